"""What every recipe's configuration shares: loading a YAML file and ``key=value`` overrides onto a
schema, the finite-number rule, the resume rules, and the views of a schema (``iter_keys``,
``to_yaml``) that ``rlnf config`` and docs/configuration.md show. Fields and value checks: ``rlnf.schema``.

A recipe's YAML file and ``key=value`` overrides are merged onto its dataclass schema with
OmegaConf, so an unknown key or a value of the wrong type fails *before any model loads*, with
a message naming the full key (and the closest valid key, when one is close). ``__post_init__``
methods check values and cross-key rules. A config file's top-level ``recipe:`` key names the recipe
it is for: ``rlnf.launcher.resolve`` checks it, and it is removed before the merge (so neither the
run folder's ``config.yaml`` nor ``--print-config`` holds it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, List

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from rlnf.errors import ConfigError
from rlnf.io import file_problem
from rlnf.schema import opt


def check_finite(config: Any, prefix: str = "") -> None:
    """Every float key of a config tree (lists of floats item by item) must be a finite number:
    one rule for all sections, so a key added later is covered too. Ranges are the sections' own."""
    import math

    for f in dataclasses.fields(config):
        key, value = f"{prefix}{f.name}", getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            check_finite(value, f"{key}.")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for index, item in enumerate(value):
                check_finite(item, f"{key}[{index}].")
        elif "float" in str(f.type):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, (int, float)) and not math.isfinite(item):
                    raise ConfigError(f"{key}={item} must be a finite number")


# Keys (or sections, ending in '.') whose change on resume would change what the run is: the model
# trained and its KL reference, the training data and its order, the algorithm, the rewards; for
# the reward recipe also the held-out split, the targets and the synthetic negatives.
RESUME_FIXED = ("policy.path", "model.", "data.train_manifest", "data.tarred_audio_filepaths", "data.text_key",
                "data.lowercase", "data.oov", "algorithm.", "rewards", "trainer.seed", "data.val_split",
                "data.score_key", "data.score_scale", "data.reference_key", "hard_negatives.")
RESUME_HELP = "Continue the run in output_dir from its last trainer state."
RESUME_FORCE_HELP = ("With resume=true: accept changes to keys that change the run's meaning (policy.path, model.*, "
                     "data.train_manifest/tarred_audio_filepaths, data.text_key/lowercase/oov, algorithm.*, rewards, "
                     "trainer.seed; train_reward_model: also data.val_split/score_key/score_scale/reference_key, "
                     "hard_negatives.*), which are refused otherwise. Other changes (lr, max_steps, logging...) "
                     "are allowed, warned about and recorded in resumes.jsonl.")


@dataclasses.dataclass
class RunConfig:
    """The keys every recipe's configuration starts with: its run folder (each recipe redefines
    ``output_dir`` to say what it writes there) and whether it resumes."""

    output_dir: str = opt(MISSING, "Run folder.")
    resume: bool = opt(False, RESUME_HELP)
    resume_force: bool = opt(False, RESUME_FORCE_HELP)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    message = str(exc).split("\n")[0]
    return f"{key}: {message}" if key else message


# A config file's top-level key naming its recipe: the launcher checks it, the schema never sees it.
RECIPE_KEY = "recipe"


def declared_recipe(loaded: DictConfig, config_path: Path) -> str | None:
    """The recipe a loaded config file names with its top-level ``recipe:`` key, or None."""
    name = loaded.get(RECIPE_KEY) if RECIPE_KEY in loaded else None
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{config_path}: the top-level key 'recipe' must be a recipe name such as rl_finetune, "
                          f"got {name!r}")
    return name


def schema_keys(schema: type, section: str) -> List[str]:
    """The key names of ``schema``'s dotted ``section`` ('' for the top level; list items such as
    ``rewards[0]`` as their element type): what an unknown key there could have meant."""
    import typing

    cls = schema
    for part in [p for p in section.split(".") if p]:
        hint = typing.get_type_hints(cls).get(part.split("[")[0])
        if typing.get_origin(hint) in (list, List):
            hint = typing.get_args(hint)[0]
        if not dataclasses.is_dataclass(hint):
            return []
        cls = hint
    return [f.name for f in dataclasses.fields(cls)]


