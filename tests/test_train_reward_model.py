"""Reward-model training stopped (SIGKILL, SIGTERM) and resumed through the command ends where an
uninterrupted run ends: the same weights, the same logged metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlnf.cli import main
from rlnf.metric_logging import read_metrics
from tests.test_reward_model import scored_manifest

REPO = Path(__file__).resolve().parents[1]
STATE = Path("checkpoints") / "trainer_state.pt"


@pytest.fixture(scope="module")
def tiny_scored(corpus, tmp_path_factory) -> Path:
    """The scored pairs of the corpus's first 6 clips (a reference and its corruptions each)."""
    folder = tmp_path_factory.mktemp("reward_resume")
    rows = scored_manifest(corpus["train"], folder / "all.json").read_text().splitlines()
    clips = list(dict.fromkeys(json.loads(row)["audio_filepath"] for row in rows))[:6]
    kept = [row for row in rows if json.loads(row)["audio_filepath"] in clips]
    path = folder / "scored.json"
    path.write_text("\n".join(kept) + "\n")
    return path


def reward_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    """A tiny reward model trained with every source of randomness on: waveform gain and noise,
    feature masks, dropout, synthetic hard negatives, shuffled pairs."""
    return ["run", "train_reward_model", "--config", "reward/card", f"data.train_manifest={manifest}",
            f"output_dir={out}", "data.score_scale=100", "data.val_split=0.34", "model.vocab_size=64",
            "model.embed_dim=16", "model.lstm_hidden=16", "model.audio_conv_channels=16", "model.head_hidden=32",
            "hard_negatives.enabled=true", "trainer.batch_size=8", "trainer.epochs=4", "trainer.eval_every=2",
            "trainer.log_every=1", "trainer.lr=1e-3", "trainer.device=cpu", "trainer.progress_bar=false", *extra]


@pytest.fixture(scope="module")
def straight(tiny_scored, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reward_straight") / "run"
    assert main(reward_args(tiny_scored, out)) == 0
    return out


def start_and_wait_for_a_checkpoint(manifest: Path, out: Path) -> subprocess.Popen:
    """The training command in a subprocess, returned once its trainer state holds step >= 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the same threads as this process: the same float sums
    process = subprocess.Popen([sys.executable, "-m", "rlnf.cli", *reward_args(manifest, out)], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((out / STATE).exists() and torch.load(out / STATE, weights_only=True)["step"] >= 2):
        if process.poll() is not None:
            pytest.fail(f"the training ended before it could be stopped: {process.stderr.read()[-2000:]}")
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    return process


def assert_same_run(resumed: Path, straight: Path) -> None:
    final_straight = torch.load(straight / STATE, weights_only=True)
    final_resumed = torch.load(resumed / STATE, weights_only=True)
    assert final_resumed["step"] == final_straight["step"]
    for name, tensor in final_straight["model"].items():
        assert torch.equal(final_resumed["model"][name], tensor), name

    def comparable(rows):
        return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]

    assert comparable(read_metrics(resumed)) == comparable(read_metrics(straight))
    summaries = [json.loads((run / "summary.json").read_text()) for run in (resumed, straight)]
    assert comparable([summaries[0]["final_metrics"]]) == comparable([summaries[1]["final_metrics"]])
    assert summaries[0]["best_value"] == summaries[1]["best_value"]
    assert (resumed / "checkpoints" / "best" / "model.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_then_resume_equals_an_uninterrupted_reward_training(tiny_scored, straight, tmp_path):
    killed = tmp_path / "killed"
    process = start_and_wait_for_a_checkpoint(tiny_scored, killed)
    os.kill(process.pid, signal.SIGKILL)  # at an arbitrary moment: maybe mid-write
    process.communicate(timeout=30)
    total = torch.load(straight / STATE, weights_only=True)["step"]
    assert 2 <= torch.load(killed / STATE, weights_only=True)["step"] < total
    assert main(reward_args(tiny_scored, killed, "resume=true")) == 0
    assert_same_run(killed, straight)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_resume_continues(tiny_scored, straight, tmp_path):
    stopped = tmp_path / "stopped"
    process = start_and_wait_for_a_checkpoint(tiny_scored, stopped)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "stopped by signal" in stderr and "resume=true" in stderr
    step = torch.load(stopped / STATE, weights_only=True)["step"]
    assert step >= 2 and (stopped / "checkpoints" / "last" / "model.safetensors").is_file()
    assert main(reward_args(tiny_scored, stopped, "resume=true")) == 0
    assert_same_run(stopped, straight)


def test_a_reward_run_refuses_a_change_of_its_targets_on_resume(tiny_scored, straight, tmp_path, capsys):
    """The run-folder checks of the other recipes: data.score_scale changes what is learned."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    assert main(reward_args(tiny_scored, copy, "resume=true", "data.score_scale=10")) == 2
    err = capsys.readouterr().err
    assert "data.score_scale: 100.0 -> 10.0" in err and "resume_force=true" in err
