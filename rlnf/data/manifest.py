"""NeMo JSONL manifests: one JSON object per line with ``audio_filepath`` and optional
``duration`` and ``text`` (plus any other fields, which are kept as metadata).

Every problem is reported with the manifest path and line number. With ``skip_bad=True`` a bad
line is skipped and counted in ``ManifestStats`` instead (reported by the recipes).

A manifest of a million lines is read into an ``UtteranceTable``: a few numpy columns plus each
distinct path and transcript once (about 32 bytes a line), not an object per line. Each distinct
clip is checked once, on a thread pool (``rlnf.data.clips``); the table can be cached
(``rlnf.data.cache``), so a second run or a resume over the same manifest skips all of it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from rlnf.errors import DataError

log = logging.getLogger(__name__)


VALIDATE_MODES = ("full", "lazy")


@dataclass
class Utterance:
    """One manifest row, validated. ``audio_filepath`` is absolute; ``line`` is 1-based.

    ``fields`` is the row as written (every key, references not normalised). Read from a table, it is
    decoded from the manifest's line at byte ``offset`` on first use, so rows nobody asks about cost
    nothing."""

    audio_filepath: str
    duration: float
    text: str | None
    manifest: str
    line: int
    row: dict[str, Any] | None = field(default=None, repr=False)
    offset: int = -1

    @property
    def where(self) -> str:
        return f"{self.manifest}:{self.line}"

    @property
    def fields(self) -> dict[str, Any]:
        if self.row is None:
            self.row = read_row(self.manifest, self.offset, self.line) if self.offset >= 0 else {}
        return self.row


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

    def to_dict(self) -> dict[str, Any]:
        return {"lines": self.lines, "kept": self.kept, "skipped": dict(self.skipped), "duplicates": self.duplicates}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "ManifestStats":
        return cls(saved["lines"], saved["kept"], Counter(saved["skipped"]), saved["duplicates"])


def iter_manifest_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(1-based line number, byte offset, raw bytes) of each non-blank line; decoding is the caller's,
    so a line that is not UTF-8 is reported with its number."""
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield number, offset, raw
            offset += len(raw)


def read_row(manifest: str, offset: int, line: int) -> dict[str, Any]:
    """The JSON object on ``line`` of ``manifest``, which starts at byte ``offset`` (of the decompressed
    cuts, for a compressed Lhotse CutSet or a Shar directory: ``rlnf.data.cuts``)."""
    from rlnf.data.cuts import compressed_line, is_gzip

    if os.path.isdir(manifest) or manifest.endswith(".gz") or is_gzip(Path(manifest)):  # gzip told by its bytes
        raw = compressed_line(manifest, offset)
    else:
        with open(manifest, "rb") as handle:
            handle.seek(offset)
            raw = handle.readline()
    try:
        row = decode_row(raw)
    except DataError as exc:
        raise DataError(f"{manifest}:{line}: {exc} (was the manifest changed while training?)") from None
    if not isinstance(row, dict):
        raise DataError(f"{manifest}:{line}: expected a JSON object (was the manifest changed while training?)")
    return row


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


