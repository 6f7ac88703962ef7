"""Crash safety and bad input through the real command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from rlnf.cli import main
from rlnf.metric_logging import read_metrics


def rl_args(model: str, corpus: dict, out: Path, *extra: str) -> list[str]:
    return ["run", "rl_finetune", "--config", "rl/grpo", f"policy.path={model}",
            f"data.train_manifest={corpus['train']}", f"output_dir={out}", "trainer.batch_size=4",
            "algorithm.num_samples=4", "trainer.progress_bar=false", "trainer.lr=3e-4", "trainer.samples_every=0",
            *extra]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_equals_an_uninterrupted_run(corpus, pretrained_tiny_nemo, tmp_path):
    common = ["trainer.max_steps=8", "trainer.save_every=1", "trainer.keep_last=2"]
    straight = tmp_path / "straight"
    assert main(rl_args(pretrained_tiny_nemo, corpus, straight, *common)) == 0

    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "rlnf.cli", *rl_args(pretrained_tiny_nemo, corpus, killed, *common)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
    state_path = killed / "checkpoints" / "trainer_state.pt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if state_path.exists() and torch.load(state_path, weights_only=True)["step"] >= 3:
                break
            if process.poll() is not None:
                pytest.fail("the training process ended before it could be killed")
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)  # at an arbitrary moment: maybe mid-write
    finally:
        process.wait(timeout=30)
    saved_step = torch.load(state_path, weights_only=True)["step"]
    assert 3 <= saved_step < 8
    assert main(rl_args(pretrained_tiny_nemo, corpus, killed, *common, "resume=true")) == 0

    final_straight = torch.load(straight / "checkpoints" / "trainer_state.pt", weights_only=True)
    final_resumed = torch.load(state_path, weights_only=True)
    assert final_resumed["step"] == 8
    for name, tensor in final_straight["model"].items():
        torch.testing.assert_close(final_resumed["model"][name], tensor, msg=name)

    def comparable(rows):
        return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]

    assert comparable(read_metrics(killed)) == comparable(read_metrics(straight))
    snapshots = sorted(p.name for p in (killed / "checkpoints").glob("step_*.nemo"))
    assert snapshots == ["step_0000007.nemo", "step_0000008.nemo"]  # the last N are kept
    assert (killed / "checkpoints" / "best.nemo").exists()


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("case, expected", [
    ("malformed_json", "bad.json:2: malformed JSON"),
    ("missing_audio_key", "bad.json:2: missing key 'audio_filepath'"),
    ("wrong_type", "bad.json:2: 'text' must be a string"),
    ("empty", "no usable utterances"),
    ("missing_file", "bad.json:2: audio file not found"),
    ("corrupt_file", "bad.json:2: cannot read audio file"),
    ("zero_samples", "bad.json:2: audio file has no samples"),
    ("missing_reference", "bad.json:2: missing key 'text' (reward 'cer' needs a reference transcript)"),
])
def test_bad_manifests_fail_before_any_model_loads(case, expected, tmp_path, capsys):
    good = tmp_path / "good.wav"
    soundfile.write(str(good), np.zeros(8000, dtype=np.float32) + 0.01, 16000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    soundfile.write(str(tmp_path / "zero.wav"), np.zeros(0, dtype=np.float32), 16000)
    first = {"audio_filepath": "good.wav", "text": "hello"}
    second = {
        "malformed_json": '{"audio_filepath": "good.wav"',
        "missing_audio_key": {"text": "x"},
        "wrong_type": {"audio_filepath": "good.wav", "text": 3},
        "missing_file": {"audio_filepath": "nope.wav", "text": "x"},
        "corrupt_file": {"audio_filepath": "corrupt.wav", "text": "x"},
        "zero_samples": {"audio_filepath": "zero.wav", "text": "x"},
        "missing_reference": {"audio_filepath": "good.wav"},
    }.get(case)
    manifest = _write(tmp_path / "bad.json", [] if case == "empty" else [first, second])
    started = time.perf_counter()
    code = main(["run", "rl_finetune", "--config", "rl/rloo", "policy.path=/nonexistent/model.nemo",
                 f"data.train_manifest={manifest}", f"output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert expected in capsys.readouterr().err
    assert time.perf_counter() - started < 10  # no model was loaded (the policy path does not even exist)


def test_skip_bad_samples_counts_instead_of_failing(tmp_path):
    from rlnf.config import DataConfig
    from rlnf.recipe_utils import load_utterances

    good = tmp_path / "good.wav"
    soundfile.write(str(good), np.zeros(8000, dtype=np.float32) + 0.01, 16000)
    manifest = _write(tmp_path / "m.json", [{"audio_filepath": "good.wav", "text": "A  B"}, "{oops",
                                            {"audio_filepath": "missing.wav"}])
    utterances, stats = load_utterances(DataConfig(train_manifest=str(manifest), skip_bad_samples=True), str(manifest),
                                        require_text=False)
    assert len(utterances) == 1 and utterances[0].text == "a b"
    assert sum(stats.skipped.values()) == 2 and "skipped" in stats.summary()


@pytest.mark.slow
def test_non_finite_loss_skips_the_update(corpus, pretrained_tiny_nemo, tmp_path, monkeypatch):
    import rlnf.rl as rl_module
    from recipes.rl_finetune import RLFinetuneRecipe
    from rlnf.config import RLFinetuneConfig, load_config

    cfg = load_config(RLFinetuneConfig, None, rl_args(pretrained_tiny_nemo, corpus, tmp_path / "run")[4:])
    recipe = RLFinetuneRecipe(cfg)
    recipe.setup()
    original = rl_module.rl_loss

    def poisoned(*args, **kwargs):
        loss, metrics = original(*args, **kwargs)
        return loss * float("nan"), metrics

    # The recipe imports rl_loss at call time, so patching the module attribute reaches it.
    monkeypatch.setattr(rl_module, "rl_loss", poisoned)
    before = {k: v.clone() for k, v in recipe.policy.model.state_dict().items()}
    batch = next(iter(recipe.stream))
    metrics, _ = recipe.train_step([batch])
    assert metrics["train/skipped_steps"] == 1
    for name, tensor in recipe.policy.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # nothing applied


def _absolute_rows(manifest: str, count: int) -> list[dict]:
    rows = [json.loads(line) for line in Path(manifest).read_text().splitlines()[:count]]
    for row in rows:
        row["audio_filepath"] = str(Path(manifest).parent / row["audio_filepath"])
    return rows


@pytest.mark.slow
def test_messy_audio_through_the_rl_command_keeps_the_work_and_resumes(corpus, pretrained_tiny_nemo, tmp_path, capsys):
    """Stereo 44.1 kHz, 8 kHz, a duplicate, a too-long clip, an empty reference and a NaN clip in one manifest: the NaN
    clip (found only when its batch loads) stops the run with a checkpoint and a message naming
    it; skip_bad_samples=true and resume=true then finish the run, counting the skipped clip."""
    rows = _absolute_rows(corpus["train"], 8)
    speech, rate = soundfile.read(rows[0]["audio_filepath"], dtype="float32")
    fine = np.interp(np.arange(0, len(speech), rate / 44100), np.arange(len(speech)), speech).astype(np.float32)
    soundfile.write(str(tmp_path / "stereo44k.wav"), np.stack([fine, fine * 0.5], axis=1), 44100)
    soundfile.write(str(tmp_path / "eight_k.wav"), speech[::2], 8000)
    poisoned = speech.copy()
    poisoned[100:200] = np.nan
    soundfile.write(str(tmp_path / "nan.wav"), poisoned, rate, subtype="FLOAT")
    soundfile.write(str(tmp_path / "long.wav"), np.zeros(rate * 30, dtype=np.float32), rate)
    soundfile.write(str(tmp_path / "hum.wav"), 0.01 * np.sin(np.arange(rate) / 5).astype(np.float32), rate)
    text = rows[0]["text"]
    extra = [{"audio_filepath": name, "text": text, "duration": 1.0} for name in
             ("stereo44k.wav", "eight_k.wav", "nan.wav", "long.wav")]
    extra.append({"audio_filepath": "hum.wav", "text": ""})  # an empty reference: a clip with no speech
    manifest = _write(tmp_path / "messy.json", [*rows, rows[0], *extra])  # relative paths + a duplicate
    nan_line = len(rows) + 4
    out = tmp_path / "run"
    args = rl_args(pretrained_tiny_nemo, corpus, out, "trainer.max_steps=6", "trainer.save_every=100",
                   "data.max_duration=20")
    args[args.index(f"data.train_manifest={corpus['train']}")] = f"data.train_manifest={manifest}"

    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"messy.json:{nan_line}" in err and "NaN" in err and "resume=true" in err
    state = torch.load(out / "checkpoints" / "trainer_state.pt", weights_only=True)
    assert state["step"] < 6 and (out / "checkpoints" / "last.nemo").exists()

    assert main([*args, "data.skip_bad_samples=true", "resume=true"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 6
    assert summary["final_metrics"]["train/skipped_clips"] >= 1
    assert "too long" in summary["train_manifest"] or "max_duration" in summary["train_manifest"]


CALLS = {"count": 0, "mode": "nan"}


def flaky_reward(inputs):
    """A user reward that goes wrong from its third call on (for the test below)."""
    CALLS["count"] += 1
    scores = [[min(1.0, len(text) / 100) for text in group] for group in inputs.hypotheses]
    if CALLS["count"] >= 3:
        if CALLS["mode"] == "raise":
            raise ConnectionError("the scoring service went away")
        if CALLS["mode"] == "nan":
            scores[0][0] = float("nan")
        elif CALLS["mode"] == "range":
            scores[0][0] = 7.0
        else:
            scores = scores[1:]
    return scores


@pytest.mark.slow
@pytest.mark.parametrize("mode, message", [
    ("nan", "rewards[0] (tests.test_reliability.flaky_reward) returned 1 NaN/infinite score(s)"),
    ("range", "rewards[0] (tests.test_reliability.flaky_reward) returned scores outside [0, 1]"),
    ("shape", "rewards[0] (tests.test_reliability.flaky_reward) returned shape (3, 4); expected [4, 4]"),
    ("raise", "rewards[0] (tests.test_reliability.flaky_reward) raised ConnectionError: the scoring service went "
              "away"),
])
def test_a_failing_reward_stops_with_a_checkpoint_of_the_last_step(mode, message, corpus, pretrained_tiny_nemo,
                                                                   tmp_path, capsys):
    CALLS.update(count=0, mode=mode)
    out = tmp_path / "run"
    args = rl_args(pretrained_tiny_nemo, corpus, out, "trainer.max_steps=10", "trainer.save_every=100",
                   "rewards=[{name: tests.test_reliability.flaky_reward}]")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "The run stopped at step 2" in err and "Traceback" not in err
    assert "Fix the reward and continue with resume=true" in err
    state = torch.load(out / "checkpoints" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2  # the two good steps are kept
    if mode == "raise":  # the full trace is in a log file inside the run's folder
        log_file = Path(err.split("(full trace: ")[1].split(")")[0])
        assert log_file.parent == out.resolve() and "ConnectionError" in log_file.read_text()
        from rlnf.io import default_file_mode

        for name in ("last.nemo", "trainer_state.pt"):  # the umask's mode, not mkstemp's 0600
            assert (out / "checkpoints" / name).stat().st_mode & 0o777 == default_file_mode(), name
