"""Recipe configurations: dataclasses with a default and a help string for every key.

A recipe's YAML file and ``key=value`` overrides are merged onto its dataclass schema with
OmegaConf, so an unknown key or a value of the wrong type fails *before any model loads*, with
a message naming the full key. ``__post_init__`` methods check values and cross-key rules.

This module is light (no torch / NeMo import) so ``rlnf --help`` and config errors are instant.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from rlnf.errors import ConfigError
from rlnf.io import file_problem

ALGORITHM_NAMES = ("reinforce", "rloo", "grpo", "ppo", "mwer")
POLICY_DECODERS = ("auto", "ctc")  # rlnf.policy.ctc_head


def opt(default: Any = MISSING, help: str = "", factory: Any = None) -> Any:  # noqa: A002
    """A dataclass field with a default (or factory) and a help string (shown by `rlnf config`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def _check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)):  # NaN fails too
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def _check_range(key: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    if not (low <= value <= high) or (high_open and value == high):  # NaN fails too
        raise ConfigError(f"{key}={value} must be in [{low}, {high}{')' if high_open else ']'}")


def check_finite(config: Any, prefix: str = "") -> None:
    """Every float key of a config tree (lists of floats item by item) must be a finite number:
    one rule for all sections, so a key added later is covered too. Ranges are the sections' own."""
    import math

    for f in dataclasses.fields(config):
        key, value = f"{prefix}{f.name}", getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{key}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for index, item in enumerate(value):
                check_finite(item, f"{key}[{index}].")
        elif "float" in str(f.type):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, (int, float)) and not math.isfinite(item):
                    raise ConfigError(f"{key}={item} must be a finite number")


# --------------------------------------------------------------------------------------------
# Sections shared by the recipes
# --------------------------------------------------------------------------------------------
@dataclass
class PolicyConfig:
    path: str = opt(MISSING, "The CTC model to fine-tune: a local .nemo file, or a pretrained model name "
                             "(NGC / Hugging Face, needs a network).")
    batchnorm: str = opt("frozen", "BatchNorm in the RL rollout AND update: 'frozen' uses running statistics "
                                   "(old, new and reference log-probs stay comparable); 'train' updates them "
                                   "from each batch in the update.")
    dropout: bool = opt(False, "Keep dropout active in the policy update (rollouts never use dropout).")
    decoder: str = opt("auto", "Which head is the policy: 'auto' takes a CTC model's decoder, and a hybrid "
                               "RNNT/TDT-CTC model's CTC head with a warning; 'ctc' asks for the CTC head "
                               "explicitly. A hybrid's RNNT/TDT decoder and joint stay frozen; a model with no "
                               "CTC head is refused.")

    adapters: int = opt(0, "Train only LoRA-style linear adapters (NeMo LinearAdapter) of this bottleneck size, "
                           "one per encoder layer (ConformerEncoder, ConvASREncoder); the reference is the same "
                           "module with them switched off. 0 fine-tunes the whole model.")

    def __post_init__(self) -> None:
        _check_choice("policy.batchnorm", self.batchnorm, ("frozen", "train"))
        _check_choice("policy.decoder", self.decoder, POLICY_DECODERS)
        _check_positive("policy.adapters", self.adapters, allow_zero=True)
        if self.adapters and self.batchnorm == "train":
            raise ConfigError("policy.adapters needs policy.batchnorm=frozen: BatchNorm statistics updated in training "
                              "would change the model the adapters-off reference stands for")


@dataclass
class DataConfig:
    train_manifest: str = opt(MISSING, "NeMo JSONL manifest of training audio (audio_filepath, optional duration "
                                       "and text).")
    val_manifest: Optional[str] = opt(None, "Manifest for validation (greedy WER/CER when it has text, and mean "
                                            "reward). None disables validation.")
    tarred_audio_filepaths: Optional[str] = opt(None, "NeMo tarred audio dataset: the tar shards of train_manifest "
                                                      "in NeMo's syntax (e.g. audio_{0..7}.tar); train_manifest is "
                                                      "then the tarred manifest (audio_filepath: member name, "
                                                      "shard_id: its shard). null: plain audio files.")
    text_key: str = opt("text", "Manifest field holding the reference transcript (optional for RL).")
    max_duration: Optional[float] = opt(None, "Utterances longer than this many seconds are skipped (counted).")
    min_duration: float = opt(0.0, "Utterances shorter than this many seconds are skipped (counted).")
    skip_bad_samples: bool = opt(False, "Skip (and count) bad manifest lines and unreadable audio instead of "
                                        "stopping with an error naming the file and line.")
    lowercase: bool = opt(True, "Lower-case references before mapping them to the policy's vocabulary.")
    oov: str = opt("error", "References with characters outside the policy's vocabulary: 'error' (stop, naming "
                            "the line), 'skip' (skip the utterance, counted) or 'drop' (delete those "
                            "characters, counted and reported). Used where references become CTC targets.")
    bucket_size: int = opt(16, "Batches are formed from groups of batch_size * bucket_size utterances sorted by "
                               "duration, so padding stays small. 1 disables bucketing.")
    shuffle: bool = opt(True, "Shuffle training batches every epoch (seeded).")
    num_workers: int = opt(0, "DataLoader worker processes for audio loading.")
    max_val_samples: Optional[int] = opt(None, "Validate on at most this many utterances (the first ones).")
    validate: str = opt("full", "When audio files are checked: 'full' reads every distinct clip's header before "
                                "step 1 (a bad file stops the run at once, naming manifest:line); 'lazy' checks a "
                                "clip when it is first loaded (same message), trusting the manifest's durations.")
    cache_dir: Optional[str] = opt("auto", "Where validated manifests are cached (keyed by manifest path, size, "
                                           "mtime and these data keys) so a second run or a resume starts at once: "
                                           "'auto' = $RLNF_CACHE, else ~/.cache/rlnf; null disables the cache.")

    def __post_init__(self) -> None:
        _check_choice("data.oov", self.oov, ("error", "skip", "drop"))
        _check_choice("data.validate", self.validate, ("full", "lazy"))
        _check_positive("data.bucket_size", self.bucket_size)
        _check_positive("data.num_workers", self.num_workers, allow_zero=True)
        _check_positive("data.min_duration", self.min_duration, allow_zero=True)
        if self.max_duration is not None:
            _check_positive("data.max_duration", self.max_duration)


