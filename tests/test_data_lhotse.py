"""Lhotse input (``rlnf.data.cuts``): a CutSet (``cuts.jsonl.gz``) and Lhotse Shar shards read as the same
table as the NeMo manifest they were made from, give the same batches, and train exactly like it, resume
included; bad cuts are named by file, line and cut id.

The twins are written with lhotse's own API (``Recording.from_file``, ``SupervisionSegment``,
``CutSet.from_manifests``, ``to_file``, ``to_shar``); rlnf reads them through ``rlnf.data.cuts``."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlnf.data.loader import AudioDataset
from rlnf.data.manifest import read_manifest
from rlnf.errors import DataError
from tests.test_data_tarred import first_batches


def lhotse_twin(manifest: str, folder: Path) -> dict[str, str]:
    """{'cuts': cuts.jsonl.gz, 'shar': Shar directory} holding ``manifest``'s lines as cuts, in the same order:
    one recording, one supervision (text, speaker) and one whole-recording cut per line."""
    from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

    folder.mkdir(parents=True, exist_ok=True)
    base = Path(manifest).parent
    recordings, supervisions = [], []
    for row in map(json.loads, open(manifest, encoding="utf-8")):
        name = row["audio_filepath"].replace("/", "-").removesuffix(".wav")
        recording = Recording.from_file(base / row["audio_filepath"], recording_id=name)
        recordings.append(recording)
        supervisions.append(SupervisionSegment(id=f"{name}-text", recording_id=name, start=0.0,
                                               duration=recording.duration, text=row["text"], speaker=row["speaker"]))
    cuts = CutSet.from_manifests(recordings=RecordingSet.from_recordings(recordings),
                                 supervisions=SupervisionSet.from_segments(supervisions))
    cuts.to_file(folder / "cuts.jsonl.gz")
    (folder / "shar").mkdir()  # lhotse writes into an existing folder
    cuts.to_shar(folder / "shar", fields={"recording": "flac"}, shard_size=5)
    return {"cuts": str(folder / "cuts.jsonl.gz"), "shar": str(folder / "shar")}


@pytest.fixture(scope="module")
def twins(corpus, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lhotse")
    return {"train": lhotse_twin(corpus["train"], folder / "train"), "val": lhotse_twin(corpus["val"], folder / "val")}


def write_cuts(path: Path, rows: list) -> str:
    """``rows`` (dicts, or raw lines) as a gzip-compressed cuts file."""
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return str(path)


def cut_rows(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("kind", ["cuts", "shar"])
def test_a_cutset_reads_as_its_nemo_twin(corpus, twins, kind):
    plain, _ = read_manifest(corpus["train"])
    table, stats = read_manifest(twins["train"][kind])
    assert stats.kept == len(plain) == 24 and not stats.skipped
    assert table.texts == plain.texts
    np.testing.assert_array_equal(table.durations, plain.durations)
    np.testing.assert_array_equal(table.lines, plain.lines)  # cut index = line: the same sample keys
    first = table[0]
    assert first.fields["id"] == "wav-" + "-".join(Path(plain[0].audio_filepath).parts[-2:])[:-4] + "-0"  # the cut's JSON
    assert first.fields["supervisions"][0]["speaker"] == plain[0].fields["speaker"]
    plain_audio, cut_audio = AudioDataset(plain, 16000), AudioDataset(table, 16000)
    for index in range(len(plain)):
        np.testing.assert_array_equal(cut_audio[index][0], plain_audio[index][0])


def test_the_audio_is_what_lhotse_loads(twins):
    """Independent of the NeMo twin: each clip equals lhotse's own ``cut.load_audio()``."""
    from lhotse import CutSet

    table, _ = read_manifest(twins["train"]["cuts"])
    dataset = AudioDataset(table, 16000)
    for index, cut in enumerate(CutSet.from_file(twins["train"]["cuts"])):
        np.testing.assert_array_equal(dataset[index][0], cut.load_audio()[0])
        assert table[index].text == cut.supervisions[0].text


