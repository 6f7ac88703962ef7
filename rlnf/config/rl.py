"""`rlnf run rl_finetune`: the policy, the rewards, the RL algorithm and their recipe config."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from rlnf.config.base import RunConfig
from rlnf.config.sections import DataConfig, TrainerConfig
from rlnf.errors import ConfigError
from rlnf.schema import check_choice, check_positive, opt

# The smallest KL coefficient the benchmark found safe against a learned reward (0.01 was exploited).
SAFE_LEARNED_KL_COEF = 0.05
ALGORITHM_NAMES = ("reinforce", "rloo", "grpo", "ppo", "mwer")
# Above this clip_eps the per-frame ratio practically never clips (on 200 frames: |log rho| > 10 nats).
PER_FRAME_CLIP_WARNING = 0.05
log = logging.getLogger(__name__)
POLICY_DECODERS = ("auto", "ctc")  # rlnf.policy.ctc_head
# A reward given to rlnf.finetune as a Python object: 'python:<module>.<qualname>' (rlnf.rewards.register_reward).
IN_PROCESS_PREFIX = "python:"


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
        check_choice("policy.batchnorm", self.batchnorm, ("frozen", "train"))
        check_choice("policy.decoder", self.decoder, POLICY_DECODERS)
        check_positive("policy.adapters", self.adapters, allow_zero=True)
        if self.adapters and self.batchnorm == "train":
            raise ConfigError("policy.adapters needs policy.batchnorm=frozen: BatchNorm statistics updated in training "
                              "would change the model the adapters-off reference stands for")



@dataclass
class RewardSpec:
    name: str = opt(MISSING, "'cer' (1 - CER), 'wer' (1 - WER), 'learned' (a reward-model checkpoint) or a "
                             "dotted path 'package.module.callable' to your own reward (a module in the working "
                             "folder is found too). 'python:<module>.<name>' records a Python object given to "
                             "rlnf.finetune; only that Python process can run it.")
    weight: float = opt(1.0, "Weight of this reward in the total (rewards are summed with their weights).")
    path: Optional[str] = opt(None, "learned: the reward checkpoint folder.")
    paths: List[str] = opt(factory=list, help="learned: several reward checkpoint folders instead of 'path', scored "
                                              "as an ensemble: the reward is their mean score minus std_coef times "
                                              "their std (population), clamped at 0. Train the members with "
                                              "different trainer.seed (or data).")
    std_coef: float = opt(0.0, "learned with 'paths': k in mean - k * std over the ensemble's scores. 0 is the "
                               "plain mean; about 1 penalises hypotheses the members disagree on, which resists "
                               "over-optimising any one reward model (reward-model ensembles in RLHF).")
    device: str = opt("auto", "learned: 'auto' (CUDA when available), 'cpu' or 'cuda'.")
    batch_size: int = opt(64, "learned: (audio, hypothesis) pairs scored per forward pass.")
    kwargs: Dict[str, Any] = opt(factory=dict, help="Dotted-path rewards: keyword arguments for the callable "
                                                    "(or the class constructor).")

    def __post_init__(self) -> None:
        if self.name == "learned" and not self.path and not self.paths:
            raise ConfigError("rewards: a 'learned' reward needs 'path' (the reward checkpoint folder), e.g. "
                              "'rewards=[{name: learned, path: REWARD_RUN/checkpoints/best}]', or 'paths' (an "
                              "ensemble of them)")
        self._check_ensemble()
        if self.name.startswith(IN_PROCESS_PREFIX):
            if not all(part.isidentifier() for part in self.name[len(IN_PROCESS_PREFIX):].split(".")):
                raise ConfigError(f"rewards: {self.name!r}: a Python reward's name must be dotted identifiers after "
                                  f"{IN_PROCESS_PREFIX!r}")
        elif self.name not in ("cer", "wer", "learned") and (
                "." not in self.name or not all(part.isidentifier() for part in self.name.split("."))):
            raise ConfigError(f"rewards: unknown reward name {self.name!r}; use cer, wer, learned or a dotted "
                              "path such as mypackage.rewards.my_reward")
        check_choice("rewards[].device", self.device, ("auto", "cpu", "cuda"))
        check_positive("rewards[].batch_size", self.batch_size)

    def _check_ensemble(self) -> None:
        if self.paths and self.name != "learned":
            raise ConfigError(f"rewards: {self.name!r}: 'paths' is for the 'learned' reward (an ensemble of reward "
                              "checkpoints)")
        if self.paths and self.path:
            raise ConfigError("rewards: a 'learned' reward takes 'path' (one checkpoint) or 'paths' (an ensemble), "
                              "not both")
        if len(self.paths) == 1:
            raise ConfigError("rewards: 'paths' names an ensemble: give two or more checkpoints (or one as 'path')")
        if len(set(self.paths)) != len(self.paths):
            raise ConfigError(f"rewards: 'paths' lists a checkpoint twice: {list(self.paths)}")
        if not math.isfinite(self.std_coef) or self.std_coef < 0:
            raise ConfigError(f"rewards[].std_coef: must be a finite number >= 0, got {self.std_coef}")
        if self.std_coef and not self.paths:
            raise ConfigError(f"rewards: {self.name!r}: std_coef is for a 'learned' ensemble: give its checkpoints as "
                              "'paths' (one model has no spread to penalise)")

    @property
    def label(self) -> str:
        """Short name used in metric names: reward/<label>/mean."""
        return self.name.removeprefix(IN_PROCESS_PREFIX).rsplit(".", 1)[-1]


@dataclass
class AlgorithmConfig:
    name: str = opt("grpo", "Preset: reinforce | rloo | grpo | ppo | mwer. It fills every key below left at null "
                            "(grpo: the benchmark's validated setting).")
    num_samples: int = opt(8, "K: hypotheses per utterance from one encoder pass (sampled, or the beam's K best).")
    rollout: Optional[str] = opt(None, "Where the K hypotheses come from: 'sample' (the policy's samples), 'nbest' (the "
                                       "K best of a CTC prefix beam search, NeMo's) or 'mixed' (K//2 best + the rest "
                                       "sampled); nbest and mixed need policy_loss=mwer (null: preset).")
    temperature: float = opt(1.0, "Sampling temperature tau; the policy is softmax(logits / tau), for the "
                                  "rollout, the update and the reference alike.")
    advantage: Optional[str] = opt(None, "rloo | group | self_critical | none (null: the preset's).")
    scale_by_std: Optional[bool] = opt(None, "group advantage: divide by the group's reward std (null: preset).")
    whiten_advantages: bool = opt(False, "Whiten advantages over the step's whole batch (every micro-batch and "
                                         "process: one mean and std) after the group baseline. The step's rollouts "
                                         "then all run before its first update, which runs a forward of its own.")
    policy_loss: Optional[str] = opt(None, "reinforce (-A log pi) | clipped (PPO surrogate) | mwer (expected advantage "
                                           "under pi renormalised over the K hypotheses) (null: preset).")
    ppo_epochs: Optional[int] = opt(None, "Update passes over each rollout (null: preset; >1 needs 'clipped').")
    clip_eps: float = opt(0.2, "PPO clipping epsilon (the lower side, and the upper one unless clip_eps_high is set).")
    clip_eps_high: Optional[float] = opt(None, "Upper clipping epsilon (DAPO's clip-higher, epsilon_high): the ratio is "
                                               "clipped to [1 - clip_eps, 1 + clip_eps_high]. null: clip_eps. Clipped "
                                               "loss only.")
    ratio: str = opt("sequence", "Importance ratio of the clipped loss: 'sequence' pi(y)/pi_old(y), or 'per_frame' "
                                 "(pi(y)/pi_old(y))^(1/T), T the encoder frames (GSPO-style length normalisation; "
                                 "use a clip_eps of about 1e-3 to 1e-2 with it: a wider range warns, since it "
                                 "would practically never clip). Clipped loss only.")
    resample_zero_std: int = opt(0, "Dynamic resampling: a group whose advantages are all 0 (it teaches nothing: equal "
                                    "shaped rewards, or all equal to the greedy one's) is re-drawn from the same "
                                    "frame distributions up to this many times; 0 is off.")
    kl_coef: float = opt(0.05, "beta: weight of the KL to the frozen reference policy; 0 loads no reference. "
                               "With a learned reward, below 0.05 warns (0.01 was exploited in the benchmark).")
    kl_estimator: Optional[str] = opt(None, "exact (sum of per-frame KLs, one value per utterance; in the loss) | k1 "
                                            "(log pi(y) - log pi_ref(y) per sample; in the reward) | k3 ((r - 1) - log "
                                            "r per sample, r = pi_ref(y)/pi(y); in the loss, as w * k3) (null: preset). "
                                            "See rlnf/kl.py.")
    kl_in_reward: Optional[bool] = opt(None, "Fold -beta*KL into each sample's reward (RLOO/PPO style) instead of "
                                             "adding beta*KL to the loss (null: preset). Must match the estimator: "
                                             "true for k1, false for exact and k3.")
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
        check_choice("algorithm.name", self.name, ALGORITHM_NAMES)
        check_choice("algorithm.kl_reduction", self.kl_reduction, ("sum", "mean"))
        check_positive("algorithm.num_samples", self.num_samples)
        check_positive("algorithm.temperature", self.temperature)
        check_positive("algorithm.clip_eps", self.clip_eps)
        if self.clip_eps_high is not None:
            check_positive("algorithm.clip_eps_high", self.clip_eps_high)
        check_positive("algorithm.resample_zero_std", self.resample_zero_std, allow_zero=True)
        for key in ("kl_coef", "entropy_coef", "supervised_coef"):
            check_positive(f"algorithm.{key}", getattr(self, key), allow_zero=True)
        check_positive("algorithm.kl_horizon", self.kl_horizon)
        check_positive("algorithm.reference_cache_mb", self.reference_cache_mb, allow_zero=True)
        if self.kl_target is not None:
            check_positive("algorithm.kl_target", self.kl_target)
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
        check_choice("algorithm.advantage", self.advantage, ADVANTAGE_ESTIMATORS)
        check_choice("algorithm.policy_loss", self.policy_loss, POLICY_LOSSES)
        check_choice("algorithm.ratio", self.ratio, RATIOS)
        check_choice("algorithm.rollout", self.rollout, ROLLOUTS)
        if self.rollout != "sample":
            if self.policy_loss != "mwer":
                raise ConfigError(f"algorithm.rollout={self.rollout} needs algorithm.policy_loss=mwer: a beam's best "
                                  "hypotheses are not samples of the policy, so REINFORCE or PPO on them is biased")
            if self.resample_zero_std:
                raise ConfigError("algorithm.resample_zero_std re-draws samples; it needs algorithm.rollout=sample")
            if self.rollout == "mixed" and self.num_samples < 2:
                raise ConfigError("algorithm.rollout=mixed needs algorithm.num_samples >= 2")
        check_choice("algorithm.kl_estimator", self.kl_estimator, ("exact", "k1", "k3"))
        check_positive("algorithm.ppo_epochs", self.ppo_epochs)
        if self.advantage in ("rloo", "group") and self.num_samples < 2:
            raise ConfigError(f"algorithm.advantage={self.advantage} needs algorithm.num_samples >= 2")
        if self.ppo_epochs > 1 and self.policy_loss != "clipped":
            raise ConfigError("algorithm.ppo_epochs > 1 re-uses each rollout, which needs "
                              "algorithm.policy_loss=clipped (the unclipped loss would be off-policy)")
        self.check_ratio()
        from rlnf.kl import KLPenalty

        KLPenalty.from_config(self)  # refuses an estimator where its penalty is wrong (names the keys)

    def check_ratio(self) -> None:
        """The clipped loss's own keys: refused with another policy loss (they would be ignored), and a
        warning when the per-frame ratio's clip range is too wide to ever clip."""
        if self.policy_loss != "clipped":
            for key, value, unset in (("ratio", self.ratio, "sequence"), ("clip_eps_high", self.clip_eps_high, None)):
                if value != unset:
                    raise ConfigError(f"algorithm.{key}={value} has no effect with algorithm.policy_loss="
                                      f"{self.policy_loss}: it belongs to the clipped loss; remove it or set "
                                      "algorithm.policy_loss=clipped")
        elif self.ratio == "per_frame" and max(self.clip_eps, self.clip_eps_high or 0.0) > PER_FRAME_CLIP_WARNING:
            log.warning("algorithm.ratio=per_frame with clip_eps=%g%s: the per-frame ratio (pi/pi_old)^(1/T) leaves "
                        "[1 - eps, 1 + eps] only when |log pi - log pi_old| > T * log(1 + eps), about %.0f nats on "
                        "200 frames, so it will practically never clip; use clip_eps (and clip_eps_high) of about "
                        "1e-3 to 1e-2", self.clip_eps,
                        "" if self.clip_eps_high is None else f", clip_eps_high={self.clip_eps_high:g}",
                        200 * math.log1p(max(self.clip_eps, self.clip_eps_high or 0.0)))


