"""Multi-process (multi-GPU, multi-node) training on Lightning Fabric's DDP strategy.

The recipes see one object, ``Distributed``. In a single-process run (the default) it holds no
Fabric and every method is the identity, so nothing changes. With ``trainer.devices`` x
``trainer.num_nodes`` > 1 it starts Lightning Fabric (``strategy="ddp"``), which

- launches the other local processes itself when started as a plain ``rlnf run`` command, or
  joins the processes that ``torchrun`` or SLURM (``srun``) started (it reads their environment),
- creates the process group (NCCL on GPUs, gloo on CPUs) and gives each process its GPU,
- wraps the policy in ``DistributedDataParallel`` (gradients averaged over processes in backward).

What rlnf adds on top is the RL-specific bookkeeping, behind a few named operations so that
``recipes/rl_finetune.py``'s step reads like a single-process loop:

- ``agree_on_batches``: every process fetches its shard of the step's micro-batches; they agree
  on each micro-batch's loss weight (``micro_batch_weights``), skip a step together when one
  shard has no readable audio, and raise together when fetching failed anywhere;
- ``together``: run an action (the rollout: sampling, rewards) on every process and, when it
  raised on any, raise on all of them, so none waits forever on a collective;
- ``backward`` / ``all_finite``: a non-finite loss skips the update on every process;
- ``pool_step``: one collective per step for the global batch's metrics (``pool_metrics``),
  its size and the stop flags (a signal or the time budget on one process stops all).

Each process samples, scores and computes group-local advantages for its own shard of every
global batch; only rank 0 logs and writes files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Callable, Sequence, TypeVar

import torch

from rlnf.errors import ConfigError, DataError, RewardError, RlnfError

log = logging.getLogger(__name__)
Result = TypeVar("Result")


def describe_error(error: Exception) -> str:
    """An error's message as other processes report it: a user error's own, else with its type."""
    return str(error) if isinstance(error, RlnfError) else f"{type(error).__name__}: {error}"


def launcher_layout(environ: dict[str, str] | None = None) -> tuple[int, int] | None:
    """(processes per node, nodes) announced by torchrun or SLURM, or None outside a launcher."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" in environ and "LOCAL_WORLD_SIZE" in environ:  # torchrun / torch.distributed.run
        world, local = int(environ["WORLD_SIZE"]), int(environ["LOCAL_WORLD_SIZE"])
        return local, max(1, world // max(1, local))
    if "SLURM_NTASKS" in environ and "SLURM_NNODES" in environ and environ.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        tasks, nodes = int(environ["SLURM_NTASKS"]), int(environ["SLURM_NNODES"])
        return max(1, tasks // max(1, nodes)), nodes
    return None


def resolve_layout(devices: int | None, num_nodes: int | None, environ: dict[str, str] | None = None) -> tuple[int, int]:
    """trainer.devices / trainer.num_nodes, with null meaning 'what the launcher says, else 1'."""
    layout = launcher_layout(environ) or (1, 1)
    return (layout[0] if devices is None else devices), (layout[1] if num_nodes is None else num_nodes)


def pool_metrics(per_rank: Sequence[tuple[dict[str, float], float]], std_scale: float = 1.0) -> dict[str, float]:
    """Combine each process's step metrics into the global batch's.

    ``per_rank``: (metrics, weight) per process, weight = its number of utterances. Every metric
    is a weighted mean, except ``X/std`` with a sibling ``X/mean``: that is the pooled sample std
    of the union, from each process's (count, mean, std) with count = weight * ``std_scale``
    (e.g. K hypotheses per utterance). A key missing on a process is pooled over the others.
    """
    keys = sorted({key for metrics, _ in per_rank for key in metrics})
    pooled: dict[str, float] = {}
    for key in keys:
        present = [(metrics[key], weight) for metrics, weight in per_rank if key in metrics and weight > 0]
        if not present:
            present = [(metrics[key], 1.0) for metrics, _ in per_rank if key in metrics]
        total = sum(weight for _, weight in present)
        pooled[key] = sum(value * weight for value, weight in present) / total
    for key in keys:
        if not key.endswith("/std"):
            continue
        mean_key = key[: -len("std")] + "mean"
        rows = [(m[key], m[mean_key], w * std_scale) for m, w in per_rank if key in m and mean_key in m and w > 0]
        if len(rows) < 2 or mean_key not in pooled:
            continue
        count = sum(n for _, _, n in rows)
        mean = sum(mu * n for _, mu, n in rows) / count
        squares = sum((n - 1) * sd * sd + n * (mu - mean) ** 2 for sd, mu, n in rows)
        pooled[key] = math.sqrt(max(squares, 0.0) / max(count - 1, 1))
    return pooled


def micro_batch_weights(counts_by_rank: Sequence[Sequence[int]], rank: int) -> list[float]:
    """Loss weight of each of this process's micro-batches: world * n[rank][i] / N, N the utterances
    of the whole step (every process, every micro-batch). Each micro-batch's loss is a per-utterance
    mean, and DDP averages gradients over processes, so the accumulated gradient is that of the
    per-utterance mean over the step: an epoch's short last micro-batch counts for its utterances, no
    more. counts_by_rank [world][accum] -> [accum]."""
    total = sum(sum(counts) for counts in counts_by_rank)
    return [len(counts_by_rank) * count / total for count in counts_by_rank[rank]]


def shard_bounds(count: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous slice [lo, hi) of a global batch of ``count`` items for ``rank``; sizes differ by <= 1."""
    return count * rank // world_size, count * (rank + 1) // world_size


def running_group() -> tuple[int, int, Callable[[Any], list[Any]] | None]:
    """(rank, world size, all-gather of Python objects) of the process group this process has joined
    (``Distributed`` starts it), or (0, 1, None) outside one: for code below the recipes, such as
    manifest validation, that must share work without being handed the recipe's ``Distributed``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0, 1, None
    return dist.get_rank(), dist.get_world_size(), gather_objects


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every process of the initialised group, in rank order."""
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class Distributed:
    """The process group of a run (or its absence). Build it before loading models."""

    def __init__(self, trainer_cfg, device: torch.device):
        devices, num_nodes = resolve_layout(trainer_cfg.devices, trainer_cfg.num_nodes)  # strategy: checked by the config
        self.fabric = None
        self.device = device
        self.skipped_batches = 0  # steps every process skipped: one shard had no readable audio
        if devices * num_nodes > 1:
            from lightning.fabric import Fabric
            from lightning.fabric.strategies import DDPStrategy

            accelerator = "cuda" if device.type == "cuda" else "cpu"
            if accelerator == "cuda" and devices > torch.cuda.device_count():
                raise ConfigError(f"trainer.devices={devices} but this node has {torch.cuda.device_count()} GPU(s)")
            # broadcast_buffers keeps BatchNorm statistics identical across ranks when they train.
            strategy = DDPStrategy(broadcast_buffers=True, find_unused_parameters=False)
            try:
                self.fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                                     precision="32-true")
                self.fabric.launch()
            except (ValueError, RuntimeError) as exc:
                raise ConfigError(f"cannot start {devices} x {num_nodes} processes (trainer.devices x "
                                  f"trainer.num_nodes): {exc}") from None
            self.device = self.fabric.device
            if not self.is_main:  # one voice in the console: the others warn and fail, but do not chat
                logging.getLogger("rlnf").setLevel(logging.WARNING)
            log.info("process group: %d processes (%d per node x %d nodes), backend %s", self.world_size, devices,
                     num_nodes, "nccl" if accelerator == "cuda" else "gloo")

    # ------------------------------------------------------------------ who am I
    @property
    def world_size(self) -> int:
        return 1 if self.fabric is None else self.fabric.world_size

    @property
    def rank(self) -> int:
        return 0 if self.fabric is None else self.fabric.global_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forward passes that will be back-propagated (DDP in a group)."""
        if self.fabric is None:
            return model
        return self.fabric.setup_module(model)

    def no_sync(self, module: torch.nn.Module, enabled: bool):
        """Skip the gradient all-reduce (for all but the last micro-batch of an accumulated step)."""
        if self.fabric is None or not enabled:
            return contextlib.nullcontext()
        return self.fabric.no_backward_sync(module, enabled=True)

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.fabric is None:
            return tensor
        return self.fabric.all_reduce(tensor.to(self.device), reduce_op="sum").to(tensor.device)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.fabric is None:
            return [obj]
        return gather_objects(obj)

    def concatenate(self, items: list) -> list:
        """Every process's ``items``, in rank order (alone: ``items``)."""
        return [item for part in self.all_gather_object(items) for item in part]

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (stop signals, time budgets)."""
        if self.fabric is None:
            return bool(flag)
        return bool(self.all_reduce_sum(torch.tensor([float(bool(flag))]))[0] > 0)

    @property
    def group_sum(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """``all_reduce_sum`` in a process group; None alone (statistics are then computed locally)."""
        return None if self.fabric is None else self.all_reduce_sum

    # ------------------------------------------------------------------ named operations of a step
    def raise_together(self, messages: list[str | None], error_class: type) -> None:
        """Every process raises when any reported an error (``messages``: one per rank, None for none)."""
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed:
            rank, message = failed[0]
            raise error_class(message if rank == self.rank or len(messages) == 1 else f"process {rank}: {message}")

    def agree_on_batches(self, fetch: Callable[[], Any], accum: int) -> tuple[list, list[float]]:
        """``accum`` micro-batches from ``fetch()`` (None: a shard with no readable audio), and each
        one's loss weight (``micro_batch_weights``): the accumulated (and DDP-averaged) gradient is
        that of the per-utterance mean over the whole step, whatever the micro-batch and shard sizes. When a process's shard is all unreadable audio (skip_bad_samples),
        every process skips it (counted in ``skipped_batches``); when fetching raised on any process
        (unreadable audio, a data worker), every process raises."""
        while True:
            if self.fabric is None:
                batches = [fetch() for _ in range(accum)]
                return batches, micro_batch_weights([[len(batch) for batch in batches]], 0)
            error = None
            try:
                batches = [fetch() for _ in range(accum)]
            except Exception as exc:  # noqa: BLE001 - every process must hear of it
                error, batches = describe_error(exc), [None] * accum
            counts = [0 if batch is None else len(batch) for batch in batches]
            every = self.all_gather_object((counts, error))
            self.raise_together([message for _, message in every], DataError)
            every = [rank_counts for rank_counts, _ in every]
            if all(count > 0 for rank_counts in every for count in rank_counts):
                return batches, micro_batch_weights(every, self.rank)
            self.skipped_batches += 1
            log.warning("a process has no readable audio in its shard; every process skips these batches")

    def together(self, action: Callable[[], Result]) -> Result:
        """``action()`` on every process; when it raised on any (bad input, a reward returning NaN or
        raising), every process raises before anyone starts a collective of the update: a
        ``RewardError`` when every failure was one, else an ``RlnfError``. Alone: ``action()``."""
        if self.fabric is None:
            return action()
        try:
            result, error = action(), None
        except Exception as exc:  # noqa: BLE001 - every process must hear of it
            result, error = None, exc
        if self.any(error is not None):
            messages = self.all_gather_object(None if error is None else (type(error).__name__,
                                                                          describe_error(error)))
            kinds = {name for name, _ in filter(None, messages)}
            self.raise_together([None if message is None else message[1] for message in messages],
                                RewardError if kinds == {"RewardError"} else RlnfError)
        return result

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss``. A non-finite loss is left out alone (its update is skipped); in a
        process group it is back-propagated anyway, since every process must take part in the
        gradient all-reduce (the update is then skipped everywhere, see ``all_finite``)."""
        if self.fabric is not None or torch.isfinite(loss):
            loss.backward()

    def all_finite(self, finite: bool) -> bool:
        """True on every process when the losses were finite on all of them."""
        return not self.any(not finite)

    def pool_step(self, metrics: dict[str, float], sizes: dict[str, float], stopping: bool, timed_out: bool,
                  std_scale: float = 1.0) -> tuple[dict[str, float], dict[str, float], bool, bool]:
        """One collective per step: the global batch's metrics (weighted by ``sizes["utterances"]``;
        pooled stds, see ``pool_metrics``; ``train/skipped_clips`` summed), its sizes, and whether any
        process was signalled or ran out of time. Alone: the arguments as they are."""
        if self.fabric is None:
            return metrics, sizes, stopping, timed_out
        parts = self.all_gather_object((metrics, sizes, stopping, timed_out))
        pooled = pool_metrics([(part[0], part[1]["utterances"]) for part in parts], std_scale=std_scale)
        pooled["train/skipped_batches"] = self.skipped_batches
        pooled["train/skipped_clips"] = sum(part[0]["train/skipped_clips"] for part in parts)
        totals = {name: sum(part[1][name] for part in parts) for name in sizes}
        return pooled, totals, any(part[2] for part in parts), any(part[3] for part in parts)

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()

    def check_identical(self, model: torch.nn.Module) -> None:
        """Raise when the processes' parameters differ (they must be equal after every update)."""
        if self.fabric is None:
            return
        with torch.no_grad():
            fingerprint = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
        prints = self.all_gather_object(fingerprint)
        for rank, other in enumerate(prints):
            if not torch.equal(other, prints[0]):
                raise RlnfError(f"parameters of rank {rank} differ from rank 0's: the processes have diverged")
