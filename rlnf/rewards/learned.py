"""The ``learned`` reward: a frozen reward-model checkpoint scoring (audio, hypothesis) pairs through
``rlnf.reward_model.scorer.RewardScorer`` (audio embedded once per utterance, repeats scored once)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlnf.reward_model.scorer import RewardScorer

if TYPE_CHECKING:  # the package imports this module: no import back at run time
    from rlnf.rewards import RewardInputs


class LearnedReward:
    """Reward-contract adapter around ``RewardScorer`` (no references needed)."""

    needs_references = False
    name = "learned"

    def __init__(self, checkpoint: str | Path, device: str = "auto", batch_size: int = 64, device_key: str = "--device"):
        self.scorer = RewardScorer(checkpoint, device=device, batch_size=batch_size, device_key=device_key)

    def __call__(self, inputs: "RewardInputs") -> torch.Tensor:
        return self.scorer.score_groups(inputs.audio, inputs.audio_len, inputs.sample_rate, inputs.hypotheses)
