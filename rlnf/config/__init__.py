"""Recipe configurations: dataclasses with a default and a help string for every key.

A recipe's YAML file and ``key=value`` overrides are merged onto its dataclass schema with
OmegaConf, so an unknown key or a value of the wrong type fails *before any model loads*, with
a message naming the full key. ``__post_init__`` methods check values and cross-key rules.

    base.py      loading (``load_config``), the finite-number rule, resume rules, ``iter_keys``
    sections.py  sections several recipes share (data, trainer)
    rl.py        rl_finetune: policy, rewards, algorithm
    ctc.py       train_ctc: the model section
    reward.py    train_reward_model: the reward model (its architecture keys come from
                 ``rlnf.reward_model.architecture``), scored pairs, augmentation, hard negatives

Fields (``opt``) and value checks come from ``rlnf.schema``.

This package is light (no torch / NeMo import) so ``rlnf --help`` and config errors are instant.
"""

from rlnf.config.base import (RESUME_FIXED, RESUME_FORCE_HELP, RESUME_HELP, RunConfig, as_dictconfig, check_finite,
                              finalize_config, iter_keys, load_config, to_yaml)
from rlnf.config.ctc import CTCModelSection, CTCTrainConfig
from rlnf.config.reward import (AugmentConfig, HardNegativesConfig, RewardDataConfig, RewardModelSection,
                                RewardTrainConfig, RewardTrainerConfig)
from rlnf.config.rl import (ALGORITHM_NAMES, POLICY_DECODERS, AlgorithmConfig, PolicyConfig, RewardSpec,
                            RLFinetuneConfig)
from rlnf.config.sections import DataConfig, OptimizerTrainerConfig, TrainerConfig
from rlnf.schema import opt

__all__ = [
    "ALGORITHM_NAMES", "POLICY_DECODERS", "RESUME_FIXED", "RESUME_FORCE_HELP", "RESUME_HELP",
    "AlgorithmConfig", "AugmentConfig", "CTCModelSection", "CTCTrainConfig", "DataConfig", "HardNegativesConfig",
    "OptimizerTrainerConfig", "PolicyConfig", "RLFinetuneConfig", "RewardDataConfig", "RewardModelSection", "RunConfig",
    "RewardSpec", "RewardTrainConfig", "RewardTrainerConfig", "TrainerConfig",
    "as_dictconfig", "check_finite", "finalize_config", "iter_keys", "load_config", "opt", "to_yaml",
]
