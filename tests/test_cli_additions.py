"""The CLI's conveniences: --version, cp, run --print-config, a quiet exit on a closed pipe, "did you
mean" for unknown keys, the recipe each shipped config names, and the learned-reward KL warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlnf.cli import main
from rlnf.config import RLFinetuneConfig, load_config
from rlnf.errors import ConfigError
from rlnf.launcher import list_configs, resolve
from rlnf.resources import configs_dir

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["policy.path=m.nemo", "data.train_manifest=t.json"]


def rlnf_process(*args: str, shell: str | None = None, cwd: Path | None = None, env: dict | None = None):
    """``python -m rlnf.cli ARGS`` (or a shell line using ``$RLNF``) with this checkout first on the path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if shell is not None:
        env["RLNF"] = f"{sys.executable} -m rlnf.cli"
        return subprocess.run(["bash", "-c", shell], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    return subprocess.run([sys.executable, "-m", "rlnf.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_version_matches_the_package_and_pyproject():
    import tomllib

    import rlnf

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert rlnf.__version__ == version
    done = rlnf_process("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"rlnf {version}"


def test_cp_copies_refuses_to_overwrite_and_names_an_unknown_config(tmp_path, capsys):
    shipped = configs_dir() / "rl" / "grpo_learned_reward.yaml"
    assert main(["cp", "rl/grpo_learned_reward", str(tmp_path / "my.yaml")]) == 0
    assert (tmp_path / "my.yaml").read_bytes() == shipped.read_bytes()
    # a folder: copied into it under the config's file name
    assert main(["cp", "reward/listening", str(tmp_path)]) == 0
    assert (tmp_path / "listening.yaml").read_bytes() == (configs_dir() / "reward" / "listening.yaml").read_bytes()
    capsys.readouterr()

    (tmp_path / "my.yaml").write_text("mine\n")
    assert main(["cp", "rl/grpo_learned_reward", str(tmp_path / "my.yaml")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "my.yaml").read_text() == "mine\n"
    assert main(["cp", "rl/grpo_learned_reward", str(tmp_path / "my.yaml"), "--force"]) == 0
    assert (tmp_path / "my.yaml").read_bytes() == shipped.read_bytes()

    assert main(["cp", "rl/grpo_learnd", str(tmp_path / "other.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown config 'rl/grpo_learnd'" in err and all(name in err for name in list_configs())
    assert not (tmp_path / "other.yaml").exists()


def test_ls_points_to_cp(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "rlnf cp" in out and "rl/grpo_learned_reward" in out and "rl/grpo_cer_reward" in out


def test_print_config_prints_the_resolved_presets_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "run"
    args = ["run", "rl_finetune", "--config", "rl/rloo", *REQUIRED, f"output_dir={out_dir}", "--print-config"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    from omegaconf import OmegaConf

    resolved = OmegaConf.create(printed)
    # the rloo preset's keys, null in the file and the schema, are filled in the print
    assert resolved.algorithm.name == "rloo" and resolved.algorithm.advantage == "rloo"
    assert resolved.algorithm.kl_in_reward is True and resolved.algorithm.kl_estimator == "k1"
    assert resolved.policy.path == "m.nemo" and resolved.output_dir == str(out_dir)
    assert "recipe" not in resolved  # the launcher's key, like the run folder's config.yaml
    assert not out_dir.exists() and list(tmp_path.iterdir()) == []
    # the print loads back as the same config
    (tmp_path / "printed.yaml").write_text(printed)
    again = load_config(RLFinetuneConfig, tmp_path / "printed.yaml")
    assert OmegaConf.to_yaml(OmegaConf.structured(again)) == printed
    # a config error still stops it, naming the key
    assert main([*args, "algorithm.kl_coeff=0.1"]) == 2
    assert "did you mean algorithm.kl_coef?" in capsys.readouterr().err


def test_print_config_does_not_refuse_an_existing_run_folder(tmp_path, capsys):
    out_dir = tmp_path / "run"
    (out_dir / "checkpoints").mkdir(parents=True)
    (out_dir / "config.yaml").write_text("old: run\n")
    assert main(["run", "rl_finetune", *REQUIRED, f"output_dir={out_dir}", "--print-config"]) == 0
    assert "algorithm:" in capsys.readouterr().out
    assert (out_dir / "config.yaml").read_text() == "old: run\n"


def test_closed_pipe_exits_quietly_without_a_trace_log(tmp_path):
    logs = tmp_path / "tmp"
    logs.mkdir()
    done = rlnf_process(shell="$RLNF config rl_finetune | head -3; echo \"status ${PIPESTATUS[0]}\" >&2",
                        env={"TMPDIR": str(logs)})
    assert len(done.stdout.splitlines()) == 3
    assert done.stderr.strip() in ("status 141", "status 0"), done.stderr
    assert list(logs.rglob("rlnf-error-*")) == []
    # A reader that is gone before the first write (head's race made deterministic): still quiet, 141.
    done = rlnf_process(shell="$RLNF config rl_finetune | true; echo \"status ${PIPESTATUS[0]}\" >&2",
                        env={"TMPDIR": str(logs)})
    assert done.stderr.strip() == "status 141", done.stderr
    assert list(logs.rglob("rlnf-error-*")) == []
    done = rlnf_process(shell="$RLNF run rl_finetune --config rl/grpo policy.path=m.nemo data.train_manifest=t.json "
                              "output_dir=o --print-config | head -1", env={"TMPDIR": str(logs)}, cwd=tmp_path)
    assert done.stdout.strip() == "output_dir: o" and done.stderr == ""
    assert list(logs.rglob("rlnf-error-*")) == []


@pytest.mark.parametrize("override, suggestion", [
    ("algorithm.kl_coeff=0.1", "algorithm.kl_coef"),
    ("trainer.max_stepz=3", "trainer.max_steps"),
    ("data.train_manifets=x.json", "data.train_manifest"),
    ("algoritm.name=grpo", "algorithm"),
    ("rewards=[{name: cer, wieght: 2}]", "weight"),
])
def test_unknown_key_suggests_the_closest(override, suggestion):
    with pytest.raises(ConfigError, match=rf"did you mean {suggestion.replace('.', '[.]')}\?$"):
        load_config(RLFinetuneConfig, None, [*REQUIRED, "output_dir=o", override])


def test_unknown_key_far_from_any_suggests_nothing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  zzzzzz: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(RLFinetuneConfig, path, [*REQUIRED, "output_dir=o"])
    assert "trainer.zzzzzz" in str(caught.value) and "did you mean" not in str(caught.value)


@pytest.mark.parametrize("recipe, config, belongs", [
    ("rl_finetune", "reward/listening", "train_reward_model"),
    ("train_reward_model", "rl/grpo_learned_reward", "rl_finetune"),
    ("train_ctc", "rl/grpo", "rl_finetune"),
])
def test_a_config_of_another_recipe_is_refused_saying_whose_it_is(recipe, config, belongs, capsys, monkeypatch):
    import rlnf.launcher as launcher

    def no_recipe(name):  # the refusal comes before the recipe module is even imported
        raise AssertionError("the recipe was loaded")

    monkeypatch.setattr(launcher, "load_recipe", no_recipe)
    with pytest.raises(ConfigError) as caught:
        resolve(recipe, config, [])
    assert str(caught.value) == (f"{configs_dir() / (config + '.yaml')} is a config of recipe {belongs}, not {recipe}: "
                                 f"run `rlnf run {belongs} --config {config}`")


def test_a_user_config_with_or_without_the_recipe_key_is_accepted(tmp_path):
    for text in ("", "recipe: rl_finetune\n"):
        path = tmp_path / "mine.yaml"
        path.write_text(text + "algorithm:\n  name: ppo\n")
        _, cfg = resolve("rl_finetune", str(path), [*REQUIRED, f"output_dir={tmp_path / 'run'}"])
        assert cfg.algorithm.name == "ppo"
    path.write_text("recipe: [rl_finetune]\n")
    with pytest.raises(ConfigError, match="'recipe' must be a recipe name"):
        resolve("rl_finetune", str(path), [*REQUIRED, f"output_dir={tmp_path / 'run'}"])


@pytest.mark.parametrize("kl_coef, rewards, warns", [
    (0.01, "[{name: learned, path: r}]", True),
    (0.0, "[{name: cer}, {name: learned, path: r, weight: 0.5}]", True),
    (0.05, "[{name: learned, path: r}]", False),
    (0.01, "[{name: cer}]", False),
])
def test_a_learned_reward_with_a_small_kl_coef_warns(kl_coef, rewards, warns, warnings_of):
    messages = warnings_of("rlnf.config")
    load_config(RLFinetuneConfig, configs_dir() / "rl" / "grpo_learned_reward.yaml",
                [*REQUIRED, "output_dir=o", f"algorithm.kl_coef={kl_coef}", f"rewards={rewards}"])
    assert len(messages) == (1 if warns else 0), messages
    if warns:
        assert f"algorithm.kl_coef={kl_coef:g}" in messages[0] and "0.05" in messages[0]


def test_the_validated_configs_hold_the_benchmarks_settings():
    """configs/rl/grpo_{learned,cer}_reward.yaml: the demo's RL settings (rlnf.demo.SETTINGS)."""
    from rlnf.demo import SETTINGS

    for name, reward in (("grpo_learned_reward", "learned"), ("grpo_cer_reward", "cer")):
        extra = ["rewards=[{name: learned, path: r}]"] if reward == "learned" else []
        cfg = load_config(RLFinetuneConfig, configs_dir() / "rl" / f"{name}.yaml", [*REQUIRED, "output_dir=o", *extra])
        assert cfg.algorithm.name == SETTINGS["rl_algorithm"] and cfg.algorithm.num_samples == SETTINGS["rl_num_samples"]
        assert cfg.algorithm.kl_coef == SETTINGS["rl_kl_coef"] and cfg.trainer.lr == SETTINGS["rl_lr"]
        assert cfg.trainer.batch_size == SETTINGS["rl_batch_size"] and cfg.trainer.lr_schedule == "constant"
        assert [spec.name for spec in cfg.rewards] == [reward]
    with pytest.raises(ConfigError, match="needs 'path'"):
        load_config(RLFinetuneConfig, configs_dir() / "rl" / "grpo_learned_reward.yaml", [*REQUIRED, "output_dir=o"])


def test_config_reference_shows_each_recipes_own_section_defaults():
    """`rlnf config` shows the defaults a recipe gives a shared section (rl_finetune's trainer.lr
    1e-4, train_ctc's 2e-3), not the shared class's."""
    from rlnf.config import CTCTrainConfig, iter_keys

    rl = {key: default for key, default, _ in iter_keys(RLFinetuneConfig)}
    ctc = {key: default for key, default, _ in iter_keys(CTCTrainConfig)}
    assert rl["trainer.lr"] == RLFinetuneConfig(output_dir="o").trainer.lr == 1e-4
    assert rl["algorithm.name"] == "grpo" and rl["algorithm.kl_coef"] == 0.05
    assert ctc["trainer.lr"] == 2e-3 and ctc["trainer.batch_size"] == 16 and ctc["trainer.warmup_steps"] == 100
    assert rl["output_dir"] == "(required)" and rl["data.train_manifest"] == "(required)"
