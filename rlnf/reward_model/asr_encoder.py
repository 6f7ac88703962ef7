"""The reward model's ears from an ASR model (``model.asr_encoder_from``): a NeMo CTC model's encoder,
frozen, in place of the card's conv blocks.

A judge that hears worse than the policy it judges cannot tell the policy's near-correct transcripts
apart by the audio (``val/ctc_wer``, docs/reward-model.md). RLHF reward models start from the policy
for the same reason. Here the encoder of a NeMo model (the policy RL will start from, or any stronger
ASR model) turns the clip's log-mel features into frames; a 1x1 convolution maps them to
``audio_conv_channels``, and the rest of the reward model (pooling, the CTC head, attention) reads
them as it reads the conv blocks' frames:

    log-mel [B, n_mel, T] -> NeMo encoder (frozen, eval mode) [B, D, T'] -> Conv1d(D, C, 1) -> ReLU -> frames

The encoder's config (``RewardConfig.asr_encoder``) and weights are copied into the reward checkpoint,
so it stays self-contained: scoring needs no ``.nemo``, only NeMo (which RL imports anyway). The
encoder reads the reward model's own features, so the ASR model's preprocessor must compute the same
ones (``feature_mismatches``): the QuartzNet front end both use by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# The reward config's feature settings and the names NeMo's AudioToMelSpectrogramPreprocessor gives them.
PREPROCESSOR_KEYS = {"sample_rate": "sample_rate", "n_mel": "features", "window_size": "window_size",
                     "window_stride": "window_stride", "n_fft": "n_fft", "window": "window", "normalize": "normalize"}
MEL_PREPROCESSOR = "AudioToMelSpectrogramPreprocessor"  # the only front end the reward model computes
# A reward checkpoint builds its encoder from config.json's _target_: only NeMo's ASR modules are built, so
# loading a checkpoint never instantiates another class.
ENCODER_MODULES = "nemo.collections.asr.modules."


@dataclass(frozen=True)
class ASREncoderSource:
    """What a reward model takes from an ASR model: its encoder's config (a plain dict with NeMo's
    ``_target_``), the encoder's output channels, its weights and its preprocessor's settings."""

    config: dict[str, Any]
    dim: int
    state: dict[str, torch.Tensor]
    preprocessor: dict[str, Any]


def read_asr_encoder(path: str) -> ASREncoderSource:
    """The encoder of the NeMo model at ``path`` (a .nemo, or a name NeMo can download); raises
    CheckpointError for a file that is not one."""
    from omegaconf import OmegaConf

    from rlnf.policy import load_nemo_model

    model = load_nemo_model(path).eval()
    config = OmegaConf.to_container(model.cfg.encoder, resolve=True)
    preprocessor = OmegaConf.to_container(model.cfg.preprocessor, resolve=True)
    return ASREncoderSource(config, encoder_dim(model.encoder, int(preprocessor.get("features", 64))),
                            {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}, preprocessor)


def encoder_dim(encoder: nn.Module, n_mel: int) -> int:
    """The channels of ``encoder``'s output, from one forward of a second of silence."""
    with torch.no_grad():
        hidden, _ = encoder(audio_signal=torch.zeros(1, n_mel, 100), length=torch.tensor([100]))
    return int(hidden.shape[1])


def feature_mismatches(preprocessor: dict[str, Any], features: dict[str, Any]) -> list[str]:
    """Where the ASR model's preprocessor settings differ from the reward model's ``features``
    (``RewardConfig.feature_settings``): "<reward key> <theirs> (reward model: <ours>)" each."""
    target = str(preprocessor.get("_target_", MEL_PREPROCESSOR))
    if not target.endswith(MEL_PREPROCESSOR):
        return [f"front end {target} (reward model: {MEL_PREPROCESSOR})"]
    settings = dict(preprocessor)
    if settings.get("n_fft") is None and "window_size" in settings:  # NeMo's own choice for a null n_fft
        settings["n_fft"] = 2 ** math.ceil(math.log2(settings["window_size"] * settings.get("sample_rate", 16000)))
    problems = []
    for ours, theirs in PREPROCESSOR_KEYS.items():
        if theirs in settings and settings[theirs] != features[ours]:
            problems.append(f"{ours} {settings[theirs]!r} (reward model: {features[ours]!r})")
    if settings.get("frame_splicing", 1) != 1:
        problems.append(f"frame_splicing {settings['frame_splicing']!r} (reward model: 1)")
    return problems


def build_asr_encoder(config: dict[str, Any]) -> nn.Module:
    """The NeMo encoder module of ``config`` (its ``_target_`` class, one of NeMo's ASR modules: a
    ValueError otherwise, which a checkpoint load reports naming config.json), random weights, frozen
    and in eval mode, its forwards free of collectives (``keep_encoder_passes_local``)."""
    from nemo.core.classes import Serialization
    from omegaconf import OmegaConf

    from rlnf.policy import keep_encoder_passes_local

    target = str(config.get("_target_", ""))
    if not target.startswith(ENCODER_MODULES):
        raise ValueError(f"asr_encoder._target_ {target!r} is not one of NeMo's ASR modules ({ENCODER_MODULES}*)")
    encoder = Serialization.from_config_dict(OmegaConf.create(config))
    keep_encoder_passes_local(encoder)
    return encoder.requires_grad_(False).eval()
