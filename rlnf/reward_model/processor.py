"""Turns waveforms and transcripts into the reward model's inputs.

Audio: NeMo's ``AudioToMelSpectrogramPreprocessor`` with the settings stored in the checkpoint's
config (the QuartzNet front end: 16 kHz, 64 mel, 20 ms Hann window, 10 ms stride, n_fft 512,
per-feature normalisation over each clip's own frames, no dither), so no ASR ``.nemo`` is needed.

Text: the folder's SentencePiece ``tokenizer.model``; ids are ``sp.encode(text)`` followed by the
end-of-sequence id when ``append_eos`` (the convention of transformers' T5Tokenizer, which the
published checkpoint was trained with), padded with ``pad_token_id``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rlnf.errors import CheckpointError
from rlnf.reward_model.modeling import RewardConfig, read_reward_config

TOKENIZER_FILE = "tokenizer.model"


class RewardProcessor:
    def __init__(self, config: RewardConfig, tokenizer_file: str | Path):
        import sentencepiece

        from rlnf.io import file_problem

        tokenizer_file = Path(tokenizer_file)
        problem = file_problem(tokenizer_file)
        if problem:
            raise CheckpointError(f"reward tokenizer {problem}: {tokenizer_file}")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_file))
        except Exception as exc:
            raise CheckpointError(f"{tokenizer_file}: not a SentencePiece model: {exc}") from None
        if self.sp.get_piece_size() > config.vocab_size:
            raise CheckpointError(f"{tokenizer_file}: the tokenizer has {self.sp.get_piece_size()} pieces but the "
                                  f"config's vocab_size is {config.vocab_size}: they must agree")
        self.config = config
        self.tokenizer_file = tokenizer_file
        self.eos_id = config.eos_token_id if config.eos_token_id is not None else self.sp.piece_to_id("</s>")
        self.pad_id = config.pad_token_id
        self._preprocessor = None

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "RewardProcessor":
        folder = Path(folder)
        return cls(read_reward_config(folder), folder / TOKENIZER_FILE)

    def save_pretrained(self, folder: str | Path) -> None:
        target = Path(folder) / TOKENIZER_FILE
        if self.tokenizer_file.resolve() != target.resolve():
            shutil.copyfile(self.tokenizer_file, target)

    # ----------------------------------------------------------------------------- audio
    @property
    def sample_rate(self) -> int:
        return int(self.config.sample_rate)

    def preprocessor(self, device: torch.device | str = "cpu"):
        if self._preprocessor is None:
            from nemo.collections.asr.modules import AudioToMelSpectrogramPreprocessor

            cfg = self.config
            self._preprocessor = AudioToMelSpectrogramPreprocessor(
                sample_rate=cfg.sample_rate, features=cfg.n_mel, window_size=cfg.window_size,
                window_stride=cfg.window_stride, n_fft=cfg.n_fft, window=cfg.window, normalize=cfg.normalize,
                pad_to=cfg.pad_to, dither=0.0, frame_splicing=1,
            ).eval()
        return self._preprocessor.to(device)

    @torch.no_grad()
    def features(self, audio: torch.Tensor, audio_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Waveforms [B, S] at ``sample_rate`` -> (log-mel [B, n_mel, T], frames [B])."""
        preprocessor = self.preprocessor(audio.device)
        with torch.autocast(device_type=audio.device.type, enabled=False):
            features, frames = preprocessor(input_signal=audio.float(), length=audio_len)
        return features, frames

    # ----------------------------------------------------------------------------- text
    def encode(self, text: str) -> list[int]:
        ids = list(self.sp.encode(text)) if text else []
        return ids + [self.eos_id] if self.config.append_eos else ids

    def encode_texts(self, texts: Sequence[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Texts -> (ids [N, L], attention mask [N, L]); an empty text without EOS keeps one pad token."""
        encoded = [self.encode(text) for text in texts]
        length = max(1, max((len(ids) for ids in encoded), default=1))
        ids = torch.full((len(encoded), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, sequence in enumerate(encoded):
            ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            mask[row, : max(1, len(sequence))] = 1
        return ids.to(device), mask.to(device)

    # ----------------------------------------------------------------------------- both
    def __call__(self, audios: Sequence[str | np.ndarray], texts: Sequence[str],
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Audio files (or 1-D arrays at ``sample_rate``) and texts -> the model's keyword inputs."""
        from rlnf.data.audio import load_audio

        waves = [load_audio(a, self.sample_rate) if isinstance(a, (str, Path)) else np.asarray(a, np.float32)
                 for a in audios]
        lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
        batch = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
        for row, wave in enumerate(waves):
            batch[row, : len(wave)] = torch.from_numpy(wave)
        features, frames = self.features(batch.to(device), lengths.to(device))
        ids, mask = self.encode_texts(texts, device)
        return {"audio": features, "audio_len": frames, "text": ids, "text_attention_mask": mask}


def load_reward_checkpoint(folder: str | Path, device: torch.device | str = "cpu"):
    """(RewardModel in eval mode on ``device``, RewardProcessor) from a self-contained folder."""
    from rlnf.reward_model.modeling import RewardModel

    from rlnf.io import file_problem

    folder = Path(folder).expanduser()
    problem = file_problem(folder, kind="folder")
    if problem:
        raise CheckpointError(f"reward checkpoint folder {problem}: {folder}")
    processor = RewardProcessor.from_pretrained(folder)
    model = RewardModel.from_pretrained(folder).to(device).eval()
    return model, processor
