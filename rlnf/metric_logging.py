"""One metric-logger interface with TensorBoard and JSONL back ends.

    run_dir/metrics.jsonl      one JSON object per logged step: {"step": N, "<metric>": value, ...}
    run_dir/samples.jsonl      text tables of sample hypotheses: {"step": N, "tag": ..., "text": ...}
    run_dir/tensorboard/       TensorBoard events (scalars, sample tables as text, audio clips)

On resume from step S, rows with step > S are dropped from the JSONL files and TensorBoard
events after S are purged, so a resumed run's logs read as if it had never stopped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rlnf.io import atomic_write_text


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line + "\n")
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
    atomic_write_text(path, "".join(kept))


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else (1e308 if value > 0 else -1e308)
    return value


class MetricLogger:
    """Interface: scalars, text and audio, keyed by step."""

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_text(self, tag: str, text: str, step: int) -> None:
        pass

    def log_audio(self, tag: str, audio: np.ndarray, sample_rate: int, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class NullLogger(MetricLogger):
    """Logs nothing: the logger of every process but rank 0 in a multi-process run."""

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        pass


class JsonlLogger(MetricLogger):
    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        self.samples_path = Path(run_dir) / "samples.jsonl"
        if resume_step is not None:
            _truncate_jsonl(self.metrics_path, resume_step)
            _truncate_jsonl(self.samples_path, resume_step)
        else:
            for path in (self.metrics_path, self.samples_path):
                path.unlink(missing_ok=True)
        self._metrics = open(self.metrics_path, "a", encoding="utf-8")
        self._samples: Any = None

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": int(step), **{key: _plain(value) for key, value in metrics.items()}}
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self._samples is None:
            self._samples = open(self.samples_path, "a", encoding="utf-8")
        self._samples.write(json.dumps({"step": int(step), "tag": tag, "text": text}, ensure_ascii=False) + "\n")
        self._samples.flush()

    def close(self) -> None:
        self._metrics.close()
        if self._samples is not None:
            self._samples.close()


class TensorBoardLogger(MetricLogger):
    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        purge_step = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step)

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            value = _plain(value)
            if isinstance(value, (int, float)) and value is not None:
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def log_text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, global_step=step)

    def log_audio(self, tag: str, audio: np.ndarray, sample_rate: int, step: int) -> None:
        self.writer.add_audio(tag, np.clip(audio, -1.0, 1.0), global_step=step, sample_rate=sample_rate)

    def close(self) -> None:
        self.writer.close()


class MultiLogger(MetricLogger):
    def __init__(self, loggers: Sequence[MetricLogger]):
        self.loggers = list(loggers)

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_dict(metrics, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for logger in self.loggers:
            logger.log_text(tag, text, step)

    def log_audio(self, tag: str, audio: np.ndarray, sample_rate: int, step: int) -> None:
        for logger in self.loggers:
            logger.log_audio(tag, audio, sample_rate, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_logger(run_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True) -> MetricLogger:
    loggers: list[MetricLogger] = [JsonlLogger(run_dir, resume_step)]
    if tensorboard:
        loggers.append(TensorBoardLogger(run_dir, resume_step))
    return MultiLogger(loggers)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (rendered by TensorBoard's text tab); pipes in cells are escaped."""
    def cell(value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ") or " "

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (for reports and tests)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
