"""The one skeleton of every recipe: setup -> loop (step, log, validate, checkpoint, stop) -> cleanup.

A recipe subclasses ``Recipe``, builds its model, data stream, optimizer, logger and
``CheckpointManager`` in ``setup`` and fills in the hooks below; ``Recipe.train`` is the loop
they all run, so stopping (``max_steps``, ``max_minutes``, Ctrl-C/SIGTERM, an error), the log,
validation and checkpoint cadence, and the best-checkpoint window are written once.

    hook                      what the recipe supplies
    run_step(iterator)        fetch the step's data from ``iterator`` and train on it:
                              (metrics, sizes), sizes e.g. {"utterances": 8} -> perf/utterances_per_s
    validate()                validation metrics {"val/...": value}
    save_model(path)          write the model checkpoint (default: NeMo's save_to, a .nemo file)
    extra_state() / load_extra_state(state)  what the recipe's trainer state holds besides the model,
                              optimizer, schedule, data position, RNGs and skipped-step count
    validation_due(last)      whether this step validates (default: trainer.val_every and the last step)
    checkpoint_due(validated, last)  whether this step saves (default: trainer.save_every and the last step)
    agree(metrics, sizes, stopping, timed_out)  the step's metrics and stop flags as every process
                              sees them (identity in one process)
    after_log(metrics)        extra logging of a logged step (samples, audio)
    progress(metrics)         the progress bar's postfix
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from rlnf.errors import ConfigError, RewardError, RlnfError, TrainingInterrupted

log = logging.getLogger(__name__)


def out_of_time(started: float, max_minutes: float | None) -> bool:
    return max_minutes is not None and time.perf_counter() - started >= 60.0 * max_minutes


class EarlyStopping:
    """``trainer.early_stop_patience``: stop after ``patience`` validations in a row that did not
    improve the best value of ``metric`` (strictly lower in mode "min", higher in "max"; a
    non-finite value never improves). ``patience`` None: never stops. Every process updates it from
    the same pooled validation metrics, so every process stops at the same step. Its state
    (best value, validations since it) is part of the trainer state, so a resumed run goes on counting."""

    def __init__(self, patience: int | None, metric: str, mode: str):
        self.patience = patience
        self.metric = metric
        self.mode = mode
        self.best: float | None = None
        self.validations_since_best = 0

    def update(self, validated: dict[str, float] | None) -> bool:
        """Offer one step's validation metrics (None: no validation this step); True when the run
        should stop now."""
        if self.patience is None or validated is None or self.metric not in validated:
            return False
        value = float(validated[self.metric])
        improved = math.isfinite(value) and (self.best is None or (
            value < self.best if self.mode == "min" else value > self.best))
        if improved:
            self.best, self.validations_since_best = value, 0
        else:
            self.validations_since_best += 1
        return self.validations_since_best >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best": self.best, "validations_since_best": self.validations_since_best}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state and state.get("metric") == self.metric:
            self.best, self.validations_since_best = state["best"], int(state["validations_since_best"])


def step_progress_bar(total_steps: int, trainer_cfg, step: int, desc: str, enabled: bool = True):
    """The tqdm bar of a recipe. A time-boxed run (max_minutes) shows steps and elapsed time rather
    than a meaningless ETA to the last step."""
    from tqdm.auto import tqdm

    time_boxed = getattr(trainer_cfg, "max_minutes", None)
    return tqdm(total=None if time_boxed else total_steps, initial=step, desc=desc, dynamic_ncols=True,
                disable=not trainer_cfg.progress_bar or not enabled)


def interrupted(by, step: int, checkpoints) -> TrainingInterrupted:
    """The error a recipe raises after a stop signal's checkpoint is written."""
    return TrainingInterrupted(f"stopped by signal {by} after step {step}; checkpoint written to "
                               f"{checkpoints.folder}. Continue with: resume=true")