def test_a_resampled_cut_loads_like_its_file_in_a_nemo_manifest(corpus, tmp_path):
    """A recording at 8 kHz (cut.resample(16000) records a Resample transform) and the same file in a
    NeMo manifest: resampled alike to the model's rate."""
    import soundfile
    from lhotse import MonoCut, Recording

    source = Path(corpus["train"]).parent / json.loads(open(corpus["train"]).readline())["audio_filepath"]
    samples, rate = soundfile.read(source, dtype="int16")
    low = tmp_path / "low.wav"
    soundfile.write(low, samples[::2], rate // 2, subtype="PCM_16")
    recording = Recording.from_file(low)
    cut = MonoCut(id="low", start=0, duration=recording.duration, channel=0, recording=recording).resample(16000)
    cuts = write_cuts(tmp_path / "cuts.jsonl.gz", [cut.to_dict()])
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"audio_filepath": str(low)}) + "\n")
    from_cuts = AudioDataset(read_manifest(cuts)[0], 16000)[0][0]
    np.testing.assert_array_equal(from_cuts, AudioDataset(read_manifest(plain)[0], 16000)[0][0])
    assert len(from_cuts) == 2 * len(samples[::2])


def test_a_cut_of_part_of_a_recording_or_of_one_channel_loads_what_lhotse_loads(corpus, tmp_path):
    """Segments (start, duration) and channel selection, against lhotse's own ``cut.load_audio()``; a segment
    past the file's end is named."""
    import soundfile
    from lhotse import MonoCut, MultiCut, Recording

    source = Path(corpus["train"]).parent / json.loads(open(corpus["train"]).readline())["audio_filepath"]
    samples, rate = soundfile.read(source, dtype="int16")
    stereo = tmp_path / "stereo.wav"
    soundfile.write(stereo, np.stack([samples, samples[::-1]], axis=1), rate, subtype="PCM_16")
    mono, two = Recording.from_file(source), Recording.from_file(stereo)
    cuts = [MonoCut(id="middle", start=0.31, duration=0.52, channel=0, recording=mono),
            MonoCut(id="right", start=0.0, duration=two.duration, channel=1, recording=two),
            MonoCut(id="right-part", start=0.2, duration=0.4, channel=1, recording=two),
            MultiCut(id="both", start=0.0, duration=two.duration, channel=[0, 1], recording=two),
            MonoCut(id="low", start=0.1, duration=0.3, channel=0, recording=mono).resample(8000)]
    path = write_cuts(tmp_path / "parts.jsonl.gz", [cut.to_dict() for cut in cuts])
    for validate in ("full", "lazy"):
        table, _ = read_manifest(path, validate=validate, cache_dir=None)
        dataset = AudioDataset(table, 16000)
        for index, cut in enumerate(cuts[:3]):
            np.testing.assert_array_equal(dataset[index][0], cut.load_audio()[0], err_msg=cut.id)
            assert table.durations[index] == pytest.approx(cut.duration)
        np.testing.assert_allclose(dataset[3][0], cuts[3].load_audio().mean(axis=0), atol=1e-7)  # down-mixed
        resampled = dataset[4][0]
        assert len(resampled) == round(0.3 * 16000) and table.durations[4] == pytest.approx(0.3)
    beyond = MonoCut(id="beyond", start=mono.duration - 0.1, duration=0.5, channel=0, recording=mono)
    row = beyond.to_dict()
    row["recording"].update(num_samples=mono.num_samples * 2, duration=mono.duration * 2)  # a wrong length
    with pytest.raises(DataError, match=r"beyond.jsonl.gz:1 \(cut beyond\): segment .* lies outside the audio file"):
        read_manifest(write_cuts(tmp_path / "beyond.jsonl.gz", [row]), cache_dir=None)


