"""trainer.loggers: each tracker receives what it supports, offline, and a resumed run's logs hold no
steps past the checkpoint; a bad tracker name fails before any model loads."""

from __future__ import annotations

import csv
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from rlnf.config import RLFinetuneConfig, RewardTrainConfig, load_config
from rlnf.errors import ConfigError
from rlnf.metric_logging import CsvLogger, WandbLogger, read_metrics

REQUIRED = ["policy.path=m.nemo", "data.train_manifest=t.json", "output_dir=/tmp/x"]


@pytest.fixture()
def wandb_offline(tmp_path, monkeypatch):
    """wandb with no network, and none of its files outside tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))


def wandb_records(run_dir: Path) -> list:
    """Every record of the run's offline .wandb files, once each file holds its run's exit record:
    wandb's service process may still be writing after run.finish() returns. The files are
    LevelDB-style logs (a 7-byte ':W&B' header, then 32 KiB blocks of chunks with a 7-byte header:
    CRC, length, type) of protobuf Records; wandb 0.31 ships no Python reader for them."""
    paths = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 30
    while True:
        per_file = [read_wandb_file(path) for path in paths]
        if all(records and records[-1].WhichOneof("record_type") == "exit" for records in per_file) \
                or time.monotonic() > deadline:
            return [record for records in per_file for record in records]
        time.sleep(0.2)


def read_wandb_file(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    records, data, position, pending = [], path.read_bytes(), 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        length, kind = struct.unpack_from("<HB", data, position + 4)
        if position + 7 + length > len(data):
            break  # a chunk still being written
        pending += data[position + 7: position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL, or LAST of a FIRST/MIDDLE/LAST sequence
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    rows = []
    for record in wandb_records(run_dir):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def read_csv(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_bad_tracker_fails_at_config_time_naming_the_key(monkeypatch):
    for schema, required in ((RLFinetuneConfig, REQUIRED), (RewardTrainConfig, ["data.train_manifest=t", "output_dir=o"])):
        with pytest.raises(ConfigError, match=r"trainer\.loggers: unknown logger 'neptune'.*csv"):
            load_config(schema, None, required + ["trainer.loggers=[tensorboard,neptune]"])
        assert load_config(schema, None, required).trainer.loggers == ["tensorboard"]  # the default
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"trainer\.loggers: logger 'wandb' needs .*rlnf\[wandb\]"):
        load_config(RLFinetuneConfig, None, REQUIRED + ["trainer.loggers=[wandb]"])


def test_csv_widens_its_header_and_drops_steps_after_the_resume_point(tmp_path):
    logger = CsvLogger(tmp_path)
    logger.log_dict({"loss": 1.0}, 1)
    logger.log_dict({"loss": 0.5, "val/wer": 0.4}, 2)  # a new column: the header widens
    logger.log_dict({"loss": float("nan")}, 3)
    logger.close()
    rows = read_csv(tmp_path)
    assert list(rows[0]) == ["step", "loss", "val/wer"]
    assert [(r["step"], r["loss"], r["val/wer"]) for r in rows] == [("1", "1.0", ""), ("2", "0.5", "0.4"), ("3", "", "")]

    resumed = CsvLogger(tmp_path, resume_step=2)
    resumed.log_dict({"loss": 0.25}, 3)
    assert [(r["step"], r["loss"]) for r in read_csv(tmp_path)] == [("1", "1.0"), ("2", "0.5"), ("3", "0.25")]
    CsvLogger(tmp_path)  # a new run starts an empty file
    assert read_csv(tmp_path) == []


def test_wandb_offline_gets_config_scalars_table_and_audio(tmp_path, wandb_offline):
    cfg = load_config(RLFinetuneConfig, None, REQUIRED + ["algorithm.name=rloo", "trainer.loggers=[wandb]"])
    logger = WandbLogger(tmp_path, config=cfg)
    logger.log_dict({"reward/mean": 0.25, "kl": float("nan")}, 1)
    logger.log_table("samples", ["utt", "kind", "text", "reward"], [[0, "reference", "a cat", ""],
                                                                    [0, "sample 0", "a hat", 0.8]], 1)
    logger.log_audio("audio/0", np.zeros(1600, dtype=np.float32), 16000, 1)
    logger.log_dict({"reward/mean": 0.5}, 2)
    logger.close()

    history = wandb_history(tmp_path)
    assert [row["reward/mean"] for row in history] == [0.25, 0.5] and "kl" not in history[0]  # NaN left out
    assert history[0]["samples/_type"] == "table-file" and history[0]["audio/0/_type"] == "audio-file"
    run_folder = next((tmp_path / "wandb").glob("offline-run-*"))
    table = json.loads((run_folder / "files" / history[0]["samples/path"]).read_text())
    assert table["columns"] == ["utt", "kind", "text", "reward"] and table["data"][1] == [0, "sample 0", "a hat", 0.8]
    assert (run_folder / "files" / history[0]["audio/0/path"]).is_file()
    (run,) = [r.run for r in wandb_records(tmp_path) if r.WhichOneof("record_type") == "run"]
    recorded = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert recorded["trainer"]["loggers"] == ["wandb"] and recorded["algorithm"]["advantage"] == "rloo"

    first_id = (tmp_path / "wandb" / "run_id").read_text()
    WandbLogger(tmp_path, resume_step=2, config=cfg).close()  # resume=true continues the same wandb run
    assert (tmp_path / "wandb" / "run_id").read_text() == first_id
    WandbLogger(tmp_path, config=cfg).close()  # a new run gets a new one
    assert (tmp_path / "wandb" / "run_id").read_text() != first_id


@pytest.mark.slow
def test_rl_run_logs_to_every_tracker(corpus, tiny_nemo, tmp_path, wandb_offline):
    from rlnf.cli import main
    from tests.test_rl_finetune_cli import run_args, tensorboard_tags

    out = tmp_path / "run"
    assert main(run_args(tiny_nemo, corpus, out, "trainer.max_steps=2", "trainer.samples_every=1",
                         "trainer.loggers=[tensorboard,csv,wandb]")) == 0
    steps = [row["step"] for row in read_metrics(out)]
    assert steps == [1, 2]
    rows = read_csv(out)
    assert [int(row["step"]) for row in rows] == steps and float(rows[1]["val/wer"]) >= 0.0
    assert {"reward/mean", "kl", "val/wer"} <= tensorboard_tags(out)
    history = wandb_history(out)
    assert [row["_step"] for row in history] == steps
    assert all("reward/mean" in row and "samples/_type" in row and "audio/0/_type" in row for row in history)
    assert "val/wer" in history[1]
