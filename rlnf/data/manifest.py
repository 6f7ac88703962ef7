"""NeMo JSONL manifests: one JSON object per line with ``audio_filepath`` and optional
``duration`` and ``text`` (plus any other fields, which are kept as metadata).

Every problem is reported with the manifest path and line number. With ``skip_bad=True`` a bad
line is skipped and counted in ``ManifestStats`` instead (reported by the recipes).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from rlnf.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Utterance:
    """One manifest row, validated. ``audio_filepath`` is absolute; ``line`` is 1-based."""

    audio_filepath: str
    duration: float
    text: str | None
    manifest: str
    line: int
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"


@dataclass
class ManifestStats:
    """How many lines were read, kept and skipped (by reason)."""

    lines: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    duplicates: int = 0

    def summary(self) -> str:
        parts = [f"{self.kept} kept of {self.lines} lines"]
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())))
        if self.duplicates:
            parts.append(f"{self.duplicates} repeated audio_filepath entries (kept)")
        return "; ".join(parts)


def iter_manifest_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) of each non-blank line; decoding is the caller's, so a line
    that is not UTF-8 is reported with its number."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, raw


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a row naming a key twice is ambiguous (which value did the user mean?)."""
    row: dict[str, Any] = {}
    for key, value in pairs:
        if key in row:
            raise DataError(f"duplicate key {key!r} in one JSON object")
        row[key] = value
    return row


def decode_row(raw: bytes) -> Any:
    """One manifest line -> its JSON value; DataError (without location) when it cannot be read."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text (byte {exc.start + 1} of the line)") from None
    try:
        return json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON ({exc.msg}, column {exc.colno})") from None
    except RecursionError:
        raise DataError("malformed JSON (nested too deeply)") from None


def _audio_info(path: str) -> tuple[int, int]:
    """(frames, sample_rate) from the file header, raising DataError when unreadable or truncated."""
    import soundfile

    from rlnf.io import file_problem

    problem = file_problem(path)
    if problem:
        raise DataError(f"audio file {problem}: {path}")
    try:
        info = soundfile.info(path)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError on corrupt files
        raise DataError(f"cannot read audio file {path}: {exc}") from None
    if info.frames <= 0:
        raise DataError(f"audio file has no samples: {path}")
    _check_not_truncated(path, info)
    return info.frames, info.samplerate


def _check_not_truncated(path: str, info) -> None:
    """Refuse a WAV whose header promises more sample data than the file holds (a cut-off copy)."""
    if info.format != "WAV":
        return
    import struct

    with open(path, "rb") as handle:
        header = handle.read(1 << 16)
        size = handle.seek(0, 2)
    offset = 12
    while offset + 8 <= len(header):  # walk the RIFF chunks to 'data'
        chunk, length = struct.unpack_from("<4sI", header, offset)
        if chunk == b"data":
            if length != 0xFFFFFFFF and offset + 8 + length > size:  # 0xFFFFFFFF: streamed, size unknown
                raise DataError(f"audio file is truncated: its header promises {length} bytes of samples but the "
                                f"file holds {size - offset - 8}: {path}")
            return
        offset += 8 + length + (length & 1)


def parse_row(row: Any, manifest: Path, line: int, text_key: str, require_text: bool | str,
              check_audio: bool) -> Utterance:
    """Validate one decoded JSON row; raise DataError (without location) when it is unusable."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    audio = row.get("audio_filepath")
    if audio is None:
        raise DataError("missing key 'audio_filepath'")
    if not isinstance(audio, str) or not audio:
        raise DataError(f"'audio_filepath' must be a non-empty string, got {audio!r}")
    audio_path = Path(audio).expanduser()
    if not audio_path.is_absolute():
        audio_path = manifest.parent / audio_path
    try:
        audio = str(audio_path.resolve())
    except (RuntimeError, OSError) as exc:  # a symlink loop
        raise DataError(f"cannot resolve audio path {audio_path}: {exc}") from None

    text = row.get(text_key)
    if text is not None and not isinstance(text, str):
        raise DataError(f"'{text_key}' must be a string, got {type(text).__name__}")
    if require_text and text is None:
        reason = require_text if isinstance(require_text, str) else "a reference is required here"
        raise DataError(f"missing key '{text_key}' ({reason})")

    duration = row.get("duration")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float))
                                 or not math.isfinite(duration) or duration < 0):
        raise DataError(f"'duration' must be a non-negative number, got {duration!r}")
    if check_audio:
        frames, sample_rate = _audio_info(audio)
        duration = frames / sample_rate
    elif duration is None:
        raise DataError("missing 'duration' (and audio checks are off)")
    return Utterance(audio_filepath=audio, duration=float(duration), text=text, manifest=str(manifest),
                     line=line, fields=row)


def read_manifest(
    path: str | Path,
    text_key: str = "text",
    require_text: bool | str = False,
    skip_bad: bool = False,
    min_duration: float = 0.0,
    max_duration: float | None = None,
    check_audio: bool = True,
    warn_duplicates: bool = True,
) -> tuple[list[Utterance], ManifestStats]:
    """Read and validate a manifest. ``require_text`` may be a string: the reason shown when a row lacks text.

    With ``check_audio`` every audio file's header is read now (fast), so a missing or corrupt
    file is reported before training starts rather than hours into it; the real duration from
    the header replaces the manifest's ``duration``.

    Raises:
        DataError naming ``path:line`` for the first bad line (unless ``skip_bad``), and when no
        usable line remains.
    """
    from rlnf.io import file_problem

    problem = file_problem(Path(path).expanduser())
    if problem:
        raise DataError(f"manifest {problem}: {path}")
    manifest = Path(path).expanduser().resolve()
    stats = ManifestStats()
    utterances: list[Utterance] = []
    seen: set[str] = set()
    for line, raw in iter_manifest_lines(manifest):
        stats.lines += 1
        try:
            utterance = parse_row(decode_row(raw), manifest, line, text_key, require_text, check_audio)
        except DataError as exc:
            if not skip_bad:
                raise DataError(f"{manifest}:{line}: {exc}") from None
            reason = str(exc).split(":")[0]
            stats.skipped[reason] += 1
            log.warning("skipping %s:%d: %s", manifest, line, exc)
            continue
        if utterance.duration < min_duration:
            stats.skipped["shorter than min_duration"] += 1
            continue
        if max_duration is not None and utterance.duration > max_duration:
            stats.skipped["longer than max_duration"] += 1
            continue
        if utterance.audio_filepath in seen:
            stats.duplicates += 1
        seen.add(utterance.audio_filepath)
        utterances.append(utterance)
    stats.kept = len(utterances)
    if not utterances:
        detail = f" ({stats.summary()})" if stats.lines else ""
        raise DataError(f"{manifest}: no usable utterances{detail}")
    if stats.duplicates and warn_duplicates:
        log.warning("%s: %d entries repeat an audio_filepath seen earlier", manifest, stats.duplicates)
    return utterances, stats


def write_manifest(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (temp file + rename)."""
    from rlnf.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
