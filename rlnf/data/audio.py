"""Audio I/O with soundfile: any channel count down-mixed to mono, resampled to the model's rate.

Resampling uses scipy's polyphase filter (``resample_poly``): deterministic and of good quality,
without torchaudio (which has no build matching the torch used here).

A clip's path may name a segment of a file, ``<file>[<start>:<end>]`` or ``<file>[<start>:<end>,channel
<c>]`` (frames at the file's own rate, end excluded; one channel instead of the down-mix): how a
Lhotse cut of part of a recording is known (``rlnf.data.cuts``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from math import gcd
from typing import BinaryIO

import numpy as np

from rlnf.errors import DataError

_SEGMENT = re.compile(r"^(.+)\[(\d+):(\d+)(?:,channel (\d+))?\]$")
# How far a segment may run past the file's end (lhotse's default tolerance, 25 ms); it is cut there.
END_TOLERANCE_SECONDS = 0.025


@dataclass(frozen=True)
class Segment:
    """Frames [start, end) of a file at its own rate; ``channel``: that channel only (None: down-mix all)."""

    start: int
    end: int
    channel: int | None = None

    def key(self, path: str) -> str:
        """The clip path naming this segment of ``path``."""
        channel = "" if self.channel is None else f",channel {self.channel}"
        return f"{path}[{self.start}:{self.end}{channel}]"

    def frames(self, file_frames: int, rate: int, path: str) -> int:
        """Frames of the segment in a file of ``file_frames``; DataError naming ``path`` when it lies outside."""
        if self.start >= file_frames or self.end > file_frames + round(END_TOLERANCE_SECONDS * rate):
            raise DataError(f"segment {self.start / rate:.3f}-{self.end / rate:.3f} s lies outside the audio file "
                            f"({file_frames / rate:.3f} s): {path}")
        return min(self.end, file_frames) - self.start


def split_segment(path: str) -> tuple[str, Segment | None]:
    """(file, segment) of a clip path; (path, None) for a whole file (also one whose name ends in brackets).
    A segment's file is absolute (``rlnf.data.cuts`` writes it so), so no relative manifest path is taken for one."""
    match = _SEGMENT.match(path)
    if match is None or not os.path.isabs(match.group(1)) or os.path.exists(path):
        return path, None
    channel = match.group(4)
    return match.group(1), Segment(int(match.group(2)), int(match.group(3)), None if channel is None else int(channel))


def open_clip(path: str) -> tuple[str, str | BinaryIO, Segment | None]:
    """(file, what soundfile opens, segment or None) of a clip path: a file, a tar member
    (``rlnf.data.tarred``, read into memory), either with a segment."""
    from rlnf.data.tarred import clip_source

    file, segment = split_segment(path)
    return file, clip_source(file), segment


def resample(audio: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling of a 1-D float signal from ``source_rate`` to ``target_rate`` Hz."""
    if source_rate == target_rate:
        return audio
    from scipy.signal import resample_poly

    divisor = gcd(source_rate, target_rate)
    return resample_poly(audio, target_rate // divisor, source_rate // divisor).astype(np.float32)


def load_audio(path: str, sample_rate: int) -> np.ndarray:
    """Read ``path`` (a file, or a tar member: ``rlnf.data.tarred``; either may name a segment) as mono
    float32 at ``sample_rate`` Hz.

    Raises:
        DataError naming the file when it is missing, unreadable, empty or holds NaN/inf.
    """
    file, source, segment = open_clip(path)
    return decode_audio(source, sample_rate, file, segment)


def decode_audio(source: str | BinaryIO, sample_rate: int, path: str, segment: Segment | None = None) -> np.ndarray:
    """``load_audio`` of ``source``: the file ``path``, or its bytes already read (errors name ``path``);
    only ``segment`` of it when given."""
    import soundfile

    start, stop = (0, None) if segment is None else (segment.start, segment.end)
    try:
        audio, source_rate = soundfile.read(source, start=start, stop=stop, dtype="float32", always_2d=True)
    except Exception as exc:
        raise DataError(f"cannot read audio file {path}: {exc}") from None
    if audio.shape[0] == 0:
        raise DataError(f"audio file has no samples{'' if segment is None else ' in the segment'}: {path}")
    if segment is not None and segment.channel is not None:
        if segment.channel >= audio.shape[1]:
            raise DataError(f"channel {segment.channel} asked of an audio file with {audio.shape[1]}: {path}")
        mono = audio[:, segment.channel]
    else:
        mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if not np.isfinite(mono).all():
        raise DataError(f"audio file holds NaN or infinite samples: {path}")
    return np.ascontiguousarray(resample(mono, source_rate, sample_rate), dtype=np.float32)
