"""Error rates with rapidfuzz's Levenshtein distance (C++), on characters or on words.

Texts are compared after ``normalize_text``: Unicode NFC, runs of spaces collapsed, ends trimmed.
Corpus rates are total edits / total reference length, as NeMo and jiwer compute them.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

from rapidfuzz.distance import Levenshtein


def normalize_text(text: str, lowercase: bool = False) -> str:
    """Unicode NFC (so 'é' as one code point and as 'e' + accent compare equal), optionally lower
    case, runs of whitespace collapsed and ends trimmed. The one normalisation of references,
    CTC targets and error rates."""
    text = unicodedata.normalize("NFC", text)
    return " ".join((text.lower() if lowercase else text).split())


def char_edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance over characters, reference length in characters)."""
    reference, hypothesis = normalize_text(reference), normalize_text(hypothesis)
    return Levenshtein.distance(reference, hypothesis), len(reference)


def word_edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance over words, reference length in words)."""
    reference_words, hypothesis_words = normalize_text(reference).split(), normalize_text(hypothesis).split()
    return Levenshtein.distance(reference_words, hypothesis_words), len(reference_words)


def error_rate(reference: str, hypothesis: str, unit: str) -> float:
    """Per-utterance CER or WER. An empty reference gives 0 for an empty hypothesis, else 1."""
    edits, length = (char_edits if unit == "char" else word_edits)(reference, hypothesis)
    if length == 0:
        return 0.0 if edits == 0 else 1.0
    return edits / length


def corpus_error_rate(references: Sequence[str], hypotheses: Sequence[str], unit: str) -> float:
    """Total edits / total reference length over a corpus ('char' -> CER, 'word' -> WER)."""
    count = char_edits if unit == "char" else word_edits
    edits = length = 0
    for reference, hypothesis in zip(references, hypotheses, strict=True):
        e, n = count(reference, hypothesis)
        edits, length = edits + e, length + n
    return edits / max(length, 1)


def regression_metrics(predictions: Sequence[float], targets: Sequence[float]) -> dict[str, float]:
    """MSE, RMSE, R^2, Pearson and Spearman correlations of predictions against targets.

    A correlation is NaN when either side is constant (undefined), never a crash.
    """
    import numpy as np
    from scipy import stats

    pred = np.asarray(predictions, dtype=np.float64)
    true = np.asarray(targets, dtype=np.float64)
    mse = float(np.mean((pred - true) ** 2))
    variance = float(np.var(true))
    constant = pred.size < 2 or np.ptp(pred) == 0 or np.ptp(true) == 0
    return {
        "mse": mse,
        "rmse": mse ** 0.5,
        "r2": 1.0 - mse / variance if variance > 0 else float("nan"),
        "pearson": float("nan") if constant else float(stats.pearsonr(pred, true)[0]),
        "spearman": float("nan") if constant else float(stats.spearmanr(pred, true)[0]),
    }


def within_group_spearman(predictions, targets, groups) -> float:
    """Mean Spearman correlation within each clip's transcripts (clips with >= 3 distinct targets)."""
    import math

    from scipy import stats

    by_group: dict = {}
    for prediction, target, group in zip(predictions, targets, groups):
        by_group.setdefault(group, ([], []))
        by_group[group][0].append(prediction)
        by_group[group][1].append(target)
    values = []
    for predicted, true in by_group.values():
        if len(set(true)) >= 3 and len(set(predicted)) > 1:
            value = stats.spearmanr(predicted, true)[0]
            if math.isfinite(value):
                values.append(value)
    return sum(values) / len(values) if values else float("nan")
