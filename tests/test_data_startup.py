"""Start-up at scale (rlnf.data.manifest's table, rlnf.data.cache, rlnf.data.clips): the compact
table reads as the per-line objects did, the cache hits, misses and survives damage, lazy validation
names manifest:line, and each process of a group checks only its share of the clips."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile

from rlnf.data import clips
from rlnf.data.cache import cache_key, entry_path
from rlnf.data.loader import AudioDataset
from rlnf.data.manifest import UtteranceTable, read_manifest
from rlnf.errors import ConfigError, DataError
from tests.test_data import manifest, wav


@pytest.fixture()
def corpus_rows(tmp_path) -> list:
    """Rows with everything a manifest may hold: relative and absolute paths, repeats, blank lines,
    missing texts, extra fields, clips outside the duration limits, and bad lines."""
    (tmp_path / "audio").mkdir()
    for index, seconds in enumerate([0.2, 0.5, 1.0, 1.5]):
        wav(tmp_path / "audio" / f"{index}.wav", seconds=seconds)
    return [
        {"audio_filepath": "audio/0.wav", "text": "too short"},
        {"audio_filepath": "audio/1.wav", "text": "one", "speaker": 7},
        {"audio_filepath": str(tmp_path / "audio" / "2.wav"), "duration": 9.0, "text": "two"},
        "",
        {"audio_filepath": "audio/1.wav", "text": "one again"},
        {"audio_filepath": "audio/missing.wav", "text": "gone"},
        '{"audio_filepath": "audio/2.wav",',
        {"audio_filepath": "audio/3.wav"},
        {"audio_filepath": "./audio/2.wav", "text": "two", "score": 0.5},
    ]


@pytest.fixture()
def checked_clips(monkeypatch) -> list[str]:
    """The audio paths whose clip check runs (resolution and header read), as they run."""
    checked: list[str] = []
    original = clips._check_clip
    monkeypatch.setattr(clips, "_check_clip", lambda audio, *args: checked.append(audio) or original(audio, *args))
    return checked


def per_line_reading(path: Path) -> list[dict]:
    """What the reader kept before the table existed, worked out line by line: min_duration 0.3 and
    skip_bad; header durations; paths resolved against the manifest's folder."""
    kept = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            continue
        audio = Path(row["audio_filepath"])
        audio = str((audio if audio.is_absolute() else path.parent / audio).resolve())
        if not os.path.exists(audio):
            continue
        info = soundfile.info(audio)
        if info.frames / info.samplerate < 0.3:
            continue
        kept.append({"audio_filepath": audio, "duration": info.frames / info.samplerate, "text": row.get("text"),
                     "line": line, "fields": row, "where": f"{path.resolve()}:{line}"})
    return kept


def as_dicts(utterances) -> list[dict]:
    return [{"audio_filepath": u.audio_filepath, "duration": u.duration, "text": u.text, "line": u.line,
             "fields": u.fields, "where": u.where} for u in utterances]


def test_the_compact_table_gives_the_same_utterances_as_reading_line_by_line(tmp_path, corpus_rows):
    path = manifest(tmp_path / "m.json", corpus_rows)
    table, stats = read_manifest(path, skip_bad=True, min_duration=0.3)
    assert isinstance(table, UtteranceTable)
    expected = per_line_reading(path)
    assert as_dicts(table) == expected
    assert stats.kept == 5 and stats.lines == 8 and stats.duplicates == 2
    assert stats.skipped["audio file not found"] == 1 and stats.skipped["shorter than min_duration"] == 1
    assert sum(stats.skipped.values()) == 3  # and the malformed line
    assert table.texts == [row["text"] for row in expected]
    assert list(table.wheres) == [row["where"] for row in expected]
    assert table.durations.tolist() == pytest.approx([row["duration"] for row in expected])
    # slices, strides and index arrays are tables of those rows
    assert as_dicts(table[1:3]) == expected[1:3] and as_dicts(table[::2]) == expected[::2]
    assert as_dicts(table[np.array([4, 0])]) == [expected[4], expected[0]]
    assert table.rows_with_text(lambda text: "one" in text).tolist() == [0, 2]
    assert table.with_texts(str.upper).texts == [t and t.upper() for t in table.texts]


