"""One metric-logger interface; JSONL always, and the trackers named in ``trainer.loggers``.

    run_dir/metrics.jsonl      always: one JSON object per logged step: {"step": N, "<metric>": value, ...}
    run_dir/samples.jsonl      always: tables of sample hypotheses: {"step": N, "tag": ..., "text": ...}
    run_dir/tensorboard/       'tensorboard' (the default): scalars, sample tables as text, audio clips
    run_dir/metrics.csv        'csv': one row per logged step, one column per metric
    run_dir/wandb/             'wandb': scalars, sample tables as wandb.Table, audio clips (WANDB_MODE=offline
                               keeps it all on disk; ``wandb sync`` uploads it later)

On resume from step S, rows with step > S are dropped from the JSONL and CSV files and TensorBoard
events after S are purged, so a resumed run's logs read as if it had never stopped. A wandb run
continues under the same id; wandb keeps the steps after S it already holds (its steps only rise).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rlnf.errors import ConfigError
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

    def log_table(self, tag: str, header: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """A table (the sample hypotheses); as Markdown text unless the back end has real tables."""
        self.log_text(tag, markdown_table(header, rows), step)

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
    def __init__(self, run_dir: str | Path, resume_step: int | None = None, config: Any = None):
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


class CsvLogger(MetricLogger):
    """run_dir/metrics.csv: one row per logged step, one column per metric, empty where a metric was
    not logged that step (val/* between validations). A metric first seen later widens the header:
    the file is rewritten then (a few times per run), so that pandas or a spreadsheet reads it whole."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, config: Any = None):
        self.path = Path(run_dir) / "metrics.csv"
        self.columns: list[str] = ["step"]
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or self.columns)
                rows = [row for row in reader if _csv_step(row) is not None and _csv_step(row) <= resume_step]
        self._rewrite(rows)

    def _rewrite(self, rows: Sequence[Mapping[str, Any]]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path, text.getvalue())

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        row = {"step": int(step), **{key: _plain(value) for key, value in metrics.items()}}
        new = [key for key in row if key not in self.columns]
        if new:
            with open(self.path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            self.columns += new
            self._rewrite(rows + [row])
            return
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, self.columns, lineterminator="\n").writerow(row)


def _csv_step(row: Mapping[str, str]) -> int | None:
    try:
        return int(row["step"])
    except (KeyError, TypeError, ValueError):
        return None  # a line cut by a kill mid-write


class WandbLogger(MetricLogger):
    """Weights & Biases: the run's config, scalars, sample tables and audio. Files go to run_dir/wandb/.
    wandb's own environment variables choose the rest: WANDB_MODE=offline (no network; ``wandb sync
    run_dir/wandb/offline-run-*`` uploads later), WANDB_PROJECT (default 'rlnf'), WANDB_ENTITY."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, config: Any = None):
        import wandb
        from omegaconf import OmegaConf

        run_dir = Path(run_dir)
        # The id is kept in the run folder so that resume=true continues the same wandb run.
        id_file = run_dir / "wandb" / "run_id"
        id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        self.wandb = wandb
        # create_new: this run neither takes over nor finishes a wandb run the caller already has open.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "rlnf"), name=run_dir.name, dir=str(run_dir),
                              id=run_id, resume="allow", reinit="create_new",
                              config=None if config is None else OmegaConf.to_container(OmegaConf.structured(config)))

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        scalars = {key: value for key, value in ((k, _plain(v)) for k, v in metrics.items())
                   if isinstance(value, (int, float))}
        self.run.log(scalars, step=int(step))

    def log_table(self, tag: str, header: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        # Cells left "" (no reward for a reference row) become None, so a numeric column stays numeric.
        data = [[None if cell == "" else cell for cell in row] for row in rows]
        self.run.log({tag: self.wandb.Table(columns=list(header), data=data, allow_mixed_types=True)}, step=int(step))

    def log_audio(self, tag: str, audio: np.ndarray, sample_rate: int, step: int) -> None:
        self.run.log({tag: self.wandb.Audio(np.clip(audio, -1.0, 1.0), sample_rate=sample_rate)}, step=int(step))

    def close(self) -> None:
        self.run.finish()


# trainer.loggers: name -> back end, each built as cls(run_dir, resume_step, config); and how to
# install the package an optional one needs.
TRACKERS: dict[str, type[MetricLogger]] = {"tensorboard": TensorBoardLogger, "csv": CsvLogger, "wandb": WandbLogger}
OPTIONAL_TRACKERS = {"wandb": "pip install 'rlnf[wandb]'"}


def check_trackers(names: Sequence[str], key: str = "trainer.loggers") -> None:
    """Fail before any model loads when a tracker is unknown or its package is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"{key}: unknown logger {name!r}; choose from {', '.join(TRACKERS)} "
                              "(metrics.jsonl is always written)")
        if name in OPTIONAL_TRACKERS and importlib.util.find_spec(name) is None:
            raise ConfigError(f"{key}: logger {name!r} needs the {name} package: {OPTIONAL_TRACKERS[name]}")


class MultiLogger(MetricLogger):
    def __init__(self, loggers: Sequence[MetricLogger]):
        self.loggers = list(loggers)

    def log_dict(self, metrics: Mapping[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log_dict(metrics, step)

    def log_text(self, tag: str, text: str, step: int) -> None:
        for logger in self.loggers:
            logger.log_text(tag, text, step)

    def log_table(self, tag: str, header: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        for logger in self.loggers:
            logger.log_table(tag, header, rows, step)

    def log_audio(self, tag: str, audio: np.ndarray, sample_rate: int, step: int) -> None:
        for logger in self.loggers:
            logger.log_audio(tag, audio, sample_rate, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_logger(run_dir: str | Path, config: Any, resume_step: int | None = None) -> MetricLogger:
    """metrics.jsonl and samples.jsonl, plus each tracker in ``config.trainer.loggers``; ``config``
    is the recipe's resolved config (wandb records it with the run)."""
    names = list(dict.fromkeys(config.trainer.loggers))
    check_trackers(names)
    return MultiLogger([JsonlLogger(run_dir, resume_step)] +
                       [TRACKERS[name](run_dir, resume_step, config) for name in names])


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
