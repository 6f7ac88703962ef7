"""NeMo tarred audio datasets (``data.tarred_audio_filepaths``): read as the same table as the plain
manifest they came from, errors that name the tar file, the member and the manifest line, and a
tarred corpus that trains exactly like its plain twin through the real commands.

The fixtures are written with Python's ``tarfile``; rlnf reads them through ``rlnf.data.tarred``."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from rlnf.data.loader import AudioDataset
from rlnf.data.manifest import read_manifest
from rlnf.errors import DataError


def tarred_twin(manifest: str, folder: Path, shards: int = 2) -> tuple[str, str]:
    """(tarred manifest, tarred_audio_filepaths) holding the audio of ``manifest``: its lines in the same
    order, contiguous runs of lines per shard as NeMo's converter writes them, member names with the
    folders squashed into the file name."""
    folder.mkdir(parents=True, exist_ok=True)
    base = Path(manifest).parent
    rows = [json.loads(line) for line in open(manifest, encoding="utf-8")]
    tars = [tarfile.open(folder / f"audio_{shard}.tar", "w") for shard in range(shards)]
    tarred_rows = []
    for index, row in enumerate(rows):
        shard = index * shards // len(rows)
        member = row["audio_filepath"].replace("/", "_")
        if member not in tars[shard].getnames():
            tars[shard].add(base / row["audio_filepath"], arcname=member)
        tarred_rows.append({**row, "audio_filepath": member, "shard_id": shard})
    for tar in tars:
        tar.close()
    tarred = folder / "tarred_audio_manifest.json"
    tarred.write_text("".join(json.dumps(row) + "\n" for row in tarred_rows), encoding="utf-8")
    return str(tarred), str(folder / f"audio_{{0..{shards - 1}}}.tar")


def rewrite(manifest: str, edit) -> str:
    """A copy of ``manifest`` beside it with ``edit(rows)`` applied."""
    rows = [json.loads(line) for line in open(manifest, encoding="utf-8")]
    edit(rows)
    path = Path(manifest).with_name("edited.json")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def twin(corpus, tmp_path_factory):
    return tarred_twin(corpus["train"], tmp_path_factory.mktemp("tarred"))


@pytest.mark.parametrize("validate", ["full", "lazy"])
def test_tarred_manifest_reads_as_its_plain_twin(corpus, twin, validate):
    manifest, shards = twin
    plain, _ = read_manifest(corpus["train"], validate=validate)
    tarred, stats = read_manifest(manifest, validate=validate, tarred_audio_filepaths=shards)
    assert stats.kept == len(plain) and not stats.skipped
    np.testing.assert_array_equal(tarred.durations, plain.durations)
    np.testing.assert_array_equal(tarred.lines, plain.lines)
    assert tarred.texts == plain.texts
    first = tarred[0]
    assert first.audio_filepath.endswith("audio_0.tar/" + json.loads(open(manifest).readline())["audio_filepath"])
    assert first.fields["shard_id"] == 0  # the row as written reaches rewards as metadata
    plain_audio, tarred_audio = AudioDataset(plain, 16000), AudioDataset(tarred, 16000)
    for index in range(len(plain)):
        np.testing.assert_array_equal(tarred_audio[index][0], plain_audio[index][0])


def first_batches(table, rank: int, position: int) -> list:
    """The first 3 batches process ``rank`` of 2 gets from ``table`` (shuffled, seed 3), starting at
    batch ``position`` of epoch 0: what a twin of a manifest must reproduce."""
    from rlnf.data.loader import TrainStream

    stream = TrainStream(AudioDataset(table, 16000), batch_size=2, bucket_size=2, shuffle=True, seed=3,
                         rank=rank, world_size=2)
    stream.load_state_dict({"epoch": 0, "batch_in_epoch": position})
    batches = iter(stream)
    return [next(batches) for _ in range(3)]


def test_each_process_shard_and_resume_position_loads_what_the_plain_twin_does(corpus, twin):
    """Two processes' shards of the same global batches, from the start and from a saved position."""
    manifest, shards = twin
    plain, _ = read_manifest(corpus["train"])
    tarred, _ = read_manifest(manifest, tarred_audio_filepaths=shards)

    for rank in (0, 1):
        for position in (0, 2):
            for plain_batch, tarred_batch in zip(first_batches(plain, rank, position),
                                                 first_batches(tarred, rank, position)):
                assert [u.line for u in tarred_batch.utterances] == [u.line for u in plain_batch.utterances]
                assert torch.equal(tarred_batch.audio, plain_batch.audio)


