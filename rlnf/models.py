"""NeMo CTC model configurations built from config, no download: QuartzNet from a tiny test model to
QuartzNet 15x5, and tiny models of the other families rlnf fine-tunes (``family_config``).

The QuartzNet architecture follows Kriman et al. 2020 ("QuartzNet"): a strided separable prologue C1,
groups of blocks B1..B5 (each block ``repeat`` time-channel separable convolutions), epilogues
C2 (dilated), C3 (1x1) and a 1x1 decoder to the vocabulary plus blank.
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


# family -> NeMo model class (characters, BPE). The hybrid's policy is its CTC head (policy.decoder).
FAMILIES: dict[str, tuple[str, str]] = {
    "quartznet": ("EncDecCTCModel", "EncDecCTCModelBPE"),
    "citrinet": ("EncDecCTCModel", "EncDecCTCModelBPE"),
    "conformer": ("EncDecCTCModel", "EncDecCTCModelBPE"),
    "fastconformer": ("EncDecCTCModel", "EncDecCTCModelBPE"),
    "hybrid": ("EncDecHybridRNNTCTCModel", "EncDecHybridRNNTCTCBPEModel"),
    "hybrid_tdt": ("EncDecHybridRNNTCTCModel", "EncDecHybridRNNTCTCBPEModel"),  # the hybrid with a TDT transducer
}

# The token-and-duration transducer's durations (frames skipped per emission), as NeMo's
# fastconformer_hybrid_tdt_ctc_bpe.yaml sets them.
TDT_DURATIONS = [0, 1, 2, 3, 4]


def _conformer_encoder(n_mels: int, d_model: int, subsampling: str, factor: int, layers: int = 1,
                       heads: int = 2) -> dict[str, Any]:
    """A ConformerEncoder of ``layers`` layers and ``heads`` attention heads: 'striding' x4 is
    Conformer-CTC's, 'dw_striding' x8 FastConformer's."""
    return {
        "_target_": "nemo.collections.asr.modules.ConformerEncoder",
        "feat_in": n_mels, "n_layers": layers, "d_model": d_model, "subsampling": subsampling,
        "subsampling_factor": factor, "subsampling_conv_channels": d_model, "ff_expansion_factor": 2,
        "self_attention_model": "rel_pos", "n_heads": heads, "conv_kernel_size": 9, "dropout": 0.0,
        "dropout_pre_encoder": 0.0, "dropout_emb": 0.0, "dropout_att": 0.0,
    }


def _citrinet_encoder(n_mels: int, channels: int) -> dict[str, Any]:
    """Citrinet's shape at toy size: separable 1D convolutions with squeeze-and-excitation over the
    whole utterance (se_context_size -1), stride 2 twice (x4)."""
    def block(kernel: int, stride: int = 1, repeat: int = 1, residual: bool = True) -> dict[str, Any]:
        return {"filters": channels, "repeat": repeat, "kernel": [kernel], "stride": [stride], "dilation": [1],
                "dropout": 0.0, "residual": residual, "separable": True, "se": True, "se_context_size": -1,
                "se_reduction_ratio": 8, "residual_mode": "stride_add", "stride_last": True}

    return {"_target_": "nemo.collections.asr.modules.ConvASREncoder", "feat_in": n_mels, "activation": "relu",
            "conv_mask": True,
            "jasper": [block(5, residual=False), block(11, stride=2, repeat=2), block(13, stride=2, repeat=2),
                       block(1, residual=False)]}


def family_config(family: str, labels: list[str] | None = None, tokenizer_dir: str | None = None,
                  n_mels: int = 64, width: int = 32, layers: int = 1, heads: int = 2) -> dict[str, Any]:
    """A tiny config (plain dict) of ``family`` (see ``FAMILIES``): characters ``labels``, or a
    SentencePiece tokenizer folder ``tokenizer_dir`` (NeMo's ``tokenizer.dir``, type bpe) for the
    BPE class. The preprocessor is ``quartznet_config``'s (16 kHz, 64 mel, dither and pad_to as
    there); ``width`` is the encoder's channels / d_model (and the hybrids' prediction and joint
    width); ``layers`` and ``heads`` the number of Conformer layers and attention heads (Conformer,
    FastConformer, hybrids; ``heads`` must divide ``width``).

    ``hybrid_tdt`` is ``hybrid`` with NeMo's token-and-duration transducer (TDT) in place of the RNNT
    one, keyed as NeMo's fastconformer_hybrid_tdt_ctc_bpe.yaml: ``model_defaults.tdt_durations``, the
    joint's ``num_extra_outputs`` (one logit per duration), ``decoding.model_type: tdt`` with the
    durations, and ``loss.loss_name: tdt`` with its ``tdt_kwargs``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if (labels is None) == (tokenizer_dir is None):
        raise ValueError("give either labels (a character model) or tokenizer_dir (a BPE model)")
    config = quartznet_config(labels or ["x"], size="tiny", n_mels=n_mels, spec_augment=False)
    if family == "citrinet":
        config["encoder"] = _citrinet_encoder(n_mels, width)
    elif family == "conformer":
        config["encoder"] = _conformer_encoder(n_mels, width, "striding", 4, layers, heads)
    elif family in ("fastconformer", "hybrid", "hybrid_tdt"):
        config["encoder"] = _conformer_encoder(n_mels, width, "dw_striding", 8, layers, heads)
    encoder_out = config["decoder"]["feat_in"] if family == "quartznet" else width
    # num_classes -1 and no vocabulary: NeMo's BPE classes take both from the tokenizer.
    decoder = {"_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": encoder_out,
               "num_classes": len(labels) if labels else -1, "vocabulary": list(labels or [])}
    config["decoder"] = decoder
    if tokenizer_dir is not None:
        config.pop("labels")
        config["tokenizer"] = {"dir": str(tokenizer_dir), "type": "bpe"}
        # NeMo's BPE ``transcribe`` reads validation_ds.use_start_end_token (pretrained models carry the section).
        config["validation_ds"] = {"manifest_filepath": None, "sample_rate": 16000, "batch_size": 1,
                                   "shuffle": False, "use_start_end_token": False}
    if family in ("hybrid", "hybrid_tdt"):
        vocabulary = len(labels) if labels else -1
        config["model_defaults"] = {"enc_hidden": width, "pred_hidden": width}
        config["decoder"] = {"_target_": "nemo.collections.asr.modules.RNNTDecoder", "normalization_mode": None,
                             "random_state_sampling": False, "blank_as_pad": True, "vocab_size": vocabulary,
                             "prednet": {"pred_hidden": width, "pred_rnn_layers": 1, "dropout": 0.0}}
        config["joint"] = {"_target_": "nemo.collections.asr.modules.RNNTJoint", "num_classes": vocabulary,
                           "vocabulary": list(labels or []), "log_softmax": None, "preserve_memory": False,
                           "fuse_loss_wer": False,
                           "jointnet": {"joint_hidden": width, "activation": "relu", "dropout": 0.0,
                                        "encoder_hidden": width, "pred_hidden": width}}
        config["decoding"] = {"strategy": "greedy_batch", "greedy": {"max_symbols": 5}}
        config["loss"] = {"loss_name": "default"}
        config["aux_ctc"] = {"ctc_loss_weight": 0.3, "decoder": decoder}
    if family == "hybrid_tdt":
        config["model_defaults"].update(tdt_durations=TDT_DURATIONS, num_tdt_durations=len(TDT_DURATIONS))
        config["joint"]["num_extra_outputs"] = len(TDT_DURATIONS)
        config["decoding"].update(model_type="tdt", durations=TDT_DURATIONS)
        config["loss"] = {"loss_name": "tdt", "tdt_kwargs": {"fastemit_lambda": 0.0, "clamp": -1.0,
                                                             "durations": TDT_DURATIONS, "sigma": 0.02, "omega": 0.1}}
    return config


def build_family_model(family: str, labels: list[str] | None = None, tokenizer_dir: str | None = None,
                       seed: int | None = None, **kwargs: Any):
    """Instantiate ``family_config``'s model (random weights) with its NeMo class."""
    import torch
    from nemo.collections.asr import models
    from omegaconf import OmegaConf

    if seed is not None:
        torch.manual_seed(seed)
    model_class = getattr(models, FAMILIES[family][tokenizer_dir is not None])
    return model_class(cfg=OmegaConf.create(family_config(family, labels, tokenizer_dir, **kwargs)))