def check_row(row: Any, text_key: str, require_text: bool | str) -> tuple[str, str | None, float | None]:
    """(audio_filepath as written, text, duration or None) of one decoded JSON row; DataError
    (without location) when it is unusable. The audio file itself is checked by ``rlnf.data.clips``."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    audio = row.get("audio_filepath")
    if audio is None:
        raise DataError("missing key 'audio_filepath'")
    if not isinstance(audio, str) or not audio:
        raise DataError(f"'audio_filepath' must be a non-empty string, got {audio!r}")
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
    return audio, text, None if duration is None else float(duration)


class UtteranceTable(Sequence[Utterance]):
    """The validated rows of one manifest, column by column.

    Columns [N]: ``path_index`` and ``text_index`` (int32, into ``paths`` and ``texts``, which hold
    each distinct audio path and transcript once; text index -1: no transcript), ``durations``
    (float64 seconds), ``lines`` (1-based) and ``offsets`` (byte offset of the line, for ``fields``).
    ``table[i]`` is an ``Utterance``; ``table[a:b]``, ``table[::k]`` or ``table[index_array]`` a table
    of those rows sharing the string lists.
    """

    def __init__(self, manifest: str, paths: list[str], texts: list[str], columns: dict[str, np.ndarray]):
        self.manifest = manifest
        self.paths = paths
        self.distinct_texts = texts
        self.path_index = columns["path_index"]
        self.text_index = columns["text_index"]
        self.durations = columns["durations"]
        self.lines = columns["lines"]
        self.offsets = columns["offsets"]

    def columns(self) -> dict[str, np.ndarray]:
        return {"path_index": self.path_index, "text_index": self.text_index, "durations": self.durations,
                "lines": self.lines, "offsets": self.offsets}

    def __len__(self) -> int:
        return len(self.durations)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            row = int(index)
            text = int(self.text_index[row])
            return Utterance(self.paths[self.path_index[row]], float(self.durations[row]),
                             self.distinct_texts[text] if text >= 0 else None, self.manifest,
                             int(self.lines[row]), offset=int(self.offsets[row]))
        return UtteranceTable(self.manifest, self.paths, self.distinct_texts,
                              {name: column[index] for name, column in self.columns().items()})

    def __iter__(self) -> Iterator[Utterance]:
        return (self[row] for row in range(len(self)))

    @property
    def texts(self) -> list[str | None]:
        """The transcript of every row (None where the row has none)."""
        texts = self.distinct_texts + [None]  # index -1 lands on None
        return [texts[index] for index in self.text_index.tolist()]

    def where(self, row: int) -> str:
        return f"{self.manifest}:{int(self.lines[row])}"

    @property
    def wheres(self) -> Sequence[str]:
        """``manifest:line`` of every row, each made when asked for (for error messages)."""
        return _Locations(self)

    def rows_with_text(self, predicate: Callable[[str], Any]) -> np.ndarray:
        """Rows [M] (in order) whose transcript satisfies ``predicate``, asked once per distinct text."""
        hits = np.array([bool(predicate(text)) for text in self.distinct_texts] + [False])  # last: no text (-1)
        return np.flatnonzero(hits[self.text_index])

    def with_texts(self, transform: Callable[[str], str]) -> "UtteranceTable":
        """The same rows with ``transform`` applied to every transcript (once per distinct text)."""
        return UtteranceTable(self.manifest, self.paths, [transform(text) for text in self.distinct_texts],
                              self.columns())


class _Locations(Sequence[str]):
    def __init__(self, table: UtteranceTable):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, row):
        return self.table.where(row)


def durations_of(utterances: Sequence[Utterance]) -> np.ndarray:
    """Seconds of every utterance [N]: a table's column, or gathered from a list."""
    if isinstance(utterances, UtteranceTable):
        return utterances.durations
    return np.array([u.duration for u in utterances], dtype=np.float64)