def test_nemo_shard_spellings_expand_alike(twin):
    manifest, shards = twin
    nemo_spelling = shards.replace("{", "_OP_").replace("}", "_CL_")
    braces, _ = read_manifest(manifest, tarred_audio_filepaths=shards, cache_dir=None)
    op_cl, _ = read_manifest(manifest, tarred_audio_filepaths=nemo_spelling, cache_dir=None)
    assert braces.paths == op_cl.paths


def test_a_missing_member_names_the_tar_the_member_and_the_line(twin, tmp_path):
    manifest, shards = twin

    def rename_third(rows):
        rows[2]["audio_filepath"] = "not_in_the_tar.wav"

    edited = rewrite(manifest, rename_third)
    with pytest.raises(DataError) as error:
        read_manifest(edited, tarred_audio_filepaths=shards)
    assert "edited.json:3:" in str(error.value) and "'not_in_the_tar.wav'" in str(error.value)
    assert "audio_0.tar" in str(error.value)
    # Lazy validation finds it when the clip is loaded, with the same message.
    table, _ = read_manifest(edited, validate="lazy", tarred_audio_filepaths=shards)
    with pytest.raises(DataError) as lazy_error:
        AudioDataset(table, 16000)[2]
    assert str(lazy_error.value) == str(error.value)
    # skip_bad_samples skips and counts it.
    table, stats = read_manifest(edited, tarred_audio_filepaths=shards, skip_bad=True)
    assert len(table) == stats.lines - 1 and sum(stats.skipped.values()) == 1


@pytest.mark.parametrize("shard_id, expected", [(None, "missing key 'shard_id'"), (7, "'shard_id' 7 names no tar"),
                                                ("0", "'shard_id' '0' names no tar")])
def test_a_bad_shard_id_names_the_line(twin, shard_id, expected):
    manifest, shards = twin

    def set_second(rows):
        rows[1]["shard_id"] = shard_id
        if shard_id is None:
            del rows[1]["shard_id"]

    with pytest.raises(DataError) as error:
        read_manifest(rewrite(manifest, set_second), tarred_audio_filepaths=shards, cache_dir=None)
    assert "edited.json:2:" in str(error.value) and expected in str(error.value)


def test_a_missing_or_compressed_shard_is_named(twin, tmp_path):
    manifest, shards = twin
    missing = shards.replace("{0..1}", "{0..2}")
    with pytest.raises(DataError, match=r"tar file not found: .*audio_2\.tar"):
        read_manifest(manifest, tarred_audio_filepaths=missing)
    compressed = tmp_path / "audio_0.tar.gz"
    compressed.write_bytes(b"")
    with pytest.raises(DataError, match="not an uncompressed .tar"):
        read_manifest(manifest, tarred_audio_filepaths=str(compressed))


def test_a_damaged_shard_names_the_tar_file(twin, tmp_path):
    manifest, shards = twin
    folder = tmp_path / "damaged"
    folder.mkdir()
    for shard in (0, 1):
        data = Path(shards.replace("{0..1}", str(shard))).read_bytes()
        (folder / f"audio_{shard}.tar").write_bytes(data[:1000] if shard == 1 else data)
    with pytest.raises(DataError, match=r"tarred_audio_manifest.json:\d+: .*audio_1\.tar"):
        read_manifest(manifest, tarred_audio_filepaths=str(folder / "audio_{0..1}.tar"))


