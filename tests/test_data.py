"""Manifests, audio loading and batching: every failure names the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from rlnf.data.audio import load_audio
from rlnf.data.loader import AudioDataset, TrainStream, bucketed_batches, collate
from rlnf.data.manifest import read_manifest
from rlnf.errors import DataError


def wav(path: Path, seconds=0.5, rate=16000, channels=1, value=None) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    signal = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    if value is not None:
        signal[:] = value
    data = np.stack([signal] * channels, axis=1) if channels > 1 else signal
    soundfile.write(str(path), data, rate, subtype="FLOAT" if value is not None else "PCM_16")
    return path


def manifest(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_relative_paths_resolve_against_manifest_folder(tmp_path):
    (tmp_path / "audio").mkdir()
    wav(tmp_path / "audio" / "a.wav", seconds=0.25)
    utterances, stats = read_manifest(manifest(tmp_path / "m.json", [{"audio_filepath": "audio/a.wav", "text": "hi"}]))
    assert utterances[0].audio_filepath == str((tmp_path / "audio" / "a.wav").resolve())
    assert utterances[0].duration == pytest.approx(0.25) and utterances[0].line == 1 and stats.kept == 1


@pytest.mark.parametrize("row, message", [
    ('{"audio_filepath": "a.wav",', "malformed JSON"),
    ({"text": "x"}, "missing key 'audio_filepath'"),
    ({"audio_filepath": 3}, "'audio_filepath' must be a non-empty string"),
    ({"audio_filepath": "a.wav", "text": 5}, "'text' must be a string"),
    ({"audio_filepath": "a.wav", "duration": "long"}, "'duration' must be a non-negative number"),
    ({"audio_filepath": "missing.wav"}, "audio file not found"),
    ({"audio_filepath": "corrupt.wav"}, "cannot read audio file"),
    ({"audio_filepath": "empty.wav"}, "no samples"),
    ('[1, 2]', "expected a JSON object"),
])
def test_bad_lines_name_manifest_and_line(tmp_path, row, message):
    wav(tmp_path / "a.wav")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage")
    soundfile.write(str(tmp_path / "empty.wav"), np.zeros(0, dtype=np.float32), 16000)
    path = manifest(tmp_path / "m.json", [{"audio_filepath": "a.wav"}, row])
    with pytest.raises(DataError, match=rf"m\.json:2: .*{message}"):
        read_manifest(path)
    utterances, stats = read_manifest(path, skip_bad=True)
    assert len(utterances) == 1 and sum(stats.skipped.values()) == 1


def test_empty_manifest_and_missing_text(tmp_path):
    with pytest.raises(DataError, match="no usable utterances"):
        read_manifest(manifest(tmp_path / "empty.json", []))
    wav(tmp_path / "a.wav")
    with pytest.raises(DataError, match=r"m\.json:1: missing key 'text'"):
        read_manifest(manifest(tmp_path / "m.json", [{"audio_filepath": "a.wav"}]), require_text=True)
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "nope.json")


def test_duration_filters_and_duplicates_are_counted(tmp_path):
    wav(tmp_path / "short.wav", seconds=0.1)
    wav(tmp_path / "long.wav", seconds=2.0)
    wav(tmp_path / "ok.wav", seconds=0.5)
    rows = [{"audio_filepath": f} for f in ("short.wav", "long.wav", "ok.wav", "ok.wav")]
    utterances, stats = read_manifest(manifest(tmp_path / "m.json", rows), min_duration=0.2, max_duration=1.0)
    assert [Path(u.audio_filepath).name for u in utterances] == ["ok.wav", "ok.wav"]
    assert stats.skipped["shorter than min_duration"] == 1 and stats.skipped["longer than max_duration"] == 1
    assert stats.duplicates == 1 and "repeated" in stats.summary()


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resampling_to_model_rate(tmp_path, rate):
    audio = load_audio(str(wav(tmp_path / "a.wav", seconds=1.0, rate=rate)), 16000)
    assert audio.dtype == np.float32 and abs(len(audio) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) - 440) <= 2  # the 440 Hz tone survives resampling


def test_stereo_is_down_mixed(tmp_path):
    audio = load_audio(str(wav(tmp_path / "s.wav", channels=2)), 16000)
    assert audio.ndim == 1 and len(audio) == 8000


def test_nan_audio_is_rejected(tmp_path):
    path = wav(tmp_path / "nan.wav", value=np.nan)
    with pytest.raises(DataError, match="NaN"):
        load_audio(str(path), 16000)


def test_bucketed_batches_cover_everything_deterministically():
    durations = list(np.random.default_rng(0).uniform(1, 10, size=103))
    batches = bucketed_batches(durations, batch_size=8, bucket_size=4, seed=3, epoch=1)
    assert sorted(i for b in batches for i in b) == list(range(103))
    assert batches == bucketed_batches(durations, batch_size=8, bucket_size=4, seed=3, epoch=1)
    assert batches != bucketed_batches(durations, batch_size=8, bucket_size=4, seed=3, epoch=2)
    # Bucketing keeps padding small: duration spread inside a batch is far below the global spread.
    spread = np.mean([np.ptp([durations[i] for i in b]) for b in batches if len(b) > 1])
    assert spread < 0.3 * np.ptp(durations)


def test_train_stream_resumes_at_the_same_batch(tmp_path):
    rows = []
    for i in range(10):
        wav(tmp_path / f"{i}.wav", seconds=0.1 + 0.05 * i)
        rows.append({"audio_filepath": f"{i}.wav"})
    utterances, _ = read_manifest(manifest(tmp_path / "m.json", rows))
    dataset = AudioDataset(utterances, 16000)

    def take(stream, n):
        iterator = iter(stream)
        return [[u.line for u in next(iterator).utterances] for _ in range(n)]

    full = take(TrainStream(dataset, 3, 2, True, seed=1), 7)
    first = TrainStream(dataset, 3, 2, True, seed=1)
    head = take(first, 3)
    resumed = TrainStream(dataset, 3, 2, True, seed=1)
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 4) == full


def test_collate_pads_and_skips(tmp_path):
    batch = collate([(np.ones(3, np.float32), "a"), None, (np.ones(5, np.float32), "b")])
    assert batch.audio.shape == (2, 5) and batch.audio_len.tolist() == [3, 5] and batch.audio[0, 3:].sum() == 0
    assert collate([None]) is None
