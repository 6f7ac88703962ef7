"""On CUDA under bf16 autocast: the policy's and the learned reward's forwards agree with fp32 on the
CPU, and RL steps with the learned reward run, stay finite and write checkpoints that load on a CPU.

Selected with ``-m cuda`` (scripts/gpu_check.sh runs them); skipped where torch sees no CUDA device.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_reward_model import trained_reward  # noqa: F401  (a fixture: the reward model trained via the CLI)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def val_batch(corpus, size: int):
    from rlnf.data.loader import AudioDataset, collate
    from rlnf.data.manifest import read_manifest

    utterances, _ = read_manifest(corpus["val"])
    return collate([AudioDataset(utterances, 16000)[i] for i in range(size)])


def test_policy_log_probs_under_bf16_match_fp32(pretrained_tiny_nemo, corpus):
    from rlnf.policy import CTCPolicy
    from rlnf.training import autocast

    batch = val_batch(corpus, 4)
    log_probs = {}
    for device, dtype in (("cpu", None), ("cuda", torch.bfloat16)):
        policy = CTCPolicy.load(pretrained_tiny_nemo, device)
        policy.set_mode("eval")
        with torch.no_grad(), autocast(torch.device(device), dtype):
            values, encoded_len = policy.forward(batch.audio.to(device), batch.audio_len.to(device))
        log_probs[device] = (values.float().cpu(), encoded_len.cpu())
    assert torch.equal(log_probs["cpu"][1], log_probs["cuda"][1])
    probs = {device: values.exp() for device, (values, _) in log_probs.items()}
    # bf16 keeps 8 bits of mantissa. Emulated with CPU autocast, the largest per-frame probability
    # difference was 0.022 on this model; 0.1 leaves room for other kernels and still fails a broken cast.
    assert (probs["cuda"] - probs["cpu"]).abs().max() < 0.1


def test_learned_reward_under_bf16_matches_fp32(trained_reward, corpus):  # noqa: F811
    from rlnf.reward_model.scorer import RewardScorer

    best = trained_reward / "checkpoints" / "best"
    batch = val_batch(corpus, 4)
    hypotheses = [[u.text, u.text[: len(u.text) // 2], "", "the the the"] for u in batch.utterances]
    on_cuda = RewardScorer(best, device="cuda")
    assert on_cuda.autocast_dtype == torch.bfloat16
    bf16 = on_cuda.score_groups(batch.audio, batch.audio_len, 16000, hypotheses)
    fp32_cuda = on_cuda.score_pairs_separately(batch.audio, batch.audio_len, 16000, hypotheses)
    fp32_cpu = RewardScorer(best, device="cpu").score_groups(batch.audio, batch.audio_len, 16000, hypotheses)
    assert torch.isfinite(bf16).all()
    torch.testing.assert_close(fp32_cuda, fp32_cpu, atol=1e-3, rtol=1e-3)
    assert (bf16 - fp32_cpu).abs().max() < 0.05  # 0.002 with CPU autocast, on scores in [0, 1]


# The rewards come back on the CPU and must meet CUDA tensors nowhere: in the policy loss (grpo: KL as a
# loss term), in the KL shaping (rloo: KL in the reward), in the self-critical baseline and the re-draws.
@pytest.mark.parametrize("preset, extra", [("grpo", ()), ("rloo", ()), ("reinforce", ("algorithm.resample_zero_std=2",))])
def test_rl_steps_with_the_learned_reward_on_cuda_bf16(trained_reward, corpus, pretrained_tiny_nemo,  # noqa: F811
                                                       tmp_path, preset, extra):
    from nemo.collections.asr.models import ASRModel

    from rlnf.cli import main
    from rlnf.metric_logging import read_metrics
    from tests.test_rl_finetune_cli import run_args

    out = tmp_path / "run"
    reward = trained_reward / "checkpoints" / "best"
    assert main(run_args(pretrained_tiny_nemo, corpus, out, preset, "trainer.max_steps=4", "trainer.device=cuda",
                         "trainer.precision=bf16", f"rewards=[{{name: learned, path: '{reward}', device: cuda}}]",
                         *extra)) == 0
    rows = read_metrics(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        for key in ("loss/total", "loss/policy", "reward/mean", "kl", "entropy", "grad_norm"):
            assert row[key] is not None and math.isfinite(row[key]), (row["step"], key, row[key])
    assert rows[-1]["kl"] > 0 and rows[-1]["train/skipped_steps"] == 0
    restored = ASRModel.restore_from(str(out / "checkpoints" / "last.nemo"), map_location="cpu")
    assert all(parameter.device.type == "cpu" for parameter in restored.parameters())
