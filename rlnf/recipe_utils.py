"""Small pieces the recipes share: loading manifests as configured, choosing the best-checkpoint metric."""

from __future__ import annotations

import logging

from rlnf.data.manifest import Utterance, read_manifest
from rlnf.metrics import normalize_whitespace

log = logging.getLogger(__name__)


def load_utterances(data_cfg, manifest: str, require_text: bool, limit: int | None = None) -> tuple[list[Utterance], object]:
    """Read ``manifest`` with the data section's keys; references are normalised (whitespace, and
    lower case when ``data.lowercase``) so rewards and targets compare like with like."""
    utterances, stats = read_manifest(manifest, text_key=data_cfg.text_key, require_text=require_text,
                                      skip_bad=data_cfg.skip_bad_samples, min_duration=data_cfg.min_duration,
                                      max_duration=data_cfg.max_duration)
    for utterance in utterances:
        if utterance.text is not None:
            text = utterance.text.lower() if data_cfg.lowercase else utterance.text
            utterance.text = normalize_whitespace(text)
    if limit is not None:
        utterances = utterances[:limit]
    log.info("%s: %s", manifest, stats.summary())
    return utterances, stats


def resolve_best_metric(trainer_cfg, val_utterances: list[Utterance] | None) -> tuple[str, str]:
    """(metric, mode) for best.nemo. auto: val/wer with references, val/reward without, and the
    training reward averaged between saves when there is no validation set."""
    metric = trainer_cfg.best_metric
    if metric == "auto":
        if val_utterances is None:
            metric = "reward/mean"
        elif all(u.text is not None for u in val_utterances):
            metric = "val/wer"
        else:
            metric = "val/reward"
    mode = trainer_cfg.best_mode
    if mode == "auto":
        mode = "min" if any(word in metric for word in ("wer", "cer", "loss")) else "max"
    return metric, mode
