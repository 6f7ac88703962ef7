"""Lhotse input: a CutSet manifest (``cuts.jsonl.gz`` or ``cuts.jsonl``) or a directory of Lhotse Shar
shards (``CutSet.to_shar``), read as the same ``UtteranceTable`` as a NeMo manifest.

Each cut becomes one row, as a NeMo line would: its audio path (the recording's file, or, in Shar, the
cut's member ``<dir>/recording.N.tar/<cut id>.<ext>`` read by ``rlnf.data.tarred``), its text (the
texts of its supervisions, in time order, joined by a space; none: untranscribed) and its duration.
The row's line is the cut's 1-based index (blank lines skipped, Shar shards in order), so a CutSet and
its NeMo twin give the same sample keys; a row's ``fields`` (reward metadata) are the cut's JSON.
Everything downstream (validation, cache, bucketing, process sharding, resume) is the manifest's.

Read: MonoCut and MultiCut cuts whose recording has one ``file`` source (or lives in a Shar shard). A
cut of the whole recording and all its channels is known by the file's path alone (down-mixed to mono,
as a NeMo clip), so it loads exactly as the same file in a NeMo manifest; a cut of part of it, or of one
channel, by a segment of it (``rlnf.data.audio.Segment``: frames at the file's rate, counted as lhotse
counts them). Refused, with the cut's file, line and id: MixedCuts, cuts of several but not all
channels, recordings split over several files, ``url``/``command``/``memory`` sources, and audio
transforms other than resampling (every clip is resampled to the model's rate anyway). Relative source
paths are relative to the current directory, as in lhotse.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

from rlnf.errors import DataError

NEMO, CUTS, SHAR = "nemo", "lhotse_cuts", "lhotse_shar"
FORMATS = ("auto", NEMO, CUTS, SHAR)
_SHAR_CUTS = re.compile(r"^cuts\.(\d+)\.jsonl(\.gz)?$")


def is_gzip(path: Path) -> bool:
    """Whether ``path`` is a gzip file (told by its first bytes, not its name)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _open_lines(path: Path):
    """A binary handle on ``path``'s lines, decompressed when it is gzip."""
    return gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")


def _first_row(path: Path) -> Any:
    """The JSON value of the first non-blank line of ``path``, or None when it cannot be read."""
    try:
        with _open_lines(path) as handle:
            for raw in handle:
                if raw.strip():
                    return json.loads(raw.decode("utf-8"))
    except (OSError, ValueError, EOFError):
        return None
    return None


def looks_like_cut(row: Any) -> bool:
    """A Lhotse cut's JSON: no ``audio_filepath``, and a ``type`` or ``recording``/``supervisions`` key."""
    return (isinstance(row, dict) and "audio_filepath" not in row
            and any(key in row for key in ("type", "recording", "supervisions")))


def not_a_nemo_line(row: dict) -> None:
    """Raise the message for a Lhotse cut found where a NeMo manifest line was expected."""
    if looks_like_cut(row):
        raise DataError("this is a Lhotse cut, not a NeMo manifest line: set data.format=lhotse_cuts (or auto)")


def resolve_format(path: str | Path, format: str) -> str:
    """The format of the manifest ``path`` for the setting ``data.format`` (``auto``: a directory is Shar,
    a file whose first line is a Lhotse cut is a CutSet, and so is a gzip file whose first line is no NeMo
    line (to report what is wrong with it), anything else a NeMo manifest).

    Raises:
        DataError naming ``data.format`` and ``path`` when they disagree.
    """
    if format not in FORMATS:
        raise DataError(f"data.format={format!r}: choose one of {', '.join(FORMATS)}")
    source = Path(path).expanduser()
    if format == "auto":
        if source.is_dir():
            return SHAR
        first = _first_row(source)
        nemo_line = isinstance(first, dict) and "audio_filepath" in first
        format = CUTS if looks_like_cut(first) or (is_gzip(source) and not nemo_line) else NEMO
    if format == SHAR and not source.is_dir():
        raise DataError(f"data.format=lhotse_shar: {path} is not a directory (give the folder CutSet.to_shar wrote, "
                        "or set data.format=auto for a manifest file)")
    if format != SHAR and source.is_dir():
        raise DataError(f"data.format={format}: {path} is a directory (Lhotse Shar shards are read with "
                        "data.format=lhotse_shar or auto)")
    if format == NEMO and is_gzip(source):
        raise DataError(f"{path} is gzip-compressed, which a NeMo manifest is not: decompress it, or set "
                        "data.format=lhotse_cuts if it is a Lhotse CutSet")
    return format