def did_you_mean(schema: type, full_key: str, section_type: Any = None) -> str:
    """'; did you mean algorithm.kl_coef?' for an unknown ``full_key`` close to a valid one, else ''.
    ``section_type``: the dataclass the key was given in, when known (OmegaConf names only the key
    of a list item's section, as in ``rewards=[{wieght: 2}]``)."""
    import difflib

    section, _, name = full_key.rpartition(".")
    keys = ([f.name for f in dataclasses.fields(section_type)] if dataclasses.is_dataclass(section_type)
            else schema_keys(schema, section))
    match = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
    return f"; did you mean {section + '.' if section else ''}{match[0]}?" if match else ""


def load_config(schema: type, config_path: str | os.PathLike | None, overrides: List[str] | None = None) -> Any:
    """Merge ``config_path`` (YAML) and ``key=value`` overrides onto ``schema`` and validate.

    Returns an instance of ``schema``. Raises ``ConfigError`` naming the offending key.
    """
    base = OmegaConf.structured(schema)
    layers = [base]
    if config_path is not None:
        config_path = Path(config_path)
        problem = file_problem(config_path)
        if problem:
            raise ConfigError(f"config file {problem}: {config_path}")
        try:
            loaded = OmegaConf.load(config_path)
        except RecursionError:
            raise ConfigError(f"{config_path}: cannot parse YAML: nested too deeply") from None
        except Exception as exc:  # YAML syntax errors, bytes that are not UTF-8
            raise ConfigError(f"{config_path}: cannot parse YAML: {exc}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{config_path}: the top level must be a mapping of keys (key: value), not a "
                              f"{type(loaded).__name__.replace('Config', '').lower() or 'value'}")
        if declared_recipe(loaded, config_path) is not None and RECIPE_KEY not in schema_keys(schema, ""):
            loaded.pop(RECIPE_KEY)  # checked by rlnf.launcher.resolve against the recipe that runs
        layers.append(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
    except ConfigKeyError as exc:
        suggestion = did_you_mean(schema, str(exc.full_key or ""), exc.object_type)
        raise ConfigError(f"unknown config key {_describe(exc)}{suggestion}") from None
    except (ValidationError, OmegaConfBaseException) as exc:
        raise ConfigError(f"bad config value {_describe(exc)}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"required config key(s) not set: {', '.join(missing)}")
    try:
        config = OmegaConf.to_object(merged)
    except MissingMandatoryValue as exc:
        raise ConfigError(f"required config key not set: {_describe(exc)}") from None
    except ValidationError as exc:
        raise ConfigError(f"bad config value {_describe(exc)}") from None
    check_finite(config)
    return finalize_config(config)


def finalize_config(config: Any) -> Any:
    """Call ``finalize()`` on every nested config section that has one (idempotent); returns ``config``."""
    if dataclasses.is_dataclass(config):
        for f in dataclasses.fields(config):
            finalize_config(getattr(config, f.name))
        if hasattr(config, "finalize"):
            config.finalize()
    elif isinstance(config, list):
        for item in config:
            finalize_config(item)
    return config


def to_yaml(config: Any) -> str:
    """The resolved configuration as YAML (what a run writes to config.yaml), headed by the config's
    ``yaml_notes()`` as comments when it has any."""
    notes = config.yaml_notes() if hasattr(config, "yaml_notes") else []
    return "".join(f"# {note}\n" for note in notes) + OmegaConf.to_yaml(OmegaConf.structured(config))


def iter_keys(schema: type, prefix: str = "", section: Any = None) -> List[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf key of a schema, for docs and `rlnf config`.
    ``section``: the default instance of a nested section, whose values are the defaults shown (a
    recipe may change a shared section's default, as rl_finetune's ``TrainerConfig(lr=1e-4)``)."""
    rows: List[tuple[str, Any, str]] = []
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        if section is not None:
            default = getattr(section, f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else MISSING)
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None) or (
                dataclasses.is_dataclass(default) and not isinstance(default, type)):
            rows.extend(iter_keys(type(default), prefix=f"{key}.", section=default))
        else:
            if isinstance(default, list) and default and dataclasses.is_dataclass(default[0]):
                default = [dataclasses.asdict(item) for item in default]
            rows.append((key, "(required)" if default is MISSING else default, f.metadata.get("help", "")))
    return rows


def as_dictconfig(config: Any) -> DictConfig:
    return OmegaConf.structured(config)