def test_the_loader_gives_the_same_batches_as_the_nemo_twin(corpus, twins):
    """Two processes' shards of the same global batches, from the start and from a saved position."""
    plain, _ = read_manifest(corpus["train"])
    tables = {kind: read_manifest(path)[0] for kind, path in twins["train"].items()}
    for rank in (0, 1):
        for position in (0, 2):
            expected = first_batches(plain, rank, position)
            for table in tables.values():
                for plain_batch, batch in zip(expected, first_batches(table, rank, position)):
                    assert [u.line for u in batch.utterances] == [u.line for u in plain_batch.utterances]
                    assert batch.references == plain_batch.references
                    assert torch.equal(batch.audio, plain_batch.audio)


def test_the_format_is_detected_and_a_wrong_data_format_is_named(corpus, twins):
    from rlnf.data.cuts import resolve_format

    assert resolve_format(corpus["train"], "auto") == "nemo"
    assert resolve_format(twins["train"]["cuts"], "auto") == "lhotse_cuts"
    assert resolve_format(twins["train"]["shar"], "auto") == "lhotse_shar"
    with pytest.raises(DataError, match=r"train.json:1: .*NeMo manifest line .*set data.format=nemo"):
        read_manifest(corpus["train"], format="lhotse_cuts", cache_dir=None)
    with pytest.raises(DataError, match=r"cuts.jsonl.gz is gzip-compressed.*data.format=lhotse_cuts"):
        read_manifest(twins["train"]["cuts"], format="nemo", cache_dir=None)
    with pytest.raises(DataError, match=r"data.format=lhotse_shar: .*train.json is not a directory"):
        read_manifest(corpus["train"], format="lhotse_shar", cache_dir=None)
    with pytest.raises(DataError, match=r"data.format=lhotse_cuts: .*shar is a directory"):
        read_manifest(twins["train"]["shar"], format="lhotse_cuts", cache_dir=None)
    with pytest.raises(DataError, match="data.tarred_audio_filepaths is set"):
        read_manifest(twins["train"]["cuts"], tarred_audio_filepaths="audio_{0..1}.tar", cache_dir=None)
    # An uncompressed cuts file given as a NeMo manifest: the line says what it is.
    plain_cuts = Path(twins["train"]["cuts"]).with_name("cuts.jsonl")
    plain_cuts.write_text("".join(json.dumps(row) + "\n" for row in cut_rows(twins["train"]["cuts"])))
    with pytest.raises(DataError, match=r"cuts.jsonl:1: this is a Lhotse cut.*data.format=lhotse_cuts"):
        read_manifest(plain_cuts, format="nemo", cache_dir=None)
    from_plain = read_manifest(plain_cuts)[0]
    assert from_plain.texts == read_manifest(corpus["train"])[0].texts
    assert from_plain[2].fields == cut_rows(twins["train"]["cuts"])[2]  # read at its byte offset
    from rlnf.config import DataConfig
    from rlnf.errors import ConfigError

    with pytest.raises(ConfigError, match="data.format"):
        DataConfig(train_manifest="x", format="lhotse")


