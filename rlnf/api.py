"""The Python API: the runs of the ``rlnf`` command, called from Python.

    import rlnf

    def short_is_good(inputs):                      # a reward: RewardInputs -> [B, K] scores in [0, 1]
        return [[1.0 / (1 + len(h)) for h in group] for group in inputs.hypotheses]

    summary = rlnf.finetune(policy="model.nemo", train_manifest="audio.json", output_dir="runs/mine",
                            rewards=[{"name": "learned", "path": "rm/checkpoints/best"}, (short_is_good, 0.1)],
                            config="rl/grpo", trainer={"max_steps": 200})
    metrics = rlnf.evaluate(model="runs/mine/checkpoints/best.nemo", manifest="test.json")

``finetune`` and ``train_reward_model`` resolve their config exactly as ``rlnf run`` does (the YAML
file, then the keyword arguments and ``overrides`` as ``key=value`` overrides), so every config
check and error message applies, and they write the same run folder: config.yaml, metrics.jsonl,
TensorBoard events, checkpoints/, summary.json. Errors a user can fix raise ``rlnf.errors.RlnfError``
(``ConfigError``, ``DataError``, ``RewardError``, ``CheckpointError``) with the message the command
prints. ``evaluate``, ``score``, ``scored_pairs``, ``adapt_batchnorm`` and ``adapt_suta`` are those of ``rlnf.commands`` (their
messages name the command-line flag of an argument: ``--model`` for ``model``).

This module is light: torch and NeMo load when a run starts. The page docs/python-api.md is its manual.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

from rlnf.commands import adapt_batchnorm, adapt_suta, evaluate, score, scored_pairs
from rlnf.errors import ConfigError

__all__ = ["adapt_batchnorm", "adapt_suta", "evaluate", "scored_pairs", "finetune", "reward_model_config", "rl_config", "score",
           "train_reward_model"]

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------ overrides
def yaml_value(value: Any) -> str:
    """``value`` written as YAML flow text, read back by the config loader as the same value (strings
    quoted, so 'yes' or '1e-4' stay what they are: a string, a number)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    if isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(key))}: {yaml_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(item) for item in value) + "]"
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) into a config; give a number, a string, a "
                      "boolean, None, or a list or dict of those")


