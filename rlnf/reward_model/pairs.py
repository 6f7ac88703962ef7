"""Scored pairs: the reward model's training data, built from a policy and a labelled manifest
(``rlnf data pairs``; the demo's ``scored_pairs`` stage).

For every clip (``limit`` of them, drawn with ``seed``), the candidates are, in this order:

1. the policy's greedy transcript and ``samples_per_temperature`` samples at each temperature
   (kind ``policy``): the hypotheses RL will ask the reward model to judge;
2. negatives (``rlnf.reward_model.negatives.hard_negatives``): the reference corrupted at each of
   ``error_rates`` (kind ``corrupt_<rate>``), the empty transcript (``empty``) and another clip's
   reference (``other_clip``);
3. the reference itself (``reference``, score 1).

References are normalised as the recipes read them (Unicode NFC, whitespace, lower case). Each
distinct text of a clip is written once, as a manifest row
``{"audio_filepath", "text", "score", "reference", "kind"}`` with
``score = max(0, 1 - CER(text, reference))`` rounded to 4 decimals: what ``rlnf run
train_reward_model`` reads (``data.score_key: score``, ``data.reference_key: reference``).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from rlnf.errors import ConfigError
from rlnf.metrics import normalize_text
from rlnf.reward_model.negatives import cer_score, hard_negatives

log = logging.getLogger("rlnf.pairs")

DEFAULT_TEMPERATURES = (0.6, 1.0, 1.4)
DEFAULT_SAMPLES_PER_TEMPERATURE = 2
DEFAULT_ERROR_RATES = (0.1, 0.3)


def check_pairs_output(output: str | Path, manifest: str, model: str, force: bool) -> Path:
    """The output path, refused before any work when it is a folder, one of the inputs, or an
    existing file (unless ``force``)."""
    from rlnf.io import check_output_file

    path = check_output_file("--output", output, {"manifest": manifest, "model": model})
    if (path.exists() or path.is_symlink()) and not force:
        raise ConfigError(f"--output {output} already exists; choose another file or pass --force to replace it")
    return path


def write_scored_pairs(policy_path: str, manifest: str, output: str | Path, *, limit: int | None = None,
                       temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
                       samples_per_temperature: int = DEFAULT_SAMPLES_PER_TEMPERATURE,
                       error_rates: Sequence[float] = DEFAULT_ERROR_RATES, seed: int = 0, batch_size: int = 16,
                       device: str = "auto", text_key: str = "text", force: bool = False,
                       progress: bool = True) -> dict[str, Any]:
    """Write the scored pairs of ``limit`` clips of ``manifest`` (all when None), drawn with ``seed``,
    as the policy ``policy_path`` hears them (see the module docstring), to ``output`` atomically.

    Sampling is seeded by ``seed`` (uniforms drawn from a CPU generator: the same draws on any device).
    ``samples_per_temperature=0``: the greedy transcript only.
    Returns a summary: clips, pairs, pairs per kind, mean score, seconds, output.

    Raises:
        ConfigError for a bad option or an output that exists (without ``force``); DataError naming
        ``manifest:line`` for a bad line or a missing / unreadable audio file.
    """
    import torch

    from rlnf import ctc
    from rlnf.data.loader import AudioDataset, eval_batches
    from rlnf.data.manifest import read_manifest, write_manifest
    from rlnf.policy import CTCPolicy
    from rlnf.training import resolve_device

    started = time.perf_counter()
    if limit is not None and limit <= 0:
        raise ConfigError(f"--limit must be a positive number of clips, got {limit}")
    if samples_per_temperature < 0:
        raise ConfigError(f"--samples-per-temperature must be >= 0, got {samples_per_temperature}")
    for temperature in temperatures:
        if not temperature > 0:
            raise ConfigError(f"--temperatures: every temperature must be > 0, got {temperature}")
    for rate in error_rates:
        if not 0 <= rate <= 1:
            raise ConfigError(f"--error-rates: every rate must be in [0, 1], got {rate}")
    out = check_pairs_output(output, manifest, policy_path, force)
    torch_device = resolve_device(device, "--device")
    utterances, _ = read_manifest(manifest, text_key=text_key,
                                  require_text="scored pairs are scored against the manifest's transcripts")
    # The references as the recipes read them (NFC, whitespace, lower case: data.lowercase's default),
    # so a cased manifest does not penalise a lower-case policy's every hypothesis for case.
    utterances = utterances.with_texts(lambda text: normalize_text(text, lowercase=True))
    rng = random.Random(seed)
    utterances = rng.sample(utterances, len(utterances) if limit is None else min(limit, len(utterances)))
    references = [u.text for u in utterances]
    policy = CTCPolicy.load(policy_path, torch_device)
    policy.set_mode("eval")
    generator = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    bar = _progress(len(utterances), progress)
    with torch.inference_mode():
        for batch in eval_batches(AudioDataset(utterances, policy.sample_rate), batch_size=batch_size):
            audio, audio_len = batch.audio.to(torch_device), batch.audio_len.to(torch_device)
            log_probs, encoded_len = policy.forward(audio, audio_len)
            hypotheses = [[text] for text in policy.transcribe(audio, audio_len)]
            for temperature in temperatures if samples_per_temperature else ():
                # The uniforms come from the CPU generator whatever the device: the same draws everywhere.
                uniforms = torch.rand(log_probs.shape[0], samples_per_temperature, log_probs.shape[1],
                                      generator=generator).to(log_probs.device)
                samples = policy.sample(ctc.apply_temperature(log_probs.float(), temperature), encoded_len,
                                        samples_per_temperature, uniforms=uniforms)
                for group, texts in zip(hypotheses, samples.texts):
                    group.extend(texts)
            for utterance, group in zip(batch.utterances, hypotheses):
                rows.extend(clip_rows(utterance.audio_filepath, utterance.text, group, references, rng, error_rates))
            bar.update(len(batch.utterances))
    bar.close()
    write_manifest(out, rows)
    kinds = Counter(row["kind"] for row in rows)
    return {"output": str(out), "clips": len(utterances), "pairs": len(rows), "kinds": dict(sorted(kinds.items())),
            "mean_score": round(sum(row["score"] for row in rows) / len(rows), 4) if rows else None,
            "seconds": round(time.perf_counter() - started, 1)}


def clip_rows(audio_filepath: str, reference: str, hypotheses: list[str], references: list[str], rng: random.Random,
              error_rates: Sequence[float] = DEFAULT_ERROR_RATES) -> list[dict[str, Any]]:
    """One clip's rows: its policy hypotheses, negatives and reference, each distinct text once."""
    candidates = [(text, "policy") for text in hypotheses]
    candidates += [(text, kind) for text, _, kind in hard_negatives(
        reference, references, rng, error_rates=list(error_rates), truncated=False, repeated=False)]
    candidates.append((reference, "reference"))
    rows, seen = [], set()
    for text, kind in candidates:
        if text in seen:
            continue
        seen.add(text)
        rows.append({"audio_filepath": audio_filepath, "text": text, "score": round(cer_score(text, reference), 4),
                     "reference": reference, "kind": kind})
    return rows


class _LogProgress:
    """A log line every ``every`` clips when stderr is not a terminal (tqdm's bar otherwise)."""

    def __init__(self, total: int, every: int = 200):
        self.total, self.every, self.done, self.next = total, every, 0, every

    def update(self, count: int) -> None:
        self.done += count
        if self.done >= self.next:
            log.info("scored pairs: %d / %d clips", self.done, self.total)
            self.next += self.every

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    import sys

    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="scored pairs", unit="clip", dynamic_ncols=True)
    return _LogProgress(total) if enabled else _LogProgress(total, every=10 ** 12)
