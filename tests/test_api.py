"""The Python API (rlnf.api): the docs page's example run as written, callable rewards in-process,
overrides as dicts and strings, and the run folder it writes (the one `rlnf run` writes)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

import rlnf
from rlnf.errors import ConfigError, RewardError

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["trainer.device=cpu", "trainer.progress_bar=false", "trainer.samples_every=0", "trainer.warmup_steps=0"]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, str]:
    """Four training and two validation clips of quiet noise (0.5 s, 16 kHz) with transcripts."""
    folder = tmp_path_factory.mktemp("api_data")
    rng = np.random.default_rng(0)
    texts = {"train": ["a cat", "the dog", "sat on", "a mat"], "val": ["the cat", "a dog"]}
    paths = {}
    for split, lines in texts.items():
        rows = []
        for index, text in enumerate(lines):
            audio = folder / f"{split}_{index}.wav"
            soundfile.write(str(audio), (0.05 * rng.standard_normal(8000)).astype(np.float32), 16000)
            rows.append({"audio_filepath": str(audio), "duration": 0.5, "text": text})
        paths[split] = str(folder / f"{split}.json")
        Path(paths[split]).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def run_files(run: Path) -> None:
    """What `rlnf run rl_finetune` leaves in its folder."""
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.nemo",
                 "checkpoints/trainer_state.pt"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))


def test_import_rlnf_loads_neither_torch_nor_nemo():
    code = ("import sys, rlnf; rlnf.finetune, rlnf.train_reward_model, rlnf.evaluate, rlnf.rl_config; "
            "print('torch' in sys.modules, 'nemo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "False False"
    assert {"finetune", "train_reward_model", "evaluate", "adapt_batchnorm", "rl_config"} <= set(dir(rlnf))


# ------------------------------------------------------------------------------ the docs page's example
def docs_example() -> str:
    """The one ```python block of docs/python-api.md."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "python-api.md").read_text(), re.S)
    assert len(blocks) == 1, "docs/python-api.md must hold exactly one ```python block (the example run here)"
    lines = blocks[0].strip().splitlines()
    assert 10 <= len(lines) <= 20, f"the example has {len(lines)} lines; the page promises 10 to 20"
    return blocks[0]


def test_the_docs_example_runs_as_written(tiny_nemo, manifests, tmp_path, capsys):
    """The page's variables bound to a tiny model and manifests; OVERRIDES (documented on the page)
    shortens the run to 2 steps on the CPU."""
    namespace = {"__name__": "docs_example", "MODEL": tiny_nemo, "TRAIN": manifests["train"],
                 "VAL": manifests["val"], "OUT": str(tmp_path), "OVERRIDES": ["trainer.max_steps=2", *QUICK]}
    exec(compile(docs_example(), "docs/python-api.md", "exec"), namespace)
    summary, metrics = namespace["summary"], namespace["metrics"]
    run = tmp_path / "rl"
    assert summary["step"] == 2 and summary == json.loads((run / "summary.json").read_text())
    assert summary["best_checkpoint"] == str(run / "checkpoints" / "best.nemo")
    run_files(run)
    config = (run / "config.yaml").read_text()
    assert "python:docs_example.not_longer_than_reference" in config and config.startswith("# rewards python:")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "reward/mean" in row] == [1, 2]
    assert "reward/not_longer_than_reference/mean" in rows[-1] and "val/wer" in rows[-1]
    assert metrics["n"] == 2 and 0.0 <= metrics["cer"] and "WER" in capsys.readouterr().out
    # paths as Path objects too; the metrics file holds what evaluate returned
    again = rlnf.evaluate(model=run / "checkpoints" / "best.nemo", manifest=Path(manifests["val"]),
                          output=tmp_path / "eval.json", device="cpu")
    assert again["wer"] == metrics["wer"] and json.loads((tmp_path / "eval.json").read_text()) == again


# ------------------------------------------------------------------------------ callable rewards in a run
class RecordingReward:
    """A reward object that needs the references, records what it was given and scores 0.5."""

    needs_references = True

    def __init__(self):
        self.calls = []

    def __call__(self, inputs):
        self.calls.append(inputs)
        return [[0.5] * inputs.num_samples for _ in range(inputs.batch_size)]


def quarter(inputs):
    """A reference-free reward function: 0.25 for every hypothesis; records the references it saw."""
    quarter.seen_references.extend(inputs.references)
    return np.full((inputs.batch_size, inputs.num_samples), 0.25)


