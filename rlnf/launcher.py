"""Finding and starting recipes: the one way every entry point runs one (``rlnf run``, the demo,
``scripts/quality.py``), and the recipe and config lookup ``rlnf ls`` / ``rlnf config`` show.

A recipe is a Python file defining ``CONFIG_CLASS`` (its config dataclass) and ``main(cfg)``; the
shipped ones live in ``recipes/`` (``rlnf.resources``), and a path to a file of your own works too.
This module is light (no torch / NeMo import): config errors stay instant.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from rlnf.errors import ConfigError, RlnfError
from rlnf.resources import configs_dir, recipes_dir


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.py") if not p.name.startswith("_"))


def list_configs() -> list[str]:
    folder = configs_dir()
    return sorted(p.relative_to(folder).with_suffix("").as_posix() for p in folder.rglob("*.yaml"))


def load_recipe(name_or_path: str) -> ModuleType:
    """A recipe by name (``recipes/NAME.py``) or by path to a .py file of yours."""
    path = Path(name_or_path)
    if path.suffix != ".py":
        path = recipes_dir() / f"{name_or_path}.py"
    if not path.is_file():
        raise RlnfError(f"unknown recipe {name_or_path!r}; available: {', '.join(list_recipes())} "
                        "(or give a path to a recipe .py file)")
    spec = importlib.util.spec_from_file_location(f"rlnf_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for attribute in ("CONFIG_CLASS", "main"):
        if not hasattr(module, attribute):
            raise RlnfError(f"{path} is not a recipe: it defines no {attribute}")
    return module


def copy_config(name: str, dest: str, force: bool = False) -> Path:
    """``rlnf cp``: copy the shipped config ``name`` (e.g. ``rl/grpo_learned_reward``) to ``dest``, a
    file or a folder to copy into under the config's file name. Returns the path written."""
    import shutil

    source = configs_dir() / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not source.is_file():
        raise RlnfError(f"unknown config {name!r}; shipped configs: {', '.join(list_configs())}")
    target = Path(dest).expanduser()
    if target.is_dir():
        target = target / source.name
    if (target.exists() or target.is_symlink()) and not force:
        raise RlnfError(f"{target} already exists; choose another destination or pass --force to replace it")
    if not target.parent.is_dir():
        raise RlnfError(f"cannot copy to {target}: folder {target.parent} does not exist")
    shutil.copyfile(source, target)
    return target


def resolve_config_path(config: str | None) -> Path | None:
    """A YAML path, or a shipped config name such as ``rl/rloo``."""
    if config is None:
        return None
    path = Path(config).expanduser()
    if path.exists() or path.is_symlink():  # load_config says what is wrong with it, if anything
        return path
    shipped = configs_dir() / (config if config.endswith(".yaml") else f"{config}.yaml")
    if shipped.is_file():
        return shipped
    raise RlnfError(f"config file not found: {config} (shipped configs: {', '.join(list_configs())})")


def check_config_recipe(recipe: str, config: str, path: Path) -> None:
    """Refuse a config whose top-level ``recipe:`` key names another recipe than ``recipe`` (a name
    or a recipe .py path), saying which command it belongs to. A config without the key is accepted;
    one that does not parse is left to ``load_config`` to report."""
    from omegaconf import DictConfig, OmegaConf

    from rlnf.config.base import declared_recipe

    try:
        loaded = OmegaConf.load(path)
    except Exception:  # noqa: BLE001 - load_config names the problem
        return
    if not isinstance(loaded, DictConfig):
        return
    declared = declared_recipe(loaded, path)
    running = Path(recipe).stem
    if declared is not None and declared != running:
        raise ConfigError(f"{path} is a config of recipe {declared}, not {running}: run "
                          f"`rlnf run {declared} --config {config}`")


def resolve(recipe: str, config: str | None = None, overrides: Sequence[str] = (),
            check_output: bool = True) -> tuple[ModuleType, Any]:
    """The recipe module and its validated config (YAML, then ``key=value`` overrides), with the run
    folder checked (named, writable; refused when it holds a run and resume is false) unless
    ``check_output`` is false. Nothing is loaded yet. A config file whose ``recipe:`` key names
    another recipe is refused first."""
    from rlnf.config import load_config
    from rlnf.run_folder import check_output_dir

    config_path = resolve_config_path(config)
    if config_path is not None:  # before the recipe module (and torch) is imported
        check_config_recipe(recipe, config, config_path)
    module = load_recipe(recipe)
    cfg = load_config(module.CONFIG_CLASS, config_path, list(overrides))
    if check_output and hasattr(cfg, "output_dir"):
        check_output_dir(cfg.output_dir, getattr(cfg, "resume", None))
    return module, cfg


def launch(recipe: str, config: str | None = None, overrides: Sequence[str] = ()) -> Any:
    """``resolve``, then run the recipe in its locked run folder; returns its summary."""
    from rlnf.run_folder import open_run_folder

    module, cfg = resolve(recipe, config, overrides)
    with open_run_folder(cfg):
        return module.main(cfg)
