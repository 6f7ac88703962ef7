"""Audio I/O with soundfile: any channel count down-mixed to mono, resampled to the model's rate.

Resampling uses scipy's polyphase filter (``resample_poly``): deterministic and of good quality,
without torchaudio (which has no build matching the torch used here).
"""

from __future__ import annotations

from math import gcd
from typing import BinaryIO

import numpy as np

from rlnf.errors import DataError


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling of a 1-D float signal from ``source_rate`` to ``target_rate`` Hz."""
    if source_rate == target_rate:
        return audio
    from scipy.signal import resample_poly

    divisor = gcd(source_rate, target_rate)
    return resample_poly(audio, target_rate // divisor, source_rate // divisor).astype(np.float32)


def load_audio(path: str, sample_rate: int) -> np.ndarray:
    """Read ``path`` (a file, or a tar member: ``rlnf.data.tarred``) as mono float32 at ``sample_rate`` Hz.

    Raises:
        DataError naming the file when it is missing, unreadable, empty or holds NaN/inf.
    """
    from rlnf.data.tarred import clip_source

    return decode_audio(clip_source(path), sample_rate, path)


def decode_audio(source: str | BinaryIO, sample_rate: int, path: str) -> np.ndarray:
    """``load_audio`` of ``source``: the file ``path``, or its bytes already read (errors name ``path``)."""
    import soundfile

    try:
        audio, source_rate = soundfile.read(source, dtype="float32", always_2d=True)
    except Exception as exc:
        raise DataError(f"cannot read audio file {path}: {exc}") from None
    if audio.shape[0] == 0:
        raise DataError(f"audio file has no samples: {path}")
    mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if not np.isfinite(mono).all():
        raise DataError(f"audio file holds NaN or infinite samples: {path}")
    return np.ascontiguousarray(resample(mono, source_rate, sample_rate), dtype=np.float32)
