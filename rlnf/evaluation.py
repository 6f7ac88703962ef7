"""Greedy evaluation of a CTC policy: transcripts, corpus WER/CER and mean reward."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from rlnf.data.loader import AudioDataset, eval_batches
from rlnf.metrics import corpus_error_rate
from rlnf.rewards import RewardInputs, RewardSet


@dataclass
class EvalResult:
    """metrics: wer, cer (when every utterance has a reference), reward (when rewards are given and
    usable), n. rows: one dict per utterance with audio_filepath, text (reference) and pred_text."""

    metrics: dict[str, float] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)


def evaluate_policy(policy, dataset: AudioDataset, batch_size: int, device: torch.device,
                    rewards: RewardSet | None = None, autocast=None) -> EvalResult:
    """Greedy transcripts of ``dataset`` and their metrics (see ``summarize``). Gradient-free and
    rank-local: a multi-process run evaluates one shard per process and pools the rows."""
    autocast = autocast or contextlib.nullcontext
    policy.set_mode("eval")
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch in eval_batches(dataset, batch_size):
            batch = batch.to(device)
            with autocast():
                log_probs, encoded_len = policy.forward(batch.audio, batch.audio_len)
            texts = [group[0] for group in policy.greedy(log_probs.float(), encoded_len).texts]
            values: list[float | None] = [None] * len(texts)
            if rewards is not None and (not rewards.needs_references or all(r is not None for r in batch.references)):
                inputs = RewardInputs(batch.audio, batch.audio_len, policy.sample_rate, [[t] for t in texts],
                                      batch.references, [u.fields for u in batch.utterances])
                values = rewards(inputs)[0][:, 0].tolist()
            for utterance, text, value in zip(batch.utterances, texts, values):
                row = {"audio_filepath": utterance.audio_filepath, "text": utterance.text, "pred_text": text}
                if value is not None:
                    row["reward"] = value
                rows.append(row)
    return EvalResult(metrics=summarize(rows), rows=rows)


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """n; corpus wer and cer when every row has a reference; mean reward when every row has one."""
    metrics: dict[str, float] = {"n": float(len(rows))}
    references = [row["text"] for row in rows]
    hypotheses = [row["pred_text"] for row in rows]
    if rows and all(r is not None for r in references):
        metrics["wer"] = corpus_error_rate(references, hypotheses, "word")
        metrics["cer"] = corpus_error_rate(references, hypotheses, "char")
    if rows and all("reward" in row for row in rows):
        metrics["reward"] = sum(row["reward"] for row in rows) / len(rows)
    return metrics
