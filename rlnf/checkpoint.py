"""Run-folder checkpoints.

    output_dir/checkpoints/last.nemo          the policy at the latest save (NeMo restore_from)
    output_dir/checkpoints/best.nemo          the policy with the best validation metric
                                              (the reward recipe: folders last/ and best/)
    output_dir/checkpoints/trainer_state.pt   everything needed to resume, in ONE file: model and
                                              optimizer/scheduler state, step, RNG states, data
                                              position, best metric

Resuming reads only ``trainer_state.pt`` (its model weights included), so a run killed between
two file writes still resumes from a consistent state. Every file is written atomically.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlnf.errors import CheckpointError
from rlnf.io import atomic_save

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # the run folder's checkpoint folder
TRAINER_STATE = "trainer_state.pt"


def check_nemo_archive(path: str | Path) -> None:
    """Refuse a .nemo archive whose members could escape the extraction folder.

    Checked before NeMo extracts it: absolute names, '..' components, and links or devices.
    """
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as archive:
            members = archive.getmembers()
    except (tarfile.TarError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable .nemo archive: {exc}") from None
    for member in members:
        name = member.name
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or Path(name).is_absolute() or ".." in parts:
            raise CheckpointError(f"{path}: refusing archive member {name!r} (it would be written outside the "
                                  "extraction folder)")
        if not (member.isfile() or member.isdir()):
            raise CheckpointError(f"{path}: refusing archive member {name!r} (links and special files are not "
                                  "allowed in a .nemo)")


def rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    # Plain lists, so the state loads with torch.load(weights_only=True).
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class CheckpointManager:
    """Writes last/best .nemo files and the trainer state into ``run_dir/checkpoints``.
    ``model_suffix=""``: the model checkpoints are folders, which ``save_model`` writes atomically
    itself (a reward checkpoint: ``save_reward_folder``)."""

    def __init__(self, run_dir: str | Path, best_metric: str, best_mode: str, keep_last: int = 0,
                 model_suffix: str = ".nemo"):
        self.model_suffix = model_suffix
        self.folder = Path(run_dir) / CHECKPOINTS
        self.folder.mkdir(parents=True, exist_ok=True)
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.best_value: float | None = None
        self.keep_last = keep_last

    @property
    def state_path(self) -> Path:
        return self.folder / TRAINER_STATE

    @property
    def last_path(self) -> Path:
        return self.folder / f"last{self.model_suffix}"

    @property
    def best_path(self) -> Path:
        return self.folder / f"best{self.model_suffix}"

    def is_better(self, value: float) -> bool:
        if not np.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value < self.best_value if self.best_mode == "min" else value > self.best_value

    def write_model(self, path: Path, save_model) -> None:
        if self.model_suffix:
            atomic_save(path, save_model)
        else:  # a folder: save_model swaps it in whole
            save_model(path)

    def save_last(self, save_model, trainer_state: dict[str, Any]) -> None:
        """``save_model(path)`` writes a .nemo; the trainer state follows it, both atomic. With
        ``keep_last`` > 0, ``step_NNNNNNN.nemo`` snapshots of the last saves are kept too (hard links)."""
        self.write_model(self.last_path, save_model)
        trainer_state = {**trainer_state, "best_value": self.best_value, "best_metric": self.best_metric}
        atomic_save(self.state_path, lambda tmp: torch.save(trainer_state, tmp))
        if self.keep_last > 0:
            snapshot = self.folder / f"step_{int(trainer_state['step']):07d}.nemo"
            snapshot.unlink(missing_ok=True)
            try:
                os.link(self.last_path, snapshot)
            except OSError:  # file systems without hard links
                shutil.copyfile(self.last_path, snapshot)
            for old in sorted(self.folder.glob("step_*.nemo"))[: -self.keep_last]:
                old.unlink()

    def update_best_from(self, validated: dict[str, float] | None, train_values: list[float], save_model) -> float | None:
        """Offer this save's value of ``best_metric`` (returned when best.nemo was written, else None).

        A ``val/*`` metric comes from ``validated`` (None when this save had no validation);
        otherwise the value is the mean of ``train_values``, the training metric logged since the
        previous save, which the caller then clears."""
        if self.best_metric.startswith("val/"):
            value = (validated or {}).get(self.best_metric)
        else:
            value = sum(train_values) / len(train_values) if train_values else None
        return value if value is not None and self.update_best(value, save_model) else None

    def update_best(self, value: float, save_model) -> bool:
        """Write best.nemo when ``value`` beats the best so far; returns whether it did."""
        if not self.is_better(value):
            return False
        self.write_model(self.best_path, save_model)
        self.best_value = float(value)
        return True

    def load_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            raise CheckpointError(f"resume=true but there is no trainer state at {self.state_path}")
        try:
            # Only tensors and plain containers: never unpickle arbitrary objects.
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read trainer state {self.state_path}: {exc}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"trainer state {self.state_path} holds a {type(state).__name__}, not a dict")
        if state.get("best_metric") == self.best_metric:
            self.best_value = state.get("best_value")
        return state
