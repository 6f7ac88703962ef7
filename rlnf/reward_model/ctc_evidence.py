"""Acoustic evidence for the reward model: a small CTC head on its audio encoder.

A pooled audio vector cannot say whether *these* words were spoken, so a reward model built on one
ranks a clip's transcripts by their text alone (docs/reward-model.md). A CTC head trained on
the clips' references (an auxiliary loss) gives every transcript a likelihood under the clip's own
audio; the regression head reads it through ``evidence_features``. The same idea as the e-WER /
Fe-WER quality estimators, which build on an ASR model's own evidence, but self-contained: the head
is part of the reward checkpoint, so scoring still needs no ASR model.

    conv frames [B, C, T'] -> means of ctc_stride frames -> BiLSTM(ctc_hidden) -> Linear -> log_softmax
                           -> log_probs [B, S, V + 1]   (blank = V, the last label; V = the text vocabulary)

Targets are the reward model's own text ids (SentencePiece pieces) without the end-of-sequence and pad
ids, so hypotheses need no second tokenisation; or, with an alphabet (``ctc_alphabet``), their spelling:
a table [vocab_size, max_chars] inside the checkpoint spells every piece in the alphabet's letters
(``spelling_table``), so V is the alphabet's size. A few dozen letters are learnt from far fewer clips
than hundreds of pieces.
"""

from __future__ import annotations

import torch
from torch import nn

from rlnf import ctc

# Negative log-likelihood per target token at which the evidence saturates; also what a transcript
# that CTC cannot align at all (more labels than frames) gets.
MAX_NLL_PER_TOKEN = 30.0
EVIDENCE_FEATURES = 3  # what evidence_features returns per pair