def stopped_by_error(exc: Exception, step: int, checkpoints, save_checkpoint) -> RlnfError:
    """The error a recipe raises when ``exc`` stops training after ``step`` completed steps:
    ``save_checkpoint()`` keeps that work first, and the message says where it is and how to go on.
    An unexpected exception (a reward or data worker that raised) stays attached as the cause, so
    the CLI writes its full trace to a log file."""
    try:
        save_checkpoint()
        kept = f"The run stopped at step {step}; its checkpoint is in {checkpoints.folder}."
    except Exception as save_error:  # noqa: BLE001 - the original error matters more
        kept = f"The run stopped at step {step}; writing its checkpoint failed too ({save_error})."
    if isinstance(exc, RlnfError):
        fix = ("Fix the reward" if isinstance(exc, RewardError)  # RewardSet named it: rewards[i] (its name)
               else "Fix the input (or set data.skip_bad_samples=true for unreadable audio)")
        error = type(exc)(f"{exc}\n{kept} {fix} and continue with resume=true.")
        error.__cause__ = exc.__cause__
        return error
    error = RlnfError(f"training stopped by {type(exc).__name__}: {exc}\n{kept} Fix the cause and continue "
                      "with resume=true.")
    error.__cause__ = exc
    return error


class Recipe:
    """Base of the recipes. ``setup`` must set ``trained_model``, ``optimizer``, ``scheduler``,
    ``stream`` (with ``state_dict``/``load_state_dict``: the data position), ``logger``,
    ``checkpoints`` and ``max_steps``; ``step`` counts completed steps, ``skipped_steps`` the
    updates skipped for a non-finite loss or gradient."""

    name = "recipe"
    # The training metric that picks best.nemo when there is no validation set: its mean over the
    # steps since the previous save (see CheckpointManager.update_best_from).
    train_metric = "train/loss"

    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir).expanduser().resolve()
        self.step = 0
        self.skipped_steps = 0
        self.max_steps = 0
        self.has_validation = False
        self.train_window: list[float] = []
        self.stopped_early = False
        self._early_stopping: EarlyStopping | None = None

    # ------------------------------------------------------------------------------ hooks
    def setup(self) -> None:
        raise NotImplementedError

    def run_step(self, iterator) -> tuple[dict[str, float], dict[str, float]]:
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        raise NotImplementedError

    def save_model(self, path: Path) -> None:
        self.trained_model.save_to(str(path))

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows the progress bar."""
        return True

    def validation_due(self, last: bool) -> bool:
        every = self.cfg.trainer.val_every
        return self.has_validation and ((every and self.step % every == 0) or last)

    def checkpoint_due(self, validated: dict[str, float] | None, last: bool) -> bool:
        every = self.cfg.trainer.save_every
        return bool((every and self.step % every == 0) or last)

    def agree(self, metrics: dict[str, float], sizes: dict[str, float], stopping: bool,
              timed_out: bool) -> tuple[dict[str, float], dict[str, float], bool, bool]:
        return metrics, sizes, stopping, timed_out

    def after_log(self, metrics: dict[str, float]) -> None:
        pass

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.3f}"}

    # ------------------------------------------------------------------------------ skeleton
    def run(self) -> dict:
        """setup, train, cleanup; when training stops (a signal, an error) the logs are closed before
        the error propagates."""
        self.setup()
        try:
            self.train()
        except Exception:
            self.logger.close()
            raise
        return self.cleanup()

    def train(self) -> None:
        """Steps until ``max_steps`` or ``trainer.max_minutes``; a signal finishes the step, saves
        and raises ``TrainingInterrupted``; an error saves the last completed step and is re-raised
        with the way to go on (``stopped``)."""
        from rlnf.training import StopSignal

        trainer = self.cfg.trainer
        early_stopping = self.early_stopping()
        iterator = iter(self.stream)
        bar = step_progress_bar(self.max_steps, trainer, self.step, self.name, enabled=self.is_main)
        started_training = time.perf_counter()
        with StopSignal() as stop:
            while self.step < self.max_steps:
                started = time.perf_counter()
                position = self.stream.state_dict()
                try:
                    metrics, sizes = self.run_step(iterator)
                except Exception as exc:
                    # Bad input, or a reward or data worker that raised, mid-run: keep the work done
                    # so far (the failed step changed no weights) and say how to go on.
                    bar.close()
                    self.stream.load_state_dict(position)
                    raise self.stopped(exc)
                self.step += 1
                metrics, sizes, stopping, timed_out = self.agree(
                    metrics, sizes, stop.received is not None,
                    out_of_time(started_training, getattr(trainer, "max_minutes", None)))
                elapsed = time.perf_counter() - started
                metrics["perf/step_time"] = elapsed
                metrics.update({f"perf/{name}_per_s": amount / elapsed for name, amount in sizes.items()})
                self.train_window.append(metrics[self.train_metric])
                last = self.step >= self.max_steps or timed_out
                validated = self.validate() if self.validation_due(last) else None
                if early_stopping.update(validated) and not last:
                    log.info("step %d: stopping early, %s has not improved on %.4f for %d validations",
                             self.step, early_stopping.metric, early_stopping.best, early_stopping.patience)
                    last = True
                    self.stopped_early = True
                if self.step % trainer.log_every == 0 or last or validated:
                    self.logger.log_dict({**metrics, **(validated or {})}, self.step)
                self.after_log(metrics)
                bar.update(1)
                bar.set_postfix(**self.progress(metrics))
                if self.checkpoint_due(validated, last) or stopping:
                    self.save_checkpoint(validated)
                if stopping:
                    bar.close()
                    raise interrupted(stop.received or "on another process", self.step, self.checkpoints)
                if last:
                    break
        bar.close()

    def early_stopping(self) -> EarlyStopping:
        """The run's ``EarlyStopping`` on the checkpoints' best metric (``trainer.early_stop_patience``);
        refuses the key when the run has no validation metric to watch."""
        if self._early_stopping is None:
            patience = getattr(self.cfg.trainer, "early_stop_patience", None)
            metric = self.checkpoints.best_metric
            if patience is not None and (not self.has_validation or not metric.startswith("val/")):
                raise ConfigError(f"trainer.early_stop_patience={patience} watches a validation metric, but this run "
                                  f"has none (best metric {metric}): set data.val_manifest, or "
                                  "trainer.early_stop_patience=null")
            self._early_stopping = EarlyStopping(patience, metric, self.checkpoints.best_mode)
        return self._early_stopping

    def stopped(self, exc: Exception) -> Exception:
        """What to raise when ``exc`` stops training: an error whose checkpoint keeps the last
        completed step."""
        return stopped_by_error(exc, self.step, self.checkpoints, lambda: self.save_checkpoint(None))

    def save_checkpoint(self, validated: dict[str, float] | None) -> None:
        """best (by the validation metric, or the training window since the last save), then last
        with the trainer state."""
        window, self.train_window = self.train_window, []
        best = self.checkpoints.update_best_from(validated, window, self.save_model)
        if best is not None:
            log.info("step %d: new best %s = %.4f", self.step, self.checkpoints.best_metric, best)
        self.checkpoints.save_last(self.save_model, self.trainer_state())

    def restore(self) -> int | None:
        """With ``resume=true``, load the trainer state (``load_trainer_state``) and return its step;
        None on a new run (``resume=true`` on a folder without a trainer state starts one, warned)."""
        if not self.cfg.resume:
            return None
        if not self.checkpoints.state_path.exists():
            log.warning("resume=true but %s has no trainer state: starting a new run", self.checkpoints.state_path)
            return None
        self.step = self.load_trainer_state(self.checkpoints.load_state())
        log.info("resumed from step %d", self.step)
        return self.step

    def trainer_state(self) -> dict[str, Any]:
        from rlnf.recipe_utils import training_state

        return training_state(self.step, self.trained_model, self.optimizer, self.scheduler, self.stream,
                              skipped_steps=self.skipped_steps, early_stopping=self.early_stopping().state_dict(),
                              **self.extra_state())

    def load_trainer_state(self, state: dict[str, Any]) -> int:
        """Restore what ``trainer_state`` saved; returns its step."""
        from rlnf.recipe_utils import restore_training_state

        step = restore_training_state(state, self.trained_model, self.optimizer, self.scheduler, self.stream,
                                      source=self.checkpoints.state_path)
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.early_stopping().load_state_dict(state.get("early_stopping"))
        self.load_extra_state(state)
        return step
