"""`rlnf run train_ctc`: supervised CTC training of a new or pretrained model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from rlnf.config.base import RunConfig
from rlnf.config.sections import DataConfig, TrainerConfig
from rlnf.schema import check_choice, check_range, opt


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

        check_choice("model.size", self.size, tuple(MODEL_SIZES))
        check_range("model.dropout", self.dropout, 0.0, 1.0, high_open=True)

    def vocabulary(self) -> List[str]:
        from rlnf.models import BAMBARA_LABELS, ENGLISH_LABELS

        return {"english": ENGLISH_LABELS, "bambara": BAMBARA_LABELS}.get(self.labels) or list(dict.fromkeys(self.labels))


@dataclass
class CTCTrainConfig(RunConfig):
    """`rlnf run train_ctc`: supervised CTC training or fine-tuning of a NeMo QuartzNet-style model."""

    output_dir: str = opt(MISSING, "Run folder (same layout as rl_finetune).")
    model: CTCModelSection = opt(factory=CTCModelSection, help="The model to train.")
    data: DataConfig = opt(factory=DataConfig, help="Labelled training and validation data.")
    trainer: TrainerConfig = opt(factory=lambda: TrainerConfig(lr=2e-3, batch_size=16, warmup_steps=100),
                                 help="Optimisation (defaults for training from scratch: lr 2e-3, batch 16).")

