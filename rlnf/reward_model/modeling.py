"""The learned reward model: (log-mel features, transcript ids) -> score in [0, 1].

Architecture (the published Bambara reward model's; see docs/reward-model.md and upstream-facts.md):

    audio  [B, n_mel, T] -> audio_conv_layers x (Conv1d -> BatchNorm1d -> ReLU) -> pool over time -> [B, C]
    text   [B, L] ids    -> Embedding(pad) -> BiLSTM -> masked mean over tokens        -> [B, 2H]
    concat [B, C + 2H]   -> Linear -> ReLU -> Dropout -> Linear -> ReLU -> Linear -> Sigmoid -> [B]

Pooling of the audio path:
    "masked" (default): padded frames are zeroed after every conv block and excluded from the mean,
                        so a clip scores the same whatever else is in its batch;
    "legacy":           the published checkpoint's behaviour: average over all frames, padding included
                        (selected automatically when loading that layout).

Fusion of the two paths:
    "pooled" (default, the card's): the head sees the pooled audio vector and the pooled text vector
                        only. One vector per clip cannot say *which* words were spoken where, so in
                        practice it ranks a clip's transcripts by their text alone (docs/reward-model.md, "Fusion").
    "attention":        also a time-resolved comparison. Every text token attends over the clip's conv
                        frames, with a learned Gaussian prior that token i of L sits near the fraction
                        (i + 0.5) / L of the clip (speech is read left to right), plus content-based
                        scores. Each token's state and what it attended to go through a small MLP; the
                        mean and max over tokens join the head's input. New parameters (``cross.*``)
                        and a wider first head layer: not loadable into the card's layout.

Acoustic evidence (``ctc_head: true``, off by default): a CTC head on the conv frames, trained with an
auxiliary CTC loss on the references (recipe: ``trainer.ctc_loss_weight``), scores every transcript's
likelihood under the clip's own audio; three features of it join the head's input (``ctc_evidence.py``).
Works with either fusion; new parameters (``ctc.*``), not loadable into the card's layout.

Ears from an ASR model (``asr_encoder``, set by train_reward_model's ``model.asr_encoder_from``): a NeMo
CTC model's encoder, frozen, replaces the conv blocks, a 1x1 conv to ``audio_conv_channels`` after it
(``asr_encoder.py``); masked pooling only. Its weights (``asr_encoder.*``) are part of the checkpoint.

``embed_audio``, ``embed_text`` and ``score_embeddings`` split the forward so an RL reward can embed
each utterance's audio once and reuse it for all K hypotheses (``Encoded`` rows index like tensors).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from rlnf.errors import CheckpointError, ConfigError
from rlnf.reward_model.architecture import ARCHITECTURE_KEYS, RewardArchitecture
from rlnf.reward_model.asr_encoder import build_asr_encoder
from rlnf.reward_model.ctc_evidence import (EVIDENCE_FEATURES, CTCEvidenceHead, ctc_nll, ctc_targets, evidence_features,
                                            greedy_spelling, spell, spelling_table)

# Feature settings of the QuartzNet front end (NeMo AudioToMelSpectrogramPreprocessor).
FEATURE_DEFAULTS: dict[str, Any] = {
    "sample_rate": 16000, "n_mel": 64, "window_size": 0.02, "window_stride": 0.01, "n_fft": 512,
    "window": "hann", "normalize": "per_feature", "pad_to": 16,
}


class RewardConfig(PretrainedConfig):
    """The architecture's hyper-parameters (``RewardArchitecture``: defaults, the model card's, and
    checks defined there), the conv's stride and padding, feature settings and the text-id convention."""

    model_type = "rlnf_reward"

    def __init__(
        self,
        stride: int = 1,
        padding: int = 2,
        pad_token_id: int = 1,
        eos_token_id: int | None = None,
        append_eos: bool = True,
        ctc_max_piece_chars: int = 16,
        sample_rate: int = 16000,
        n_mel: int = 64,
        window_size: float = 0.02,
        window_stride: float = 0.01,
        n_fft: int = 512,
        window: str = "hann",
        normalize: str = "per_feature",
        pad_to: int = 16,
        asr_encoder: dict | None = None,
        asr_encoder_dim: int | None = None,
        **kwargs: Any,
    ):
        given = {key: kwargs.pop(key) for key in ARCHITECTURE_KEYS if key in kwargs}
        try:
            architecture = RewardArchitecture(**given)
        except ConfigError as exc:  # a transformers config says ValueError; a checkpoint load names the file
            raise ValueError(str(exc)) from None
        for key, value in architecture.hyper_parameters().items():
            setattr(self, key, value)
        self.stride = stride
        self.padding = padding
        self.append_eos = append_eos
        self.ctc_max_piece_chars = ctc_max_piece_chars
        self.sample_rate = sample_rate
        self.n_mel = n_mel
        self.window_size = window_size
        self.window_stride = window_stride
        self.n_fft = n_fft
        self.window = window
        self.normalize = normalize
        self.pad_to = pad_to
        if asr_encoder is not None and (not asr_encoder_dim or self.pooling == "legacy"):
            raise ValueError("asr_encoder needs asr_encoder_dim (its output channels) and pooling 'masked'")
        self.asr_encoder = asr_encoder  # a NeMo encoder's config (asr_encoder.py), or None: the conv blocks
        self.asr_encoder_dim = asr_encoder_dim
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def feature_settings(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in FEATURE_DEFAULTS}


