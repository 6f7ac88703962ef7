"""The unsupervised losses of test-time adaptation (SUTA: Lin et al., 2022, "Listen, Adapt, Better
WER: Source-free Single-utterance Test-time Adaptation for Automatic Speech Recognition").

Pure functions of one encoder pass's per-frame log-probs. Every function takes ``log_probs [B, T, V]``
(or ``[T, V]`` for one utterance) and ``encoded_len [B]`` (None: every frame is valid); frames at
t >= encoded_len[b] are padding and never count. ``temperature`` T smooths the distribution first:
P = softmax(log_probs / T), which is softmax(logits / T) because log_probs differ from the logits by
one constant per frame.
"""

from __future__ import annotations

import torch

from rlnf.ctc import frame_mask


def _batched(log_probs: torch.Tensor, encoded_len: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """log_probs as [B, T, V] and the valid-frame mask [B, T]."""
    if log_probs.dim() == 2:
        log_probs = log_probs.unsqueeze(0)
        if encoded_len is not None:
            encoded_len = encoded_len.reshape(1)
    if log_probs.dim() != 3:
        raise ValueError(f"log_probs must be [B, T, V] or [T, V], got shape {tuple(log_probs.shape)}")
    batch, frames, _ = log_probs.shape
    if encoded_len is None:
        encoded_len = torch.full((batch,), frames, dtype=torch.long, device=log_probs.device)
    return log_probs, frame_mask(encoded_len.to(log_probs.device), frames)


def frame_entropy(log_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H_t = -sum_v P_tv log P_tv with P = softmax(log_probs / T): [..., T, V] -> [..., T] (nats)."""
    scaled = torch.log_softmax(log_probs / temperature, dim=-1)
    return -(scaled.exp() * scaled).sum(dim=-1)


def entropy_loss(log_probs: torch.Tensor, encoded_len: torch.Tensor | None = None, temperature: float = 1.0,
                 blank_id: int | None = None) -> torch.Tensor:
    """L_em: the mean per-frame entropy (``frame_entropy``) over the valid frames of the whole batch.

    With ``blank_id`` given, frames whose most likely token is blank are left out (SUTA's main setting:
    blank dominates CTC outputs, and pushing its frames to be more certain teaches nothing). A batch with
    no frame left gives 0 (and zero gradients). Returns a scalar."""
    log_probs, counted = _batched(log_probs, encoded_len)
    if blank_id is not None:
        counted = counted & (log_probs.argmax(dim=-1) != blank_id)
    entropy = frame_entropy(log_probs, temperature)
    weights = counted.to(entropy.dtype)
    return (entropy * weights).sum() / weights.sum().clamp(min=1.0)


def mcc_loss(log_probs: torch.Tensor, encoded_len: torch.Tensor | None = None, temperature: float = 1.0,
             reweight: bool = False) -> torch.Tensor:
    """L_mcc: minimum class confusion (Jin et al., 2020, as SUTA uses it), the mean over utterances of

        C = P^T diag(w) P                  [V, V]   (P = softmax(log_probs / T) over the T_b valid frames)
        C'_ij = C_ij / sum_k C_ik          each row normalised to sum to 1
        L = (sum_ij C'_ij - sum_i C'_ii) / V

    i.e. the share of probability mass that frames spread over pairs of different classes, per class.
    ``reweight=False`` takes w_t = 1. ``reweight=True`` is MCC's uncertainty reweighting (and the SUTA
    authors' released setting): w_t = 1 + exp(-H_t), H_t the frame's entropy at ``temperature``, scaled
    to sum to T_b and held constant (no gradient through w), so confident frames count more.
    Returns a scalar."""
    log_probs, valid = _batched(log_probs, encoded_len)
    probs = torch.softmax(log_probs / temperature, dim=-1)  # [B, T, V]
    weights = valid.to(probs.dtype)  # [B, T]; padding frames weigh nothing
    if reweight:
        certainty = (1.0 + torch.exp(-frame_entropy(log_probs, temperature))).detach() * weights
        weights = certainty * weights.sum(dim=1, keepdim=True) / certainty.sum(dim=1, keepdim=True).clamp(
            min=torch.finfo(probs.dtype).tiny)
    confusion = torch.einsum("btv,bt,btu->bvu", probs, weights, probs)  # [B, V, V]
    confusion = confusion / confusion.sum(dim=2, keepdim=True).clamp(min=torch.finfo(probs.dtype).tiny)
    classes = probs.shape[-1]
    off_diagonal = confusion.sum(dim=(1, 2)) - confusion.diagonal(dim1=1, dim2=2).sum(dim=1)  # [B]
    return (off_diagonal / classes).mean()


def suta_loss(log_probs: torch.Tensor, encoded_len: torch.Tensor | None = None, temperature: float = 1.0,
              em_weight: float = 0.5, blank_id: int | None = None, mcc_reweight: bool = False) -> torch.Tensor:
    """SUTA's objective: em_weight * L_em + (1 - em_weight) * L_mcc, both at ``temperature``
    (``entropy_loss`` with ``blank_id`` as given, ``mcc_loss`` with ``mcc_reweight``). Returns a scalar."""
    loss = log_probs.new_zeros(())
    if em_weight > 0:
        loss = loss + em_weight * entropy_loss(log_probs, encoded_len, temperature, blank_id)
    if em_weight < 1:
        loss = loss + (1.0 - em_weight) * mcc_loss(log_probs, encoded_len, temperature, mcc_reweight)
    return loss
