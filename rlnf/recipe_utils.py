"""Small pieces the recipes share: loading manifests as configured, choosing the best-checkpoint metric,
the trainer state's common part, the run summary. The loop itself is ``rlnf/recipe_loop.py``."""

from __future__ import annotations

import logging

from rlnf.data.manifest import Utterance, UtteranceTable, read_manifest
from rlnf.metrics import normalize_text

log = logging.getLogger(__name__)


def load_utterances(data_cfg, manifest: str, require_text: bool | str,
                    limit: int | None = None) -> tuple[UtteranceTable, object]:
    """Read ``manifest`` with the data section's keys (validation mode and cache included); references
    are normalised (Unicode NFC, whitespace, and lower case when ``data.lowercase``) so rewards and
    targets compare like with like. In a process group each process checks only its share of the clips.
    ``data.tarred_audio_filepaths`` holds the audio of ``data.train_manifest`` (validation manifests
    are plain, unless they are that same file). ``data.format`` says whether a manifest is NeMo JSONL or a
    Lhotse CutSet or Shar directory (``rlnf.data.cuts``)."""
    from rlnf.data.cache import cache_folder
    from rlnf.distributed import running_group

    rank, world_size, gather = running_group()
    tarred = data_cfg.tarred_audio_filepaths if manifest == data_cfg.train_manifest else None
    utterances, stats = read_manifest(manifest, text_key=data_cfg.text_key, require_text=require_text,
                                      skip_bad=data_cfg.skip_bad_samples, min_duration=data_cfg.min_duration,
                                      max_duration=data_cfg.max_duration, validate=data_cfg.validate,
                                      cache_dir=cache_folder(data_cfg.cache_dir), rank=rank, world_size=world_size,
                                      gather=gather, tarred_audio_filepaths=tarred,
                                      format=data_cfg.format)
    utterances = utterances.with_texts(lambda text: normalize_text(text, data_cfg.lowercase))
    if limit is not None:
        utterances = utterances[:limit]
    log.info("%s: %s", manifest, stats.summary())
    return utterances, stats


def resolve_best_metric(trainer_cfg, val_utterances: list[Utterance] | None,
                        train_metric: str = "reward/mean") -> tuple[str, str]:
    """(metric, mode) for best.nemo. auto: val/wer with references, val/reward without, and
    ``train_metric`` averaged between saves when there is no validation set."""
    metric = trainer_cfg.best_metric
    if metric == "auto":
        if val_utterances is None:
            metric = train_metric
        elif all(u.text is not None for u in val_utterances):
            metric = "val/wer"
        else:
            metric = "val/reward"
    mode = getattr(trainer_cfg, "best_mode", "auto")  # the reward recipe has no key: its mode is the metric's
    if mode == "auto":
        mode = "min" if any(word in metric for word in ("wer", "cer", "loss", "mse")) else "max"
    return metric, mode


def training_state(step: int, model, optimizer, scheduler, stream, generator=None, **extra) -> dict:
    """Everything a recipe needs to resume, in one dict (saved as one atomic file)."""
    from rlnf.checkpoint import rng_state

    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "data": stream.state_dict(), "rng": rng_state(), **extra}
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_training_state(state: dict, model, optimizer, scheduler, stream, generator=None,
                                 source: object = "trainer state") -> int:
    """Load what ``training_state`` saved (read from ``source``, named in errors); returns the step."""
    from rlnf.checkpoint import set_rng_state
    from rlnf.errors import CheckpointError

    missing = [key for key in ("step", "model", "optimizer", "scheduler", "data", "rng") if key not in state]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(map(repr, missing))}: it was not written by this recipe, "
                              "or is damaged")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # size mismatches, missing or unexpected tensors
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        raise CheckpointError(f"{source} holds weights of another architecture than the model being trained "
                              f"({first})") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    stream.load_state_dict(state["data"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
    set_rng_state(state["rng"])
    return int(state["step"])


def write_summary(run_dir, step: int, checkpoints, **extra) -> dict:
    """summary.json: the last value of every logged metric, the checkpoints and ``extra``."""
    import json

    from rlnf.io import atomic_write_text
    from rlnf.metric_logging import read_metrics

    final: dict = {}
    for row in read_metrics(run_dir):
        final.update(row)
    summary = {
        "step": step,
        "final_metrics": final,
        "best_metric": checkpoints.best_metric,
        "best_value": checkpoints.best_value,
        "best_checkpoint": str(checkpoints.best_path) if checkpoints.best_path.exists() else None,
        "last_checkpoint": str(checkpoints.last_path),
        **extra,
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return summary