def shar_shards(folder: Path) -> list[tuple[Path, Path]]:
    """(cuts file, recording tar) of every shard of a Shar directory, in shard order.

    Raises:
        DataError when the directory holds no shard, or a shard has no audio.
    """
    found = sorted((match.group(1), entry) for entry in folder.iterdir() if (match := _SHAR_CUTS.match(entry.name)))
    if not found:
        raise DataError(f"{folder} is a directory without Lhotse Shar shards (no cuts.NNNNNN.jsonl.gz): give a "
                        "manifest file (NeMo JSONL or Lhotse cuts), or the folder that CutSet.to_shar wrote")
    shards = []
    for number, cuts_file in found:
        audio = folder / f"recording.{number}.tar"
        if not audio.is_file():
            raise DataError(f"{cuts_file}: its audio shard {audio.name} is missing (write the Shar with "
                            "fields={'recording': 'flac'} or 'wav'; an uncompressed .tar is needed)")
        shards.append((cuts_file, audio))
    return shards


def source_files(manifest: Path, format: str) -> list[list]:
    """[path, size, mtime_ns] of every file besides ``manifest`` itself that a table read from it depends
    on (the manifest cache's key): a Shar directory's shards."""
    if format != SHAR:
        return []
    files = [path for shard in shar_shards(manifest) for path in shard]
    return [[str(path), path.stat().st_size, path.stat().st_mtime_ns] for path in files]


def _cut_files(manifest: Path, format: str) -> list[tuple[Path, Path | None]]:
    return shar_shards(manifest) if format == SHAR else [(manifest, None)]


class CutRows:
    """The parsed rows of a CutSet (``rlnf.data.manifest.ParsedRow``: line, byte offset in the
    decompressed cuts, parsed cut or its DataError), and ``where(line)``: the cuts file, its line and
    the cut's id, for messages. ``decode`` turns a line's bytes into JSON (the manifest's decoder, so
    a bad line reads as in a NeMo manifest)."""

    def __init__(self, manifest: Path, format: str, require_text: bool | str, decode: Callable[[bytes], Any]):
        self.manifest, self.format, self.require_text, self.decode = manifest, format, require_text, decode
        self.places: list[tuple[int, Path]] = []  # (first line, cuts file) of each file
        self.cut_ids: dict[int, str] = {}

    def where(self, line: int) -> str:
        first, cuts_file = next(place for place in reversed(self.places) if place[0] <= line)
        cut = f" (cut {self.cut_ids[line]})" if line in self.cut_ids else ""
        return f"{cuts_file}:{line - first + 1}{cut}"

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        line = offset = 0
        for cuts_file, audio_tar in _cut_files(self.manifest, self.format):
            self.places.append((line + 1, cuts_file))
            members = _audio_members(audio_tar) if audio_tar is not None else None
            for raw in _read_lines(cuts_file):
                line += 1
                start, offset = offset, offset + len(raw)
                if not raw.strip():  # blank lines count, as in a NeMo manifest
                    continue
                try:
                    row = self.decode(raw)
                    if isinstance(row, dict) and isinstance(row.get("id"), str):
                        self.cut_ids[line] = row["id"]
                    parsed = parse_cut(row, self.require_text, audio_tar, members)
                except DataError as exc:
                    yield line, start, exc
                    continue
                yield line, start, parsed


def _read_lines(cuts_file: Path) -> Iterator[bytes]:
    """The raw lines of a cuts file; DataError naming it when it cannot be read to the end (a damaged or
    cut-off gzip stream)."""
    line = 0
    try:
        with _open_lines(cuts_file) as handle:
            for raw in handle:
                line += 1
                yield raw
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{cuts_file}: cannot read past line {line} ({type(exc).__name__}: {exc}): is the file "
                        "damaged or cut off?") from None


def _audio_members(audio_tar: Path) -> dict[str, str]:
    """{cut id: member name} of the audio members of a Shar recording shard (``<id>.<ext>``)."""
    from rlnf.data.tarred import member_names

    return {name.rsplit(".", 1)[0]: name for name in member_names(str(audio_tar.resolve()))
            if not name.endswith(".json")}


