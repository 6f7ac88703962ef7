"""Multi-process training: the pieces (pooling, sharding, per-utterance sampling, global whitening)
against brute force, then a real 2-process gloo run against a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rlnf import algorithms, ctc
from rlnf.distributed import launcher_layout, pool_metrics, resolve_layout, shard_bounds
from rlnf.hypotheses import sampling_uniforms
from tests.test_bpe_and_options import bpe_nemo  # noqa: F401  (fixture)


def test_pool_metrics_equals_statistics_of_the_union():
    generator = np.random.default_rng(0)
    parts = [generator.normal(size=(n, 4)) for n in (3, 1, 5)]  # uneven shards of [B_r, K] rewards
    per_rank = [({"reward/mean": float(p.mean()), "reward/std": float(p.std(ddof=1)) if p.size > 1 else 0.0,
                  "kl": float(p[:, 0].mean())}, len(p)) for p in parts]
    pooled = pool_metrics(per_rank, std_scale=4)
    union = np.concatenate(parts)
    assert pooled["reward/mean"] == pytest.approx(union.mean(), rel=1e-12)
    assert pooled["reward/std"] == pytest.approx(union.std(ddof=1), rel=1e-12)
    assert pooled["kl"] == pytest.approx(union[:, 0].mean(), rel=1e-12)
    # A key only some processes report is pooled over those.
    assert pool_metrics([({"a": 1.0}, 2), ({"a": 4.0, "b": 7.0}, 1)]) == {"a": 2.0, "b": 7.0}


@pytest.mark.parametrize("count,world", [(7, 2), (8, 3), (3, 3), (16, 4)])
def test_shards_partition_the_global_batch(count, world):
    bounds = [shard_bounds(count, rank, world) for rank in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == count
    assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world - 1))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_train_stream_shards_are_the_single_process_batches(tmp_path):
    from rlnf.data.loader import AudioDataset, TrainStream
    from rlnf.data.manifest import Utterance

    utterances = [Utterance(str(tmp_path / f"{i}.wav"), 1.0 + 0.1 * i, None, "m.json", i + 1) for i in range(23)]
    dataset = AudioDataset(utterances, 16000)

    def stream(rank=0, world=1, batch_size=4):
        return TrainStream(dataset, batch_size, bucket_size=2, shuffle=True, seed=3, rank=rank, world_size=world)

    single = stream()._epoch_batches()
    shards = [stream(rank, 2, batch_size=2)._epoch_batches() for rank in range(2)]
    assert [a + b for a, b in zip(*shards)] == [batch for batch in single if len(batch) >= 2]
    assert any(len(a) != len(b) for a, b in zip(*shards))  # this epoch has uneven shards
    tiny = [stream(rank, 4, batch_size=2)._epoch_batches() for rank in range(4)]
    assert all(len(batch) >= 1 for shard in tiny for batch in shard)  # tails smaller than 4 are left out


def test_an_utterance_samples_the_same_alone_or_in_a_padded_batch():
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(3, 12, 6, generator=generator), dim=-1)
    encoded_len = torch.tensor([12, 7, 9])
    keys = [(42, 5, 0, 11), (42, 5, 0, 12), (42, 5, 0, 13)]
    batch = ctc.sample_alignments(log_probs, encoded_len, 5, 0,
                                  uniforms=sampling_uniforms(keys, encoded_len, 5))
    for row in range(3):
        length = int(encoded_len[row])
        alone = ctc.sample_alignments(log_probs[row:row + 1, :length], encoded_len[row:row + 1], 5, 0,
                                      uniforms=sampling_uniforms(keys[row:row + 1], encoded_len[row:row + 1], 5))
        assert torch.equal(alone[0], batch[row, :, :length])
    other_step = sampling_uniforms([(42, 6, 0, 11)], encoded_len[:1], 5)
    assert not torch.equal(other_step, sampling_uniforms(keys[:1], encoded_len[:1], 5))


def test_whitening_over_processes_equals_whitening_the_global_batch():
    generator = torch.Generator().manual_seed(1)
    parts = [torch.randn(3, 4, generator=generator), torch.randn(1, 4, generator=generator)]

    def stats(values):
        flat = values.double().reshape(-1)
        return torch.stack([flat.new_tensor(flat.numel()), flat.sum(), (flat * flat).sum()])

    expected = algorithms.whiten(torch.cat(parts))
    for index, part in enumerate(parts):
        other = stats(parts[1 - index])
        got = algorithms.whiten(part, all_reduce_sum=lambda local: local + other)
        rows = slice(0, 3) if index == 0 else slice(3, 4)
        torch.testing.assert_close(got, expected[rows], rtol=1e-5, atol=1e-6)


def test_layout_comes_from_torchrun_or_slurm_when_not_set():
    assert launcher_layout({}) is None
    torchrun = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "RANK": "5"}
    assert launcher_layout(torchrun) == (4, 2)
    assert launcher_layout({"SLURM_NTASKS": "6", "SLURM_NNODES": "3", "SLURM_JOB_NAME": "rl"}) == (2, 3)
    assert launcher_layout({"SLURM_NTASKS": "6", "SLURM_NNODES": "3", "SLURM_JOB_NAME": "bash"}) is None
    assert resolve_layout(None, None, torchrun) == (4, 2)
    assert resolve_layout(2, None, {}) == (2, 1)


def test_multi_process_settings_are_checked_before_anything_loads(tmp_path, capsys):
    from rlnf.cli import main

    args = ["run", "rl_finetune", "--config", "rl/grpo", "policy.path=x.nemo", "data.train_manifest=x.json",
            f"output_dir={tmp_path / 'out'}"]
    assert main([*args, "trainer.strategy=fsdp"]) == 2
    assert "trainer.strategy" in capsys.readouterr().err
    assert main([*args, "trainer.devices=0"]) == 2
    assert "trainer.devices" in capsys.readouterr().err


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(corpus, pretrained_tiny_nemo, tmp_path):
    """rank 0 and rank 1 each take half of every global batch of 4 (one batch of 3 splits 1 + 2), with
    gradient accumulation over 2 micro-batches; the result equals one process with batch 4.

    The batch of 3 comes last (no shuffling): float rounding differs between one and two processes
    (another padding, another summation order, ~1e-7), and at this learning rate (KL 55 nats by step
    3) such a difference can flip one sampled label of a later step, after which the runs rightly
    differ. With the short batch first, that happened at step 3 (reward/mean 0.5211 against 0.5215
    while the gradient norms of steps 1 and 2 agreed to 1e-7)."""
    from rlnf.metric_logging import read_metrics

    lines = Path(corpus["train"]).read_text().splitlines()[:23]  # 23: the epoch ends with a batch of 3
    train = Path(corpus["train"]).with_name("train_23.json")  # beside the corpus: its audio paths are relative
    train.write_text("\n".join(lines) + "\n")

    def args(out: Path, batch_size: int, *extra: str) -> list[str]:
        return ["run", "rl_finetune", "--config", "rl/grpo", f"policy.path={pretrained_tiny_nemo}",
                f"data.train_manifest={train}", f"data.val_manifest={corpus['val']}", f"output_dir={out}",
                f"trainer.batch_size={batch_size}", "trainer.grad_accum_steps=2", "trainer.max_steps=3",
                "trainer.save_every=1", "trainer.val_every=3", "trainer.samples_every=0", "trainer.lr=3e-3",
                "trainer.lr_schedule=constant", "trainer.warmup_steps=0", "trainer.eps=1e-3",
                "trainer.progress_bar=false", "data.bucket_size=2", "algorithm.num_samples=4",
                "algorithm.whiten_advantages=true", "data.shuffle=false", *extra]

    # Both runs as commands with one thread per process: another thread count sums in another order,
    # and such ~1e-6 differences can grow past the tolerance over three steps of this learning rate.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = tmp_path / "single"
    alone = subprocess.run([sys.executable, "-m", "rlnf.cli", *args(single, 4)], capture_output=True, text=True,
                           timeout=400, env=env, cwd=Path(__file__).parents[1])
    assert alone.returncode == 0, alone.stderr[-3000:]

    double = tmp_path / "double"
    result = subprocess.run([sys.executable, "-m", "rlnf.cli", *args(double, 2, "trainer.devices=2")],
                            capture_output=True, text=True, timeout=400, env=env, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["step"] == 3
    assert result.stdout.count('"world_size"') == 1  # only rank 0 reports
    # Every save checked that both processes hold identical parameters (it raises otherwise);
    # the parameters also equal the single-process run's.
    final_single = torch.load(single / "checkpoints" / "trainer_state.pt", weights_only=True)
    final_double = torch.load(double / "checkpoints" / "trainer_state.pt", weights_only=True)
    assert final_double["step"] == 3
    gap = max(float((final_double["model"][name] - tensor).abs().max()) for name, tensor in final_single["model"].items())
    from rlnf.policy import CTCPolicy

    initial = CTCPolicy.load(pretrained_tiny_nemo).model.state_dict()
    moved = max(float((final_single["model"][name] - initial[name]).abs().max()) for name in final_single["model"])
    assert gap < 1e-6 < 1e-3 < moved, (gap, moved)  # equal up to float summation order, and training moved them
    rows_single, rows_double = read_metrics(single), read_metrics(double)
    assert [row["step"] for row in rows_double] == [1, 2, 3]
    for a, b in zip(rows_single, rows_double):
        for key in ("reward/mean", "reward/std", "kl", "advantage/std", "loss/policy", "loss/kl", "grad_norm",
                    "val/wer", "val/cer", "val/n"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert rows_double[-1]["val/n"] == rows_single[-1]["val/n"] == len(Path(corpus["val"]).read_text().splitlines())


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_after_a_checkpoint_and_resume_continues(corpus, tiny_nemo, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "rlnf.cli", "run", "rl_finetune", "--config", "rl/grpo", f"policy.path={tiny_nemo}",
            f"data.train_manifest={corpus['train']}", f"output_dir={out}", "trainer.batch_size=2",
            "algorithm.num_samples=4", "trainer.progress_bar=false", "trainer.samples_every=0", "trainer.devices=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([*args, "trainer.max_steps=1000", "trainer.save_every=1"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).parents[1])
    state_path = out / "checkpoints" / "trainer_state.pt"
    try:
        deadline = time.time() + 240
        while not (state_path.exists() and torch.load(state_path, weights_only=True)["step"] >= 2):
            assert parent.poll() is None and time.time() < deadline, "the run ended or stalled before the signal"
            time.sleep(0.1)
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGTERM)  # rank 1 only: Fabric started it as rank 0's child
        _, stderr = parent.communicate(timeout=120)
    finally:
        parent.kill()
    assert parent.returncode == 130, stderr[-2000:]
    assert "stopped by signal on another process" in stderr  # rank 0 stopped because rank 1 was signalled
    stopped = torch.load(state_path, weights_only=True)["step"]
    resumed = subprocess.run([*args, f"trainer.max_steps={stopped + 2}", "resume=true"], capture_output=True,
                             text=True, env=env, timeout=240, cwd=Path(__file__).parents[1])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.load(state_path, weights_only=True)["step"] == stopped + 2


@pytest.mark.slow
def test_two_processes_with_a_bpe_policy_ppo_epochs_and_training_batchnorm(corpus, bpe_nemo, tmp_path):
    """The paths the first test does not take: a BPE model, PPO's second forward per update epoch
    (through DDP), BatchNorm statistics and dropout in training mode. Every save checks that the two
    processes hold identical parameters, so finishing is the test."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rlnf.cli", "run", "rl_finetune", "--config", "rl/ppo", f"policy.path={bpe_nemo}",
         f"data.train_manifest={corpus['train']}", f"output_dir={out}", "trainer.batch_size=2",
         "algorithm.num_samples=4", "trainer.max_steps=3", "trainer.save_every=1", "trainer.samples_every=0",
         "trainer.progress_bar=false", "policy.batchnorm=train", "policy.dropout=true", "trainer.devices=2"],
        capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout[result.stdout.index("{"):])["world_size"] == 2