class CTCEvidenceHead(nn.Module):
    """Conv frames [B, C, S] (zero past ``lengths``) -> log_probs [B, S, vocab_size + 1]."""

    def __init__(self, audio_dim: int, hidden: int, vocab_size: int):
        super().__init__()
        self.lstm = nn.LSTM(audio_dim, hidden, batch_first=True, bidirectional=True)
        self.output = nn.Linear(2 * hidden, vocab_size + 1)
        self.blank = vocab_size

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(frames.transpose(1, 2), lengths.clamp(min=1).cpu(),
                                                   batch_first=True, enforce_sorted=False)
        states, _ = self.lstm(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(states, batch_first=True, total_length=frames.shape[-1])
        return torch.log_softmax(self.output(states).float(), dim=-1)


def ctc_targets(ids: torch.Tensor, mask: torch.Tensor, drop_ids: tuple[int | None, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text ids [N, L] and attention mask [N, L] -> (targets [N, L] left-aligned, padded with 0;
    target_lengths [N]): the valid ids that are not in ``drop_ids`` (end-of-sequence, pad)."""
    keep = mask.bool()
    for drop in drop_ids:
        if drop is not None:
            keep &= ids != drop
    target_lengths = keep.sum(dim=1)
    # Stable sort moves kept ids to the front in their order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    targets = torch.gather(ids, 1, order)
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
    return targets.masked_fill(positions >= target_lengths[:, None], 0), target_lengths


def spelling_table(pieces: list[str], alphabet: str, max_chars: int) -> torch.Tensor:
    """SentencePiece pieces (index = id) -> [len(pieces), max_chars] letter indices into ``alphabet``, -1
    padded. The word-start mark U+2581 spells a space; letters outside the alphabet, control pieces
    (``<unk>``, ``<s>``, ``</s>``) and letters past max_chars are dropped."""
    table = torch.full((len(pieces), max_chars), -1, dtype=torch.long)
    for index, piece in enumerate(pieces):
        if piece.startswith("<") and piece.endswith(">"):
            continue
        letters = [alphabet.index(c) for c in piece.replace("\u2581", " ").lower() if c in alphabet][:max_chars]
        table[index, : len(letters)] = torch.tensor(letters, dtype=torch.long)
    return table


def spell(targets: torch.Tensor, target_lengths: torch.Tensor, table: torch.Tensor,
          space: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Piece targets [N, L] (from ``ctc_targets``) -> letter targets [N, L'] and lengths [N] through
    ``table`` [V, max_chars]; leading and trailing spaces (index ``space``) are dropped, so a
    transcript's spelling does not depend on where SentencePiece put its word marks."""
    rows = []
    for row, length in zip(targets.tolist(), target_lengths.tolist()):
        letters = [letter for piece in row[:length] for letter in table[piece].tolist() if letter >= 0]
        while letters and letters[0] == space:
            letters.pop(0)
        while letters and letters[-1] == space:
            letters.pop()
        rows.append(letters)
    width = max(1, max(len(letters) for letters in rows))
    spelled = torch.zeros(len(rows), width, dtype=torch.long, device=targets.device)
    for index, letters in enumerate(rows):
        spelled[index, : len(letters)] = torch.tensor(letters, dtype=torch.long)
    return spelled, torch.tensor([len(letters) for letters in rows], device=targets.device)


def spelt_text(text: str, alphabet: str) -> str:
    """``text`` as a head over ``alphabet`` spells it (``spell``): lower-cased, letters outside the
    alphabet dropped, runs of spaces merged, no edge spaces. What its transcripts are judged against."""
    kept = "".join(c for c in text.lower() if c in alphabet)
    return " ".join(kept.split()) if " " in alphabet else kept


def greedy_spelling(log_probs: torch.Tensor, lengths: torch.Tensor, alphabet: str) -> list[str]:
    """The head's own transcripts: log_probs [N, S, len(alphabet) + 1] (blank last), lengths [N] frames ->
    each clip's best path with repeats merged and blanks dropped, in ``alphabet``'s letters, its spaces
    as ``spelt_text`` writes them. How well the reward model hears, on its own (``val/ctc_wer``)."""
    blank = log_probs.shape[-1] - 1
    labels, label_len = ctc.collapse_alignments(ctc.greedy_alignments(log_probs, lengths, blank), blank)
    return [spelt_text("".join(alphabet[label] for label in row[:length]), alphabet)
            for row, length in zip(labels.tolist(), label_len.tolist())]


def ctc_nll(log_probs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor,
            blank: int) -> torch.Tensor:
    """-log p(targets | audio) under CTC, per row: log_probs [N, S, V] (log-softmax), lengths [N] frames,
    targets [N, L], target_lengths [N] -> [N] nats. A row CTC cannot align (fewer frames than labels
    plus repeated neighbours) gets ``MAX_NLL_PER_TOKEN`` per label (the same cap as ``evidence_features``),
    with no gradient."""
    nll = nn.functional.ctc_loss(log_probs.float().transpose(0, 1), targets, lengths, target_lengths, blank=blank,
                                 reduction="none", zero_infinity=True)
    repeats = ((targets[:, 1:] == targets[:, :-1])
               & (torch.arange(1, targets.shape[1], device=targets.device)[None, :] < target_lengths[:, None])).sum(dim=1)
    feasible = lengths >= target_lengths + repeats
    return torch.where(feasible, nll, MAX_NLL_PER_TOKEN * target_lengths.clamp(min=1).to(nll.dtype))


def evidence_features(nll: torch.Tensor, target_lengths: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[N] nats, [N] labels, [N] frames -> [N, 3] features for the regression head:
    mean log-likelihood per label (capped at -MAX_NLL_PER_TOKEN, scaled by 1/10), per frame, and labels
    per frame (the speaking rate a transcript implies: too long or too short for the clip)."""
    labels = target_lengths.clamp(min=1).to(nll.dtype)
    frames = lengths.clamp(min=1).to(nll.dtype)
    per_label = (nll / labels).clamp(max=MAX_NLL_PER_TOKEN)
    return torch.stack([-per_label / 10.0, -(nll / frames).clamp(max=MAX_NLL_PER_TOKEN), target_lengths.to(nll.dtype) / frames], dim=-1)
