"""Edge-case audio and references through the real commands: pure silence, CTC-infeasible references."""

from __future__ import annotations

import json
from pathlib import Path

import math

import numpy as np
import pytest
import soundfile

from rlnf.cli import main
from rlnf.metric_logging import read_metrics


def _manifest_with(corpus: dict, tmp_path: Path, extra_rows: list[dict]) -> Path:
    base = Path(corpus["train"]).parent
    rows = [json.loads(line) for line in Path(corpus["train"]).read_text().splitlines()][:3]
    rows = [{**r, "audio_filepath": str(base / r["audio_filepath"])} for r in rows] + extra_rows
    manifest = tmp_path / "m.json"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.mark.slow
def test_pure_silence_trains_without_nan(corpus, pretrained_tiny_nemo, tmp_path):
    silence = tmp_path / "silence.wav"
    soundfile.write(str(silence), np.zeros(24000, dtype=np.float32), 16000)
    manifest = _manifest_with(corpus, tmp_path, [{"audio_filepath": str(silence), "text": "and the lord"}])
    out = tmp_path / "run"
    assert main(["run", "rl_finetune", "--config", "rl/grpo", f"policy.path={pretrained_tiny_nemo}",
                 f"data.train_manifest={manifest}", f"output_dir={out}", "trainer.max_steps=2", "trainer.batch_size=4",
                 "algorithm.num_samples=4", "trainer.progress_bar=false", "data.shuffle=false"]) == 0
    rows = read_metrics(out)
    assert all(math.isfinite(row["loss/total"]) and math.isfinite(row["kl"]) for row in rows)
    assert rows[-1]["train/skipped_steps"] == 0


@pytest.mark.slow
def test_ctc_infeasible_reference_is_counted_not_fatal(corpus, tmp_path):
    # 0.2 s of audio (about 10 frames after stride 2) with a 120-character reference: no alignment exists.
    short = tmp_path / "short.wav"
    soundfile.write(str(short), (0.05 * np.random.default_rng(0).standard_normal(3200)).astype(np.float32), 16000)
    manifest = _manifest_with(corpus, tmp_path, [{"audio_filepath": str(short), "text": "and it came to pass " * 6}])
    out = tmp_path / "ctc"
    assert main(["run", "train_ctc", "--config", "ctc/small", f"data.train_manifest={manifest}", f"output_dir={out}",
                 "model.size=tiny", "trainer.max_steps=2", "trainer.batch_size=4", "trainer.log_every=1",
                 "trainer.progress_bar=false", "data.shuffle=false"]) == 0
    rows = read_metrics(out)
    assert max(row["train/infeasible"] for row in rows) > 0  # counted
    assert all(math.isfinite(row["train/loss"]) for row in rows) and rows[-1]["train/skipped_steps"] == 0
