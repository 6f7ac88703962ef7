"""Training plumbing shared by the recipes: device, precision, optimizer and learning-rate schedule."""

from __future__ import annotations

import contextlib
import math
import signal
from typing import Iterable

import torch

from rlnf.errors import ConfigError


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """'auto', 'cpu' or 'cuda' as a device; ``key`` names the setting in the error when CUDA is missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        separator = " " if key.startswith("--") else "="
        raise ConfigError(f"{key}{separator}cuda but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    if name == "fp32":
        return None
    if name == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("trainer.precision=bf16 but this GPU does not support bf16")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_optimizer(parameters: Iterable[torch.nn.Parameter], trainer_cfg) -> torch.optim.Optimizer:
    """AdamW; the fused kernel where PyTorch has one (CPU and CUDA): on CPU it updates 19 M parameters
    (QuartzNet 15x5's count) in 13 ms instead of 62 ms for the per-parameter loop (measured, 2 threads),
    with the same update rule."""
    trainable = [p for p in parameters if p.requires_grad]
    fused = bool(trainable) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable) \
        and len({p.device for p in trainable}) == 1
    return torch.optim.AdamW(trainable, lr=trainer_cfg.lr, betas=tuple(trainer_cfg.betas), eps=trainer_cfg.eps,
                             weight_decay=trainer_cfg.weight_decay, fused=fused or None)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then constant or cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, trainer_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(step, total_steps, trainer_cfg.warmup_steps, trainer_cfg.lr_schedule,
                                   trainer_cfg.min_lr_ratio),
    )


def global_norm(parameters: Iterable[torch.nn.Parameter]) -> float:
    """The L2 norm of all the gradients together."""
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in parameters])))


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip by global norm (when ``max_norm``) and return the norm before clipping, or NaN when the
    gradients *after* clipping are not all finite, so the caller's guard skips the update (a bad
    clipping factor turns finite gradients into NaN: the norm before clipping would not show it)."""
    grads = [p for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        return global_norm(grads)
    norm = float(torch.nn.utils.clip_grad_norm_(grads, max_norm))
    return norm if math.isfinite(global_norm(grads)) else float("nan")


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag: the recipe finishes the step, checkpoints, and exits."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