def test_callable_rewards_drive_a_run_and_it_resumes_in_process(tiny_nemo, manifests, tmp_path):
    from rlnf.rewards import RewardInputs

    recorder, out = RecordingReward(), tmp_path / "run"
    quarter.seen_references = []
    common = dict(policy=tiny_nemo, train_manifest=manifests["train"], output_dir=out,
                  rewards=[recorder, (quarter, 2.0)], config="rl/grpo",
                  algorithm={"num_samples": 3, "kl_coef": 0.0}, trainer={"batch_size": 2})
    summary = rlnf.finetune(**common, overrides=[*QUICK, "trainer.max_steps=1"])
    assert summary["step"] == 1
    inputs = recorder.calls[0]
    assert isinstance(inputs, RewardInputs) and len(inputs.hypotheses) == 2
    assert all(len(group) == 3 and all(isinstance(h, str) for h in group) for group in inputs.hypotheses)
    assert inputs.audio.ndim == 2 and inputs.audio.shape[0] == 2 and inputs.sample_rate == 16000
    assert inputs.audio_len.tolist() == [8000, 8000]
    train_texts = {json.loads(line)["text"] for line in Path(manifests["train"]).read_text().splitlines()}
    assert set(inputs.references) <= train_texts and None not in inputs.references
    assert quarter.seen_references and set(quarter.seen_references) == {None}  # it does not need them
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    # the total is the weighted sum of what the two rewards returned: 1 * 0.5 + 2 * 0.25
    assert row["reward/RecordingReward/mean"] == pytest.approx(0.5)
    assert row["reward/quarter/mean"] == pytest.approx(0.25)
    assert row["reward/mean"] == pytest.approx(1.0)
    config = (out / "config.yaml").read_text()
    assert "name: python:tests.test_api.RecordingReward" in config and "name: python:tests.test_api.quarter" in config
    assert "cannot re-run them" in config

    # Resume in the same process, the same objects: the saved config's rewards match.
    calls = len(recorder.calls)
    summary = rlnf.finetune(**common, overrides=[*QUICK, "trainer.max_steps=2"], resume=True)
    assert summary["step"] == 2 and len(recorder.calls) > calls
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_failing_callable_stops_the_run_with_a_checkpoint_naming_rewards_i(tiny_nemo, manifests, tmp_path):
    def flaky(inputs):
        flaky.calls += 1
        if flaky.calls >= 2:
            raise ValueError("the scoring service went away")
        return [[0.5] * inputs.num_samples for _ in range(inputs.batch_size)]

    flaky.calls = 0
    out = tmp_path / "run"
    with pytest.raises(RewardError) as caught:
        rlnf.finetune(tiny_nemo, manifests["train"], out, rewards=["cer", flaky], config="rl/grpo",
                      algorithm={"num_samples": 2}, trainer={"batch_size": 2, "max_steps": 3, "save_every": 100},
                      overrides=QUICK)
    message = str(caught.value)
    # a function defined in a function: its qualname without <locals>
    where = "python:tests.test_api.test_a_failing_callable_stops_the_run_with_a_checkpoint_naming_rewards_i.flaky"
    assert message.startswith(f"rewards[1] ({where}) raised ValueError: the scoring service went away\n")
    assert "The run stopped at step 1" in message and "Fix the reward and continue with resume=true" in message
    assert isinstance(caught.value.__cause__, ValueError)  # the CLI writes its trace to a log file
    import torch

    assert torch.load(out / "checkpoints" / "trainer_state.pt", weights_only=True)["step"] == 1


# ------------------------------------------------------------------------------ configs without a run
def named_function(inputs):
    return [[1.0] * inputs.num_samples for _ in range(inputs.batch_size)]


def scaled(inputs, scale=1.0):
    return [[scale] * inputs.num_samples for _ in range(inputs.batch_size)]


def test_overrides_as_dicts_and_strings_and_reward_forms(tmp_path):
    class Scorer:
        name = "my_scorer"

        def __call__(self, inputs):
            return named_function(inputs)

    cfg = rlnf.rl_config("m.nemo", tmp_path / "a.json", tmp_path / "out",
                         rewards=["cer", ("wer", 0.5), {"name": "learned", "path": "rm", "weight": 2},
                                  named_function, (Scorer(), 0.25), {"name": scaled, "kwargs": {"scale": 0.5}}],
                         config="rl/grpo", algorithm={"kl_coef": 0.05}, trainer={"lr": 1e-4, "max_steps": 3},
                         data={"text_key": "yes", "val_manifest": None}, overrides=["trainer.max_steps=7"])
    assert cfg.policy.path == "m.nemo" and cfg.data.train_manifest == str(tmp_path / "a.json")
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.kl_coef == 0.05 and cfg.trainer.lr == 1e-4
    assert cfg.trainer.max_steps == 7  # the dotted strings come last
    assert cfg.data.text_key == "yes"  # a string stays a string (not YAML's boolean)
    assert [(spec.name, spec.weight) for spec in cfg.rewards] == [
        ("cer", 1.0), ("wer", 0.5), ("learned", 2.0), ("python:tests.test_api.named_function", 1.0),
        ("python:my_scorer", 0.25), ("python:tests.test_api.scaled", 1.0)]
    assert cfg.rewards[5].kwargs == {"scale": 0.5}
    assert [spec.label for spec in cfg.rewards] == ["cer", "wer", "learned", "named_function", "my_scorer", "scaled"]
    assert not (tmp_path / "out").exists()  # a resolved config only


