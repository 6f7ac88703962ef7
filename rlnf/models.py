"""QuartzNet-style NeMo CTC model configurations, from a tiny test model to QuartzNet 15x5.

The architecture follows Kriman et al. 2020 ("QuartzNet"): a strided separable prologue C1,
groups of blocks B1..B5 (each block ``repeat`` time-channel separable convolutions), epilogues
C2 (dilated), C3 (1x1) and a 1x1 decoder to the vocabulary plus blank. Built from config, no download.
"""

from __future__ import annotations

from typing import Any

# (filters, kernel) of the five block groups of QuartzNet 15x5 (each group: 3 blocks of 5 repeats).
_QUARTZNET_GROUPS = [(256, 33), (256, 39), (512, 51), (512, 63), (512, 75)]

# size -> (channels: None = QuartzNet's, else the same for every block; blocks per group; repeats per block;
#          groups used; kernel scale; C3 filters)
MODEL_SIZES: dict[str, tuple[int | None, int, int, int, float, int]] = {
    "tiny": (64, 1, 1, 2, 1 / 3, 128),  # ~0.04M parameters: unit tests
    "small": (160, 1, 2, 5, 1 / 3, 256),  # ~0.5M parameters: the CPU demo
    "medium": (None, 1, 4, 5, 1 / 3, 512),  # ~5M
    "5x5": (None, 1, 5, 5, 1.0, 1024),  # QuartzNet 5x5, ~6.7M
    "15x5": (None, 3, 5, 5, 1.0, 1024),  # QuartzNet 15x5, ~19M
}

BAMBARA_LABELS = list("abcdefghijklmnopqrstuvwxyz") + list("0123456789") + [" ", "'", "-"] + list("ŋɔɛɲɓɾ")
ENGLISH_LABELS = [" "] + list("abcdefghijklmnopqrstuvwxyz") + ["'"]


def _odd(value: float) -> int:
    kernel = max(3, int(round(value)))
    return kernel if kernel % 2 == 1 else kernel + 1


def quartznet_config(
    labels: list[str],
    size: str = "small",
    sample_rate: int = 16000,
    n_mels: int = 64,
    dropout: float = 0.0,
    spec_augment: bool = True,
    first_stride: int = 2,
) -> dict[str, Any]:
    """A NeMo ``EncDecCTCModel`` config (plain dict) for a QuartzNet of the given size.

    The preprocessor matches the Bambara QuartzNet and the reward model's features: 16 kHz,
    64 mel, 20 ms Hann window, 10 ms stride, n_fft 512, per-feature normalisation.
    """
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    channels, blocks_per_group, repeat, groups, kernel_scale, c3_filters = MODEL_SIZES[size]

    def block(filters: int, kernel: int, repeat_: int, stride: int = 1, dilation: int = 1,
              residual: bool = True) -> dict[str, Any]:
        return {"filters": int(filters), "repeat": repeat_, "kernel": [_odd(kernel)], "stride": [stride],
                "dilation": [dilation], "dropout": dropout, "residual": residual, "separable": True}

    jasper = [block(channels or 256, 33 * kernel_scale, 1, stride=first_stride, residual=False)]
    for filters, kernel in _QUARTZNET_GROUPS[:groups]:
        jasper += [block(channels or filters, kernel * kernel_scale, repeat) for _ in range(blocks_per_group)]
    last = jasper[-1]["filters"]
    jasper.append(block(last, 87 * kernel_scale, 1, dilation=2, residual=False))
    jasper.append({**block(c3_filters, 1, 1, residual=False), "kernel": [1]})

    config: dict[str, Any] = {
        "sample_rate": sample_rate,
        "labels": list(labels),
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": sample_rate, "normalize": "per_feature", "window_size": 0.02,
            "window_stride": 0.01, "window": "hann", "features": n_mels, "n_fft": 512,
            "frame_splicing": 1, "dither": 1e-5, "pad_to": 16,
        },
        "spec_augment": None,
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConvASREncoder",
            "feat_in": n_mels, "activation": "relu", "conv_mask": True, "jasper": jasper,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
            "feat_in": c3_filters, "num_classes": len(labels), "vocabulary": list(labels),
        },
        "optim": {"name": "adamw", "lr": 1e-3},
    }
    if spec_augment:
        config["spec_augment"] = {
            "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
            "freq_masks": 2, "time_masks": 2, "freq_width": 15, "time_width": 0.05,
        }
    return config


def build_ctc_model(labels: list[str], size: str = "small", seed: int | None = None, **kwargs: Any):
    """Instantiate a character ``EncDecCTCModel`` (random weights) from ``quartznet_config``."""
    import torch
    from nemo.collections.asr.models import EncDecCTCModel
    from omegaconf import OmegaConf

    if seed is not None:
        torch.manual_seed(seed)
    return EncDecCTCModel(cfg=OmegaConf.create(quartznet_config(labels, size=size, **kwargs)))
