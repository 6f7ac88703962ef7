"""The run folder (``output_dir``): what marks a run, the checks before a run starts or resumes in
it, and the lock that keeps a second run out while one writes there.

Light (no torch / NeMo import): these checks run before any model loads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, Iterator

from omegaconf import OmegaConf

from rlnf.checkpoint import CHECKPOINTS, TRAINER_STATE
from rlnf.config import RESUME_FIXED
from rlnf.errors import ConfigError, RlnfError
from rlnf.io import TEMPORARY_MARK

log = logging.getLogger(__name__)

LOCK_FILE = ".rlnf.lock"

# What a run leaves in its folder: a folder holding any of these holds a run (the trainer state,
# the reward recipe's checkpoint, any recipe's metrics).
RUN_MARKERS = (f"{CHECKPOINTS}/{TRAINER_STATE}", f"{CHECKPOINTS}/last", "metrics.jsonl")


def check_output_dir(output_dir: str, resume: bool | None) -> Path:
    """Fail early when the run folder is unnamed or unwritable, or already holds a run and resume is
    false (``resume=None``: the recipe cannot resume, so such a folder is always refused)."""
    if not str(output_dir).strip():
        raise ConfigError("output_dir='' names no folder (the run would be written into the working directory); "
                          "give a folder for the run")
    path = Path(output_dir).expanduser().resolve()
    held = next((marker for marker in RUN_MARKERS if (path / marker).exists()), None)
    if not resume and held:
        how = "set resume=true to continue it, or choose" if resume is not None else "choose"
        raise ConfigError(f"output_dir={output_dir!r} already holds a run ({held}); {how} another output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".rlnf_write_test.{os.getpid()}"  # per process: ranks of one run probe together
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output_dir={output_dir!r} is not writable: {exc.strerror}") from None
    return path


def holding_rank() -> bool:
    """Whether this process is the one that locks the run folder: the first of a process group
    (torchrun, SLURM and Lightning's launcher set these), or a lone process."""
    return all(int(os.environ.get(key) or 0) == 0 for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``folder/.rlnf.lock`` while a run writes into ``folder``, so a
    second run started on the same folder stops with a message naming the first one's PID. The
    lock goes with the process (even after kill -9); the file stays, holding the last PID."""
    import fcntl

    if not holding_rank():
        yield
        return
    path = Path(folder) / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RlnfError(f"output_dir {folder} is in use by another run (PID {holder}; lock file {path}): wait for "
                            "it to finish, or choose another output_dir") from None
        except OSError as exc:  # a file system without locks (some network mounts)
            log.warning("cannot lock %s (%s): two runs on this folder would not be stopped", path, exc.strerror)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders an interrupted atomic write left in ``folder``
    (a run killed mid-save). Call it only while holding the run's lock. Returns what was removed."""
    removed = sorted(Path(folder).glob(f".*{TEMPORARY_MARK}*"))
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return removed


def _flatten(tree: Any, prefix: str = "") -> Dict[str, Any]:
    """{dotted key: value} of a nested dict; lists stay whole values."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def check_resume(config: Any, run_dir: Path) -> Dict[str, tuple]:
    """On resume, compare ``config`` with the run's saved ``config.yaml``. A change to a key of
    ``RESUME_FIXED`` is refused (naming the keys) unless ``resume_force``; every other change is
    warned about and appended to ``resumes.jsonl``. Returns the changes, {key: (saved, new)}. Keys
    the saved file lacks (added to rlnf since) are not compared."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return {}
    try:
        saved = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path)))
    except Exception as exc:  # noqa: BLE001 - a damaged file: say which
        raise ConfigError(f"resume: cannot read the run's saved config {saved_path}: {exc}") from None
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(config)))
    changes = {key: (saved[key], value) for key, value in new.items()
               if key in saved and saved[key] != value and key not in ("resume", "resume_force")}
    fixed = [key for key in changes if key.startswith(RESUME_FIXED)]
    if fixed and not getattr(config, "resume_force", False):
        listed = "; ".join(f"{key}: {changes[key][0]!r} -> {changes[key][1]!r}" for key in fixed)
        raise ConfigError(f"resume: these keys differ from the run's {saved_path} and would change what the run "
                          f"is ({listed}). Restore them, start a new output_dir, or set resume_force=true")
    if changes:
        listed = ", ".join(f"{key}: {before!r} -> {after!r}" for key, (before, after) in changes.items())
        log.warning("resume: changed since the run started: %s (recorded in resumes.jsonl)", listed)
        with open(run_dir / "resumes.jsonl", "a", encoding="utf-8") as record:
            record.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changed": changes}) + "\n")
    return changes


@contextlib.contextmanager
def open_run_folder(config: Any) -> Iterator[Path | None]:
    """Hold ``config.output_dir`` (checked by ``check_output_dir``) for one run: lock it, remove
    what a killed save left there, and on resume check the config against the run's own. Yields
    the folder (None for a recipe without one)."""
    if not hasattr(config, "output_dir"):
        yield None
        return
    folder = Path(config.output_dir).expanduser().resolve()
    with run_lock(folder):
        if holding_rank():  # the folder is ours alone now
            for path in (folder, folder / CHECKPOINTS):
                remove_stale_temporaries(path)
            if getattr(config, "resume", False):
                check_resume(config, folder)
        yield folder
