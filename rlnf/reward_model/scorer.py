"""Scoring (audio, transcript) pairs with a frozen reward-model checkpoint, efficiently.

For B utterances with K hypotheses each, the mel features and the audio embedding are computed
once per utterance and reused for its K hypotheses; identical hypotheses within a group are
scored once. On CUDA the model runs under bf16 autocast. Used by the ``learned`` reward
(``rlnf.rewards.learned``) and ``rlnf score`` (``rlnf.reward_model.scoring``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

log = logging.getLogger(__name__)


class RewardScorer:
    """Scores groups of hypotheses against their audio with a reward checkpoint (frozen)."""

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "auto", batch_size: int = 64,
                 device_key: str = "--device"):
        from rlnf.reward_model.processor import load_reward_checkpoint
        from rlnf.training import resolve_device

        self.device = resolve_device(device, device_key) if isinstance(device, str) else device
        self.model, self.processor = load_reward_checkpoint(checkpoint, self.device)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.batch_size = batch_size
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
        self._warned_rate: int | None = None

    def _prepare_audio(self, audio: torch.Tensor, audio_len: torch.Tensor, sample_rate: int):
        target = self.processor.sample_rate
        if sample_rate != target:
            from rlnf.data.audio import resample

            if self._warned_rate != sample_rate:
                log.warning("resampling audio from %d Hz (policy) to %d Hz (reward model)", sample_rate, target)
                self._warned_rate = sample_rate
            waves = [resample(audio[b, : int(audio_len[b])].float().cpu().numpy(), sample_rate, target)
                     for b in range(audio.shape[0])]
            audio_len = torch.tensor([len(w) for w in waves])
            audio = torch.zeros(len(waves), int(audio_len.max()))
            for b, wave in enumerate(waves):
                audio[b, : len(wave)] = torch.from_numpy(wave)
        return audio.to(self.device), audio_len.to(self.device)

    @torch.inference_mode()
    def score_groups(self, audio: torch.Tensor, audio_len: torch.Tensor, sample_rate: int,
                     hypotheses: Sequence[Sequence[str]]) -> torch.Tensor:
        """audio [B, S], audio_len [B], hypotheses [B][K] -> scores [B, K] (float32, CPU)."""
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        audio, audio_len = self._prepare_audio(audio, audio_len, sample_rate)
        features, frames = self.processor.features(audio, audio_len)
        with autocast:
            audio_embedding = self.model.embed_audio(features, frames)  # once per utterance
        # Distinct (utterance, text) pairs; duplicates within a group are scored once.
        unique: dict[tuple[int, str], int] = {}
        for b, group in enumerate(hypotheses):
            for text in group:
                unique.setdefault((b, text), len(unique))
        pairs = list(unique)
        scores = torch.empty(len(pairs))
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            ids, mask = self.processor.encode_texts([text for _, text in chunk], self.device)
            rows = torch.tensor([b for b, _ in chunk], device=self.device)
            with autocast:
                text_embedding = self.model.embed_text(ids, mask)
                chunk_scores = self.model.score_embeddings(audio_embedding[rows].to(text_embedding.pooled.dtype),
                                                           text_embedding)
            scores[start:start + len(chunk)] = chunk_scores.float().cpu()
        return torch.tensor([[float(scores[unique[(b, text)]]) for text in group]
                             for b, group in enumerate(hypotheses)], dtype=torch.float32)

    @torch.inference_mode()
    def score_pairs_separately(self, audio: torch.Tensor, audio_len: torch.Tensor, sample_rate: int,
                               hypotheses: Sequence[Sequence[str]]) -> torch.Tensor:
        """Reference path without reuse: every pair through the full forward on its own (tests, benchmark)."""
        audio, audio_len = self._prepare_audio(audio, audio_len, sample_rate)
        out = torch.empty(len(hypotheses), len(hypotheses[0]))
        for b, group in enumerate(hypotheses):
            wave, length = audio[b:b + 1, : int(audio_len[b])], audio_len[b:b + 1]
            for k, text in enumerate(group):
                features, frames = self.processor.features(wave, length)
                ids, mask = self.processor.encode_texts([text], self.device)
                out[b, k] = self.model(features, frames, ids, mask).logits.float().cpu()[0]
        return out
