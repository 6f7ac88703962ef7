"""trainer.early_stop_patience: rlnf.recipe_loop.EarlyStopping and the shared loop stopping on it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from rlnf.config.sections import TrainerConfig
from rlnf.errors import ConfigError
from rlnf.recipe_loop import EarlyStopping, Recipe


def brute_force_stop(values: list[float], patience: int, mode: str) -> int | None:
    """The index of the validation that stops the run: the first one after which `patience`
    validations in a row did not improve the best so far (None: never)."""
    best, since = None, 0
    for index, value in enumerate(values):
        better = math.isfinite(value) and (best is None or (value < best if mode == "min" else value > best))
        best, since = (value, 0) if better else (best, since + 1)
        if since == patience:
            return index
    return None


@pytest.mark.parametrize("mode", ["min", "max"])
def test_early_stopping_counts_validations_without_a_new_best(mode):
    values = [0.8, 0.7, 0.7, 0.75, 0.65, 0.66, float("nan"), 0.9, 0.5, 0.6]
    for patience in (1, 2, 3, 4):
        stopper = EarlyStopping(patience, "val/wer", mode)
        stops = [stopper.update({"val/wer": value}) for value in values]
        expected = brute_force_stop(values, patience, mode)
        assert (stops.index(True) if True in stops else None) == expected, (patience, mode)
    off = EarlyStopping(None, "val/wer", "min")
    assert not any(off.update({"val/wer": 1.0}) for _ in range(10))
    stopper = EarlyStopping(1, "val/wer", "min")
    assert not stopper.update(None) and not stopper.update({"val/cer": 0.1})  # no validation / other metric
    stopper.update({"val/wer": 0.5})
    resumed = EarlyStopping(2, "val/wer", "min")
    resumed.load_state_dict(stopper.state_dict())
    assert (resumed.best, resumed.validations_since_best) == (0.5, 0)
    assert not resumed.update({"val/wer": 0.6}) and resumed.update({"val/wer": 0.6})
    other = EarlyStopping(2, "val/reward", "max")
    other.load_state_dict(stopper.state_dict())  # another metric's state is not taken over
    assert other.best is None


class Counter(Recipe):
    """A recipe without a model: its validation metric at step s is curve[s // val_every - 1]."""

    name = "counter"

    def __init__(self, trainer: TrainerConfig, curve: list[float], tmp_path, has_validation=True):
        super().__init__(SimpleNamespace(trainer=trainer, output_dir=str(tmp_path), resume=False))
        self.curve, self.has_validation, self.max_steps = curve, has_validation, trainer.max_steps
        self.saves: list[int] = []
        self.checkpoints = SimpleNamespace(best_metric="val/wer" if has_validation else "train/loss", best_mode="min")
        self.logger = SimpleNamespace(log_dict=lambda metrics, step: None, close=lambda: None)

    def run_step(self, iterator):
        return {"train/loss": 1.0}, {}

    def validate(self):
        return {"val/wer": self.curve[self.step // self.cfg.trainer.val_every - 1]}

    def save_checkpoint(self, validated):
        self.saves.append(self.step)


def run(recipe: Counter) -> Counter:
    class Stream:
        def __iter__(self):
            while True:
                yield None

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    recipe.stream = Stream()
    recipe.train()
    return recipe


def test_the_loop_stops_after_patience_validations_and_saves_that_step(tmp_path):
    curve = [0.9, 0.8, 0.85, 0.82, 0.7, 0.6]  # no new best at validations 3 and 4
    trainer = TrainerConfig(max_steps=60, val_every=10, save_every=0, log_every=1, progress_bar=False,
                            early_stop_patience=2)
    recipe = run(Counter(trainer, curve, tmp_path))
    assert recipe.step == 40 and recipe.stopped_early and recipe.saves == [40]
    trainer = TrainerConfig(max_steps=60, val_every=10, save_every=0, log_every=1, progress_bar=False,
                            early_stop_patience=3)
    recipe = run(Counter(trainer, curve, tmp_path))
    assert recipe.step == 60 and not recipe.stopped_early  # patience 3 never ran out
    assert recipe.early_stopping().state_dict() == {"metric": "val/wer", "best": 0.6, "validations_since_best": 0}


def test_early_stop_patience_is_checked_and_needs_a_validation_metric(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.early_stop_patience=0 must be > 0"):
        TrainerConfig(early_stop_patience=0)
    trainer = TrainerConfig(max_steps=5, val_every=0, log_every=1, progress_bar=False, early_stop_patience=2)
    with pytest.raises(ConfigError, match="set data.val_manifest, or trainer.early_stop_patience=null"):
        run(Counter(trainer, [], tmp_path, has_validation=False))