@pytest.mark.parametrize("arguments, message", [
    ({"trainer": {"max_step": 3}}, "unknown config key trainer.max_step"),
    ({"overrides": ["algorithm.kl_coeff=0.1"]}, "unknown config key algorithm.kl_coeff"),
    ({"algorithm": {"kl_coef": "lots"}}, "algorithm.kl_coef"),
    ({"algorithm": {"kl_coef": float("nan")}}, "algorithm.kl_coef=nan must be"),
    ({"rewards": [42]}, "rewards[0]: 42 is not a reward"),
    ({"rewards": [("cer", 1.0, "x")]}, "rewards[0]: a tuple must be a (reward, weight) pair"),
    ({"rewards": [("cer", "heavy")]}, "rewards[0]: the weight of a (reward, weight) pair must be a number"),
    ({"rewards": [named_function, named_function]}, "two rewards share a name"),
    ({"overrides": ["trainer.max_steps"]}, "is not of the form key=value"),
    ({"rewards": ("cer", 0.5)}, "is one (reward, weight) pair: put it in a list"),
    ({"trainer": {"devices": 2}}, "several processes from the Python API need a launcher"),
])
def test_bad_arguments_raise_the_config_error_naming_the_key(arguments, message, tmp_path):
    arguments = {"policy": "m.nemo", "train_manifest": "a.json", "output_dir": str(tmp_path / "out"), **arguments}
    with pytest.raises(ConfigError, match=re.escape(message)):
        rlnf.finetune(**arguments)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_a_missing_policy_names_the_config_key():
    with pytest.raises(ConfigError, match="policy.path"):
        rlnf.rl_config(train_manifest="a.json", output_dir="out")


def test_a_python_reward_from_another_process_is_refused_naming_it():
    from rlnf.config import RewardSpec
    from rlnf.rewards import build_rewards

    with pytest.raises(ConfigError, match=r"'python:elsewhere\.fn' names a Python object given to rlnf.finetune "
                                          r"in another process"):
        build_rewards([RewardSpec(name="python:elsewhere.fn")])


def test_train_reward_model_config_from_arguments(tmp_path):
    cfg = rlnf.reward_model_config("pairs.jsonl", tmp_path / "rm", val_pairs="val.jsonl", config="reward/listening",
                                   trainer={"epochs": 2})
    assert cfg.data.train_manifest == "pairs.jsonl" and cfg.data.val_manifest == "val.jsonl"
    assert cfg.trainer.epochs == 2 and cfg.output_dir == str(tmp_path / "rm")
    with pytest.raises(ConfigError, match="unknown config key trainer.epoch"):
        rlnf.train_reward_model("pairs.jsonl", tmp_path / "rm", trainer={"epoch": 2})


def test_train_reward_model_writes_the_run_folder_of_rlnf_run(manifests, tmp_path):
    """Scored pairs of the training clips (each transcript, a corrupted one and an empty one), a
    tiny reward model, one epoch: the summary and the run folder that `rlnf run train_reward_model` writes."""
    rows = []
    for line in Path(manifests["train"]).read_text().splitlines() + Path(manifests["val"]).read_text().splitlines():
        row = json.loads(line)
        for text, score in ((row["text"], 1.0), (row["text"][::-1], 0.3), ("", 0.0)):
            rows.append({"audio_filepath": row["audio_filepath"], "duration": 0.5, "text": text, "score": score,
                         "reference": row["text"]})
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "rm"
    summary = rlnf.train_reward_model(
        pairs, out, config="reward/card", data={"val_split": 0.34},
        model={"vocab_size": 24, "embed_dim": 8, "lstm_hidden": 8, "audio_conv_channels": 8, "head_hidden": 8},
        trainer={"epochs": 1, "batch_size": 4, "device": "cpu", "progress_bar": False})
    assert summary == json.loads((out / "summary.json").read_text())
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/best", "checkpoints/last"):
        assert (out / name).exists(), name
    assert "vocab_size: 24" in (out / "config.yaml").read_text()
