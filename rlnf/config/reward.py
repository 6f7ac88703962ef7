"""`rlnf run train_reward_model`: the reward model, its scored pairs, augmentation, hard negatives
and trainer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from rlnf.config.base import RunConfig
from rlnf.config.sections import OptimizerTrainerConfig
from rlnf.errors import ConfigError
from rlnf.reward_model.architecture import RewardArchitecture
from rlnf.schema import check_choice, check_positive, opt


@dataclass
class RewardModelSource:
    """Where the reward model's weights and tokenizer come from (the section's keys beside the
    architecture's)."""

    init_from: Optional[str] = opt(None, "Start from this reward checkpoint folder (ours or the published layout) "
                                         "instead of random weights.")
    tokenizer: Optional[str] = opt(None, "SentencePiece model for the transcripts; null trains one on the training "
                                         "texts (vocabulary size vocab_size).")
    asr_encoder_from: Optional[str] = opt(None, "A NeMo CTC model (.nemo) whose encoder, frozen, replaces the audio "
                                                "conv blocks, so the reward model hears as well as that model (e.g. "
                                                "the policy it will judge; its preprocessor must compute the reward "
                                                "model's features). Copied into the checkpoint (docs/reward-model.md).")


@dataclass
class RewardModelSection(RewardArchitecture, RewardModelSource):
    """The reward model: init_from and tokenizer, then the architecture's keys (``RewardArchitecture``,
    which RewardConfig shares). A dataclass lists the fields of its last base first, hence the order."""

    def __post_init__(self) -> None:
        self.validate(prefix="model.")
        if self.asr_encoder_from and self.init_from:
            raise ConfigError("model.asr_encoder_from and model.init_from: a reward checkpoint brings its own audio "
                              "encoder; set one of them")
        if self.asr_encoder_from and self.pooling == "legacy":
            raise ConfigError("model.asr_encoder_from needs model.pooling 'masked'")


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
        check_positive("data.score_scale", self.score_scale)


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
        check_positive("augment.gain_db", self.gain_db, allow_zero=True)


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
        check_positive("trainer.epochs", self.epochs)
        check_positive("trainer.eval_every", self.eval_every, allow_zero=True)
        check_choice("trainer.best_metric", self.best_metric,
                      ("val/mse", "val/rmse", "val/r2", "val/pearson", "val/spearman", "val/group_spearman"))
        check_positive("trainer.rank_loss_weight", self.rank_loss_weight, allow_zero=True)
        check_positive("trainer.ctc_loss_weight", self.ctc_loss_weight, allow_zero=True)
        check_positive("trainer.ctc_pretrain_epochs", self.ctc_pretrain_epochs, allow_zero=True)


@dataclass
class RewardTrainConfig(RunConfig):
    """`rlnf run train_reward_model`: train a reward model on scored (audio, transcript) pairs."""

    output_dir: str = opt(MISSING, "Run folder: config.yaml, metrics.jsonl, tensorboard/, checkpoints/{best,last}/ "
                                   "(self-contained reward checkpoints), checkpoints/trainer_state.pt, summary.json.")
    model: RewardModelSection = opt(factory=RewardModelSection, help="The reward model.")
    data: RewardDataConfig = opt(factory=RewardDataConfig, help="Scored training pairs.")
    augment: AugmentConfig = opt(factory=AugmentConfig, help="Training-time augmentation.")
    hard_negatives: HardNegativesConfig = opt(factory=HardNegativesConfig, help="Synthetic hard negatives.")
    trainer: RewardTrainerConfig = opt(factory=RewardTrainerConfig, help="Optimisation and evaluation.")

    def __post_init__(self) -> None:
        if (self.trainer.ctc_loss_weight > 0 or self.trainer.ctc_pretrain_epochs > 0) and not self.model.ctc_head:
            raise ConfigError("trainer.ctc_loss_weight and trainer.ctc_pretrain_epochs train a CTC head: set "
                              "model.ctc_head=true (or set them to 0)")

