"""Rewards: map (audio, K hypotheses per utterance, optional references) to scores in [0, 1].

The contract (also in the README, "Plugging in a reward"):

    reward(inputs: RewardInputs) -> array-like [B, K] of floats in [0, 1]

``RewardInputs`` carries the padded audio at the policy's sample rate, the hypotheses grouped
per utterance, the references (None where a manifest row has no text) and the manifest rows.
A reward that needs references sets ``needs_references = True``. Any callable can be named in a
config by its dotted path; a class is instantiated with the config's ``kwargs``.

Built-ins: ``cer`` (1 - CER), ``wer`` (1 - WER), ``learned`` (a reward-model checkpoint).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from rlnf.errors import ConfigError, RewardError
from rlnf.metrics import error_rate


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


def check_scores(name: str, scores: Any, batch_size: int, num_samples: int) -> torch.Tensor:
    """Validate a reward's output: shape [B, K], finite, within [0, 1]. Returns float32 [B, K] on CPU."""
    try:
        values = torch.as_tensor(scores, dtype=torch.float32).detach().cpu()
    except Exception as exc:
        raise RewardError(f"reward '{name}' returned something that is not a [B, K] array of numbers: {exc}") from None
    if values.shape != (batch_size, num_samples):
        raise RewardError(f"reward '{name}' returned shape {tuple(values.shape)}; expected "
                          f"[{batch_size}, {num_samples}] (one score per hypothesis)")
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise RewardError(f"reward '{name}' returned {bad} NaN/infinite score(s)")
    tolerance = 1e-5
    if values.min() < -tolerance or values.max() > 1 + tolerance:
        raise RewardError(f"reward '{name}' returned scores outside [0, 1] (min {values.min():.4g}, "
                          f"max {values.max():.4g}); rescale it")
    return values.clamp(0.0, 1.0)


def import_object(dotted_path: str) -> Any:
    """'package.module.attribute' -> the attribute. Runs the module's code: only name code you trust."""
    module_name, _, attribute = dotted_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"rewards: cannot import module {module_name!r} for reward {dotted_path!r}: {exc}") from None
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


class CallableReward:
    """A user reward named by dotted path; functions get ``kwargs`` at call time."""

    def __init__(self, dotted_path: str, kwargs: dict[str, Any]):
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
    label: str
    weight: float
    reward: Callable[[RewardInputs], Any]

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

    def __call__(self, inputs: RewardInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (total [B, K] = sum_i w_i r_i, {label: r_i [B, K]})."""
        components: dict[str, torch.Tensor] = {}
        total = torch.zeros(inputs.batch_size, inputs.num_samples)
        for item in self.rewards:
            scores = check_scores(item.label, item.reward(inputs), inputs.batch_size, inputs.num_samples)
            components[item.label] = scores
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

        return LearnedReward(spec.path, device=spec.device, batch_size=spec.batch_size, device_key="rewards[].device")
    return CallableReward(spec.name, dict(spec.kwargs))


def build_rewards(specs: Sequence[Any]) -> RewardSet:
    """The configured rewards (their weights were checked with the config: finite, not all 0)."""
    return RewardSet([WeightedReward(spec.label, spec.weight, build_reward(spec)) for spec in specs])