@dataclass
class OptimizerTrainerConfig:
    """The trainer keys every recipe shares (AdamW, schedule, seed, device, logging), each with its
    one check; a recipe's trainer section adds its own keys and may change a default."""

    batch_size: int = opt(8, "Utterances (pairs, for the reward model) per step.")
    lr: float = opt(1e-5, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    betas: List[float] = opt(factory=lambda: [0.9, 0.999], help="AdamW betas.")
    eps: float = opt(1e-8, "AdamW epsilon.")
    warmup_steps: int = opt(0, "Linear learning-rate warm-up steps.")
    lr_schedule: str = opt("cosine", "'cosine' (decay to min_lr_ratio * lr at the last step) or 'constant', after "
                                     "warm-up.")
    min_lr_ratio: float = opt(0.0, "Final learning rate of the cosine schedule, as a fraction of lr.")
    max_grad_norm: Optional[float] = opt(1.0, "Gradient clipping by global norm; null disables.")
    log_every: int = opt(1, "Write scalar metrics every N steps.")
    seed: int = opt(42, "Seed for sampling, data order and initialisation; CPU runs are deterministic.")
    device: str = opt("auto", "'auto' (CUDA when available), 'cpu' or 'cuda'.")
    precision: str = opt("auto", "'auto' (bf16 autocast on CUDA when supported, else fp32), 'fp32' or 'bf16'.")
    progress_bar: bool = opt(True, "Show a tqdm progress bar.")
    loggers: List[str] = opt(factory=lambda: ["tensorboard"],
                             help="Trackers besides metrics.jsonl (always written): any of 'tensorboard', 'csv' "
                                  "(metrics.csv), 'wandb' (pip install 'rlnf[wandb]'; WANDB_MODE=offline needs no "
                                  "network). [] for JSONL only.")

    def __post_init__(self) -> None:
        from rlnf.metric_logging import check_trackers  # light: numpy, no torch

        check_trackers(self.loggers, "trainer.loggers")
        for key in ("batch_size", "log_every"):
            _check_positive(f"trainer.{key}", getattr(self, key))
        _check_positive("trainer.lr", self.lr)
        _check_positive("trainer.eps", self.eps)
        _check_positive("trainer.weight_decay", self.weight_decay, allow_zero=True)
        if len(self.betas) != 2:
            raise ConfigError(f"trainer.betas must have two values, got {list(self.betas)}")
        for beta in self.betas:
            _check_range("trainer.betas", beta, 0.0, 1.0, high_open=True)
        _check_range("trainer.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_positive("trainer.warmup_steps", self.warmup_steps, allow_zero=True)
        _check_choice("trainer.lr_schedule", self.lr_schedule, ("cosine", "constant"))
        if self.max_grad_norm is not None:
            _check_positive("trainer.max_grad_norm", self.max_grad_norm)
        _check_choice("trainer.device", self.device, ("auto", "cpu", "cuda"))
        _check_choice("trainer.precision", self.precision, ("auto", "fp32", "bf16"))


@dataclass
class TrainerConfig(OptimizerTrainerConfig):
    batch_size: int = opt(8, "Utterances per step (each gets algorithm.num_samples hypotheses in RL).")
    max_steps: int = opt(1000, "Number of optimizer steps.")
    max_minutes: Optional[float] = opt(None, "Also stop (validate, checkpoint, summarise) after this many minutes of "
                                             "training: a wall-clock budget.")
    grad_accum_steps: int = opt(1, "Micro-batches of batch_size accumulated per optimizer step.")
    val_every: int = opt(100, "Validate every N steps (and at the end). 0 disables periodic validation.")
    save_every: int = opt(100, "Write checkpoints/last.nemo and the trainer state every N steps (and at the end).")
    keep_last: int = opt(0, "Also keep checkpoints/step_NNNNNNN.nemo of the last N saves (hard links; 0: only "
                            "last.nemo and best.nemo).")
    samples_every: int = opt(50, "Log a text table of sample hypotheses and a few audio clips every N steps; "
                                 "0 disables.")
    devices: Optional[int] = opt(None, "Processes per node (one per GPU; on CPU, processes). null: what torchrun or "
                                       "SLURM announce, else 1. batch_size is per process.")
    num_nodes: Optional[int] = opt(None, "Nodes. null: what torchrun or SLURM announce, else 1.")
    strategy: str = opt("ddp", "Multi-process strategy (Lightning Fabric): 'ddp', data parallel with a full "
                               "policy, reward model and reference on every process.")
    best_metric: str = opt("auto", "Validation metric that selects checkpoints/best.nemo: 'auto' is val/wer when "
                                   "the validation manifest has references, else val/reward.")
    best_mode: str = opt("auto", "'min', 'max' or 'auto' (min for wer/cer/loss metrics, max otherwise).")

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("max_steps", "grad_accum_steps"):
            _check_positive(f"trainer.{key}", getattr(self, key))
        for key in ("val_every", "save_every", "samples_every", "keep_last"):
            _check_positive(f"trainer.{key}", getattr(self, key), allow_zero=True)
        _check_choice("trainer.best_mode", self.best_mode, ("auto", "min", "max"))
        _check_choice("trainer.strategy", self.strategy, ("ddp",))
        for key in ("devices", "num_nodes"):
            if getattr(self, key) is not None:
                _check_positive(f"trainer.{key}", getattr(self, key))
        if self.max_minutes is not None:
            _check_positive("trainer.max_minutes", self.max_minutes)


@dataclass
class RewardSpec:
    name: str = opt(MISSING, "'cer' (1 - CER), 'wer' (1 - WER), 'learned' (a reward-model checkpoint) or a "
                             "dotted path 'package.module.callable' to your own reward.")
    weight: float = opt(1.0, "Weight of this reward in the total (rewards are summed with their weights).")
    path: Optional[str] = opt(None, "learned: the reward checkpoint folder.")
    device: str = opt("auto", "learned: 'auto' (CUDA when available), 'cpu' or 'cuda'.")
    batch_size: int = opt(64, "learned: (audio, hypothesis) pairs scored per forward pass.")
    kwargs: Dict[str, Any] = opt(factory=dict, help="Dotted-path rewards: keyword arguments for the callable "
                                                    "(or the class constructor).")

    def __post_init__(self) -> None:
        if self.name == "learned" and not self.path:
            raise ConfigError("rewards: a 'learned' reward needs 'path' (the reward checkpoint folder)")
        if self.name not in ("cer", "wer", "learned") and (
                "." not in self.name or not all(part.isidentifier() for part in self.name.split("."))):
            raise ConfigError(f"rewards: unknown reward name {self.name!r}; use cer, wer, learned or a dotted "
                              "path such as mypackage.rewards.my_reward")
        _check_choice("rewards[].device", self.device, ("auto", "cpu", "cuda"))
        _check_positive("rewards[].batch_size", self.batch_size)

    @property
    def label(self) -> str:
        """Short name used in metric names: reward/<label>/mean."""
        return self.name.rsplit(".", 1)[-1]


@dataclass
class AlgorithmConfig:
    name: str = opt("rloo", "Preset: reinforce | rloo | grpo | ppo | mwer. It fills every key below left at null.")
    num_samples: int = opt(8, "K: hypotheses per utterance from one encoder pass (sampled, or the beam's K best).")
    rollout: Optional[str] = opt(None, "Where the K hypotheses come from: 'sample' (the policy's samples), 'nbest' (the "
                                       "K best of a CTC prefix beam search, NeMo's) or 'mixed' (K//2 best + the rest "
                                       "sampled); nbest and mixed need policy_loss=mwer (null: preset).")
    temperature: float = opt(1.0, "Sampling temperature tau; the policy is softmax(logits / tau), for the "
                                  "rollout, the update and the reference alike.")
    advantage: Optional[str] = opt(None, "rloo | group | self_critical | none (null: the preset's).")
    scale_by_std: Optional[bool] = opt(None, "group advantage: divide by the group's reward std (null: preset).")
    whiten_advantages: bool = opt(False, "Whiten advantages over the whole batch after the group baseline.")
    policy_loss: Optional[str] = opt(None, "reinforce (-A log pi) | clipped (PPO surrogate) | mwer (expected advantage "
                                           "under pi renormalised over the K hypotheses) (null: preset).")
    ppo_epochs: Optional[int] = opt(None, "Update passes over each rollout (null: preset; >1 needs 'clipped').")
    clip_eps: float = opt(0.2, "PPO clipping epsilon (the lower side, and the upper one unless clip_eps_high is set).")
    clip_eps_high: Optional[float] = opt(None, "Upper clipping epsilon (DAPO's clip-higher, epsilon_high): the ratio is "
                                               "clipped to [1 - clip_eps, 1 + clip_eps_high]. null: clip_eps.")
    ratio: str = opt("sequence", "Importance ratio of the clipped loss: 'sequence' pi(y)/pi_old(y), or 'per_frame' "
                                 "(pi(y)/pi_old(y))^(1/T), T the encoder frames (GSPO-style length normalisation; "
                                 "use a clip_eps of about 1e-3 to 1e-2 with it).")
    resample_zero_std: int = opt(0, "Dynamic resampling: a group whose K rewards are all equal (it teaches nothing) is "
                                    "re-drawn from the same frame distributions up to this many times; 0 is off.")
    kl_coef: float = opt(0.01, "beta: weight of the KL to the frozen reference policy; 0 loads no reference.")
    kl_estimator: Optional[str] = opt(None, "exact (sum of per-frame KLs) | k1 | k3 (sequence-level, on sampled "
                                            "hypotheses) (null: preset).")
    kl_in_reward: Optional[bool] = opt(None, "Fold -beta*KL into each sample's reward (RLOO/PPO style) instead of "
                                             "adding beta*KL to the loss (null: preset).")
    kl_reduction: str = opt("sum", "'sum': KL summed over frames; 'mean': divided by the number of frames "
                                   "(a gentler, length-independent penalty).")
    kl_target: Optional[float] = opt(None, "Adaptive KL (Ziegler et al. 2019; TRL's adaptive controller): the penalised KL "
                                           "to hold (logged 'kl/penalised': exact, k1 or k3 as penalised, per frame with "
                                           "kl_reduction=mean). beta starts at kl_coef and after each step is multiplied "
                                           "by 1 + clip(KL/target - 1, -0.2, 0.2) * utterances / kl_horizon. null: beta "
                                           "stays kl_coef.")
    kl_horizon: int = opt(10000, "Adaptive KL: utterances over which beta may change by a factor of about e^0.2.")
    reference_cache_mb: float = opt(1024.0, "Keep the frozen reference's log-probs of each training utterance (CPU "
                                            "memory, least recently used out beyond this many MB), so utterances "
                                            "seen before skip the reference forward; 0 turns it off.")
    entropy_coef: float = opt(0.0, "Weight of the per-frame entropy bonus (subtracted from the loss).")
    supervised_coef: float = opt(0.0, "lambda: weight of a supervised CTC loss on references when the batch has "
                                      "them (0: pure RL).")

    def __post_init__(self) -> None:
        _check_choice("algorithm.name", self.name, ALGORITHM_NAMES)
        _check_choice("algorithm.kl_reduction", self.kl_reduction, ("sum", "mean"))
        _check_positive("algorithm.num_samples", self.num_samples)
        _check_positive("algorithm.temperature", self.temperature)
        _check_positive("algorithm.clip_eps", self.clip_eps)
        if self.clip_eps_high is not None:
            _check_positive("algorithm.clip_eps_high", self.clip_eps_high)
        _check_positive("algorithm.resample_zero_std", self.resample_zero_std, allow_zero=True)
        for key in ("kl_coef", "entropy_coef", "supervised_coef"):
            _check_positive(f"algorithm.{key}", getattr(self, key), allow_zero=True)
        _check_positive("algorithm.kl_horizon", self.kl_horizon)
        _check_positive("algorithm.reference_cache_mb", self.reference_cache_mb, allow_zero=True)
        if self.kl_target is not None:
            _check_positive("algorithm.kl_target", self.kl_target)
            if self.kl_coef <= 0:
                raise ConfigError("algorithm.kl_target needs algorithm.kl_coef > 0 (the starting beta)")

    def finalize(self) -> None:
        """Fill the keys left at null from the preset, then check the rules between keys.

        Separate from ``__post_init__`` because OmegaConf instantiates the schema's defaults.
        """
        from rlnf.algorithms import ADVANTAGE_ESTIMATORS, POLICY_LOSSES, PRESETS, RATIOS, ROLLOUTS

        for key, value in PRESETS[self.name].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        _check_choice("algorithm.advantage", self.advantage, ADVANTAGE_ESTIMATORS)
        _check_choice("algorithm.policy_loss", self.policy_loss, POLICY_LOSSES)
        _check_choice("algorithm.ratio", self.ratio, RATIOS)
        _check_choice("algorithm.rollout", self.rollout, ROLLOUTS)
        if self.rollout != "sample":
            if self.policy_loss != "mwer":
                raise ConfigError(f"algorithm.rollout={self.rollout} needs algorithm.policy_loss=mwer: a beam's best "
                                  "hypotheses are not samples of the policy, so REINFORCE or PPO on them is biased")
            if self.kl_coef > 0 and self.kl_estimator != "exact":
                raise ConfigError(f"algorithm.rollout={self.rollout} needs algorithm.kl_estimator=exact: k1 and k3 "
                                  "estimate the KL from samples of the policy")
            if self.resample_zero_std:
                raise ConfigError("algorithm.resample_zero_std re-draws samples; it needs algorithm.rollout=sample")
            if self.rollout == "mixed" and self.num_samples < 2:
                raise ConfigError("algorithm.rollout=mixed needs algorithm.num_samples >= 2")
        _check_choice("algorithm.kl_estimator", self.kl_estimator, ("exact", "k1", "k3"))
        _check_positive("algorithm.ppo_epochs", self.ppo_epochs)
        if self.advantage in ("rloo", "group") and self.num_samples < 2:
            raise ConfigError(f"algorithm.advantage={self.advantage} needs algorithm.num_samples >= 2")
        if self.ppo_epochs > 1 and self.policy_loss != "clipped":
            raise ConfigError("algorithm.ppo_epochs > 1 re-uses each rollout, which needs "
                              "algorithm.policy_loss=clipped (the unclipped loss would be off-policy)")
        if not self.kl_in_reward and self.kl_estimator == "k1" and self.kl_coef > 0:
            raise ConfigError("algorithm.kl_estimator=k1 as a loss term has zero expected gradient; use exact or k3 "
                              "in the loss, or set algorithm.kl_in_reward=true")
        if self.kl_in_reward and self.kl_estimator == "k3" and self.kl_coef > 0:
            raise ConfigError("algorithm.kl_in_reward=true with kl_estimator=k3 is refused: E[k3 * grad log pi] = "
                              "grad KL(pi||ref) - grad KL(ref||pi), which cancels to first order, so it barely pulls "
                              "towards the reference; use k1 in the reward, or k3 / exact in the loss "
                              "(kl_in_reward=false)")
        if self.kl_in_reward and self.kl_estimator == "exact" and self.kl_coef > 0:
            raise ConfigError("algorithm.kl_in_reward=true needs kl_estimator k1 or k3: the exact KL is the same "
                              "for all K samples of an utterance, so it cancels in the group baseline")


# --------------------------------------------------------------------------------------------
# Recipe configurations
# --------------------------------------------------------------------------------------------
# Keys (or sections, ending in '.') whose change on resume would change what the run is: the model
# trained and its KL reference, the training data and its order, the algorithm, the rewards; for
# the reward recipe also the held-out split, the targets and the synthetic negatives.
RESUME_FIXED = ("policy.path", "model.", "data.train_manifest", "data.tarred_audio_filepaths", "data.text_key",
                "data.lowercase", "data.oov", "algorithm.", "rewards", "trainer.seed", "data.val_split",
                "data.score_key", "data.score_scale", "data.reference_key", "hard_negatives.")
RESUME_HELP = "Continue the run in output_dir from its last trainer state."
RESUME_FORCE_HELP = ("With resume=true: accept changes to keys that change the run's meaning (policy.path, model.*, "
                     "data.train_manifest/tarred_audio_filepaths, data.text_key/lowercase/oov, algorithm.*, rewards, "
                     "trainer.seed; train_reward_model: also data.val_split/score_key/score_scale/reference_key, "
                     "hard_negatives.*), which are refused otherwise. Other changes (lr, max_steps, logging...) "
                     "are allowed, warned about and recorded in resumes.jsonl.")

@dataclass
class RLFinetuneConfig:
    """`rlnf run rl_finetune`: RL fine-tuning of a CTC policy against one or more rewards."""

    output_dir: str = opt(MISSING, "Run folder: config.yaml, metrics.jsonl, TensorBoard events, checkpoints/, "
                                   "summary.json.")
    resume: bool = opt(False, RESUME_HELP)
    resume_force: bool = opt(False, RESUME_FORCE_HELP)
    policy: PolicyConfig = opt(factory=PolicyConfig, help="The policy to fine-tune.")
    data: DataConfig = opt(factory=DataConfig, help="Training and validation data.")
    trainer: TrainerConfig = opt(factory=TrainerConfig, help="Optimisation, logging and checkpointing.")
    algorithm: AlgorithmConfig = opt(factory=AlgorithmConfig, help="The RL algorithm.")
    rewards: List[RewardSpec] = opt(factory=lambda: [RewardSpec(name="cer")],
                                    help="Rewards summed with their weights (default: 1 - CER).")

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ConfigError("rewards: give at least one reward (e.g. rewards=[{name: cer}])")
        labels = [spec.label for spec in self.rewards]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"rewards: two rewards share a name ({labels}); metric names would collide")
        if all(spec.weight == 0 for spec in self.rewards):
            raise ConfigError("rewards: every weight is 0, so every reward would be 0 and nothing would be learned; "
                              "give at least one reward a non-zero weight")


@dataclass
class CTCModelSection:
    path: Optional[str] = opt(None, "Fine-tune this .nemo (or pretrained name); null builds a new QuartzNet.")
    size: str = opt("small", "New model size: tiny | small | medium | 5x5 | 15x5 (QuartzNet 15x5, ~19M parameters).")
    labels: str = opt("english", "New model vocabulary: 'english' (a-z, space, apostrophe), 'bambara' (the Bambara "
                                 "QuartzNet's 45 symbols) or the characters themselves, e.g. 'abc '.")
    spec_augment: bool = opt(True, "SpecAugment (time/frequency masks) while training a new model.")
    dropout: float = opt(0.0, "Dropout in the encoder blocks of a new model.")

    def __post_init__(self) -> None:
        from rlnf.models import MODEL_SIZES

        _check_choice("model.size", self.size, tuple(MODEL_SIZES))
        _check_range("model.dropout", self.dropout, 0.0, 1.0, high_open=True)

    def vocabulary(self) -> List[str]:
        from rlnf.models import BAMBARA_LABELS, ENGLISH_LABELS

        return {"english": ENGLISH_LABELS, "bambara": BAMBARA_LABELS}.get(self.labels) or list(dict.fromkeys(self.labels))


@dataclass
class CTCTrainConfig:
    """`rlnf run train_ctc`: supervised CTC training or fine-tuning of a NeMo QuartzNet-style model."""

    output_dir: str = opt(MISSING, "Run folder (same layout as rl_finetune).")
    resume: bool = opt(False, RESUME_HELP)
    resume_force: bool = opt(False, RESUME_FORCE_HELP)
    model: CTCModelSection = opt(factory=CTCModelSection, help="The model to train.")
    data: DataConfig = opt(factory=DataConfig, help="Labelled training and validation data.")
    trainer: TrainerConfig = opt(factory=lambda: TrainerConfig(lr=2e-3, batch_size=16, warmup_steps=100),
                                 help="Optimisation (defaults for training from scratch: lr 2e-3, batch 16).")


@dataclass
class RewardModelSection:
    init_from: Optional[str] = opt(None, "Start from this reward checkpoint folder (ours or the published layout) "
                                         "instead of random weights.")
    tokenizer: Optional[str] = opt(None, "SentencePiece model for the transcripts; null trains one on the training "
                                         "texts (vocabulary size vocab_size).")
    vocab_size: int = opt(2048, "Text vocabulary size (the card's: 2048).")
    embed_dim: int = opt(128, "Token embedding size.")
    lstm_hidden: int = opt(128, "BiLSTM hidden size per direction.")
    lstm_layers: int = opt(1, "BiLSTM layers.")
    audio_conv_channels: int = opt(128, "Channels of the audio conv blocks.")
    audio_conv_layers: int = opt(3, "Number of Conv1d -> BatchNorm -> ReLU blocks.")
    kernel_size: int = opt(5, "Audio conv kernel size.")
    head_hidden: int = opt(256, "Hidden size of the regression head.")
    dropout: float = opt(0.1, "Dropout in the regression head.")
    pooling: str = opt("masked", "'masked' (batch-invariant) or 'legacy' (pool over padding, as published).")
    fusion: str = opt("pooled", "'pooled' (the card's: pooled audio + pooled text) or 'attention' (adds a "
                                "time-resolved token-to-frame comparison; README, Fusion).")
    attention_dim: int = opt(128, "Width of the token-to-frame attention (fusion 'attention').")
    attention_stride: int = opt(4, "Audio frames averaged per attention step (4: 40 ms; fusion 'attention').")
    ctc_head: bool = opt(False, "Add a CTC head on the audio encoder (trained on the references with "
                                "trainer.ctc_loss_weight); each transcript's CTC likelihood under the clip's audio "
                                "joins the regression head's input (README, Acoustic evidence).")
    ctc_hidden: int = opt(128, "BiLSTM hidden size per direction of the CTC head (ctc_head).")
    ctc_stride: int = opt(2, "Audio frames averaged per CTC frame (2: 20 ms; ctc_head).")
    ctc_alphabet: Optional[str] = opt(None, "null: the CTC head's labels are the text pieces; a string of letters "
                                            "(e.g. \" abcdefghijklmnopqrstuvwxyz'\"): it spells transcripts in them "
                                            "(far fewer labels to learn; ctc_head).")

    def __post_init__(self) -> None:
        _check_choice("model.pooling", self.pooling, ("masked", "legacy"))
        if self.ctc_head and self.pooling == "legacy":
            raise ConfigError("model.ctc_head needs model.pooling 'masked'")
        if self.ctc_alphabet is not None and (not self.ctc_alphabet or len(set(self.ctc_alphabet)) != len(self.ctc_alphabet)):
            raise ConfigError(f"model.ctc_alphabet={self.ctc_alphabet!r} must be a non-empty string of distinct letters")
        _check_range("model.dropout", self.dropout, 0.0, 1.0, high_open=True)
        _check_choice("model.fusion", self.fusion, ("pooled", "attention"))
        if self.fusion == "attention" and self.pooling == "legacy":
            raise ConfigError("model.fusion 'attention' needs model.pooling 'masked'")
        for key in ("vocab_size", "embed_dim", "lstm_hidden", "lstm_layers", "audio_conv_channels",
                    "audio_conv_layers", "kernel_size", "head_hidden", "attention_dim", "attention_stride", "ctc_hidden", "ctc_stride"):
            _check_positive(f"model.{key}", getattr(self, key))


@dataclass
class RewardDataConfig:
    train_manifest: str = opt(MISSING, "Manifest of scored pairs: audio_filepath, text (the transcript to score), "
                                       "score.")
    val_manifest: Optional[str] = opt(None, "Validation manifest; null holds out val_split of the training clips.")
    val_split: float = opt(0.1, "Share of training *clips* held out for validation when there is no val_manifest "
                                "(seeded).")
    text_key: str = opt("text", "Field holding the transcript to score.")
    score_key: str = opt("score", "Field holding the target score.")
    score_scale: float = opt(1.0, "Scores are divided by this (100 turns 0-100 human scores into 0-1).")
    reference_key: str = opt("reference", "Field holding the clip's correct transcript (for hard negatives); rows "
                                          "whose score is 1 serve as their own reference.")
    max_duration: Optional[float] = opt(None, "Skip clips longer than this many seconds (counted).")
    skip_bad_samples: bool = opt(False, "Skip (and count) bad lines and unreadable audio instead of stopping.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_split < 1.0:
            raise ConfigError(f"data.val_split={self.val_split} must be in [0, 1)")
        _check_positive("data.score_scale", self.score_scale)


@dataclass
class AugmentConfig:
    prob: float = opt(0.5, "Probability that a training example is augmented (each augmentation drawn separately).")
    freq_masks: int = opt(2, "Frequency masks on the log-mel features.")
    freq_width: int = opt(8, "Maximum width of a frequency mask, in mel bins.")
    time_masks: int = opt(2, "Time masks on the log-mel features (within the clip's own frames).")
    time_width: float = opt(0.05, "Maximum width of a time mask, as a fraction of the clip's frames.")
    gain_db: float = opt(6.0, "Random gain within +-gain_db dB on the waveform (never silences a clip).")
    noise_snr_db: Optional[float] = opt(20.0, "Additive white noise at this SNR (dB); null disables.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"augment.prob={self.prob} must be in [0, 1]")
        if not 0.0 <= self.time_width <= 0.5:
            raise ConfigError(f"augment.time_width={self.time_width} must be in [0, 0.5] (a clip is never masked whole)")
        _check_positive("augment.gain_db", self.gain_db, allow_zero=True)


@dataclass
class HardNegativesConfig:
    enabled: bool = opt(False, "Add synthetic hard negatives to the training pairs, scored max(0, 1 - CER) against "
                               "the reference.")
    error_rates: List[float] = opt(factory=lambda: [0.05, 0.15, 0.3, 0.6],
                                   help="Character error rates of corrupted references (substitutions, deletions, "
                                        "insertions, merged words).")
    empty: bool = opt(True, "Add the empty hypothesis (score 0).")
    truncated: bool = opt(True, "Add a truncated reference (first 30-70 % of its characters).")
    other_clip: bool = opt(True, "Add another clip's reference.")
    repeated: bool = opt(True, "Add a reference with a stuttered (repeated) word, as CTC sampling produces.")

    def __post_init__(self) -> None:
        if any(not 0.0 <= rate <= 1.0 for rate in self.error_rates):
            raise ConfigError(f"hard_negatives.error_rates must be within [0, 1], got {list(self.error_rates)}")


@dataclass
class RewardTrainerConfig(OptimizerTrainerConfig):
    """The model card's recipe by default: AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, cosine
    schedule, batch 8, 10 epochs, seed 42."""

    batch_size: int = opt(8, "Pairs per step (the card: 8).")
    lr: float = opt(1e-4, "Peak learning rate, AdamW (the card: 1e-4).")
    log_every: int = opt(10, "Write training metrics every N steps.")
    epochs: int = opt(10, "Passes over the training pairs (the card: 10).")
    rank_loss_weight: float = opt(0.0, "Weight of a margin ranking loss between transcripts of the same clip, added "
                                       "to the MSE (0: MSE only, as the card). RL's group baselines only see within-"
                                       "clip differences; use with group_by_clip so batches hold such pairs.")
    ctc_loss_weight: float = opt(0.0, "Weight of the auxiliary CTC loss of the references under model.ctc_head "
                                      "(per label, mean over the batch's clips that have a reference).")
    ctc_pretrain_epochs: int = opt(0, "Epochs of CTC-only training on the clips' references before the scored "
                                      "pairs (model.ctc_head), so the evidence means something from the first step.")
    group_by_clip: bool = opt(False, "Batch each clip's pairs together, so one audio embedding serves several pairs "
                                     "(much faster when clips have many transcripts; false: random pairs, as the card).")
    eval_every: int = opt(0, "Evaluate every N steps; 0 evaluates once per epoch.")
    best_metric: str = opt("val/pearson", "Metric selecting checkpoints/best: val/mse, val/rmse, val/r2, val/pearson, "
                                          "val/spearman or val/group_spearman (mean within-clip rank correlation); "
                                          "lower is better for mse/rmse, higher for the others.")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive("trainer.epochs", self.epochs)
        _check_positive("trainer.eval_every", self.eval_every, allow_zero=True)
        _check_choice("trainer.best_metric", self.best_metric,
                      ("val/mse", "val/rmse", "val/r2", "val/pearson", "val/spearman", "val/group_spearman"))
        _check_positive("trainer.rank_loss_weight", self.rank_loss_weight, allow_zero=True)
        _check_positive("trainer.ctc_loss_weight", self.ctc_loss_weight, allow_zero=True)
        _check_positive("trainer.ctc_pretrain_epochs", self.ctc_pretrain_epochs, allow_zero=True)


@dataclass
class RewardTrainConfig:
    """`rlnf run train_reward_model`: train a reward model on scored (audio, transcript) pairs."""

    output_dir: str = opt(MISSING, "Run folder: config.yaml, metrics.jsonl, tensorboard/, checkpoints/{best,last}/ "
                                   "(self-contained reward checkpoints), checkpoints/trainer_state.pt, summary.json.")
    resume: bool = opt(False, RESUME_HELP)
    resume_force: bool = opt(False, RESUME_FORCE_HELP)
    model: RewardModelSection = opt(factory=RewardModelSection, help="The reward model.")
    data: RewardDataConfig = opt(factory=RewardDataConfig, help="Scored training pairs.")
    augment: AugmentConfig = opt(factory=AugmentConfig, help="Training-time augmentation.")
    hard_negatives: HardNegativesConfig = opt(factory=HardNegativesConfig, help="Synthetic hard negatives.")
    trainer: RewardTrainerConfig = opt(factory=RewardTrainerConfig, help="Optimisation and evaluation.")

    def __post_init__(self) -> None:
        if (self.trainer.ctc_loss_weight > 0 or self.trainer.ctc_pretrain_epochs > 0) and not self.model.ctc_head:
            raise ConfigError("trainer.ctc_loss_weight and trainer.ctc_pretrain_epochs train a CTC head: set "
                              "model.ctc_head=true (or set them to 0)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).split("\n")[0]
    return f"{key}: {message}" if key else message


def load_config(schema: type, config_path: str | os.PathLike | None, overrides: List[str] | None = None) -> Any:
    """Merge ``config_path`` (YAML) and ``key=value`` overrides onto ``schema`` and validate.

    Returns an instance of ``schema``. Raises ``ConfigError`` naming the offending key.
    """
    base = OmegaConf.structured(schema)
    layers = [base]
    if config_path is not None:
        config_path = Path(config_path)
        problem = file_problem(config_path)
        if problem:
            raise ConfigError(f"config file {problem}: {config_path}")
        try:
            loaded = OmegaConf.load(config_path)
        except RecursionError:
            raise ConfigError(f"{config_path}: cannot parse YAML: nested too deeply") from None
        except Exception as exc:  # YAML syntax errors, bytes that are not UTF-8
            raise ConfigError(f"{config_path}: cannot parse YAML: {exc}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{config_path}: the top level must be a mapping of keys (key: value), not a "
                              f"{type(loaded).__name__.replace('Config', '').lower() or 'value'}")
        layers.append(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
    except ConfigKeyError as exc:
        raise ConfigError(f"unknown config key {_describe(exc)}") from None
    except (ValidationError, OmegaConfBaseException) as exc:
        raise ConfigError(f"bad config value {_describe(exc)}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"required config key(s) not set: {', '.join(missing)}")
    try:
        config = OmegaConf.to_object(merged)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"required config key not set: {_describe(exc)}") from None
    except ValidationError as exc:
        raise ConfigError(f"bad config value {_describe(exc)}") from None
    check_finite(config)
    return finalize_config(config)


def finalize_config(config: Any) -> Any:
    """Call ``finalize()`` on every nested config section that has one (idempotent); returns ``config``."""
    if dataclasses.is_dataclass(config):
        for f in dataclasses.fields(config):
            finalize_config(getattr(config, f.name))
        if hasattr(config, "finalize"):
            config.finalize()
    elif isinstance(config, list):
        for item in config:
            finalize_config(item)
    return config


def to_yaml(config: Any) -> str:
    """The resolved configuration as YAML (what a run writes to config.yaml)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def iter_keys(schema: type, prefix: str = "") -> List[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf key of a schema, for docs and `rlnf config`."""
    rows: List[tuple[str, Any, str]] = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING)
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None) or (
                dataclasses.is_dataclass(default) and not isinstance(default, type)):
            rows.extend(iter_keys(type(default), prefix=f"{key}."))
        else:
            if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
                default = [dataclasses.asdict(item) for item in default]
            rows.append((key, "(required)" if default is MISSING else default, f.metadata.get("help", "")))
    return rows


def as_dictconfig(config: Any) -> DictConfig:
    return OmegaConf.structured(config)
