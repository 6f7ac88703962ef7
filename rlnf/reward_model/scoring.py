"""`rlnf score`: score every (audio, text) pair of a manifest with a reward checkpoint, no references.

With several text keys (e.g. the outputs of different ASR systems) each clip's audio is embedded
once for all of them, and a table of mean scores per system is printed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from rlnf.errors import DataError, RewardError


def score_manifest(reward: str, manifest: str, text_keys: Sequence[str] = ("text",), output: str | None = None,
                   batch_size: int = 64, device: str = "auto", print_table: bool = True) -> dict[str, float]:
    from rlnf.data.loader import AudioDataset, eval_batches
    from rlnf.data.manifest import read_manifest
    from rlnf.io import atomic_write_text, check_output_file
    from rlnf.reward_model.scorer import RewardScorer

    if output:  # refused now, not after every pair is scored
        check_output_file("--output", output, {"manifest": manifest})
    utterances, _ = read_manifest(manifest)
    for utterance in utterances:
        for key in text_keys:
            value = utterance.fields.get(key)
            if not isinstance(value, str):
                raise DataError(f"{utterance.where}: text key '{key}' is missing or not a string")
    scorer = RewardScorer(reward, device=device, batch_size=batch_size)
    scores: dict[str, list[float]] = {}
    for batch in eval_batches(AudioDataset(utterances, scorer.processor.sample_rate), batch_size=16):
        groups = [[u.fields[key] for key in text_keys] for u in batch.utterances]
        values = scorer.score_groups(batch.audio, batch.audio_len, scorer.processor.sample_rate, groups)
        for utterance, row in zip(batch.utterances, values.tolist()):
            scores[utterance.audio_filepath + f"#{utterance.line}"] = row
    bad = [key for key, row in scores.items() if not all(math.isfinite(value) for value in row)]
    if bad:  # never write NaN into JSON (it is not valid JSON) nor report it as a mean
        raise RewardError(f"reward checkpoint {reward} gave NaN or infinite scores for {len(bad)} of {len(scores)} "
                          f"clips (first: {bad[0].rsplit('#', 1)[0]}); nothing was written")
    rows = []
    for utterance in utterances:
        row = dict(utterance.fields)
        values = scores[utterance.audio_filepath + f"#{utterance.line}"]
        if len(text_keys) == 1:
            row["score"] = values[0]
        else:
            row.update({f"score_{key}": value for key, value in zip(text_keys, values)})
        rows.append(row)
    means = {key: sum(s[i] for s in scores.values()) / len(scores) for i, key in enumerate(text_keys)}
    if output:
        atomic_write_text(output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    if print_table:
        width = max(len(k) for k in text_keys)
        print(f"{'system':<{width}}  mean score  (n={len(rows)}, reward {Path(reward).name})")
        for key, mean in sorted(means.items(), key=lambda item: -item[1]):
            print(f"{key:<{width}}  {mean:10.4f}")
    return means