class PublishedRewardConfig(RewardConfig):
    """The published checkpoint's config.json: ``model_type: reward-model`` with the hyper-parameters
    nested in ``pretrained_config`` (and an optional ``override`` dict beside it). Legacy pooling."""

    model_type = "reward-model"

    def __init__(self, pretrained_config: dict | None = None, override: dict | None = None, **kwargs: Any):
        nested = {**(pretrained_config or {}), **(override or {})}
        known = {*inspect.signature(RewardConfig.__init__).parameters, *ARCHITECTURE_KEYS} - {"self", "kwargs"}
        merged = {key: value for key, value in nested.items() if key in known}
        merged.update({k: v for k, v in kwargs.items() if k not in merged})
        merged.setdefault("pooling", "legacy")
        self.pretrained_config = pretrained_config or {}
        self.override = override or {}
        super().__init__(**merged)


@dataclass
class RewardModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B] scores in [0, 1]


@dataclass
class Encoded:
    """One path's encoding: ``pooled`` [N, D] and, for attention fusion, time-resolved ``states``
    [N, S, D'] with valid ``lengths`` [N]. On the audio side ``states`` are the attention's values and
    ``keys`` [N, S, A] its keys (both projected once per clip); on the text side ``states`` are the
    BiLSTM outputs. With a CTC head, the audio side carries ``ctc_log_probs`` [N, S'', V + 1] and
    ``ctc_lengths`` [N]; the text side carries the CTC ``targets`` [N, L] and ``target_lengths`` [N]
    (its ids without end-of-sequence and pad). Indexing by rows (``encoded[rows]``) selects those rows
    of every field, like a tensor."""

    pooled: torch.Tensor
    states: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    ctc_log_probs: torch.Tensor | None = None
    ctc_lengths: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    target_lengths: torch.Tensor | None = None

    def __getitem__(self, rows) -> "Encoded":
        return Encoded(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows]
                          for f in fields(self)})

    def to(self, dtype: torch.dtype) -> "Encoded":
        """The features in ``dtype``; lengths and ids stay integers, and the CTC log-probabilities
        stay float32 (the CTC recursion sums many of them)."""
        return replace(self, **{name: getattr(self, name).to(dtype) for name in ("pooled", "states", "keys")
                                if getattr(self, name) is not None})