def as_overrides(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Nested keyword values as ``key=value`` overrides: {'trainer': {'max_steps': 2}} ->
    ['trainer.max_steps=2']. Lists stay whole values (they replace the config's list, as on the
    command line)."""
    items: list[str] = []
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            items.extend(as_overrides(value, f"{prefix}{key}."))
        else:
            items.append(f"{prefix}{key}={yaml_value(value)}")
    return items


def dotted_overrides(overrides: str | Iterable[str]) -> list[str]:
    return [overrides] if isinstance(overrides, str) else [str(item) for item in overrides]


# ------------------------------------------------------------------------------ rewards
def reward_specs(rewards: Sequence[Any]) -> list[dict[str, Any]]:
    """The ``rewards`` argument of ``finetune`` as config entries (RewardSpec dicts). Each item is a
    name ('cer', 'wer'), a dotted path, a dict (a RewardSpec: name, weight, path, kwargs...; its name
    may be a Python callable too), a Python callable (a function, a class, or an object with
    ``__call__``), or a pair (any of these, weight). A callable is registered for this process
    (``rlnf.rewards.register_reward``) and named ``python:<module>.<qualname>``, or
    ``python:<its name attribute>``."""
    if isinstance(rewards, (str, Mapping)) or callable(rewards):
        rewards = [rewards]
    elif (isinstance(rewards, tuple) and len(rewards) == 2 and isinstance(rewards[1], (int, float))
          and not isinstance(rewards[1], bool)):
        raise ConfigError(f"rewards={rewards!r} is one (reward, weight) pair: put it in a list, "
                          f"rewards=[{rewards!r}], so that it is not read as two rewards")
    specs = []
    for index, item in enumerate(rewards):
        weight = None
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ConfigError(f"rewards[{index}]: a tuple must be a (reward, weight) pair, got {len(item)} items")
            item, weight = item
        if isinstance(item, os.PathLike):
            item = os.fspath(item)
        if isinstance(item, str):
            spec: dict[str, Any] = {"name": item}
        elif isinstance(item, Mapping):
            spec = dict(item)
            if callable(spec.get("name")):
                spec["name"] = register(spec["name"])
        elif callable(item):
            spec = {"name": register(item)}
        else:
            raise ConfigError(f"rewards[{index}]: {item!r} is not a reward; give a name ('cer', 'wer'), a dotted path "
                              "('mypackage.rewards.my_reward'), a dict such as {'name': 'learned', 'path': 'rm/'}, "
                              "a Python callable, or a (reward, weight) pair")
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"rewards[{index}]: the weight of a (reward, weight) pair must be a number, "
                                  f"got {weight!r}")
            spec["weight"] = float(weight)
        specs.append(spec)
    return specs


def register(reward: Any) -> str:
    from rlnf.rewards import register_reward  # torch loads here, only for a Python reward

    return register_reward(reward)


# ------------------------------------------------------------------------------ configs
def _resolve(recipe: str, config: str | None, values: dict[str, Any], sections: dict[str, Any],
             overrides: str | Iterable[str], check_folder: bool) -> tuple[Any, Any]:
    """(recipe module, validated config): the YAML, then the arguments and sections, then the dotted
    ``overrides``; with ``check_folder``, the run folder checked as ``rlnf run`` checks it."""
    from rlnf.launcher import resolve
    from rlnf.run_folder import check_output_dir

    given = {key: value for key, value in values.items() if value is not None}
    items = as_overrides(given) + as_overrides(sections) + dotted_overrides(overrides)
    config = None if config is None else os.fspath(config)
    module, cfg = resolve(recipe, config, items, check_output=False)
    if check_folder:  # as rlnf run checks it, after what only the Python API refuses
        _refuse_spawning(cfg)
        check_output_dir(cfg.output_dir, getattr(cfg, "resume", None))
    return module, cfg


def _refuse_spawning(cfg) -> None:
    """Several processes from Python need a launcher: without one, Lightning would start the others by
    re-running this script from its first line (an earlier step of it included), and in a notebook it
    cannot. Refused before the run folder is made, naming the keys and the launcher to use."""
    from rlnf.distributed import launcher_layout
    from rlnf.errors import ConfigError

    trainer = getattr(cfg, "trainer", None)
    if not hasattr(trainer, "devices") or launcher_layout() is not None:  # a single-process recipe, or launched
        return
    processes = (trainer.devices or 1) * (trainer.num_nodes or 1)
    if processes > 1:
        raise ConfigError(f"trainer.devices={trainer.devices}, trainer.num_nodes={trainer.num_nodes}: several "
                          "processes from the Python API need a launcher; run this script under `torchrun "
                          "--nproc_per_node=N script.py` (or srun) with trainer.devices left null, or use `rlnf run`")


def _rl_values(policy, train_manifest, output_dir, rewards, val_manifest) -> dict[str, Any]:
    values: dict[str, Any] = {"output_dir": output_dir, "data": {"train_manifest": train_manifest,
                                                                  "val_manifest": val_manifest}}
    if isinstance(policy, Mapping):  # the policy section itself: {"path": ..., "adapters": 8}
        values["policy"] = dict(policy)
    elif policy is not None:
        values["policy"] = {"path": policy}
    if rewards is not None:
        values["rewards"] = reward_specs(rewards)
    values["data"] = {key: value for key, value in values["data"].items() if value is not None}
    if not values["data"]:
        del values["data"]
    return values


def rl_config(policy: PathLike | Mapping | None = None, train_manifest: PathLike | None = None,
              output_dir: PathLike | None = None, rewards: Sequence[Any] | None = None, *,
              config: PathLike | None = None, val_manifest: PathLike | None = None,
              overrides: str | Iterable[str] = (), **sections: Any):
    """The validated ``RLFinetuneConfig`` that ``finetune`` with the same arguments would run, without
    running it or touching ``output_dir`` (print it with ``rlnf.config.to_yaml``). Raises
    ``ConfigError`` naming the key, as ``rlnf run`` does."""
    return _resolve("rl_finetune", config, _rl_values(policy, train_manifest, output_dir, rewards, val_manifest),
                    sections, overrides, check_folder=False)[1]


def finetune(policy: PathLike | Mapping | None = None, train_manifest: PathLike | None = None,
             output_dir: PathLike | None = None, rewards: Sequence[Any] | None = None, *,
             config: PathLike | None = None, val_manifest: PathLike | None = None,
             overrides: str | Iterable[str] = (), **sections: Any) -> dict[str, Any]:
    """RL fine-tuning of a CTC policy against rewards: ``rlnf run rl_finetune`` from Python.

    Args:
        policy: the .nemo to fine-tune (``policy.path``), or the whole policy section as a dict
            (``{"path": "m.nemo", "adapters": 8}``).
        train_manifest: JSONL manifest of the training audio (``data.train_manifest``); rows need a
            ``text`` only for rewards that need references (cer, wer).
        output_dir: the run folder (``output_dir``): config.yaml, metrics.jsonl, TensorBoard events,
            checkpoints/{best,last}.nemo and trainer_state.pt, summary.json.
        rewards: the rewards summed with their weights (default: the config's, else 1 - CER). Each is
            a name ('cer', 'wer'), a dotted path 'mypackage.rewards.fn' (a module in the working
            folder is found too), a dict (a RewardSpec: ``{"name": "learned", "path": "rm/", "weight":
            1.0}``), a Python callable ``fn(inputs: RewardInputs) -> [B, K]`` scores in [0, 1] or an
            object with ``__call__`` (``needs_references = True`` to receive the references), or a
            ``(reward, weight)`` pair of any of these. A callable is named
            ``python:<module>.<qualname>`` in config.yaml (its ``name`` attribute, when it has one,
            instead); only this Python process can run it, resume included.
        config: a shipped config name (``"rl/grpo"``, see ``rlnf ls``) or a YAML path; None: defaults.
        val_manifest: validation manifest (``data.val_manifest``): greedy WER/CER/reward, best.nemo.
        overrides: ``key=value`` strings as on the command line (``["trainer.max_steps=200"]``),
            applied last.
        **sections: any other config key, a section as a dict (``algorithm={"kl_coef": 0.05}``,
            ``trainer={"max_steps": 200}``) or a top-level key (``resume=True``).

    Returns:
        The run summary (as summary.json): step, checkpoints, best metric, final_metrics...

    Raises:
        rlnf.errors.RlnfError: a config, data, reward or checkpoint problem, with the message
        ``rlnf run`` prints; a reward that fails mid-run stops the run with a checkpoint of the last
        completed step (continue with ``resume=True``).

    Example::

        summary = rlnf.finetune("model.nemo", "audio.json", "runs/x", rewards=[my_reward, ("cer", 0.5)],
                                config="rl/grpo", algorithm={"kl_coef": 0.05}, trainer={"max_steps": 200})
    """
    from rlnf.run_folder import open_run_folder

    module, cfg = _resolve("rl_finetune", config,
                           _rl_values(policy, train_manifest, output_dir, rewards, val_manifest),
                           sections, overrides, check_folder=True)
    with open_run_folder(cfg):
        return module.main(cfg)


def _reward_values(train_pairs, output_dir, val_pairs) -> dict[str, Any]:
    data = {key: value for key, value in {"train_manifest": train_pairs, "val_manifest": val_pairs}.items()
            if value is not None}
    return {"output_dir": output_dir, **({"data": data} if data else {})}


def reward_model_config(train_pairs: PathLike | None = None, output_dir: PathLike | None = None, *,
                        val_pairs: PathLike | None = None, config: PathLike | None = None,
                        overrides: str | Iterable[str] = (), **sections: Any):
    """The validated ``RewardTrainConfig`` that ``train_reward_model`` with the same arguments would
    run, without running it or touching ``output_dir``."""
    return _resolve("train_reward_model", config, _reward_values(train_pairs, output_dir, val_pairs), sections,
                    overrides, check_folder=False)[1]


def train_reward_model(train_pairs: PathLike | None = None, output_dir: PathLike | None = None, *,
                       val_pairs: PathLike | None = None, config: PathLike | None = None,
                       overrides: str | Iterable[str] = (), **sections: Any) -> dict[str, Any]:
    """Train a reward model on scored pairs: ``rlnf run train_reward_model`` from Python.

    Args:
        train_pairs: manifest of scored pairs (``data.train_manifest``): audio_filepath, text (the
            transcript scored), score in [0, 1] (``rlnf data pairs`` writes one).
        output_dir: the run folder; checkpoints/best/ is the reward checkpoint a ``learned`` reward
            takes as ``path``.
        val_pairs: validation pairs (``data.val_manifest``); None holds out ``data.val_split`` of the clips.
        config: a shipped config name (``"reward/listening"``) or a YAML path; None: defaults (the
            published model card's recipe).
        overrides, **sections: as for ``finetune`` (``trainer={"epochs": 3}``, ``model={...}``).

    Returns:
        The run summary (as summary.json).

    Example::

        summary = rlnf.train_reward_model("pairs.jsonl", "runs/rm", config="reward/listening",
                                          trainer={"epochs": 3})
        reward = {"name": "learned", "path": "runs/rm/checkpoints/best"}
    """
    from rlnf.run_folder import open_run_folder

    module, cfg = _resolve("train_reward_model", config, _reward_values(train_pairs, output_dir, val_pairs),
                           sections, overrides, check_folder=True)
    with open_run_folder(cfg):
        return module.main(cfg)