def read_manifest(
    path: str | Path,
    text_key: str = "text",
    require_text: bool | str = False,
    skip_bad: bool = False,
    min_duration: float = 0.0,
    max_duration: float | None = None,
    validate: str = "full",
    warn_duplicates: bool = True,
    cache_dir: Path | None = None,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[Any], list[Any]] | None = None,
    tarred_audio_filepaths: str | None = None,
    format: str = "auto",
) -> tuple[UtteranceTable, ManifestStats]:
    """Read and validate a manifest. ``require_text`` may be a string: the reason shown when a row lacks text.

    ``validate='full'`` reads every distinct audio file's header now (fast, parallel), so a missing
    or corrupt file is reported before training starts rather than hours into it; the real duration
    from the header replaces the manifest's ``duration``. ``'lazy'`` reads only the headers of rows
    without a ``duration``; the others are checked when first loaded (``AudioDataset``), with the
    same message. ``cache_dir``: where the validated table is cached (``rlnf.data.cache``), None for
    no cache. In a run of ``world_size`` processes each checks its share of the clips and ``gather``
    (an all-gather of Python objects) pools them; every process gets the whole table.
    ``tarred_audio_filepaths``: the tar shards (NeMo's brace syntax) of a NeMo tarred manifest, whose
    ``audio_filepath`` values are member names and ``shard_id`` their shards (``rlnf.data.tarred``).
    ``format``: 'nemo' (JSONL lines), 'lhotse_cuts' (a Lhotse CutSet, ``.jsonl`` or ``.jsonl.gz``),
    'lhotse_shar' (a directory of Lhotse Shar shards) or 'auto' (told apart by ``rlnf.data.cuts``);
    a CutSet becomes the same table as its NeMo twin (line: the cut's 1-based index).

    Raises:
        DataError naming ``path:line`` for the first bad line (unless ``skip_bad``), and when no
        usable line remains.
    """
    from rlnf.data.cache import cache_key, load_entry, save_entry
    from rlnf.io import file_problem

    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate={validate!r}: choose one of {', '.join(VALIDATE_MODES)}")
    from rlnf.data import cuts

    format = cuts.resolve_format(path, format)
    if format != cuts.SHAR:
        problem = file_problem(Path(path).expanduser())
        if problem:
            raise DataError(f"manifest {problem}: {path}")
    manifest = Path(path).expanduser().resolve()
    if format != cuts.NEMO:
        cuts.forget()  # rows' fields come from the cuts as they are now
    shards = None
    if tarred_audio_filepaths is not None:
        from rlnf.data.tarred import expand_shards

        if format != cuts.NEMO:
            raise DataError(f"data.tarred_audio_filepaths is set but {path} is a Lhotse {format} source, which "
                            "holds its own audio: unset data.tarred_audio_filepaths (or set data.format=nemo)")
        shards = expand_shards(tarred_audio_filepaths)
    key = entry = None
    if cache_dir is not None:
        options = {"text_key": text_key, "require_text": require_text, "skip_bad": skip_bad,
                   "min_duration": min_duration, "max_duration": max_duration, "validate": validate}
        if shards is not None:  # a plain manifest's key stays what it was
            options["tar_shards"] = shards
        if format != cuts.NEMO:  # so is a NeMo manifest's
            options.update(format=format, files=cuts.source_files(manifest, format))
        key = cache_key(manifest, options)
        entry = load_entry(cache_dir, key)
        if world_size > 1 and not all(gather(entry is not None)):  # one process missing: all rebuild together
            entry = None
    if entry is not None:
        columns, meta = entry
        table = UtteranceTable(str(manifest), meta["paths"], meta["texts"], columns)
        stats = ManifestStats.from_dict(meta["stats"])
        log.info("%s: validated table read from the cache (%d rows)", manifest, len(table))
    else:
        if format == cuts.NEMO:
            rows, where = _nemo_rows(manifest, text_key, require_text, shards), None
        else:
            rows = cuts.CutRows(manifest, format, require_text, decode_row)
            where = rows.where
        table, stats = _validate(manifest, rows, skip_bad, min_duration, max_duration, validate, rank,
                                 world_size, gather, where)
        if key is not None:
            save_entry(cache_dir, key, table.columns(), {"paths": table.paths, "texts": table.distinct_texts,
                                                         "stats": stats.to_dict()})
    if stats.duplicates and warn_duplicates:
        log.warning("%s: %d entries repeat an audio_filepath seen earlier", manifest, stats.duplicates)
    return table, stats


def _skip(stats: ManifestStats, where: str, problem: str) -> None:
    stats.skipped[problem.split(":")[0]] += 1
    log.warning("skipping %s: %s", where, problem)


# One parsed line: (1-based line, byte offset, (audio path, text, duration or None) or the DataError
# (without location) that makes it unusable).
ParsedRow = tuple[int, int, "tuple[str, str | None, float | None] | DataError"]


def _nemo_rows(manifest: Path, text_key: str, require_text: bool | str,
               shards: list[str] | None) -> Iterator[ParsedRow]:
    """The parsed lines of a NeMo manifest. With tar ``shards`` each row's audio becomes the path of
    its member (``rlnf.data.tarred``)."""
    from rlnf.data.cuts import not_a_nemo_line
    from rlnf.data.tarred import member_key

    for line, offset, raw in iter_manifest_lines(manifest):
        try:
            row = decode_row(raw)
            if isinstance(row, dict) and "audio_filepath" not in row:
                not_a_nemo_line(row)
            audio, text, duration = check_row(row, text_key, require_text)
            if shards is not None:
                audio = member_key(row, audio, shards)
        except DataError as exc:
            yield line, offset, exc
            continue
        yield line, offset, (audio, text, duration)


