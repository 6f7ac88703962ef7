"""Rewards: map (audio, K hypotheses per utterance, optional references) to scores in [0, 1].

The contract (also in docs/rewards.md and docs/python-api.md):

    reward(inputs: RewardInputs) -> array-like [B, K] of floats in [0, 1]

``RewardInputs`` carries the padded audio at the policy's sample rate, the hypotheses grouped
per utterance, the references and the manifest rows. A reward that needs references sets
``needs_references = True``: only such a reward receives them (the others see None), and a
training manifest row without text is then refused before the run starts. Any callable can be named in a
config by its dotted path (a module in the working folder is found too); a class is instantiated
with the config's ``kwargs``. A Python object given to ``rlnf.finetune`` is registered here
(``register_reward``) and named ``python:<module>.<qualname>`` in the config.

Built-ins: ``cer`` (1 - CER), ``wer`` (1 - WER), ``learned`` (a reward-model checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rlnf.config.rl import IN_PROCESS_PREFIX
from rlnf.errors import ConfigError, RewardError, RlnfError
from rlnf.metrics import error_rate

log = logging.getLogger(__name__)


@dataclass
class RewardInputs:
    """What a reward sees. audio [B, S] float32 at ``sample_rate``; audio_len [B] in samples."""

    audio: torch.Tensor
    audio_len: torch.Tensor
    sample_rate: int
    hypotheses: list[list[str]]
    references: list[str | None]
    metadata: list[dict[str, Any]] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.hypotheses)

    @property
    def num_samples(self) -> int:
        return len(self.hypotheses[0]) if self.hypotheses else 0


class ErrorRateReward:
    """1 - error rate (clipped at 0) of each hypothesis against its utterance's reference."""

    needs_references = True

    def __init__(self, unit: str):
        self.unit = unit
        self.name = "cer" if unit == "char" else "wer"

    def __call__(self, inputs: RewardInputs) -> torch.Tensor:
        scores = [[max(0.0, 1.0 - error_rate(reference, hypothesis, self.unit)) for hypothesis in group]
                  for group, reference in zip(inputs.hypotheses, inputs.references)]
        return torch.tensor(scores, dtype=torch.float32)


def consensus_scores(group: Sequence[str], unit: str = "char") -> list[float]:
    """Each sample's agreement with the rest of its group: 1 - the mean error rate (clipped at 0) of
    hypothesis i when each other sample j of the group is taken as the reference. This is sample i's
    expected accuracy under the policy's own distribution (MBR's expected utility, estimated from the
    group). A group of one scores 1."""
    if len(group) < 2:
        return [1.0] * len(group)
    return [max(0.0, 1.0 - sum(error_rate(reference, hypothesis, unit)
                               for j, reference in enumerate(group) if j != i) / (len(group) - 1))
            for i, hypothesis in enumerate(group)]


def consensus(inputs: RewardInputs, unit: str = "char") -> torch.Tensor:
    """Reference-free reward (``name: rlnf.rewards.consensus``, ``kwargs: {unit: char | word}``): each
    hypothesis scored by ``consensus_scores`` against the other samples of its utterance, in the spirit
    of test-time RL's majority vote. It rewards the policy's own consensus, so alone it sharpens what
    the policy already says (much as self-training does); it is meant as a term beside a learned reward.

    Sample j's score depends on sample i (i is one of j's references), so under a group baseline
    (rloo, group) the baseline of sample i is no longer independent of sample i, and the policy
    gradient is a biased estimate of the gradient of the expected consensus: it still ranks a group's
    samples by agreement, which is what the term is for, but it is not an unbiased estimator."""
    if unit not in ("char", "word"):
        raise ValueError(f"consensus: unit must be 'char' or 'word', not {unit!r}")
    return torch.tensor([consensus_scores(group, unit) for group in inputs.hypotheses], dtype=torch.float32)


def score_problem(scores: Any, batch_size: int, num_samples: int) -> tuple[torch.Tensor | None, str | None]:
    """(float32 [B, K] on CPU clamped to [0, 1], None) for a valid reward output, else (None, what is
    wrong with it: the rest of a sentence that starts with the reward's name)."""
    try:
        values = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
    except Exception as exc:
        return None, f"returned something that is not a [B, K] array of numbers: {exc}"
    if values.shape != (batch_size, num_samples):
        return None, (f"returned shape {tuple(values.shape)}; expected [{batch_size}, {num_samples}] "
                      "(one score per hypothesis)")
    if not torch.isfinite(values).all():
        return None, f"returned {int((~torch.isfinite(values)).sum())} NaN/infinite score(s)"
    tolerance = 1e-5
    if values.min() < -tolerance or values.max() > 1 + tolerance:
        return None, f"returned scores outside [0, 1] (min {values.min():.4g}, max {values.max():.4g}); rescale it"
    return values.clamp(0.0, 1.0), None


def check_scores(name: str, scores: Any, batch_size: int, num_samples: int) -> torch.Tensor:
    """Validate a reward's output: shape [B, K], finite, within [0, 1]. Returns float32 [B, K] on CPU."""
    values, problem = score_problem(scores, batch_size, num_samples)
    if problem:
        raise RewardError(f"reward '{name}' {problem}")
    return values