def test_bad_cuts_name_the_file_the_line_and_the_cut(twins, tmp_path):
    rows = cut_rows(twins["train"]["cuts"])
    first_bad = write_cuts(tmp_path / "first_bad.jsonl.gz", ['{"id": "broken"', *rows[1:]])
    with pytest.raises(DataError, match=r"first_bad.jsonl.gz:1: malformed JSON"):  # detected as cuts: it is gzip
        read_manifest(first_bad, cache_dir=None)
    corrupt = write_cuts(tmp_path / "corrupt.jsonl.gz", [*rows[:2], '{"id": "broken", "type": "MonoCut"', *rows[3:]])
    with pytest.raises(DataError, match=r"corrupt.jsonl.gz:3: malformed JSON"):
        read_manifest(corrupt, cache_dir=None)
    cut_off = tmp_path / "cut_off.jsonl.gz"
    cut_off.write_bytes(Path(twins["train"]["cuts"]).read_bytes()[:-100])
    with pytest.raises(DataError, match=r"cut_off.jsonl.gz: cannot read past line \d+ .*damaged or cut off"):
        read_manifest(cut_off, cache_dir=None)
    table, stats = read_manifest(corrupt, skip_bad=True, cache_dir=None)
    assert len(table) == len(rows) - 1 and 3 not in table.lines and sum(stats.skipped.values()) == 1

    missing = json.loads(json.dumps(rows[4]))
    missing["recording"]["sources"][0]["source"] = str(tmp_path / "gone.wav")
    path = write_cuts(tmp_path / "missing.jsonl.gz", [*rows[:4], missing])
    with pytest.raises(DataError) as error:
        read_manifest(path, cache_dir=None)
    assert f"missing.jsonl.gz:5 (cut {missing['id']}): audio file not found: {tmp_path / 'gone.wav'}" in str(error.value)
    table, _ = read_manifest(path, validate="lazy", cache_dir=None)  # found when loaded: file and line
    with pytest.raises(DataError, match=r"missing.jsonl.gz:5: audio file not found: .*gone.wav"):
        AudioDataset(table, 16000)[4]

    url = json.loads(json.dumps(rows[0]))
    url["recording"]["sources"][0].update(type="url", source="https://example.com/a.wav")
    not_a_cut = {"id": "x", "type": "MonoCut", "start": 0}
    untranscribed = json.loads(json.dumps(rows[1]))
    untranscribed["supervisions"] = []
    for row, expected in ((url, r"part.jsonl.gz:1 \(cut .*\): cut .*: audio source type 'url' is not read"),
                          (not_a_cut, r"part.jsonl.gz:1 \(cut x\): not a readable Lhotse cut"),
                          ({"id": "m", "type": "MixedCut", "tracks": []}, r"part.jsonl.gz:1 \(cut m\): .*MixedCut")):
        with pytest.raises(DataError, match=expected):
            read_manifest(write_cuts(tmp_path / "part.jsonl.gz", [row]), cache_dir=None)
    table, _ = read_manifest(write_cuts(tmp_path / "untranscribed.jsonl.gz", [untranscribed]), cache_dir=None)
    assert table[0].text is None  # a cut without supervision text: untranscribed, as a NeMo line without text
    with pytest.raises(DataError, match=r"untranscribed.jsonl.gz:1 \(cut .*\): cut .* has no supervision text"):
        read_manifest(str(tmp_path / "untranscribed.jsonl.gz"), require_text=True, cache_dir=None)


def test_a_shar_directory_without_shards_or_audio_says_so(twins, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"empty is a directory without Lhotse Shar shards .*give a manifest file"):
        read_manifest(empty)
    with pytest.raises(DataError, match=r"cuts.000000.jsonl.gz:1 \(cut .*\): .*give the Shar directory"):
        read_manifest(Path(twins["train"]["shar"], "cuts.000000.jsonl.gz"), cache_dir=None)
    no_audio = tmp_path / "no_audio"
    no_audio.mkdir()
    (no_audio / "cuts.000000.jsonl.gz").write_bytes(Path(twins["train"]["shar"], "cuts.000000.jsonl.gz").read_bytes())
    with pytest.raises(DataError, match=r"cuts.000000.jsonl.gz: its audio shard recording.000000.tar is missing"):
        read_manifest(no_audio)


def test_a_shar_error_names_the_shard_file_and_its_line(twins, tmp_path):
    import shutil

    copy = tmp_path / "shar"
    shutil.copytree(twins["train"]["shar"], copy)
    rows = cut_rows(str(copy / "cuts.000001.jsonl.gz"))
    rows[1]["id"] = "renamed"  # no member renamed.flac in recording.000001.tar
    write_cuts(copy / "cuts.000001.jsonl.gz", rows)
    with pytest.raises(DataError, match=r"cuts.000001.jsonl.gz:2 \(cut renamed\): cut renamed has no audio in Shar "
                                        r"shard .*recording.000001.tar"):
        read_manifest(copy)