class CrossAttentionMatch(nn.Module):
    """Token-to-frame attention with a monotonic position prior; returns [N, 2 * attention_dim]
    (mean and max over tokens of a per-token match vector)."""

    def __init__(self, audio_dim: int, text_dim: int, dim: int):
        super().__init__()
        self.query = nn.Linear(text_dim, dim)
        self.key = nn.Linear(audio_dim, dim)
        self.value = nn.Linear(audio_dim, dim)
        # Width of the position prior, as a fraction of the clip (softplus(-2.2) ~ 0.1).
        self.prior_width = nn.Parameter(torch.tensor(-2.2))
        self.match = nn.Sequential(nn.Linear(3 * dim, dim), nn.ReLU(), nn.Linear(dim, dim), nn.ReLU())
        self.dim = dim

    def project_audio(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames [B, S, C] -> (keys, values) [B, S, dim]; once per clip, reused for all its texts."""
        return self.key(frames), self.value(frames)

    def attention(self, audio: Encoded, text: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries [N, L, dim], weights [N, L, S]): each token's distribution over the clip's frames."""
        keys, frames = audio.keys, audio.lengths
        tokens, lengths = text.states, text.lengths
        query = self.query(tokens)
        logits = query @ keys.transpose(1, 2) / self.dim ** 0.5  # content: [N, L, S]
        device = keys.device
        frame_position = (torch.arange(keys.shape[1], device=device)[None, :] + 0.5) / frames[:, None].clamp(min=1)
        token_position = (torch.arange(tokens.shape[1], device=device)[None, :] + 0.5) / lengths[:, None].clamp(min=1)
        width = nn.functional.softplus(self.prior_width) + 1e-3
        distance = token_position[:, :, None] - frame_position[:, None, :]
        logits = logits.float() - (distance / width) ** 2 / 2  # position prior: token i of L near (i + 0.5) / L
        valid_frames = torch.arange(keys.shape[1], device=device)[None, :] < frames[:, None]
        logits = logits.masked_fill(~valid_frames[:, None, :], torch.finfo(logits.dtype).min)
        return query, torch.softmax(logits, dim=-1)

    def forward(self, audio: Encoded, text: Encoded) -> torch.Tensor:
        query, weights = self.attention(audio, text)
        context = weights.to(audio.states.dtype) @ audio.states  # [N, L, dim]
        matched = self.match(torch.cat([query, context, query * context], dim=-1))  # [N, L, dim]
        lengths = text.lengths
        valid_tokens = (torch.arange(matched.shape[1], device=matched.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        mean = (matched * valid_tokens).sum(dim=1) / lengths.clamp(min=1)[:, None].to(matched.dtype)
        peak = matched.masked_fill(~valid_tokens, 0.0).amax(dim=1)  # ReLU outputs: 0 is a neutral fill
        return torch.cat([mean, peak], dim=-1)


def window_means(hidden: torch.Tensor, lengths: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Means of ``stride`` consecutive valid frames: [B, C, T] (zero past each length) -> [B, C, ceil(T / stride)]
    and the new lengths. A clip's last, partial window averages its own frames only, so the result does
    not depend on the padding a batch adds."""
    if stride == 1:
        return hidden, lengths
    batch, channels, frames = hidden.shape
    windows = -(-frames // stride)
    padded = nn.functional.pad(hidden, (0, windows * stride - frames))
    valid = (torch.arange(windows * stride, device=hidden.device)[None, :] < lengths[:, None]).to(hidden.dtype)
    sums = padded.view(batch, channels, windows, stride).sum(dim=-1)
    counts = valid.view(batch, 1, windows, stride).sum(dim=-1)
    return sums / counts.clamp(min=1), torch.div(lengths + stride - 1, stride, rounding_mode="floor")


def conv_output_length(length: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    return torch.div(length + 2 * padding - kernel, stride, rounding_mode="floor") + 1


class RewardModel(PreTrainedModel):
    config_class = RewardConfig
    base_model_prefix = "reward"
    main_input_name = "audio"

    def __init__(self, config: RewardConfig):
        super().__init__(config)
        if config.asr_encoder is not None:  # frozen ears from an ASR model (asr_encoder.py)
            self.asr_encoder = build_asr_encoder(config.asr_encoder)
            self.audio_projection = nn.Sequential(nn.Conv1d(config.asr_encoder_dim, config.audio_conv_channels, 1),
                                                  nn.ReLU())
        else:
            layers: list[nn.Module] = []
            in_channels = config.n_mel
            for _ in range(config.audio_conv_layers):
                layers += [nn.Conv1d(in_channels, config.audio_conv_channels, config.kernel_size, config.stride,
                                     config.padding),
                           nn.BatchNorm1d(config.audio_conv_channels), nn.ReLU()]
                in_channels = config.audio_conv_channels
            layers.append(nn.AdaptiveAvgPool1d(1))
            self.audio_encoder = nn.Sequential(*layers)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=config.pad_token_id)
        self.lstm = nn.LSTM(config.embed_dim, config.lstm_hidden, num_layers=config.lstm_layers,
                            batch_first=True, bidirectional=True)
        combined = config.audio_conv_channels + 2 * config.lstm_hidden
        if config.fusion == "attention":
            self.cross = CrossAttentionMatch(config.audio_conv_channels, 2 * config.lstm_hidden, config.attention_dim)
            combined += 2 * config.attention_dim
        if config.ctc_head:
            units = len(config.ctc_alphabet) if config.ctc_alphabet else config.vocab_size
            self.ctc = CTCEvidenceHead(config.audio_conv_channels, config.ctc_hidden, units)
            if config.ctc_alphabet:  # each piece's letters; filled from the tokenizer (set_spelling), saved with the weights
                self.register_buffer("ctc_spelling", torch.full((config.vocab_size, config.ctc_max_piece_chars), -1,
                                                                dtype=torch.long))
            combined += EVIDENCE_FEATURES
        self.head = nn.Sequential(
            nn.Linear(combined, config.head_hidden), nn.ReLU(), nn.Dropout(config.dropout),
            nn.Linear(config.head_hidden, config.head_hidden), nn.ReLU(),
            nn.Linear(config.head_hidden, 1), nn.Sigmoid(),
        )
        self.post_init()

    def train(self, mode: bool = True) -> "RewardModel":
        """As nn.Module's, but frozen ASR ears stay in eval mode (their BatchNorm statistics fixed)."""
        super().train(mode)
        if self.config.asr_encoder is not None:
            self.asr_encoder.eval()
        return self

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's default initialisation (as upstream); keep the padding row at zero.
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    # ----------------------------------------------------------------------------- pieces
    def embed_audio(self, audio: torch.Tensor, audio_len: torch.Tensor) -> Encoded:
        """audio [B, n_mel, T] log-mel features, audio_len [B] frames -> pooled [B, audio_conv_channels]
        (and, for attention fusion, the conv frames [B, T', C] projected to keys and values)."""
        cfg = self.config
        if cfg.pooling == "legacy":
            return Encoded(self.audio_encoder(audio).squeeze(-1))
        hidden, lengths = audio, audio_len
        mask = torch.arange(hidden.shape[-1], device=hidden.device)[None, :] < lengths[:, None]
        hidden = hidden * mask.unsqueeze(1)
        if cfg.asr_encoder is not None:
            with torch.no_grad():
                hidden, lengths = self.asr_encoder(audio_signal=hidden, length=lengths)
            hidden = self.audio_projection(hidden)
            mask = torch.arange(hidden.shape[-1], device=hidden.device)[None, :] < lengths[:, None]
            hidden = hidden * mask.unsqueeze(1)
        else:
            for index in range(cfg.audio_conv_layers):
                conv, norm, act = self.audio_encoder[3 * index: 3 * index + 3]
                hidden = act(norm(conv(hidden)))
                lengths = conv_output_length(lengths, cfg.kernel_size, cfg.stride, cfg.padding)
                mask = torch.arange(hidden.shape[-1], device=hidden.device)[None, :] < lengths[:, None]
                hidden = hidden * mask.unsqueeze(1)  # padding stays zero, exactly as for a clip alone
        pooled = hidden.sum(dim=-1) / lengths.clamp(min=1).unsqueeze(1).to(hidden.dtype)
        encoded = Encoded(pooled)
        if cfg.ctc_head:
            ctc_frames, encoded.ctc_lengths = window_means(hidden, lengths, cfg.ctc_stride)
            encoded.ctc_log_probs = self.ctc(ctc_frames, encoded.ctc_lengths)
        if cfg.fusion == "attention":
            windows, encoded.lengths = window_means(hidden, lengths, cfg.attention_stride)
            encoded.keys, encoded.states = self.cross.project_audio(windows.transpose(1, 2))
        return encoded

    def embed_text(self, text: torch.Tensor, text_attention_mask: torch.Tensor) -> Encoded:
        """text [N, L] ids, mask [N, L] -> masked mean of BiLSTM states [N, 2 * lstm_hidden] (and the
        states themselves for attention fusion)."""
        lengths = text_attention_mask.sum(dim=1).clamp(min=1)
        embedded = self.embedding(text)
        packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        output, _ = self.lstm(packed)
        output, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=text.shape[1])
        mask = (torch.arange(text.shape[1], device=text.device)[None, :] < lengths[:, None]).unsqueeze(-1)
        pooled = (output * mask).sum(dim=1) / lengths.unsqueeze(1).to(output.dtype)
        encoded = Encoded(pooled)
        if self.config.fusion == "attention":
            encoded.states, encoded.lengths = output, lengths
        if self.config.ctc_head:
            encoded.targets, encoded.target_lengths = ctc_targets(
                text, text_attention_mask, (self.config.eos_token_id, self.config.pad_token_id))
            if self.config.ctc_alphabet:
                space = self.config.ctc_alphabet.index(" ") if " " in self.config.ctc_alphabet else None
                encoded.targets, encoded.target_lengths = spell(encoded.targets, encoded.target_lengths,
                                                                self.ctc_spelling.cpu(), space)
        return encoded

    def set_spelling(self, pieces: list[str]) -> None:
        """Fill the piece -> letters table of a CTC head over ``ctc_alphabet`` from the tokenizer's pieces."""
        table = spelling_table(pieces, self.config.ctc_alphabet, self.config.ctc_max_piece_chars)
        self.ctc_spelling[: len(pieces)] = table[: self.ctc_spelling.shape[0]].to(self.ctc_spelling.device)

    def ctc_transcripts(self, audio: Encoded) -> list[str]:
        """The CTC head's greedy transcripts of the clips ``audio`` encodes (a head over ``ctc_alphabet``)."""
        if not (self.config.ctc_head and self.config.ctc_alphabet):
            raise ValueError("ctc_transcripts needs a CTC head over letters (model.ctc_head, model.ctc_alphabet)")
        return greedy_spelling(audio.ctc_log_probs, audio.ctc_lengths, self.config.ctc_alphabet)

    def ctc_nll(self, audio: Encoded, text: Encoded) -> torch.Tensor:
        """-log p(text | audio) [N] nats under the CTC head, for matched rows of audio and text."""
        return ctc_nll(audio.ctc_log_probs, audio.ctc_lengths, text.targets, text.target_lengths, self.ctc.blank)

    def score_embeddings(self, audio: Encoded, text: Encoded) -> torch.Tensor:
        """Encodings of N (audio, text) pairs (audio rows already matched to texts) -> scores [N] in [0, 1]."""
        parts = [audio.pooled, text.pooled]
        if self.config.fusion == "attention":
            parts.append(self.cross(audio, text))
        if self.config.ctc_head:
            nll = self.ctc_nll(audio, text)
            parts.append(evidence_features(nll, text.target_lengths, audio.ctc_lengths).to(audio.pooled.dtype))
        return self.head(torch.cat(parts, dim=-1)).squeeze(-1)

    def forward(self, audio: torch.Tensor, audio_len: torch.Tensor, text: torch.Tensor,
                text_attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                **unused: Any) -> RewardModelOutput:
        scores = self.score_embeddings(self.embed_audio(audio, audio_len), self.embed_text(text, text_attention_mask))
        loss = nn.functional.mse_loss(scores.float(), labels.float()) if labels is not None else None
        return RewardModelOutput(loss=loss, logits=scores)

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args: Any, **kwargs: Any) -> "RewardModel":
        """Our folders and the published layout; a shape or vocabulary mismatch names the tensor."""
        folder = Path(pretrained_model_name_or_path)
        if folder.is_dir():
            return load_reward_folder(folder, model_class=cls, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


def read_reward_config(folder: str | Path) -> RewardConfig:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a reward checkpoint: no config.json")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {exc.start + 1})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings, got a {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in (PublishedRewardConfig.model_type, RewardConfig.model_type) and "pretrained_config" not in raw:
        raise CheckpointError(f"{path}: model_type {model_type!r} is not a reward model "
                              f"({RewardConfig.model_type!r} or {PublishedRewardConfig.model_type!r})")
    try:
        if model_type == PublishedRewardConfig.model_type or "pretrained_config" in raw:
            return PublishedRewardConfig(**{k: v for k, v in raw.items() if k != "model_type"})
        return RewardConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: invalid settings ({type(exc).__name__}: {exc})") from None


def load_reward_folder(folder: str | Path, model_class: type = RewardModel, **config_overrides: Any) -> RewardModel:
    """Build the model from ``config.json`` and load ``model.safetensors`` strictly."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_reward_config(folder)
    for key, value in config_overrides.items():
        if key in ("torch_dtype", "dtype", "device_map"):
            continue
        setattr(config, key, value)
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder}: no model.safetensors (reward weights load only from safetensors)")
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own SafetensorError on corrupt headers
        raise CheckpointError(f"{weights}: cannot read safetensors: {exc}") from None
    try:
        model = model_class(config)
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as exc:  # e.g. an unknown pooling
        raise CheckpointError(f"{folder / 'config.json'}: invalid settings ({type(exc).__name__}: {exc})") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{weights}: state dict does not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            hint = " (vocab_size in config.json disagrees with the weights)" if name == "embedding.weight" else ""
            raise CheckpointError(f"{weights}: tensor {name} has shape {tuple(tensor.shape)} but the config "
                                  f"expects {tuple(expected[name].shape)}{hint}")
    damaged = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if damaged:  # a diverged training run: every score would be NaN
        raise CheckpointError(f"{weights}: NaN or infinite values in {', '.join(damaged[:5])}"
                              f"{' ...' if len(damaged) > 5 else ''}; the checkpoint cannot score")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model


class PublishedRewardModel(RewardModel):
    """The same model, registered for the published ``reward-model`` config type (AutoModel needs one
    model class per config class)."""

    config_class = PublishedRewardConfig


AutoConfig.register(RewardConfig.model_type, RewardConfig)
AutoConfig.register(PublishedRewardConfig.model_type, PublishedRewardConfig)
AutoModel.register(RewardConfig, RewardModel)
AutoModel.register(PublishedRewardConfig, PublishedRewardModel)
