"""Audio clip checks from the file header: exists, readable, not empty, not cut off.

A manifest names each clip once per line, and a large one names the same clips many times; the
checks here run once per distinct path, on a thread pool (header reads wait on the disk or the
network file system, not on Python), and in a multi-process run each process checks only its
share of the paths (``rlnf.distributed.shard_bounds``) before the results are gathered.
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional, Sequence

from rlnf.errors import DataError

# Header reads are I/O bound: more threads than cores keep a network file system busy.
HEADER_THREADS = min(32, 4 * (os.cpu_count() or 1))


def audio_info(path: str) -> tuple[int, int]:
    """(frames, sample_rate) from the header of a file, or of a tar member (``rlnf.data.tarred``), or of
    a segment of either (``rlnf.data.audio``: its frames), raising DataError when unreadable or truncated."""
    from rlnf.data.audio import open_clip

    file, source, segment = open_clip(path)
    frames, rate = header_info(source, file)
    return (frames if segment is None else segment.frames(frames, rate, file)), rate


def header_info(source: str | BinaryIO, path: str) -> tuple[int, int]:
    """(frames, sample_rate) of ``source``: the file ``path``, or its bytes already read (a tar
    member), left at position 0. DataError naming ``path`` when unreadable, empty or truncated."""
    import soundfile

    from rlnf.io import file_problem

    problem = file_problem(source) if isinstance(source, str) else None
    if problem:
        raise DataError(f"audio file {problem}: {path}")
    try:
        info = soundfile.info(source)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError on corrupt files
        raise DataError(f"cannot read audio file {path}: {exc}") from None
    finally:
        if not isinstance(source, str):
            source.seek(0)
    if info.frames <= 0:
        raise DataError(f"audio file has no samples: {path}")
    _check_not_truncated(source, path, info)
    return info.frames, info.samplerate


def _check_not_truncated(source: str | BinaryIO, path: str, info) -> None:
    """Refuse a WAV whose header promises more sample data than the file holds (a cut-off copy)."""
    if info.format != "WAV":
        return
    with open(source, "rb") if isinstance(source, str) else nullcontext(source) as handle:
        header = handle.read(1 << 16)
        size = handle.seek(0, 2)
        handle.seek(0)
    offset = 12
    while offset + 8 <= len(header):  # walk the RIFF chunks to 'data'
        chunk, length = struct.unpack_from("<4sI", header, offset)
        if chunk == b"data":
            if length != 0xFFFFFFFF and offset + 8 + length > size:  # 0xFFFFFFFF: streamed, size unknown
                raise DataError(f"audio file is truncated: its header promises {length} bytes of samples but the "
                                f"file holds {size - offset - 8}: {path}")
            return
        offset += 8 + length + (length & 1)


def resolve_audio_path(audio: str, manifest_folder: Path) -> str:
    """The absolute, symlink-free path of a manifest's ``audio_filepath`` (relative to the manifest's folder)."""
    audio_path = Path(audio).expanduser()
    if not audio_path.is_absolute():
        audio_path = manifest_folder / audio_path
    try:
        return str(audio_path.resolve())
    except (RuntimeError, OSError) as exc:  # a symlink loop
        raise DataError(f"cannot resolve audio path {audio_path}: {exc}") from None


# One clip's outcome: (resolved path, seconds from the header or None, None), or (None, None, problem).
ClipResult = tuple[Optional[str], Optional[float], Optional[str]]


def _check_clip(audio: str, manifest_folder: Path, read_header: bool) -> ClipResult:
    from rlnf.data.audio import split_segment
    from rlnf.data.tarred import split_member

    try:
        # A tar member's path (rlnf.data.tarred) and a segment's (rlnf.data.audio) are already absolute.
        path = audio if split_member(audio) or split_segment(audio)[1] else resolve_audio_path(audio, manifest_folder)
        if not read_header:
            return path, None, None
        frames, sample_rate = audio_info(path)
        return path, frames / sample_rate, None
    except DataError as exc:
        return None, None, str(exc)


def check_clips(audio: Sequence[str], read_header: Sequence[bool], manifest_folder: Path,
                rank: int = 0, world_size: int = 1,
                gather: Callable[[Any], list[Any]] | None = None) -> list[ClipResult]:
    """Resolve every distinct ``audio`` path (and read its header where ``read_header``), in parallel.

    Returns one ``ClipResult`` per path: ``(resolved_path, seconds or None, None)``, or
    ``(None, None, problem)``.
    With ``world_size > 1`` this process checks only its contiguous share of the paths and
    ``gather`` (an all-gather of Python objects over the processes) assembles every share.
    """
    from rlnf.distributed import shard_bounds

    low, high = shard_bounds(len(audio), rank, world_size)

    def check(index: int) -> ClipResult:
        return _check_clip(audio[index], manifest_folder, read_header[index])

    with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
        results = list(pool.map(check, range(low, high), chunksize=64))
    if world_size == 1:
        return results
    return [result for share in gather(results) for result in share]
