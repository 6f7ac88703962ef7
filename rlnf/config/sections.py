"""The sections two or more recipes share: the data (rl_finetune, train_ctc), the trainer keys of
every recipe (AdamW, schedule, seed, device, logging) and the step-based trainer of rl_finetune and
train_ctc. A recipe's own sections live in its module (rl.py, ctc.py, reward.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from rlnf.errors import ConfigError
from rlnf.schema import check_choice, check_positive, check_range, opt


@dataclass
class DataConfig:
    train_manifest: str = opt(MISSING, "NeMo JSONL manifest of training audio (audio_filepath, optional duration "
                                       "and text), or a Lhotse CutSet (cuts.jsonl.gz) or Shar directory (see "
                                       "data.format).")
    format: str = opt("auto", "What train_manifest and val_manifest are: 'nemo' (JSONL manifest), 'lhotse_cuts' "
                              "(Lhotse CutSet, .jsonl or .jsonl.gz), 'lhotse_shar' (directory written by "
                              "CutSet.to_shar) or 'auto' (a directory is Shar; a file whose first line is a Lhotse "
                              "cut is a CutSet; otherwise NeMo).")
    val_manifest: Optional[str] = opt(None, "Manifest (or Lhotse CutSet / Shar directory) for validation (greedy "
                                            "WER/CER when it has text, and mean reward). None disables validation.")
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
        check_choice("data.oov", self.oov, ("error", "skip", "drop"))
        check_choice("data.validate", self.validate, ("full", "lazy"))
        check_choice("data.format", self.format, ("auto", "nemo", "lhotse_cuts", "lhotse_shar"))
        check_positive("data.bucket_size", self.bucket_size)
        check_positive("data.num_workers", self.num_workers, allow_zero=True)
        check_positive("data.min_duration", self.min_duration, allow_zero=True)
        if self.max_duration is not None:
            check_positive("data.max_duration", self.max_duration)


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
    early_stop_patience: Optional[int] = opt(None, "Stop after this many validations in a row without a new best "
                                                   "of the best-checkpoint metric (checkpoints/best holds the best "
                                                   "one); null: never stop early. Needs a validation set.")
    loggers: List[str] = opt(factory=lambda: ["tensorboard"],
                             help="Trackers besides metrics.jsonl (always written): any of 'tensorboard', 'csv' "
                                  "(metrics.csv), 'wandb' (pip install 'rlnf[wandb]'; WANDB_MODE=offline needs no "
                                  "network). [] for JSONL only.")

    def __post_init__(self) -> None:
        from rlnf.metric_logging import check_trackers  # light: numpy, no torch

        check_trackers(self.loggers, "trainer.loggers")
        for key in ("batch_size", "log_every"):
            check_positive(f"trainer.{key}", getattr(self, key))
        check_positive("trainer.lr", self.lr)
        if self.early_stop_patience is not None:
            check_positive("trainer.early_stop_patience", self.early_stop_patience)
        check_positive("trainer.eps", self.eps)
        check_positive("trainer.weight_decay", self.weight_decay, allow_zero=True)
        if len(self.betas) != 2:
            raise ConfigError(f"trainer.betas must have two values, got {list(self.betas)}")
        for beta in self.betas:
            check_range("trainer.betas", beta, 0.0, 1.0, high_open=True)
        check_range("trainer.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_positive("trainer.warmup_steps", self.warmup_steps, allow_zero=True)
        check_choice("trainer.lr_schedule", self.lr_schedule, ("cosine", "constant"))
        if self.max_grad_norm is not None:
            check_positive("trainer.max_grad_norm", self.max_grad_norm)
        check_choice("trainer.device", self.device, ("auto", "cpu", "cuda"))
        check_choice("trainer.precision", self.precision, ("auto", "fp32", "bf16"))


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
            check_positive(f"trainer.{key}", getattr(self, key))
        for key in ("val_every", "save_every", "samples_every", "keep_last"):
            check_positive(f"trainer.{key}", getattr(self, key), allow_zero=True)
        check_choice("trainer.best_mode", self.best_mode, ("auto", "min", "max"))
        check_choice("trainer.strategy", self.strategy, ("ddp",))
        for key in ("devices", "num_nodes"):
            if getattr(self, key) is not None:
                check_positive(f"trainer.{key}", getattr(self, key))
        if self.max_minutes is not None:
            check_positive("trainer.max_minutes", self.max_minutes)
