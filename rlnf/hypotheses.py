"""Where a rollout's K hypotheses per utterance come from: samples of the policy, the N-best list
of a CTC prefix beam search, or both (``algorithm.rollout``). Each source draws from one set of
(tempered) frame log-probs [B, T, V], so no encoder pass is repeated.

Sampling is keyed per utterance (``sampling_uniforms``): an utterance gets the same samples whatever
else shares its batch and whichever process it lands on; re-draw n of a group uses its key + (n,).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from rlnf.policy import CTCPolicy, Samples

__all__ = ["sampling_uniforms", "HypothesisSource", "PolicySamples", "BeamList", "BeamAndSamples",
           "hypothesis_source"]


def sampling_uniforms(keys: Sequence[Sequence[int]], encoded_len: torch.Tensor, num_samples: int,
                      frames: int | None = None) -> torch.Tensor:
    """Uniform draws [B, K, T] for ``ctc.sample_alignments``, one independent stream per utterance.

    Row b depends only on ``keys[b]`` (e.g. (seed, step, micro-batch, manifest line)) and its own
    ``encoded_len[b]``: an utterance gets the same samples whatever else shares its batch, how the
    batch is padded, and how a global batch is split over processes. Frames past encoded_len are 0.
    """
    lengths = encoded_len.tolist()
    frames = int(max(lengths, default=0)) if frames is None else frames
    uniforms = torch.zeros(len(lengths), num_samples, frames)
    for row, (key, length) in enumerate(zip(keys, lengths)):
        seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        uniforms[row, :, :length] = torch.rand(num_samples, int(length), generator=generator)
    return uniforms.to(encoded_len.device)


class HypothesisSource:
    """K hypotheses per utterance from frame log-probs. ``draw(..., attempt=n)`` with n >= 1 is the
    n-th re-draw of those utterances: new samples for the sampling sources (a beam's list is the same
    every time, so the config allows dynamic resampling with ``rollout: sample`` only)."""

    def __init__(self, num_samples: int):
        self.num_samples = num_samples

    def draw(self, policy: CTCPolicy, log_probs: torch.Tensor, encoded_len: torch.Tensor,
             keys: Sequence[Sequence[int]] | None, generator: torch.Generator | None, attempt: int = 0) -> Samples:
        raise NotImplementedError


class PolicySamples(HypothesisSource):
    """K alignments sampled from the per-frame categoricals, collapsed to transcripts."""

    def draw(self, policy, log_probs, encoded_len, keys, generator, attempt=0):
        return sample(policy, log_probs, encoded_len, self.num_samples, keys, generator, attempt)


class BeamList(HypothesisSource):
    """The K most likely distinct transcripts of a CTC prefix beam search (MWER's N-best list)."""

    def draw(self, policy, log_probs, encoded_len, keys, generator, attempt=0):
        return policy.nbest(log_probs, encoded_len, self.num_samples)


class BeamAndSamples(HypothesisSource):
    """The K // 2 best of a beam search, then K - K // 2 samples."""

    def draw(self, policy, log_probs, encoded_len, keys, generator, attempt=0):
        best = self.num_samples // 2
        drawn = sample(policy, log_probs, encoded_len, self.num_samples - best, keys, generator, attempt)
        return policy.nbest(log_probs, encoded_len, best).concat(drawn)


def sample(policy: CTCPolicy, log_probs: torch.Tensor, encoded_len: torch.Tensor, num_samples: int,
           keys: Sequence[Sequence[int]] | None, generator: torch.Generator | None, attempt: int) -> Samples:
    """``num_samples`` samples per utterance, from per-utterance keyed uniforms when ``keys`` are given
    (re-draw ``attempt`` n >= 1 keyed by key + (n,)), else from ``generator``."""
    uniforms = None
    if keys is not None:
        keys = keys if attempt == 0 else [(*key, attempt) for key in keys]
        uniforms = sampling_uniforms(keys, encoded_len, num_samples, frames=log_probs.shape[1])
    return policy.sample(log_probs, encoded_len, num_samples, generator, uniforms)


SOURCES: dict[str, type[HypothesisSource]] = {"sample": PolicySamples, "nbest": BeamList, "mixed": BeamAndSamples}


def hypothesis_source(rollout: str, num_samples: int) -> HypothesisSource:
    """The source named by ``algorithm.rollout``."""
    return SOURCES[rollout](num_samples)
