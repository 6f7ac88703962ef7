"""The building blocks of a config schema: ``opt`` (a dataclass field with a default and a help
string) and the value checks, which raise ``ConfigError`` naming the key.

Light (dataclasses and omegaconf only) and below every layer that declares a schema: the recipes'
configs (``rlnf.config``) and the reward model's architecture (``rlnf.reward_model.architecture``).
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

from omegaconf import MISSING

from rlnf.errors import ConfigError


def opt(default: Any = MISSING, help: str = "", factory: Any = None) -> Any:  # noqa: A002
    """A dataclass field with a default (or factory) and a help string (shown by `rlnf config`)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def check_positive(key: str, value: float, allow_zero: bool = False) -> None:
    if not (value > 0 or (allow_zero and value == 0)):  # NaN fails too
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")


def check_range(key: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    if not (low <= value <= high) or (high_open and value == high):  # NaN fails too
        raise ConfigError(f"{key}={value} must be in [{low}, {high}{')' if high_open else ']'}")
