"""A BPE CTC policy (EncDecCTCModelBPE), the supervised term, and gradient accumulation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlnf.cli import main
from rlnf.metric_logging import read_metrics


@pytest.fixture(scope="session")
def bpe_nemo(tmp_path_factory, nemo_quiet, bpe_tokenizer_dir) -> str:
    """A tiny EncDecCTCModelBPE (QuartzNet) with the in-process SentencePiece tokenizer, saved as .nemo."""
    from rlnf.models import build_family_model

    path = tmp_path_factory.mktemp("bpe") / "bpe.nemo"
    build_family_model("quartznet", tokenizer_dir=bpe_tokenizer_dir, seed=0).save_to(str(path))
    return str(path)


def test_bpe_policy_samples_decodes_and_scores(bpe_nemo, tmp_path):
    from rlnf import ctc
    from rlnf.policy import CTCPolicy, labels_to_padded

    policy = CTCPolicy.load(bpe_nemo)
    assert policy.tokenizer is not None and policy.blank_id == policy.model.decoder.num_classes_with_blank - 1
    policy.set_mode("rollout")
    audio = torch.randn(2, 16000) * 0.1
    lengths = torch.tensor([16000, 12000])
    with torch.no_grad():
        log_probs, encoded_len = policy.forward(audio, lengths)
    samples = policy.sample(log_probs, encoded_len, 3, torch.Generator().manual_seed(0))
    assert len(samples.texts) == 2 and all(isinstance(t, str) for t in samples.texts[0])
    seq = ctc.sequence_log_probs(log_probs, encoded_len, samples.labels, samples.label_len, policy.blank_id)
    assert torch.isfinite(seq).all()
    ids = policy.encode_text("and the lord said")
    assert policy.decode(*labels_to_padded([ids])) == ["and the lord said"]
    policy.save(tmp_path / "copy.nemo")
    assert CTCPolicy.load(str(tmp_path / "copy.nemo")).tokenizer is not None


@pytest.mark.slow
def test_bpe_policy_through_rl_finetune(bpe_nemo, corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "rl_finetune", "--config", "rl/grpo", f"policy.path={bpe_nemo}",
                 f"data.train_manifest={corpus['train']}", f"output_dir={out}", "trainer.max_steps=2",
                 "trainer.batch_size=2", "algorithm.num_samples=3", "trainer.progress_bar=false",
                 "algorithm.supervised_coef=0.1"]) == 0
    rows = read_metrics(out)
    assert len(rows) == 2 and all("loss/supervised" in row for row in rows)


@pytest.mark.slow
def test_supervised_term_and_gradient_accumulation(pretrained_tiny_nemo, corpus, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "rl_finetune", "--config", "rl/rloo", f"policy.path={pretrained_tiny_nemo}",
                 f"data.train_manifest={corpus['train']}", f"output_dir={out}", "trainer.max_steps=2",
                 "trainer.batch_size=2", "trainer.grad_accum_steps=3", "algorithm.num_samples=4",
                 "algorithm.supervised_coef=0.5", "trainer.progress_bar=false"]) == 0
    rows = read_metrics(out)
    assert all(row["loss/supervised"] > 0 for row in rows)
    # 3 micro-batches of 2 utterances per optimizer step.
    state = torch.load(out / "checkpoints" / "trainer_state.pt", weights_only=True)
    assert state["data"]["batch_in_epoch"] + state["data"]["epoch"] * 12 == 2 * 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2
