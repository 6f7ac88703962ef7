"""Bad input and faults, round 2 (issue 16): each case through the real command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from rlnf.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m rlnf.cli ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "rlnf.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def clip(tmp_path) -> Path:
    path = tmp_path / "clip.wav"
    soundfile.write(str(path), np.zeros(8000, dtype=np.float32) + 0.01, 16000)
    return path


# ------------------------------------------------------------------------------ the top-level handler
def test_an_unexpected_exception_is_one_line_naming_the_command_and_a_log(tmp_path):
    recipe = tmp_path / "broken_recipe.py"
    recipe.write_text("from dataclasses import dataclass\n\n"
                      "@dataclass\nclass Config:\n    output_dir: str = ''\n\n"
                      "CONFIG_CLASS = Config\n\n"
                      "def main(cfg):\n    return {}['missing']\n")
    out = tmp_path / "run"
    result = run_cli("run", str(recipe), f"output_dir={out}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlnf run "), result.stderr
    assert "KeyError: 'missing'" in lines[0] and "broken_recipe.py:10" in lines[0]
    log_file = Path(lines[0].rsplit("full trace in ", 1)[1])
    assert log_file.parent == out.resolve() and "Traceback" in log_file.read_text()


# ------------------------------------------------------------------------------ defect 1: data loss
RL_REQUIRED = ["run", "rl_finetune", "--config", "rl/rloo", "policy.path=/nonexistent/model.nemo"]


def test_evaluate_refuses_to_write_its_output_over_the_manifest(tmp_path, clip, capsys):
    manifest = write_rows(tmp_path / "m.json", [{"audio_filepath": str(clip), "text": "a"}])
    before = manifest.read_text()
    for output in (manifest, tmp_path / "m.jsonl"):  # the output itself, or its transcripts file
        if output != manifest:
            manifest = write_rows(tmp_path / "m.transcripts.jsonl", [{"audio_filepath": str(clip), "text": "a"}])
            before = manifest.read_text()
        assert main(["evaluate", "--model", "/nonexistent.nemo", "--manifest", str(manifest),
                     "--output", str(output)]) == 2
        assert "is the manifest" in capsys.readouterr().err
        assert manifest.read_text() == before


@pytest.mark.parametrize("command", ["evaluate", "adapt-batchnorm"])
def test_a_folder_given_as_model_names_the_flag_and_the_nemo_inside_it(command, tmp_path, clip, capsys):
    manifest = write_rows(tmp_path / "m.json", [{"audio_filepath": str(clip), "text": "a"}])
    output = ["--output", str(tmp_path / "a.nemo")] if command == "adapt-batchnorm" else []
    run, empty = tmp_path / "runs" / "x", tmp_path / "empty"
    (run / "checkpoints").mkdir(parents=True)
    empty.mkdir()
    for present, expected in ((["last.nemo"], f"{run}/checkpoints/last.nemo"),
                              (["last.nemo", "best.nemo"], f"{run}/checkpoints/best.nemo")):
        for name in present:
            (run / "checkpoints" / name).write_bytes(b"")
        assert main([command, "--model", str(run), "--manifest", str(manifest), *output]) == 2
        err = capsys.readouterr().err
        assert f"--model {run}: is a directory; give a .nemo file such as {expected}" in err, err
    assert main([command, "--model", str(empty), "--manifest", str(manifest), *output]) == 2
    assert f"--model {empty}: is a directory; give a .nemo file\n" in capsys.readouterr().err
    assert main([command, "--model", str(tmp_path / "missing.nemo"), "--manifest", str(manifest), *output]) == 2
    assert f"--model {tmp_path / 'missing.nemo'}: not found" in capsys.readouterr().err


def test_score_refuses_a_directory_as_output_before_scoring(tmp_path, clip, capsys):
    manifest = write_rows(tmp_path / "m.json", [{"audio_filepath": str(clip), "text": "a"}])
    assert main(["score", "--reward", "/nonexistent", "--manifest", str(manifest), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "score"])
def test_batch_size_zero_is_refused_by_the_parser(command):
    model = ["--model", "m.nemo"] if command == "evaluate" else ["--reward", "r"]
    result = run_cli(command, *model, "--manifest", "m.json", "--batch-size", "0")
    assert result.returncode == 2 and "--batch-size: must be a positive integer, got 0" in result.stderr


def test_train_reward_model_refuses_a_folder_holding_a_run_unless_resumed(tmp_path, capsys):
    out = tmp_path / "reward_run"
    (out / "checkpoints" / "last").mkdir(parents=True)
    assert main(["run", "train_reward_model", "--config", "reward/card", "data.train_manifest=x.json",
                 f"output_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run (checkpoints/last); set resume=true to continue it" in err


def test_an_empty_output_dir_is_refused(tmp_path, capsys):
    assert main([*RL_REQUIRED, "data.train_manifest=x.json", "output_dir=''"]) == 2
    assert "output_dir='' names no folder" in capsys.readouterr().err


def test_a_second_run_on_a_locked_folder_stops_naming_the_first(tmp_path):
    from rlnf.run_folder import run_lock

    out = tmp_path / "run"
    out.mkdir()
    with run_lock(out):  # this test process plays the first run
        result = run_cli(*RL_REQUIRED, "data.train_manifest=x.json", f"output_dir={out}")
    assert result.returncode == 2
    assert f"is in use by another run (PID {os.getpid()}" in result.stderr and str(out) in result.stderr


def test_stale_temporary_checkpoint_files_are_removed_on_resume(tmp_path, capsys):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    state = folder / "trainer_state.pt"
    state.write_bytes(b"state")
    stale = [folder / ".last.k2j3.tmp.nemo", folder / ".trainer_state.x9.tmp.pt", tmp_path / "run" / ".summary.a1.tmp.json"]
    for path in stale:
        path.write_bytes(b"half written")
    (folder / ".best.q1.tmp").mkdir()  # a reward checkpoint's staging folder
    main([*RL_REQUIRED, "data.train_manifest=x.json", f"output_dir={tmp_path / 'run'}", "resume=true"])
    assert not any(path.exists() for path in stale) and not (folder / ".best.q1.tmp").exists()
    assert state.read_bytes() == b"state"


# ------------------------------------------------------------------------------ defect 2: config values
@pytest.mark.parametrize("recipe, override, message", [
    ("rl_finetune", "algorithm.temperature=nan", "algorithm.temperature=nan must be > 0"),
    ("rl_finetune", "algorithm.kl_coef=nan", "algorithm.kl_coef=nan must be >= 0"),
    ("rl_finetune", "algorithm.clip_eps=inf", "algorithm.clip_eps=inf must be a finite number"),
    ("rl_finetune", "trainer.max_grad_norm=nan", "trainer.max_grad_norm=nan must be > 0"),
    ("rl_finetune", "trainer.min_lr_ratio=-1", "trainer.min_lr_ratio=-1.0 must be in [0.0, 1.0]"),
    ("rl_finetune", "trainer.lr=nan", "trainer.lr=nan must be > 0"),
    ("rl_finetune", "trainer.eps=-1e-8", "trainer.eps=-1e-08 must be > 0"),
    ("rl_finetune", "trainer.weight_decay=-0.1", "trainer.weight_decay=-0.1 must be >= 0"),
    ("rl_finetune", "trainer.betas=[0.9,1.5]", "trainer.betas=1.5 must be in [0.0, 1.0)"),
    ("rl_finetune", "rewards=[{name: cer, weight: nan}]", "rewards[0].weight=nan must be a finite number"),
    ("rl_finetune", "rewards=[{name: cer, weight: 0}, {name: wer, weight: 0}]", "every weight is 0"),
    ("rl_finetune", "rewards=[{name: .fancy}]", "unknown reward name '.fancy'"),
    ("train_ctc", "trainer.min_lr_ratio=2", "trainer.min_lr_ratio=2.0 must be in [0.0, 1.0]"),
    ("train_reward_model", "trainer.lr=nan", "trainer.lr=nan must be > 0"),
    ("train_reward_model", "augment.noise_snr_db=nan", "augment.noise_snr_db=nan must be a finite number"),
])
def test_bad_numbers_fail_at_config_time_naming_the_key(recipe, override, message, tmp_path, capsys):
    required = {"rl_finetune": ["policy.path=/nonexistent/model.nemo"], "train_ctc": [], "train_reward_model": []}
    config = {"rl_finetune": "rl/rloo", "train_ctc": "ctc/small", "train_reward_model": "reward/card"}[recipe]
    code = main(["run", recipe, "--config", config, *required[recipe], "data.train_manifest=/nonexistent.json",
                 f"output_dir={tmp_path / 'run'}", override])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_yaml_whose_top_level_is_a_list_is_refused(tmp_path, capsys):
    config = tmp_path / "list.yaml"
    config.write_text("- policy\n- data\n")
    assert main(["run", "rl_finetune", "--config", str(config)]) == 2
    assert "list.yaml: the top level must be a mapping" in capsys.readouterr().err


def test_a_yaml_nested_too_deeply_is_refused_naming_the_file(tmp_path, capsys):
    config = tmp_path / "deep.yaml"
    config.write_text("policy: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["run", "rl_finetune", "--config", str(config)]) == 2
    assert "deep.yaml: cannot parse YAML: nested too deeply" in capsys.readouterr().err


def test_gradients_made_non_finite_by_clipping_are_reported_as_nan():
    import torch

    from rlnf.training import clip_gradients

    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.full((3,), 2.0)
    assert clip_gradients([weight], 1.0) == pytest.approx(12 ** 0.5)
    weight.grad = torch.full((3,), 2.0)
    assert math.isnan(clip_gradients([weight], float("nan")))  # the caller skips the update


# ------------------------------------------------------------------------------ defect 4: resume
def _saved_run(tmp_path: Path, *overrides: str) -> tuple[Path, list[str]]:
    """A run folder as rl_finetune leaves it (config.yaml, a trainer state) and its command line."""
    from rlnf.config import RLFinetuneConfig, load_config, to_yaml

    out = tmp_path / "run"
    args = [*RL_REQUIRED, "data.train_manifest=/nonexistent.json", f"output_dir={out}", *overrides]
    (out / "checkpoints").mkdir(parents=True)
    (out / "config.yaml").write_text(to_yaml(load_config(RLFinetuneConfig, "configs/rl/rloo.yaml", args[4:])))
    (out / "checkpoints" / "trainer_state.pt").write_bytes(b"state")
    return out, args


@pytest.mark.parametrize("change, key", [
    ("policy.path=/other/model.nemo", "policy.path"),
    ("data.train_manifest=/other.json", "data.train_manifest"),
    ("algorithm.num_samples=4", "algorithm.num_samples"),
    ("rewards=[{name: wer}]", "rewards"),
])
def test_resume_refuses_a_change_of_meaning_naming_the_key(change, key, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out, args = _saved_run(tmp_path)
    assert main([*args, "resume=true", change]) == 2
    err = capsys.readouterr().err
    assert f"{key}:" in err and "resume_force=true" in err
    # with the override the check lets it through (and the missing manifest stops the run next)
    assert main([*args, "resume=true", "resume_force=true", change]) == 2
    assert "resume_force" not in capsys.readouterr().err


def test_resume_warns_about_and_records_allowed_changes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out, args = _saved_run(tmp_path)
    main([*args, "resume=true", "trainer.lr=5e-5", "trainer.max_steps=2000"])
    record = json.loads((out / "resumes.jsonl").read_text().splitlines()[-1])
    assert record["changed"]["trainer.lr"] == [1e-4, 5e-5] and record["changed"]["trainer.max_steps"] == [1000, 2000]


@pytest.mark.slow
def test_resume_with_a_damaged_or_foreign_trainer_state_names_the_file(tmp_path, clip, tiny_nemo, capsys):
    import torch

    from rlnf.models import build_ctc_model

    manifest = write_rows(tmp_path / "m.json", [{"audio_filepath": str(clip), "text": "a b"}] * 2)
    out = tmp_path / "run"
    args = ["run", "rl_finetune", "--config", "rl/rloo", f"policy.path={tiny_nemo}", f"data.train_manifest={manifest}",
            f"output_dir={out}", "trainer.batch_size=2", "algorithm.num_samples=2", "trainer.max_steps=1",
            "trainer.progress_bar=false", "trainer.samples_every=0"]
    assert main(args) == 0
    state_path = out / "checkpoints" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)

    other = tmp_path / "other.nemo"  # another vocabulary: another output layer
    build_ctc_model(list("abc '"), "tiny", seed=0).save_to(str(other))
    forced = [a for a in args if not a.startswith("policy.path")] + [f"policy.path={other}", "resume=true",
                                                                     "resume_force=true", "trainer.max_steps=2"]
    assert main(forced) == 2
    err = capsys.readouterr().err
    assert f"{state_path} holds weights of another architecture" in err and "Traceback" not in err

    torch.save({key: value for key, value in state.items() if key != "model"}, state_path)
    assert main([*args, "resume=true", "trainer.max_steps=2"]) == 2
    assert f"{state_path} lacks 'model'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ defect 5 and unclear messages
@pytest.mark.parametrize("case, expected", [
    ("not_utf8", "bad.json:2: not UTF-8 text"),
    ("deep", "bad.json:2: malformed JSON (nested too deeply)"),
    ("duplicate_key", "bad.json:2: duplicate key 'text' in one JSON object"),
    ("directory", "bad.json:2: audio file is a directory, not a file"),
    ("fifo", "bad.json:2: audio file is not a regular file (a FIFO"),
    ("symlink_loop", "bad.json:2: cannot resolve audio path"),
    ("truncated", "bad.json:2: audio file is truncated"),
])
def test_unreadable_manifest_rows_name_the_line_and_the_problem(case, expected, tmp_path, clip, capsys):
    first = json.dumps({"audio_filepath": str(clip), "text": "a"}).encode()
    if case == "fifo":
        os.mkfifo(tmp_path / "pipe.wav")
    if case == "symlink_loop":
        os.symlink(tmp_path / "loop_b.wav", tmp_path / "loop_a.wav")
        os.symlink(tmp_path / "loop_a.wav", tmp_path / "loop_b.wav")
    if case == "truncated":
        data = clip.read_bytes()
        (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    second = {
        "not_utf8": b'{"audio_filepath": "clip.wav", "text": "caf\xe9"}',
        "deep": b'{"audio_filepath": "clip.wav", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "duplicate_key": b'{"audio_filepath": "clip.wav", "text": "a", "text": "b"}',
        "directory": json.dumps({"audio_filepath": str(tmp_path), "text": "a"}).encode(),
        "fifo": b'{"audio_filepath": "pipe.wav", "text": "a"}',
        "symlink_loop": b'{"audio_filepath": "loop_a.wav", "text": "a"}',
        "truncated": b'{"audio_filepath": "cut.wav", "text": "a"}',
    }[case]
    manifest = tmp_path / "bad.json"
    manifest.write_bytes(first + b"\n" + second + b"\n")
    assert main([*RL_REQUIRED, f"data.train_manifest={manifest}", f"output_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert expected in err, err


@pytest.mark.parametrize("case, expected", [
    ("list", "config.json: expected a JSON object of settings, got a list"),
    ("not_utf8", "config.json: not UTF-8 text"),
    ("bad_option", "config.json: invalid settings (ValueError: pooling='bogus' is not valid; choose one of masked, legacy)"),
    ("a_file", "reward checkpoint folder is not a folder"),
])
def test_a_bad_reward_checkpoint_config_is_named(case, expected, tmp_path, clip, capsys):
    folder = tmp_path / "reward"
    folder.mkdir()
    config = folder / "config.json"
    if case == "list":
        config.write_text("[1, 2]")
    elif case == "not_utf8":
        config.write_bytes(b'{"model_type": "rlnf_reward", "name": "\xff"}')
    elif case == "bad_option":
        config.write_text(json.dumps({"model_type": "rlnf_reward", "pooling": "bogus"}))
        (folder / "model.safetensors").write_bytes(b"")
    else:
        folder = config
        config.write_text("{}")
    manifest = write_rows(tmp_path / "m.json", [{"audio_filepath": str(clip), "text": "a"}])
    assert main(["score", "--reward", str(folder), "--manifest", str(manifest)]) == 2
    assert expected in capsys.readouterr().err


class KeywordReward:
    """A user reward class taking one keyword (for the test below)."""

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, inputs):
        return [[self.scale] * len(group) for group in inputs.hypotheses]


def keyword_function(inputs, scale: float = 1.0):
    return [[scale] * len(group) for group in inputs.hypotheses]


@pytest.mark.slow
def test_bad_user_rewards_and_paths_are_named_before_training(tmp_path, clip, capsys, monkeypatch, nemo_quiet):
    (tmp_path / "broken_reward.py").write_text("def reward(inputs):\n    return [[1.0]]\nif True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    manifest = write_rows(tmp_path / "m.json", [{"audio_filepath": str(clip), "text": "a"}])
    common = ["run", "rl_finetune", "--config", "rl/rloo", f"data.train_manifest={manifest}",
              f"output_dir={tmp_path / 'out'}", "trainer.device=cpu"]
    cases = [
        ("rewards=[{name: tests.test_bad_input.KeywordReward, kwargs: {scal: 2}}]",
         "kwargs ['scal'] do not fit 'tests.test_bad_input.KeywordReward'"),
        ("rewards=[{name: tests.test_bad_input.keyword_function, kwargs: {scal: 2}}]",
         "kwargs ['scal'] do not fit 'tests.test_bad_input.keyword_function'"),
        ("rewards=[{name: broken_reward.reward}]", "broken_reward.py:3: syntax error in the module of reward"),
        (f"policy.path={tmp_path}", f"policy checkpoint {tmp_path} is a directory; give a .nemo file"),
    ]
    import torch

    if not torch.cuda.is_available():
        reward = tmp_path / "reward"
        reward.mkdir()
        cases.append((f"rewards=[{{name: learned, path: {reward}, device: cuda}}]",
                      "rewards[].device=cuda but no CUDA device is available"))
    for override, expected in cases:
        policy = [] if override.startswith("policy.path") else ["policy.path=/nonexistent/model.nemo"]
        assert main([*common, *policy, override]) == 2, override
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, err


# ------------------------------------------------------------------------------ defect 6: NaN scores
def test_score_with_nan_reward_weights_refuses_and_writes_nothing(tmp_path, clip, capsys):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from tests.test_reward_model import random_published_folder, tiny_tokenizer

    folder = random_published_folder(tmp_path / "reward")
    shutil.copyfile(tiny_tokenizer(tmp_path), folder / "tokenizer.model")
    state = load_file(str(folder / "model.safetensors"))
    state["head.3.weight"] = torch.full_like(state["head.3.weight"], float("nan"))
    save_file(state, str(folder / "model.safetensors"))
    manifest = write_rows(tmp_path / "m.json", [{"audio_filepath": str(clip), "text": "a"}])
    output = tmp_path / "scored.jsonl"
    assert main(["score", "--reward", str(folder), "--manifest", str(manifest), "--output", str(output)]) == 2
    assert "NaN or infinite values in head.3.weight" in capsys.readouterr().err
    assert not output.exists()


# ------------------------------------------------------------------------------ defect 7: constant scores
@pytest.mark.parametrize("constant, message", [
    ("train", "every training score is 0.5 (after score_scale): a reward model learns nothing"),
    ("val", "every validation score is 0.5: val/pearson is undefined on constant targets"),
])
def test_train_reward_model_refuses_constant_scores(constant, message, tmp_path, clip, capsys):
    rows = [{"audio_filepath": str(clip), "text": "a b", "score": 0.5 if constant == "train" else 0.1 * i}
            for i in range(4)]
    train = write_rows(tmp_path / "train.json", rows)
    val = write_rows(tmp_path / "val.json", [{"audio_filepath": str(clip), "text": "a", "score": 0.5}] * 2)
    out = tmp_path / "run"
    assert main(["run", "train_reward_model", "--config", "reward/card", f"data.train_manifest={train}",
                 f"data.val_manifest={val}", f"output_dir={out}"]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "summary.json").exists()


# ------------------------------------------------------------------------------ accepted without a word
def test_cer_is_the_same_for_nfc_and_nfd_forms_of_a_text():
    import unicodedata

    from rlnf.metrics import error_rate

    text = "café crème"
    nfd = unicodedata.normalize("NFD", text)
    assert nfd != text
    assert error_rate(text, nfd, "char") == 0.0 and error_rate(nfd, text, "word") == 0.0


@pytest.mark.slow
def test_references_the_policy_cannot_spell_are_counted_and_warned_once(tmp_path, clip, tiny_nemo, warnings_of):
    rows = [{"audio_filepath": str(clip), "text": text} for text in ("a b", "room 101, please", "a-c", "b")]
    manifest = write_rows(tmp_path / "m.json", rows)
    messages = warnings_of("rlnf.rl_finetune")
    assert main(["run", "rl_finetune", "--config", "rl/rloo", f"policy.path={tiny_nemo}",
                 f"data.train_manifest={manifest}", f"output_dir={tmp_path / 'run'}", "trainer.batch_size=2",
                 "algorithm.num_samples=2", "trainer.max_steps=1", "trainer.progress_bar=false",
                 "trainer.samples_every=0"]) == 0
    warnings = [message for message in messages if "cannot produce" in message]
    assert len(warnings) == 1
    assert warnings[0].startswith("2 of 4 training references") and "m.json:2: [',', '0', '1']" in warnings[0]


@pytest.mark.slow
def test_bad_audio_found_by_a_data_worker_names_the_line_without_its_traceback(tmp_path, clip, tiny_nemo, capsys):
    speech = np.zeros(8000, dtype=np.float32) + 0.01
    speech[100:200] = np.nan
    soundfile.write(str(tmp_path / "nan.wav"), speech, 16000, subtype="FLOAT")
    manifest = write_rows(tmp_path / "m.json", [{"audio_filepath": str(clip), "text": "a"},
                                                {"audio_filepath": "nan.wav", "text": "a"}])
    out = tmp_path / "run"
    assert main(["run", "rl_finetune", "--config", "rl/rloo", f"policy.path={tiny_nemo}",
                 f"data.train_manifest={manifest}", f"output_dir={out}", "trainer.batch_size=1",
                 "algorithm.num_samples=2", "trainer.max_steps=4", "trainer.progress_bar=false",
                 "trainer.samples_every=0", "data.num_workers=1", "data.shuffle=false"]) == 2
    err = capsys.readouterr().err
    assert "m.json:2: audio file holds NaN or infinite samples" in err and "resume=true" in err
    assert "Traceback" not in err and "worker" not in err
    assert (out / "checkpoints" / "trainer_state.pt").exists()


CALLS_ON_THIS_PROCESS = {"count": 0}


def fails_on_rank_one(inputs):
    """A user reward whose scoring service goes away on process 1 only, at its third call."""
    CALLS_ON_THIS_PROCESS["count"] += 1
    if os.environ.get("LOCAL_RANK") == "1" and CALLS_ON_THIS_PROCESS["count"] >= 3:
        raise ConnectionError("the scoring service went away")
    return [[min(1.0, len(text) / 100) for text in group] for group in inputs.hypotheses]


@pytest.mark.slow
def test_a_reward_raising_on_one_process_stops_both_with_a_checkpoint(corpus, tiny_nemo, tmp_path):
    import torch

    out = tmp_path / "run"
    stderr = run_two_processes_to_failure(
        "rl/grpo", tiny_nemo, corpus["train"], out, "trainer.batch_size=2", "algorithm.num_samples=4",
        "trainer.max_steps=6", "rewards=[{name: tests.test_bad_input.fails_on_rank_one}]")
    assert ("process 1: rewards[0] (tests.test_bad_input.fails_on_rank_one) raised ConnectionError: the scoring "
            "service went away") in stderr and "Fix the reward" in stderr
    assert torch.load(out / "checkpoints" / "trainer_state.pt", weights_only=True)["step"] == 2


def run_two_processes_to_failure(config: str, policy: str, manifest, out: Path, *overrides: str) -> str:
    """``rlnf run rl_finetune`` on two gloo processes, expected to stop with exit status 2 and a message
    that is no traceback; returns its stderr."""
    result = subprocess.run(
        [sys.executable, "-m", "rlnf.cli", "run", "rl_finetune", "--config", config, f"policy.path={policy}",
         f"data.train_manifest={manifest}", f"output_dir={out}", "trainer.progress_bar=false",
         "trainer.samples_every=0", "trainer.devices=2", "trainer.save_every=100", *overrides],
        capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.slow
def test_bad_audio_on_one_process_stops_both_with_a_checkpoint(tmp_path, clip, tiny_nemo):
    """A data worker on process 1 meets a clip of NaN samples at step 2: both processes stop (none
    waits on a collective), the message names the manifest line, and step 1 is kept."""
    import torch

    speech = np.zeros(8000, dtype=np.float32) + 0.01
    speech[100:200] = np.nan
    soundfile.write(str(tmp_path / "nan.wav"), speech, 16000, subtype="FLOAT")
    manifest = write_rows(tmp_path / "m.json", [{"audio_filepath": str(clip), "text": text} for text in "abc"]
                          + [{"audio_filepath": "nan.wav", "text": "d"}])
    out = tmp_path / "run"
    stderr = run_two_processes_to_failure("rl/rloo", tiny_nemo, manifest, out, "trainer.batch_size=1",
                                          "algorithm.num_samples=2", "trainer.max_steps=4", "data.num_workers=1",
                                          "data.shuffle=false")
    assert "m.json:4: audio file holds NaN or infinite samples" in stderr
    assert torch.load(out / "checkpoints" / "trainer_state.pt", weights_only=True)["step"] == 1