def parse_cut(row: Any, require_text: bool | str, audio_tar: Path | None = None,
              members: dict[str, str] | None = None) -> tuple[str, str | None, float]:
    """(audio path, text or None, duration) of one cut's JSON; DataError (without location) when it
    cannot be trained on as written (see the module's docstring)."""
    from lhotse.serialization import deserialize_item
    from lhotse.utils import compute_num_samples

    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object (a Lhotse cut), got {type(row).__name__}")
    if not looks_like_cut(row):
        if "audio_filepath" in row:
            raise DataError("this is a NeMo manifest line (audio_filepath), not a Lhotse cut: set data.format=nemo "
                            "(or auto)")
        raise DataError("not a Lhotse cut (no 'type' key)")
    try:
        cut = deserialize_item(dict(row))
    except Exception as exc:  # noqa: BLE001 - lhotse raises KeyError, TypeError, ValueError... on bad cuts
        raise DataError(f"not a readable Lhotse cut ({type(exc).__name__}: {exc})") from None
    kind = type(cut).__name__
    if kind not in ("MonoCut", "MultiCut"):
        raise DataError(f"cut {getattr(cut, 'id', '?')} is a {kind}: only MonoCut and MultiCut (one recording each) "
                        "are read")
    recording = cut.recording
    if recording is None:
        raise DataError(f"cut {cut.id} has no recording (no audio)")
    transforms = [transform.get("name") if isinstance(transform, dict) else type(transform).__name__
                  for transform in recording.transforms or []]
    if any(name != "Resample" for name in transforms):
        raise DataError(f"cut {cut.id}: its recording has audio transforms {transforms}; only Resample is accepted "
                        "(clips are resampled to the model's rate)")
    rate = recording.sampling_rate
    whole = abs(cut.start) * rate < 0.5 and compute_num_samples(cut.duration, rate) == recording.num_samples
    channels = sorted(set(cut.channel if isinstance(cut.channel, list) else [cut.channel]))
    if len(recording.sources) != 1:
        raise DataError(f"cut {cut.id}: recording {recording.id} has {len(recording.sources)} audio sources (a file "
                        "per channel), which is not read")
    source = recording.sources[0]
    all_channels = channels == sorted(recording.channel_ids)
    if not all_channels and (len(channels) > 1 or channels[0] not in source.channels):
        raise DataError(f"cut {cut.id} takes channels {channels} of recording {recording.id}, which has "
                        f"{sorted(recording.channel_ids)}: a cut of one channel, or of all (down-mixed), is read")
    if source.type == "file":
        audio = os.path.abspath(os.path.expanduser(source.source))  # relative to the current directory, as in lhotse
    elif source.type == "shar" and members is not None:
        if cut.id not in members:
            raise DataError(f"cut {cut.id} has no audio in Shar shard {audio_tar}")
        audio = f"{audio_tar.resolve()}/{members[cut.id]}"
    elif source.type == "shar":
        raise DataError(f"cut {cut.id}: its audio is in a Lhotse Shar shard: give the Shar directory as the manifest "
                        "(data.format=lhotse_shar or auto), not one of its cuts files")
    else:
        raise DataError(f"cut {cut.id}: audio source type '{source.type}' is not read (only 'file' sources, and "
                        "Shar shards read as their directory)")
    if not (whole and all_channels):
        from rlnf.data.audio import Segment

        file_rate = _file_rate(recording)  # a segment is counted in the file's frames
        start = compute_num_samples(cut.start, file_rate)
        channel = None if all_channels else source.channels.index(channels[0])
        audio = Segment(start, start + compute_num_samples(cut.duration, file_rate), channel).key(audio)
    texts = [s.text for s in sorted(cut.supervisions, key=lambda s: s.start) if s.text is not None]
    text = " ".join(texts) if texts else None
    if require_text and text is None:
        reason = require_text if isinstance(require_text, str) else "a reference is required here"
        raise DataError(f"cut {cut.id} has no supervision text ({reason})")
    return audio, text, float(cut.duration)


def _file_rate(recording) -> int:
    """The sampling rate of the recording's file: before its Resample transforms, if any."""
    for transform in recording.transforms or []:
        kwargs = transform.get("kwargs", {}) if isinstance(transform, dict) else vars(transform)
        if "source_sampling_rate" in kwargs:
            return int(kwargs["source_sampling_rate"])
    return recording.sampling_rate


@functools.lru_cache(maxsize=4)
def _decompressed(manifest: str, stamp: int) -> bytes:
    path = Path(manifest)
    parts = []
    for cuts_file, _ in _cut_files(path, SHAR if path.is_dir() else CUTS):
        with _open_lines(cuts_file) as handle:
            parts.append(handle.read())
    return b"".join(parts)


def compressed_line(manifest: str, offset: int) -> bytes:
    """The line at byte ``offset`` of the decompressed cuts of ``manifest`` (a ``.gz`` CutSet, or a Shar
    directory's cuts files one after another). The decompressed cuts are kept in memory once asked for,
    until the file (or the directory's listing) changes or ``read_manifest`` reads it again (``forget``)."""
    data = _decompressed(manifest, os.stat(manifest).st_mtime_ns)
    end = data.find(b"\n", offset)
    return data[offset:] if end < 0 else data[offset:end + 1]


def forget() -> None:
    """Drop the decompressed cuts kept for ``compressed_line`` (a CutSet read again may have changed in place)."""
    _decompressed.cache_clear()
