"""The ``learned`` reward: frozen reward-model checkpoints scoring (audio, hypothesis) pairs through
``rlnf.reward_model.scorer.RewardScorer`` (audio embedded once per utterance, repeats scored once).

One checkpoint gives its score. Several (an ensemble) give ``ensemble_score``: their mean minus
``std_coef`` times their spread, the conservative reward of reward-model-ensemble RLHF work (Coste et
al. 2024, Eisenstein et al. 2024): a hypothesis the members disagree on is one the policy may be
exploiting in one of them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from rlnf.reward_model.scorer import RewardScorer

if TYPE_CHECKING:  # the package imports this module: no import back at run time
    from rlnf.rewards import RewardInputs


def ensemble_score(scores: torch.Tensor, std_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """scores [M, B, K] of M reward models -> (mean - std_coef * std, clamped at 0; std), each [B, K].
    std is the population std over the M members (0 for one member)."""
    mean = scores.mean(dim=0)
    std = scores.std(dim=0, correction=0)
    return (mean - std_coef * std).clamp(min=0.0), std


class LearnedReward:
    """Reward-contract adapter around one ``RewardScorer`` per checkpoint (no references needed).
    With several checkpoints, ``diagnostics`` holds the last call's ensemble std [B, K] (logged as
    reward/<label>/ensemble_std/mean)."""

    needs_references = False
    name = "learned"

    def __init__(self, checkpoints: str | Path | Sequence[str | Path], device: str = "auto", batch_size: int = 64,
                 device_key: str = "--device", std_coef: float = 0.0):
        paths = [checkpoints] if isinstance(checkpoints, (str, Path)) else list(checkpoints)
        self.scorers = [RewardScorer(path, device=device, batch_size=batch_size, device_key=device_key)
                        for path in paths]
        self.std_coef = std_coef
        self.diagnostics: dict[str, torch.Tensor] = {}

    @property
    def scorer(self) -> RewardScorer:
        """The first (for one checkpoint, the only) scorer."""
        return self.scorers[0]

    def __call__(self, inputs: "RewardInputs") -> torch.Tensor:
        scores = [scorer.score_groups(inputs.audio, inputs.audio_len, inputs.sample_rate, inputs.hypotheses)
                  for scorer in self.scorers]
        if len(scores) == 1:
            return scores[0]
        combined, std = ensemble_score(torch.stack(scores), self.std_coef)
        self.diagnostics = {"ensemble_std": std}
        return combined
