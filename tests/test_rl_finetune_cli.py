"""End to end through the CLI (in-process): `rlnf run rl_finetune` with each preset on a tiny QuartzNet."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from rlnf.cli import main
from rlnf.metric_logging import read_metrics

REQUIRED_METRICS = [
    "reward/mean", "reward/std", "reward/cer/mean", "kl", "entropy", "loss/policy", "loss/kl", "loss/total",
    "advantage/mean", "ppo/clip_ratio", "rollout/frac_zero_std", "rollout/hyp_len", "rollout/blank_ratio",
    "rollout/empty_ratio", "lr", "grad_norm", "perf/utterances_per_s", "perf/step_time",
]
VAL_METRICS = ["val/wer", "val/cer", "val/reward"]


def run_args(model: str, corpus: dict, out: Path, *extra: str) -> list[str]:
    return ["run", "rl_finetune", "--config", f"rl/{extra[0]}" if extra and "=" not in extra[0] else "rl/rloo",
            f"policy.path={model}", f"data.train_manifest={corpus['train']}", f"data.val_manifest={corpus['val']}",
            f"output_dir={out}", "trainer.batch_size=4", "algorithm.num_samples=4", "trainer.val_every=2",
            "trainer.save_every=2", "trainer.samples_every=2", "trainer.progress_bar=false", "trainer.lr=3e-4",
            *[e for e in extra if "=" in e]]


def tensorboard_tags(run_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    return set(tags["scalars"]) | set(tags["tensors"]) | set(tags.get("audio", []))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["reinforce", "rloo", "grpo", "ppo"])
def test_each_preset_runs_logs_and_checkpoints(preset, corpus, pretrained_tiny_nemo, tmp_path):
    out = tmp_path / preset
    assert main(run_args(pretrained_tiny_nemo, corpus, out, preset, "trainer.max_steps=3")) == 0

    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3]  # one object per logged step
    for name in REQUIRED_METRICS:
        assert all(name in row for row in rows), name
    for name in VAL_METRICS:
        assert name in rows[1] and name in rows[2], name  # validated at step 2 and at the end
    assert rows[0]["kl"] == 0.0  # the rollout policy is the reference before the first update
    assert rows[2]["kl"] > 0.0
    assert 0.0 <= rows[2]["val/wer"] and 0.0 <= rows[2]["val/reward"] <= 1.0

    tags = tensorboard_tags(out)
    assert {"reward/mean", "kl", "val/wer", "loss/total"} <= tags
    assert any(tag.startswith("samples") for tag in tags) and any(tag.startswith("audio/") for tag in tags)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and "reference" in samples[0]["text"] and "sample 0" in samples[0]["text"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 3 and summary["best_metric"] == "val/wer"
    config_text = (out / "config.yaml").read_text()
    assert f"name: {preset}" in config_text and "advantage:" in config_text

    from nemo.collections.asr.models import ASRModel

    for name in ("best.nemo", "last.nemo"):
        restored = ASRModel.restore_from(str(out / "checkpoints" / name), map_location="cpu")
        assert restored.decoder.num_classes_with_blank == 29


@pytest.mark.slow
def test_existing_run_is_not_overwritten(corpus, pretrained_tiny_nemo, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(pretrained_tiny_nemo, corpus, out, "trainer.max_steps=1")) == 0
    assert main(run_args(pretrained_tiny_nemo, corpus, out, "trainer.max_steps=2")) == 2
    assert "resume=true" in capsys.readouterr().err
    assert main(run_args(pretrained_tiny_nemo, corpus, out, "trainer.max_steps=2", "resume=true")) == 0
    assert [row["step"] for row in read_metrics(out)] == [1, 2]


class InterruptingCER:
    """1 - CER, and a SIGINT to this process on the n-th training call (as a pre-emption would)."""

    needs_references = True
    calls = 0

    def __init__(self, at_call: int):
        self.at_call = at_call

    def __call__(self, batch):
        from rlnf.rewards import ErrorRateReward

        if batch.num_samples > 1:
            type(self).calls += 1
            if type(self).calls == self.at_call:
                os.kill(os.getpid(), signal.SIGINT)
        return ErrorRateReward("char")(batch)


@pytest.mark.slow
def test_interrupt_then_resume_equals_an_uninterrupted_run(corpus, pretrained_tiny_nemo, tmp_path):
    common = ["trainer.max_steps=4", "trainer.save_every=100", "trainer.samples_every=0",
              "rewards=[{name: tests.test_rl_finetune_cli.InterruptingCER, kwargs: {at_call: %d}}]"]
    straight = tmp_path / "straight"
    InterruptingCER.calls = 0
    assert main(run_args(pretrained_tiny_nemo, corpus, straight, *common[:-1], common[-1] % 999)) == 0

    stopped = tmp_path / "stopped"
    InterruptingCER.calls = 0
    code = main(run_args(pretrained_tiny_nemo, corpus, stopped, *common[:-1], common[-1] % 2))
    assert code == 128 + signal.SIGINT
    state = torch.load(stopped / "checkpoints" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 2  # the step in flight finished and was checkpointed
    # The reward's test-only trigger (at_call) changes, and rewards are a key resume guards: force it.
    assert main(run_args(pretrained_tiny_nemo, corpus, stopped, *common[:-1], common[-1] % 999, "resume=true",
                         "resume_force=true")) == 0

    final_straight = torch.load(straight / "checkpoints" / "trainer_state.pt", weights_only=True)
    final_resumed = torch.load(stopped / "checkpoints" / "trainer_state.pt", weights_only=True)
    assert final_resumed["step"] == final_straight["step"] == 4
    for name, tensor in final_straight["model"].items():
        torch.testing.assert_close(final_resumed["model"][name], tensor, msg=name)

    def comparable(rows):
        return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]

    assert comparable(read_metrics(stopped)) == comparable(read_metrics(straight))


@pytest.mark.slow
@pytest.mark.parametrize("preset, penalised", [("grpo", "kl"), ("rloo", "kl/k1")])
def test_adaptive_kl_moves_beta_by_the_penalised_kl_and_resumes_with_it(preset, penalised, corpus,
                                                                         pretrained_tiny_nemo, tmp_path):
    """The controller steers the KL that is penalised: the exact alignment KL for grpo, the k1
    estimate on the samples for rloo (k1 in the reward), not the exact KL in both."""
    from rlnf.algorithms import adaptive_kl_coef

    out = tmp_path / "adaptive"
    extra = [preset, "algorithm.kl_coef=0.05", "algorithm.kl_target=0.5", "algorithm.kl_horizon=16",
             "trainer.samples_every=0", "trainer.val_every=0"]
    assert main(run_args(pretrained_tiny_nemo, corpus, out, *extra, "trainer.max_steps=3")) == 0
    assert main(run_args(pretrained_tiny_nemo, corpus, out, *extra, "trainer.max_steps=5", "resume=true")) == 0
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["kl/coef"] == 0.05 and rows[0]["kl"] == 0.0
    for row in rows:
        assert row["kl/penalised"] == pytest.approx(row[penalised], rel=1e-6, abs=1e-9)
    if preset == "rloo":
        assert any(abs(row["kl/k1"] - row["kl"]) > 1e-6 for row in rows[1:])  # the two KLs differ
    for before, after in zip(rows, rows[1:]):  # across the resume too: beta is in the trainer state
        expected = adaptive_kl_coef(before["kl/coef"], before["kl/penalised"], 0.5, 16, 4)
        assert after["kl/coef"] == pytest.approx(expected, rel=1e-9)
    assert rows[1]["kl/coef"] < 0.05  # KL 0 < target at step 1: beta went down


@pytest.mark.slow
def test_second_epoch_takes_reference_log_probs_from_the_cache(corpus, pretrained_tiny_nemo, tmp_path):
    out = tmp_path / "cached"
    assert main(run_args(pretrained_tiny_nemo, corpus, out, "trainer.max_steps=12", "trainer.val_every=0",
                         "trainer.save_every=0", "trainer.samples_every=0")) == 0
    rows = read_metrics(out)
    rates = [row["perf/ref_cache_hit_rate"] for row in rows]
    assert rates[0] == 0.0 and rates[-1] == 1.0  # 32 utterances, batch 4: step 12 is in the second epoch
    off = tmp_path / "uncached"
    assert main(run_args(pretrained_tiny_nemo, corpus, off, "trainer.max_steps=1", "trainer.val_every=0",
                         "algorithm.reference_cache_mb=0")) == 0
    assert "perf/ref_cache_hit_rate" not in read_metrics(off)[0]


@pytest.mark.slow
def test_per_frame_ratio_clip_higher_and_dynamic_resampling_through_the_command(corpus, pretrained_tiny_nemo,
                                                                                tmp_path):
    out = tmp_path / "options"
    assert main(run_args(pretrained_tiny_nemo, corpus, out, "ppo", "trainer.max_steps=2", "trainer.val_every=0",
                         "trainer.samples_every=0", "algorithm.ratio=per_frame", "algorithm.clip_eps=0.005",
                         "algorithm.clip_eps_high=0.01", "algorithm.resample_zero_std=2")) == 0
    rows = read_metrics(out)
    for row in rows:
        for key in ("ppo/clip_ratio_low", "ppo/clip_ratio_high", "rollout/frac_uninformative_before",
                    "rollout/frac_uninformative", "perf/resample_time", "kl/penalised"):
            assert key in row and row[key] == row[key], key  # present and not NaN
        assert row["rollout/frac_uninformative"] <= row["rollout/frac_uninformative_before"]
    assert "ratio: per_frame" in (out / "config.yaml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("rollout", ["nbest", "mixed"])
def test_mwer_on_beam_lists_through_the_command(rollout, corpus, pretrained_tiny_nemo, tmp_path):
    out = tmp_path / rollout
    assert main(run_args(pretrained_tiny_nemo, corpus, out, "mwer", "trainer.max_steps=2", "trainer.val_every=0",
                         "trainer.samples_every=2", f"algorithm.rollout={rollout}")) == 0
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert 0 < row["mwer/list_mass"] <= 1 and math.isfinite(row["loss/total"])
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples  # the sample table holds the beam's hypotheses
