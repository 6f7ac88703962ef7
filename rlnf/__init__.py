"""rlnf: reinforcement-learning fine-tuning of NeMo CTC speech-recognition models against a learned reward.

The Python API (``rlnf.api``, docs/python-api.md)::

    rlnf.finetune(policy="m.nemo", train_manifest="audio.json", output_dir="runs/x", rewards=[my_fn, "cer"])
    rlnf.train_reward_model(train_pairs="pairs.jsonl", output_dir="runs/rm", config="reward/listening")
    rlnf.evaluate(model="runs/x/checkpoints/best.nemo", manifest="test.json")

Heavy modules load on first use, so ``import rlnf`` stays fast:
``from rlnf import RewardModel, RewardConfig`` imports transformers only then.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "finetune": "rlnf.api",
    "train_reward_model": "rlnf.api",
    "evaluate": "rlnf.api",
    "score": "rlnf.api",
    "adapt_batchnorm": "rlnf.api",
    "adapt_suta": "rlnf.api",
    "scored_pairs": "rlnf.api",
    "rl_config": "rlnf.api",
    "reward_model_config": "rlnf.api",
    "RewardInputs": "rlnf.rewards",
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


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