def final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "trainer_state.pt", weights_only=True)


def test_a_cutset_and_shar_train_like_the_nemo_twin_resume_included(corpus, twins, pretrained_tiny_nemo, tmp_path):
    """Three RL steps (rloo, 2 samples, cer) with validation on the NeMo manifests; on the CutSet and on
    the Shar twins the run stops after step 2 and resumes to 3: the same metrics every step, the same
    weights and data position."""
    from rlnf.cli import main
    from rlnf.metric_logging import read_metrics

    def run(out: Path, data: dict, *extra: str) -> int:
        return main(["run", "rl_finetune", "--config", "rl/rloo", f"policy.path={pretrained_tiny_nemo}",
                     f"data.train_manifest={data['train']}", f"data.val_manifest={data['val']}", f"output_dir={out}",
                     "trainer.batch_size=4", "algorithm.num_samples=2", "trainer.val_every=2", "trainer.save_every=2",
                     "trainer.samples_every=0", "trainer.progress_bar=false", "trainer.lr=3e-4",
                     "trainer.lr_schedule=constant", "trainer.loggers=[]", "rewards=[{name: cer}]", *extra])

    def comparable(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if not k.startswith("perf/") and "time" not in k and "seconds" not in k}
                for row in rows]

    assert run(tmp_path / "nemo", corpus, "trainer.max_steps=3") == 0
    expected, state = comparable(read_metrics(tmp_path / "nemo")), final_state(tmp_path / "nemo")
    assert len(expected) >= 3 and any("val/cer" in row for row in expected)
    for kind in ("cuts", "shar"):
        data = {"train": twins["train"][kind], "val": twins["val"][kind]}
        assert run(tmp_path / kind, data, "trainer.max_steps=2") == 0
        assert final_state(tmp_path / kind)["step"] == 2
        assert run(tmp_path / kind, data, "trainer.max_steps=3", "resume=true") == 0
        assert comparable(read_metrics(tmp_path / kind)) == expected, kind
        resumed = final_state(tmp_path / kind)
        assert resumed["step"] == 3 and resumed["data"] == state["data"]
        for name, tensor in state["model"].items():
            torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=0, msg=name)
    # rlnf evaluate reads them too: the same WER, CER and transcripts.
    from rlnf.commands import evaluate

    reference = evaluate(str(tmp_path / "nemo" / "checkpoints" / "last.nemo"), corpus["val"], device="cpu",
                         output=str(tmp_path / "nemo.eval.json"))
    for kind in ("cuts", "shar"):
        result = evaluate(str(tmp_path / "nemo" / "checkpoints" / "last.nemo"), twins["val"][kind], device="cpu")
        assert {k: result[k] for k in ("wer", "cer", "n")} == {k: reference[k] for k in ("wer", "cer", "n")}


def test_the_manifest_cache_serves_a_cutset_and_a_shar_directory_until_a_shard_changes(twins, tmp_path):
    import shutil

    copy = tmp_path / "shar"
    shutil.copytree(twins["train"]["shar"], copy)
    for source in (twins["train"]["cuts"], copy):
        first, _ = read_manifest(source, cache_dir=tmp_path / "cache")
        assert len(list((tmp_path / "cache" / "manifests").iterdir())) == (1 if source != copy else 2)
        again, _ = read_manifest(source, cache_dir=tmp_path / "cache")  # served from the entry
        assert again.texts == first.texts and again.paths == first.paths
        np.testing.assert_array_equal(again.offsets, first.offsets)
        assert again[3].fields == first[3].fields
    rows = cut_rows(str(copy / "cuts.000002.jsonl.gz"))
    rows[0]["supervisions"][0]["text"] = "changed"
    write_cuts(copy / "cuts.000002.jsonl.gz", rows)
    changed, _ = read_manifest(copy, cache_dir=tmp_path / "cache")
    assert changed.texts[10] == "changed" and changed[10].fields["supervisions"][0]["text"] == "changed"
