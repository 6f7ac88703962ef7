"""The reward model's architecture hyper-parameters, defined once: each with its default (the model
card's), its help string and its checks. Two places read them:

    RewardConfig (modeling.py)      the checkpoint's config.json: takes its defaults from here and
                                    runs ``validate()`` (a bad value is a ValueError, as in transformers)
    RewardModelSection (rlnf.config) the ``model`` section of train_reward_model: these fields plus its
                                    own (init_from, tokenizer), validated as ``model.<key>``

Light on purpose (dataclasses only, no torch / transformers), because rlnf.config imports it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from rlnf.errors import ConfigError
from rlnf.schema import check_choice, check_positive, check_range, opt

POOLINGS = ("masked", "legacy")
FUSIONS = ("pooled", "attention")


@dataclass
class RewardArchitecture:
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
                                "time-resolved token-to-frame comparison; docs/reward-model.md, Fusion).")
    attention_dim: int = opt(128, "Width of the token-to-frame attention (fusion 'attention').")
    attention_stride: int = opt(4, "Audio frames averaged per attention step (4: 40 ms; fusion 'attention').")
    ctc_head: bool = opt(False, "Add a CTC head on the audio encoder (trained on the references with "
                                "trainer.ctc_loss_weight); each transcript's CTC likelihood under the clip's audio "
                                "joins the regression head's input (docs/reward-model.md, Acoustic evidence).")
    ctc_hidden: int = opt(128, "BiLSTM hidden size per direction of the CTC head (ctc_head).")
    ctc_stride: int = opt(2, "Audio frames averaged per CTC frame (2: 20 ms; ctc_head).")
    ctc_alphabet: Optional[str] = opt(None, "null: the CTC head's labels are the text pieces; a string of letters "
                                            "(e.g. \" abcdefghijklmnopqrstuvwxyz'\"): it spells transcripts in them "
                                            "(far fewer labels to learn; ctc_head).")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "") -> None:
        """Raise ``ConfigError`` naming the key as ``prefix + name`` (the recipe's ``model.pooling``)."""
        check_choice(f"{prefix}pooling", self.pooling, POOLINGS)
        if self.ctc_head and self.pooling == "legacy":
            raise ConfigError(f"{prefix}ctc_head needs {prefix}pooling 'masked'")
        alphabet = self.ctc_alphabet
        if alphabet is not None and (not alphabet or len(set(alphabet)) != len(alphabet)):
            raise ConfigError(f"{prefix}ctc_alphabet={alphabet!r} must be a non-empty string of distinct letters")
        check_range(f"{prefix}dropout", self.dropout, 0.0, 1.0, high_open=True)
        check_choice(f"{prefix}fusion", self.fusion, FUSIONS)
        if self.fusion == "attention" and self.pooling == "legacy":
            raise ConfigError(f"{prefix}fusion 'attention' needs {prefix}pooling 'masked'")
        for f in dataclasses.fields(RewardArchitecture):  # every size, count and stride (annotations are strings)
            if f.type == "int":
                check_positive(f"{prefix}{f.name}", getattr(self, f.name))

    def hyper_parameters(self) -> dict[str, Any]:
        """The architecture's keys and values only (a config section built on it has more)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(RewardArchitecture)}


ARCHITECTURE_KEYS = tuple(f.name for f in dataclasses.fields(RewardArchitecture))
