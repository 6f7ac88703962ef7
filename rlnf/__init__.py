"""rlnf: reinforcement-learning fine-tuning of NeMo CTC speech-recognition models against a learned reward.

Heavy modules load on first use, so ``import rlnf`` stays fast:
``from rlnf import RewardModel, RewardConfig`` imports transformers only then.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "RewardModel": "rlnf.reward_model.modeling",
    "RewardConfig": "rlnf.reward_model.modeling",
    "RewardProcessor": "rlnf.reward_model.processor",
    "CTCPolicy": "rlnf.policy",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rlnf' has no attribute {name!r}")