def _validate(manifest: Path, rows: Iterator[ParsedRow], skip_bad: bool, min_duration: float,
              max_duration: float | None, validate: str, rank: int, world_size: int,
              gather: Callable[[Any], list[Any]] | None,
              where: Callable[[int], str] | None = None) -> tuple[UtteranceTable, ManifestStats]:
    """Take every parsed row (a NeMo manifest's or a Lhotse CutSet's), check each distinct clip once,
    and build the table (see ``read_manifest``). Relative audio paths are relative to ``manifest``'s
    folder. ``where(line)`` names a row in messages (default ``manifest:line``)."""
    from rlnf.data.clips import check_clips

    where = where or (lambda line: f"{manifest}:{line}")

    stats = ManifestStats()
    # 1. Collect the rows into compact columns; each distinct audio string and text gets one index.
    raw_paths: dict[str, int] = {}
    texts: dict[str, int] = {}
    raw_index, text_index, lines, offsets = array("i"), array("i"), array("q"), array("q")
    manifest_seconds = array("d")
    first_error = None  # a bad row stops the scan: no later line can change the error reported
    for line, offset, parsed in rows:
        stats.lines += 1
        if isinstance(parsed, DataError):
            if not skip_bad:
                first_error = DataError(f"{where(line)}: {parsed}")
                break
            _skip(stats, where(line), str(parsed))
            continue
        audio, text, duration = parsed
        raw_index.append(raw_paths.setdefault(audio, len(raw_paths)))
        text_index.append(-1 if text is None else texts.setdefault(text, len(texts)))
        lines.append(line)
        offsets.append(offset)
        manifest_seconds.append(math.nan if duration is None else duration)
    raw_index, lines, manifest_seconds = np.asarray(raw_index), np.asarray(lines), np.asarray(manifest_seconds)

    # 2. Resolve each distinct path, reading its header when validating in full or when a row lacks a duration.
    if validate == "full":
        read_header = [True] * len(raw_paths)
    else:
        read_header = np.zeros(len(raw_paths), dtype=bool)
        read_header[raw_index[np.isnan(manifest_seconds)]] = True
        read_header = read_header.tolist()
    results = check_clips(list(raw_paths), read_header, manifest.parent, rank, world_size, gather)

    # 3. Bad clips, in line order: the first is the error (it precedes any bad row found in step 1).
    clip_bad = np.array([problem is not None for _, _, problem in results], dtype=bool).reshape(-1)
    keep = ~clip_bad[raw_index]
    for row in np.flatnonzero(~keep):
        problem = results[raw_index[row]][2]
        if not skip_bad:
            raise DataError(f"{where(int(lines[row]))}: {problem}")
        _skip(stats, where(int(lines[row])), problem)
    if first_error is not None:
        raise first_error

    # 4. Durations (the header's when read), the duration limits, and the distinct resolved paths.
    clip_seconds = np.array([math.nan if seconds is None else seconds for _, seconds, _ in results],
                            dtype=np.float64)
    header_seconds = clip_seconds[raw_index]
    seconds = np.where(np.isnan(header_seconds), manifest_seconds, header_seconds)
    longest = math.inf if max_duration is None else max_duration
    for reason, outside in (("shorter than min_duration", seconds < min_duration),
                            ("longer than max_duration", seconds > longest)):
        outside &= keep
        if outside.any():
            stats.skipped[reason] += int(outside.sum())
            keep &= ~outside
    paths: dict[str, int] = {}
    path_of_raw = np.array([-1 if path is None else paths.setdefault(path, len(paths)) for path, _, _ in results],
                           dtype=np.int32)
    rows = np.flatnonzero(keep)
    path_index = path_of_raw[raw_index[rows]]
    stats.kept = len(rows)
    stats.duplicates = int(len(rows) - len(np.unique(path_index)))
    if not len(rows):
        detail = f" ({stats.summary()})" if stats.lines else ""
        raise DataError(f"{manifest}: no usable utterances{detail}")
    columns = {"path_index": path_index, "text_index": np.asarray(text_index)[rows], "durations": seconds[rows],
               "lines": lines[rows], "offsets": np.asarray(offsets)[rows]}
    return UtteranceTable(str(manifest), list(paths), list(texts), columns), stats

def write_manifest(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write rows as JSONL atomically (temp file + rename)."""
    from rlnf.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
