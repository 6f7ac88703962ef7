"""`rlnf adapt suta`'s settings (``rlnf.adaptation`` runs it): the one place their defaults live; the
command's signature and its CLI flags take theirs from ``SUTA_DEFAULTS``. Light: no torch import."""

from __future__ import annotations

from dataclasses import dataclass

from rlnf.errors import ConfigError
from rlnf.schema import check_choice, check_positive, check_range, opt

SUTA_PARAMS = ("all", "norm", "encoder")


@dataclass
class SUTAConfig:
    """SUTA's settings. The defaults of steps, temperature, em_weight and params are the ones issue 24's
    independent SUTA run chose on the demo's held-out-voice validation set; lr and exclude_blank_frames
    were then chosen on the same validation set with this code (docs/experiment-log.md: 1e-4 and off,
    validation WER 0.669 from 0.706, where 3e-4 with blank frames left out gave 0.747); mcc_reweight and
    weight_decay follow the SUTA authors' released settings."""

    steps: int = opt(10, "Adaptation steps per utterance (each one forward + backward pass); 0 is plain "
                         "greedy decoding.")
    lr: float = opt(1e-4, "AdamW learning rate.")
    weight_decay: float = opt(0.0, "AdamW weight decay (SUTA's code uses 0).")
    temperature: float = opt(2.5, "Temperature T of both losses: P = softmax(logits / T).")
    em_weight: float = opt(0.3, "alpha in alpha * L_em + (1 - alpha) * L_mcc: the entropy's weight; 1 is entropy "
                                "minimisation alone, 0 minimum class confusion alone.")
    params: str = opt("all", "Which parameters adapt: 'all' (every trainable weight), 'norm' (the affine "
                             "scale and shift of BatchNorm/LayerNorm/GroupNorm layers only, SUTA's light "
                             "variant) or 'encoder' (the encoder's weights, not the CTC head).")
    exclude_blank_frames: bool = opt(False, "Leave frames whose most likely token is blank out of the entropy "
                                            "(the SUTA paper's setting; on the demo's validation set it made "
                                            "SUTA worse than no adaptation); the class-confusion term sees "
                                            "every frame.")
    mcc_reweight: bool = opt(True, "Weight frames in the class-confusion matrix by 1 + exp(-entropy) (MCC's "
                                   "uncertainty reweighting, on in the SUTA authors' released settings); false "
                                   "counts every frame alike.")
    batchnorm: str = opt("frozen", "BatchNorm during the adaptation steps: 'frozen' keeps the running statistics "
                                   "(eval mode); 'train' normalises with the utterance's own statistics, in the "
                                   "steps and in its transcript (the running ones are restored after each "
                                   "utterance). Dropout is always off.")

    def __post_init__(self) -> None:
        check_positive("steps", self.steps, allow_zero=True)
        if self.steps != int(self.steps):
            raise ConfigError(f"steps={self.steps} must be a whole number")
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("temperature", self.temperature)
        check_range("em_weight", self.em_weight, 0.0, 1.0)
        check_choice("params", self.params, SUTA_PARAMS)
        check_choice("batchnorm", self.batchnorm, ("frozen", "train"))


SUTA_DEFAULTS = SUTAConfig()
