"""Configs fail fast, before any model loads, naming the key; presets fill unset keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlnf.cli import main
from rlnf.launcher import list_configs, load_recipe
from rlnf.config import RLFinetuneConfig, iter_keys, load_config
from rlnf.run_folder import check_output_dir
from rlnf.errors import ConfigError
from rlnf.resources import configs_dir

REQUIRED = ["policy.path=m.nemo", "data.train_manifest=t.json", "output_dir=/tmp/x"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_minimal_yaml_sets_only_three_keys(tmp_path):
    cfg = load_config(RLFinetuneConfig, write(tmp_path, "policy: {path: m.nemo}\ndata: {train_manifest: t.json}\n"
                                                        "output_dir: out\n"))
    # The defaults are the benchmark's validated settings: grpo, kl_coef 0.05, lr 1e-4.
    assert cfg.algorithm.name == "grpo" and cfg.rewards[0].name == "cer"
    assert cfg.algorithm.kl_coef == 0.05 and cfg.trainer.lr == 1e-4
    assert cfg.algorithm.advantage == "group" and cfg.algorithm.policy_loss == "clipped"  # preset filled
    assert cfg.algorithm.kl_in_reward is False and cfg.algorithm.kl_estimator == "exact"


@pytest.mark.parametrize("override, message", [
    ("trainer.max_stepz=3", "trainer.max_stepz"),
    ("algorithm.foo=1", "algorithm.foo"),
    ("trainer.max_steps=abc", "trainer.max_steps"),
    ("algorithm.name=dpo", "algorithm.name"),
    ("trainer.device=tpu", "trainer.device"),
    ("algorithm.num_samples=1", "num_samples"),
    ("algorithm.kl_estimator=k1", "kl_estimator=k1"),  # rloo preset folds KL into reward: k1 is fine there
])
def test_bad_key_or_value_names_the_key(override, message):
    if override == "algorithm.kl_estimator=k1":
        cfg = load_config(RLFinetuneConfig, None, REQUIRED + ["algorithm.name=rloo", override])
        assert cfg.algorithm.kl_estimator == "k1"
        with pytest.raises(ConfigError, match="k1 as a loss term"):
            load_config(RLFinetuneConfig, None, REQUIRED + ["algorithm.name=rloo", override,
                                                            "algorithm.kl_in_reward=false"])
        return
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(RLFinetuneConfig, None, REQUIRED + [override])


def test_missing_required_keys_are_listed():
    with pytest.raises(ConfigError, match="data.train_manifest.*output_dir.*policy.path"):
        load_config(RLFinetuneConfig, None, [])


def test_cross_key_rules():
    with pytest.raises(ConfigError, match="ppo_epochs"):
        load_config(RLFinetuneConfig, None, REQUIRED + ["algorithm.name=reinforce", "algorithm.ppo_epochs=2"])
    with pytest.raises(ConfigError, match="kl_in_reward"):
        load_config(RLFinetuneConfig, None, REQUIRED + ["algorithm.name=grpo", "algorithm.kl_in_reward=true"])
    with pytest.raises(ConfigError, match="needs 'path'"):
        load_config(RLFinetuneConfig, None, REQUIRED + ["rewards=[{name: learned}]"])
    with pytest.raises(ConfigError, match="unknown reward"):
        load_config(RLFinetuneConfig, None, REQUIRED + ["rewards=[{name: bleu}]"])


@pytest.mark.parametrize("name", ["reinforce", "rloo", "grpo", "ppo"])
def test_presets(name):
    cfg = load_config(RLFinetuneConfig, configs_dir() / "rl" / f"{name}.yaml", REQUIRED)
    assert cfg.algorithm.name == name
    expected = {"reinforce": ("self_critical", "reinforce"), "rloo": ("rloo", "reinforce"),
                "grpo": ("group", "clipped"), "ppo": ("rloo", "clipped")}[name]
    assert (cfg.algorithm.advantage, cfg.algorithm.policy_loss) == expected


def test_user_value_beats_preset():
    cfg = load_config(RLFinetuneConfig, None, REQUIRED + ["algorithm.name=grpo", "algorithm.scale_by_std=false"])
    assert cfg.algorithm.scale_by_std is False and cfg.algorithm.advantage == "group"


def test_every_shipped_config_names_its_recipe_and_parses_with_it():
    from omegaconf import OmegaConf

    for name in list_configs():
        cfg_path = configs_dir() / f"{name}.yaml"
        declared = OmegaConf.load(cfg_path).get("recipe")
        assert declared == _recipe_for(name), (name, declared)
        recipe = load_recipe(declared)
        overrides = [f"{key}=x" for key, default, _ in iter_keys(recipe.CONFIG_CLASS) if default == "(required)"]
        if "path: ???" in cfg_path.read_text().split("rewards:")[-1]:  # a learned reward whose folder the user gives
            overrides.append("rewards=[{name: learned, path: x}]")
        load_config(recipe.CONFIG_CLASS, cfg_path, overrides)


def _recipe_for(config_name: str) -> str:
    return {"rl": "rl_finetune", "reward": "train_reward_model", "ctc": "train_ctc"}[config_name.split("/")[0]]


def test_every_key_has_a_help_string():
    for key, _, help_text in iter_keys(RLFinetuneConfig):
        assert help_text, key


def test_output_dir_checks(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "trainer_state.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="resume=true"):
        check_output_dir(str(tmp_path / "run"), resume=False)
    check_output_dir(str(tmp_path / "run"), resume=True)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="not writable"):
            check_output_dir(str(locked / "run"), resume=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="not writable"):
        check_output_dir(str(blocker / "run"), resume=False)


def test_cli_reports_bad_key_without_loading_models(capsys):
    code = main(["run", "rl_finetune", "--config", "rl/rloo", *REQUIRED, "trainer.bogus=1"])
    assert code == 2
    assert "trainer.bogus" in capsys.readouterr().err


def test_cli_help_is_instant_and_imports_no_torch():
    code = ("import sys; from rlnf.cli import build_parser; build_parser().format_help(); "
            "print('torch' in sys.modules, 'nemo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_cli_ls_and_config(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "rl_finetune" in out and "rl/grpo" in out
    assert main(["config", "rl_finetune"]) == 0
    assert "algorithm.kl_coef" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["grpo", "mwer", "ppo", "reinforce", "rloo"])
def test_shipped_rl_configs_say_only_what_differs_from_their_preset(name):
    """configs/rl/NAME.yaml sets algorithm.name and only keys whose value differs from the schema's
    default with that preset applied (required keys stay as ??? to show what a user must give)."""
    import dataclasses

    from omegaconf import OmegaConf

    from rlnf.config import AlgorithmConfig, RLFinetuneConfig
    from rlnf.resources import configs_dir

    shipped = OmegaConf.to_container(OmegaConf.load(configs_dir() / "rl" / f"{name}.yaml"))
    assert shipped["algorithm"]["name"] == name
    assert shipped.pop("recipe") == "rl_finetune"  # the launcher's key, not the schema's
    defaults = OmegaConf.to_container(OmegaConf.structured(RLFinetuneConfig))
    algorithm = AlgorithmConfig(name=name)
    algorithm.finalize()  # the preset's values
    defaults["algorithm"] = dataclasses.asdict(algorithm)
    restated = []
    if "rewards" in shipped:  # each entry completed with RewardSpec's defaults
        if [{**defaults["rewards"][0], **entry} for entry in shipped.pop("rewards")] == defaults["rewards"]:
            restated.append("rewards")
    for section, values in shipped.items():
        if not isinstance(values, dict):  # output_dir, resume...
            if values != "???" and values == defaults[section]:
                restated.append(section)
            continue
        restated += [f"{section}.{key}" for key, value in values.items()
                     if key != "name" and value != "???" and value == defaults[section][key]]
    assert not restated, f"configs/rl/{name}.yaml restates defaults: {restated}"