def _missing_module(exc: ImportError, module_name: str) -> bool:
    """Whether ``exc`` says ``module_name`` itself (or a package above it) is missing, not a module
    that its own code imports."""
    missing = getattr(exc, "name", None)
    return isinstance(exc, ModuleNotFoundError) and bool(missing) and (
        module_name == missing or module_name.startswith(f"{missing}."))


def import_module_or_cwd(module_name: str) -> Any:
    """``importlib.import_module``, and when the module is not found, again with the working folder
    on ``sys.path`` (as ``python -m`` and ``python script.py`` put it there; the ``rlnf`` command does
    not). It stays on ``sys.path`` once it served an import."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        cwd = os.getcwd()
        if not _missing_module(exc, module_name) or any(os.path.abspath(entry or ".") == cwd for entry in sys.path):
            raise
    sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        module = importlib.import_module(module_name)
    except BaseException:
        sys.path.remove(cwd)
        raise
    log.info("reward module %r found in the working folder %s (added to sys.path)", module_name, cwd)
    return module


def import_object(dotted_path: str) -> Any:
    """'package.module.attribute' -> the attribute, the module looked up on ``sys.path`` and then in
    the working folder. Runs the module's code: only name code you trust."""
    module_name, _, attribute = dotted_path.rpartition(".")
    try:
        module = import_module_or_cwd(module_name)
    except ImportError as exc:
        hint = ""
        if _missing_module(exc, module_name):
            hint = (f" (looked on sys.path and in the working folder {os.getcwd()}: put the folder that holds "
                    f"{module_name.split('.')[0]}/ or {module_name.split('.')[0]}.py on PYTHONPATH, e.g. "
                    "PYTHONPATH=/path/to/folder rlnf run ..., run from that folder, or pip install the package "
                    "that provides it)")
        raise ConfigError(f"rewards: cannot import module {module_name!r} for reward {dotted_path!r}: "
                          f"{exc}{hint}") from None
    except SyntaxError as exc:
        raise ConfigError(f"rewards: {exc.filename}:{exc.lineno}: syntax error in the module of reward "
                          f"{dotted_path!r}: {exc.msg}") from None
    except Exception as exc:  # the module's own code raised while it was imported
        raise ConfigError(f"rewards: importing module {module_name!r} for reward {dotted_path!r} raised "
                          f"{type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigError(f"rewards: module {module_name!r} has no attribute {attribute!r}") from None


# ------------------------------------------------------------------------------ in-process rewards
# Python objects handed to ``rlnf.finetune``: the config names each by ``python:<readable name>``
# and the recipe, in the same process, finds the object here.
_IN_PROCESS: dict[str, Any] = {}


def readable_name(reward: Any) -> str:
    """A reward object's name for configs and messages: its ``label`` or ``name`` attribute when it
    has one (a string), else ``<module>.<qualname>`` of the function or class (of an instance, its
    class; of a ``functools.partial``, its function), with ``<locals>`` dropped and ``<lambda>`` written
    ``lambda``. Dotted identifiers only."""
    explicit = next((value for value in (getattr(reward, key, None) for key in ("label", "name"))
                     if isinstance(value, str) and value.strip()), None)
    if explicit is None:
        target = reward.func if isinstance(reward, functools.partial) else reward
        if not (inspect.isfunction(target) or inspect.isclass(target) or inspect.ismethod(target)):
            target = type(target)
        qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or "reward"
        explicit = f"{getattr(target, '__module__', None) or 'python'}.{qualname}"
    parts = [re.sub(r"\W", "_", part.replace("<lambda>", "lambda"))
             for part in explicit.split(".") if part and part != "<locals>"]
    return ".".join(part if part.isidentifier() else f"_{part}" for part in parts) or "reward"


def register_reward(reward: Any, name: str | None = None) -> str:
    """Register a Python reward (a function, a class, or an object with ``__call__``) for this process
    and return the name a config holds for it: ``python:<name or readable_name(reward)>``. A later
    registration under the same name replaces the object (a function defined again in a notebook)."""
    if not callable(reward):
        raise ConfigError(f"rewards: {reward!r} is not callable; a reward is a function or an object with "
                          "__call__(inputs) returning [B, K] scores")
    key = IN_PROCESS_PREFIX + (readable_name(reward) if name is None else name)
    _IN_PROCESS[key] = reward
    return key


def registered_reward(key: str) -> Any:
    try:
        return _IN_PROCESS[key]
    except KeyError:
        raise ConfigError(f"rewards: {key!r} names a Python object given to rlnf.finetune in another process; a "
                          "config file alone cannot re-run it. Call rlnf.finetune with the object again (resume "
                          "included), or name the reward by its dotted path, module.function, to run it from "
                          "a config") from None


class CallableReward:
    """A user reward named by dotted path (or ``python:...``, registered in this process); functions
    get ``kwargs`` at call time, a class is instantiated with them."""

    def __init__(self, dotted_path: str, kwargs: dict[str, Any]):
        if dotted_path.startswith(IN_PROCESS_PREFIX):
            target = registered_reward(dotted_path)
        else:
            target = import_object(dotted_path)
        self.name = dotted_path.rsplit(".", 1)[-1]
        if not callable(target):
            raise ConfigError(f"rewards: {dotted_path!r} is not callable")
        # kwargs that the class or function does not take fail here, naming them, not at the first call
        leading = () if isinstance(target, type) else (None,)  # a function's first argument: the inputs
        try:
            inspect.signature(target).bind(*leading, **kwargs)
        except TypeError as exc:
            raise ConfigError(f"rewards: kwargs {sorted(kwargs)} do not fit {dotted_path!r}: {exc}") from None
        except ValueError:  # no signature to read (a builtin): the call itself will tell
            pass
        if isinstance(target, type):
            try:
                self.function: Callable = target(**kwargs)
            except Exception as exc:
                raise ConfigError(f"rewards: {dotted_path}(**kwargs) raised {type(exc).__name__}: {exc}") from exc
            self.kwargs: dict[str, Any] = {}
        else:
            self.function, self.kwargs = target, dict(kwargs)
        self.needs_references = bool(getattr(self.function, "needs_references", False))

    def __call__(self, inputs: RewardInputs) -> Any:
        return self.function(inputs, **self.kwargs)


@dataclass
class WeightedReward:
    """One term of a ``RewardSet``: ``label`` names its metrics (reward/<label>/mean), ``source`` is
    how the config names it (a dotted path, 'cer', ...; default: the label)."""

    label: str
    weight: float
    reward: Callable[[RewardInputs], Any]
    source: str = ""

    @property
    def needs_references(self) -> bool:
        return bool(getattr(self.reward, "needs_references", False))


class RewardSet:
    """Several rewards summed with weights; each component is validated and reported separately."""

    def __init__(self, rewards: Sequence[WeightedReward]):
        if not rewards:
            raise ConfigError("rewards: give at least one reward")
        self.rewards = list(rewards)

    @property
    def needs_references(self) -> bool:
        return any(item.needs_references for item in self.rewards)

    @property
    def labels(self) -> list[str]:
        return [item.label for item in self.rewards]

    def check_references(self, references: Sequence[str | None], where: Sequence[str]) -> None:
        for item in self.rewards:
            if item.needs_references:
                for reference, location in zip(references, where):
                    if reference is None:
                        raise RewardError(f"reward '{item.label}' needs a reference transcript but {location} has "
                                          "none (use a reference-free reward such as 'learned')")

    def describe(self, index: int) -> str:
        """How messages name reward ``index``: 'rewards[1] (mypkg.rewards.bad)', the config's list."""
        item = self.rewards[index]
        return f"rewards[{index}] ({item.source or item.label})"

    def __call__(self, inputs: RewardInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (total [B, K] = sum_i w_i r_i, {label: r_i [B, K]}). The references reach only the
        rewards that need them (the others see None). A reward that raises, or returns something
        unusable, raises a ``RewardError`` naming it (``describe``), the cause attached."""
        components: dict[str, torch.Tensor] = {}
        total = torch.zeros(inputs.batch_size, inputs.num_samples)
        without_references = dataclasses.replace(inputs, references=[None] * inputs.batch_size)
        for index, item in enumerate(self.rewards):
            try:
                raw = item.reward(inputs if item.needs_references else without_references)
            except RlnfError as exc:  # already a user error (a checkpoint, a device): say whose
                error = type(exc)(f"{self.describe(index)}: {exc}")
                raise error from (exc.__cause__ or exc)
            except Exception as exc:
                raise RewardError(f"{self.describe(index)} raised {type(exc).__name__}: {exc}") from exc
            scores, problem = score_problem(raw, inputs.batch_size, inputs.num_samples)
            if problem:
                raise RewardError(f"{self.describe(index)} {problem}")
            components[item.label] = scores
            # Optional per-hypothesis figures of the last call (a learned ensemble's std): logged, not summed.
            for key, values in getattr(item.reward, "diagnostics", {}).items():
                components[f"{item.label}/{key}"] = values.float().cpu()
            total = total + item.weight * scores
        return total, components


def build_reward(spec: Any) -> Callable[[RewardInputs], Any]:
    """One reward from a ``rlnf.config.RewardSpec``."""
    if spec.name == "cer":
        return ErrorRateReward("char")
    if spec.name == "wer":
        return ErrorRateReward("word")
    if spec.name == "learned":
        from rlnf.rewards.learned import LearnedReward

        return LearnedReward(list(spec.paths) or spec.path, device=spec.device, batch_size=spec.batch_size,
                             device_key="rewards[].device", std_coef=spec.std_coef)
    return CallableReward(spec.name, dict(spec.kwargs))


def build_rewards(specs: Sequence[Any]) -> RewardSet:
    """The configured rewards (their weights were checked with the config: finite, not all 0)."""
    return RewardSet([WeightedReward(spec.label, spec.weight, build_reward(spec), spec.name) for spec in specs])