@dataclass
class RLFinetuneConfig(RunConfig):
    """`rlnf run rl_finetune`: RL fine-tuning of a CTC policy against one or more rewards."""

    output_dir: str = opt(MISSING, "Run folder: config.yaml, metrics.jsonl, TensorBoard events, checkpoints/, "
                                   "summary.json.")
    policy: PolicyConfig = opt(factory=PolicyConfig, help="The policy to fine-tune.")
    data: DataConfig = opt(factory=DataConfig, help="Training and validation data.")
    trainer: TrainerConfig = opt(factory=lambda: TrainerConfig(lr=1e-4),
                                 help="Optimisation, logging and checkpointing (lr 1e-4: the benchmark's validated "
                                      "setting).")
    algorithm: AlgorithmConfig = opt(factory=AlgorithmConfig, help="The RL algorithm.")
    rewards: List[RewardSpec] = opt(factory=lambda: [RewardSpec(name="cer")],
                                    help="Rewards summed with their weights (default: 1 - CER).")

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ConfigError("rewards: give at least one reward (e.g. rewards=[{name: cer}])")
        labels = [spec.label for spec in self.rewards]
        if len(set(labels)) != len(labels):
            hint = ("; give each Python reward its own name (a 'name' attribute)"
                    if any(spec.name.startswith(IN_PROCESS_PREFIX) for spec in self.rewards) else "")
            raise ConfigError(f"rewards: two rewards share a name ({labels}); metric names would collide{hint}")
        if all(spec.weight == 0 for spec in self.rewards):
            raise ConfigError("rewards: every weight is 0, so every reward would be 0 and nothing would be learned; "
                              "give at least one reward a non-zero weight")

    def finalize(self) -> None:
        """Once per loaded config (``finalize_config``): warn about a learned reward with a KL
        coefficient below what the benchmark found safe."""
        if self.algorithm.kl_coef < SAFE_LEARNED_KL_COEF and any(spec.name == "learned" and spec.weight
                                                                 for spec in self.rewards):
            log.warning(
                "algorithm.kl_coef=%g with a learned reward: below %g, the smallest the benchmark found safe (at 0.01 "
                "the policy exploited the reward model: reward up, CER up 19 %%); set algorithm.kl_coef=%g or more",
                self.algorithm.kl_coef, SAFE_LEARNED_KL_COEF, SAFE_LEARNED_KL_COEF)

    def yaml_notes(self) -> List[str]:
        """Comments heading the run's config.yaml: rewards that this file alone cannot re-run."""
        in_process = [spec.name for spec in self.rewards if spec.name.startswith(IN_PROCESS_PREFIX)]
        if not in_process:
            return []
        return [f"rewards {', '.join(in_process)}: Python objects given to rlnf.finetune in its process; this file "
                "alone cannot re-run them", "(resume through rlnf.finetune with the same objects, or name each "
                "reward by its dotted path, module.function, to run from the command line)"]