def final_state(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "trainer_state.pt", weights_only=True)


def assert_same_training(plain: Path, tarred: Path) -> None:
    from rlnf.metric_logging import read_metrics

    plain_state, tarred_state = final_state(plain), final_state(tarred)
    assert plain_state["step"] == tarred_state["step"] == 2
    assert plain_state["data"] == tarred_state["data"]
    for name, tensor in plain_state["model"].items():
        torch.testing.assert_close(tarred_state["model"][name], tensor, rtol=0, atol=0, msg=name)

    def comparable(rows):
        return [{k: v for k, v in row.items() if not k.startswith("perf/")} for row in rows]

    rows = comparable(read_metrics(plain))
    assert len(rows) == 2
    assert all(np.isfinite(row["loss/total" if "loss/total" in row else "train/loss"]) for row in rows)
    assert comparable(read_metrics(tarred)) == rows


@pytest.mark.slow
def test_a_tarred_corpus_trains_like_its_plain_twin(corpus, twin, pretrained_tiny_nemo, tmp_path):
    """Two RL steps (rl_finetune) and two supervised steps (train_ctc) on each: equal weights, data
    position and metrics. The tarred RL run stops after step 1 and resumes, so the resume position
    is checked too."""
    from rlnf.cli import main

    manifest, shards = twin
    common = {"rl_finetune": ["--config", "rl/rloo", f"policy.path={pretrained_tiny_nemo}", "algorithm.num_samples=4",
                              "trainer.samples_every=0"],
              "train_ctc": ["--config", "ctc/small", "model.size=tiny"]}
    for recipe, options in common.items():
        def run(out: Path, *extra: str) -> int:
            return main(["run", recipe, *options, f"output_dir={out}", "trainer.batch_size=4",
                         "trainer.progress_bar=false", "trainer.lr=3e-4", "trainer.lr_schedule=constant",
                         "trainer.loggers=[]", *extra])

        assert run(tmp_path / recipe / "plain", f"data.train_manifest={corpus['train']}", "trainer.max_steps=2") == 0
        tarred = tmp_path / recipe / "tarred"
        tarred_data = [f"data.train_manifest={manifest}", f"data.tarred_audio_filepaths={shards}"]
        if recipe == "rl_finetune":
            assert run(tarred, *tarred_data, "trainer.max_steps=1") == 0
            assert run(tarred, *tarred_data, "trainer.max_steps=2", "resume=true") == 0
        else:
            assert run(tarred, *tarred_data, "trainer.max_steps=2") == 0
        assert_same_training(tmp_path / recipe / "plain", tarred)


@pytest.mark.slow
def test_two_processes_train_a_tarred_corpus_like_its_plain_twin(corpus, twin, pretrained_tiny_nemo, tmp_path):
    """Two gloo processes (each loads its half of every global batch, each validates its share of the
    members): the same weights and metrics from the tarred corpus as from the plain one."""
    import os
    import subprocess
    import sys

    manifest, shards = twin
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, data in (("plain", [f"data.train_manifest={corpus['train']}"]),
                       ("tarred", [f"data.train_manifest={manifest}", f"data.tarred_audio_filepaths={shards}"])):
        result = subprocess.run(
            [sys.executable, "-m", "rlnf.cli", "run", "rl_finetune", "--config", "rl/rloo",
             f"policy.path={pretrained_tiny_nemo}", f"output_dir={tmp_path / name}", *data, "trainer.devices=2",
             "trainer.batch_size=2", "algorithm.num_samples=4", "trainer.max_steps=2", "trainer.samples_every=0",
             "trainer.lr=3e-4", "trainer.progress_bar=false", "trainer.loggers=[]"],
            capture_output=True, text=True, timeout=500, env=env, cwd=Path(__file__).parents[1])
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads(result.stdout[result.stdout.index("{"):])["world_size"] == 2
    assert_same_training(tmp_path / "plain", tmp_path / "tarred")
