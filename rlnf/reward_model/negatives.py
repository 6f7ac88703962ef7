"""Synthetic transcripts for reward-model training: corrupted references at controlled error rates,
empty, truncated and stuttered hypotheses, and other clips' transcripts.

Each is scored from its error rate to the reference: ``score = max(0, 1 - CER(hypothesis, reference))``
(the documented mapping), so the model learns to punish what CTC sampling produces.
"""

from __future__ import annotations

import random
from typing import Sequence

from rlnf.metrics import error_rate

DEFAULT_ALPHABET = "abcdefghijklmnopqrstuvwxyz '"


def cer_score(hypothesis: str, reference: str) -> float:
    return max(0.0, 1.0 - error_rate(reference, hypothesis, "char"))


def corrupt(reference: str, rate: float, rng: random.Random, alphabet: str = DEFAULT_ALPHABET) -> str:
    """Apply about ``rate * len(reference)`` character edits: substitutions, deletions, insertions
    and merged words (a deleted space), in random positions."""
    chars = list(reference)
    letters = alphabet.replace(" ", "") or "a"
    edits = max(1, round(rate * len(chars))) if rate > 0 else 0
    for _ in range(edits):
        if not chars:
            chars.append(rng.choice(letters))
            continue
        position = rng.randrange(len(chars))
        kind = rng.random()
        spaces = [i for i, c in enumerate(chars) if c == " "]
        if kind < 0.15 and spaces:
            del chars[rng.choice(spaces)]  # merge two words
        elif kind < 0.5:
            chars[position] = rng.choice(letters)
        elif kind < 0.75:
            del chars[position]
        else:
            chars.insert(position, rng.choice(letters))
    return " ".join("".join(chars).split())


def hard_negatives(reference: str, other_references: Sequence[str], rng: random.Random,
                   error_rates: Sequence[float] = (0.05, 0.15, 0.3, 0.6), empty: bool = True,
                   truncated: bool = True, other_clip: bool = True, repeated: bool = True,
                   alphabet: str = DEFAULT_ALPHABET) -> list[tuple[str, float, str]]:
    """[(hypothesis, score, kind)] for one clip's reference."""
    out: list[tuple[str, str]] = [(corrupt(reference, rate, rng, alphabet), f"corrupt_{rate:g}") for rate in error_rates]
    if empty:
        out.append(("", "empty"))
    if truncated and len(reference) > 4:
        out.append((reference[: max(1, int(len(reference) * rng.uniform(0.3, 0.7)))].strip(), "truncated"))
    if repeated and reference.split():
        words = reference.split()
        index = rng.randrange(len(words))
        out.append((" ".join(words[: index + 1] + [words[index]] + words[index + 1:]), "repeated"))
    if other_clip:
        candidates = [r for r in other_references if r != reference]
        if candidates:
            out.append((rng.choice(candidates), "other_clip"))
    return [(hypothesis, cer_score(hypothesis, reference), kind) for hypothesis, kind in out]