def test_cache_hits_misses_and_is_invalidated_by_a_new_mtime_or_option(tmp_path, corpus_rows, checked_clips, caplog):
    path = manifest(tmp_path / "m.json", corpus_rows)
    cache = tmp_path / "cache"
    first, first_stats = read_manifest(path, skip_bad=True, cache_dir=cache)
    assert len(list((cache / "manifests").glob("*.npz"))) == 1
    checked = checked_clips
    checked.clear()
    with caplog.at_level(logging.INFO, logger="rlnf"):
        second, second_stats = read_manifest(path, skip_bad=True, cache_dir=cache)
    assert not checked and "read from the cache" in caplog.text  # a hit reads no header
    assert as_dicts(second) == as_dicts(first) and second_stats == first_stats

    read_manifest(path, skip_bad=True, cache_dir=cache, min_duration=0.3)  # another option: a miss
    assert checked
    checked.clear()
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same bytes, new mtime: a miss
    read_manifest(path, skip_bad=True, cache_dir=cache)
    assert checked
    manifest(path, corpus_rows[:3])  # new content: its own entry, its own rows
    third, _ = read_manifest(path, skip_bad=True, cache_dir=cache)
    assert [u.line for u in third] == [1, 2, 3]


def test_a_corrupt_cache_entry_is_ignored_with_a_warning_and_rebuilt(tmp_path, corpus_rows, caplog):
    path = manifest(tmp_path / "m.json", corpus_rows)
    cache = tmp_path / "cache"
    expected = as_dicts(read_manifest(path, skip_bad=True, cache_dir=cache)[0])
    entry = entry_path(cache, cache_key(path.resolve(), {"text_key": "text", "require_text": False, "skip_bad": True,
                                                         "min_duration": 0.0, "max_duration": None,
                                                         "validate": "full"}))
    assert entry.exists()
    for damage in (b"not a zip file", entry.read_bytes()[: entry.stat().st_size // 2]):
        entry.write_bytes(damage)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rlnf"):
            assert as_dicts(read_manifest(path, skip_bad=True, cache_dir=cache)[0]) == expected
        assert "ignoring the unreadable manifest cache entry" in caplog.text and str(entry) in caplog.text
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="rlnf"):
            read_manifest(path, skip_bad=True, cache_dir=cache)
        assert "read from the cache" in caplog.text  # rebuilt and rewritten whole
    assert not [p for p in entry.parent.iterdir() if ".tmp" in p.name]  # atomic writes leave no temporary file


def test_lazy_validation_checks_a_clip_when_first_loaded_naming_manifest_and_line(tmp_path):
    wav(tmp_path / "a.wav", seconds=0.5)
    wav(tmp_path / "b.wav", seconds=0.5)
    data = (tmp_path / "b.wav").read_bytes()
    (tmp_path / "b.wav").write_bytes(data[: len(data) // 2])  # cut off: its header promises more
    path = manifest(tmp_path / "m.json", [{"audio_filepath": "a.wav", "duration": 0.5},
                                          {"audio_filepath": "missing.wav", "duration": 1.0},
                                          {"audio_filepath": "b.wav", "duration": 0.5},
                                          {"audio_filepath": "a.wav"}])  # no duration: its header is read now
    with pytest.raises(DataError, match=r"m\.json:2: audio file not found"):
        read_manifest(path)
    table, stats = read_manifest(path, validate="lazy")
    assert len(table) == 4 and table[3].duration == pytest.approx(0.5) and stats.kept == 4
    dataset = AudioDataset(table, 16000)
    assert len(dataset[0][0]) == 8000
    with pytest.raises(DataError, match=r"m\.json:2: audio file not found: .*missing\.wav"):
        dataset[1]
    with pytest.raises(DataError, match=r"m\.json:3: audio file is truncated"):
        dataset[2]
    assert AudioDataset(table, 16000, skip_bad=True)[1] is None  # skip_bad: skipped (and counted by the stream)
    no_duration = manifest(tmp_path / "n.json", [{"audio_filepath": "a.wav", "duration": 0.5},
                                                 {"audio_filepath": "missing.wav"}])
    with pytest.raises(DataError, match=r"n\.json:2: audio file not found"):
        read_manifest(no_duration, validate="lazy")


class ThreadGroup:
    """An all-gather of Python objects between threads: the process group's contract, in one process."""

    def __init__(self, world_size: int):
        self.barrier = threading.Barrier(world_size)
        self.slots: list = [None] * world_size

    def gather_for(self, rank: int):
        def gather(obj):
            self.slots[rank] = obj
            self.barrier.wait()
            gathered = list(self.slots)
            self.barrier.wait()
            return gathered
        return gather

    def run(self, work) -> list:
        """``work(rank, gather)`` in one thread per rank; the results in rank order."""
        results: list = [None] * len(self.slots)
        errors: list = []

        def process(rank: int) -> None:
            try:
                results[rank] = work(rank, self.gather_for(rank))
            except Exception as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=process, args=(rank,)) for rank in range(len(self.slots))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        if errors:
            raise errors[0]
        return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_process_checks_only_its_share_of_the_clips(tmp_path, corpus_rows, checked_clips, world_size):
    path = manifest(tmp_path / "m.json", corpus_rows)
    single = as_dicts(read_manifest(path, skip_bad=True)[0])
    checked_clips.clear()

    def process(rank: int, gather) -> list[dict]:
        return as_dicts(read_manifest(path, skip_bad=True, cache_dir=tmp_path / "cache", rank=rank,
                                      world_size=world_size, gather=gather)[0])

    assert ThreadGroup(world_size).run(process) == [single] * world_size
    distinct = {json.loads(line)["audio_filepath"] for line in path.read_text().splitlines() if line.startswith("{")
                and line.endswith("}")}
    assert sorted(checked_clips) == sorted(distinct)  # every distinct clip once over all processes, none twice
    checked_clips.clear()
    assert ThreadGroup(world_size).run(process) == [single] * world_size
    assert not checked_clips  # the second run: every process hit the cache


def test_data_validate_is_checked_by_the_config():
    from rlnf.config import DataConfig

    with pytest.raises(ConfigError, match="data.validate='sometimes'"):
        DataConfig(train_manifest="m.json", validate="sometimes")


def _gloo_process(rank: int, world_size: int, store: str, path: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    from rlnf.distributed import running_group

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        group_rank, group_size, gather = running_group()
        table, _ = read_manifest(path, skip_bad=True, cache_dir=Path(cache), rank=group_rank, world_size=group_size,
                                 gather=gather)
        Path(out).write_text(json.dumps([group_rank, group_size, as_dicts(table)]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_read_the_same_table_through_the_process_group(tmp_path, corpus_rows):
    """The real collective: running_group() inside a gloo process group of two processes."""
    import multiprocessing

    path = manifest(tmp_path / "m.json", corpus_rows)
    single = as_dicts(read_manifest(path, skip_bad=True)[0])
    context = multiprocessing.get_context("fork")
    outputs = [tmp_path / f"rank{rank}.json" for rank in range(2)]
    processes = [context.Process(target=_gloo_process, args=(rank, 2, str(tmp_path / "store"), str(path),
                                                              str(tmp_path / "cache"), str(outputs[rank])))
                 for rank in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0, 0]
    for rank, output in enumerate(outputs):
        assert json.loads(output.read_text()) == [rank, 2, json.loads(json.dumps(single))]
