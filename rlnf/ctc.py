"""Pure CTC functions: sampling, collapsing, sequence log-probabilities, KL and entropy.

A CTC model outputs, for every encoder frame t, a categorical distribution over the
vocabulary plus a blank. An *alignment* a = (a_1..a_T) is one label per frame; the output
distribution over alignments is the product of the per-frame categoricals. A *hypothesis* y
is what remains after collapsing an alignment (merge repeats, then drop blanks), and

    log p(y | x) = log sum_{a : collapse(a) = y} prod_t p_t(a_t)

which is exactly minus the CTC loss of y on the same log-probs.

Shapes used throughout:
    B  utterances, K samples per utterance, T frames, V classes (labels + blank), L labels
    log_probs    [B, T, V]  log-softmax outputs (frames past encoded_len are padding)
    encoded_len  [B]        number of valid frames per utterance (may be < log_probs.shape[1])

Frames at t >= encoded_len are ignored everywhere: NeMo decoders can emit more frames than
``encoded_len`` (padding to a multiple of 16), and those frames carry no meaning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bound on the log-ratios of sequence probabilities that go through exp(): importance ratios
# log pi - log pi_old are clamped to +-MAX_LOG_RATIO (a sample whose probability moved by more than e^20
# then contributes no gradient instead of inf or NaN, which would skip the whole update); k3 bounds
# only its exponent (see ``kl_k3``).
MAX_LOG_RATIO = 20.0

__all__ = [
    "MAX_LOG_RATIO",
    "apply_temperature",
    "frame_mask",
    "sample_alignments",
    "greedy_alignments",
    "collapse_alignments",
    "sequence_log_probs",
    "distinct_sequence_log_probs",
    "first_occurrences",
    "blank_share",
    "exact_kl",
    "kl_k1",
    "kl_k3",
    "frame_entropy",
    "min_frames",
]


def apply_temperature(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Re-normalised log-probs of softmax(logits / temperature).

    ``log_probs`` [..., V] are already log-softmaxed; dividing them by the temperature and
    re-normalising gives the same result as applying the temperature to the raw logits.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature == 1.0:
        return log_probs
    return torch.log_softmax(log_probs / temperature, dim=-1)


def frame_mask(encoded_len: torch.Tensor, max_frames: int) -> torch.Tensor:
    """Boolean mask [B, T]: True where frame t < encoded_len[b]."""
    frames = torch.arange(max_frames, device=encoded_len.device)
    return frames.unsqueeze(0) < encoded_len.unsqueeze(1)


def sample_alignments(
    log_probs: torch.Tensor,
    encoded_len: torch.Tensor,
    num_samples: int,
    blank_id: int,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw ``num_samples`` alignments per utterance from the per-frame categoricals.

    All samples come from one set of log-probs (one encoder pass), in one vectorised call, by
    inverse-CDF sampling: label a_t = the first v with CDF_t(v) > u_t for a uniform u_t.

    Args:
        log_probs: [B, T, V] log-probabilities (temperature already applied).
        encoded_len: [B] valid frames.
        num_samples: K.
        blank_id: index written at padded frames.
        generator: optional torch.Generator for the uniforms (ignored when ``uniforms`` is given).
        uniforms: optional [B, K, T] draws in [0, 1). Passing them makes each utterance's samples
            a function of its own draws only (see ``rlnf.hypotheses.sampling_uniforms``), whatever batch or
            process it lands in.
    Returns:
        alignments: [B, K, T] int64; frames t >= encoded_len[b] hold ``blank_id``.
    """
    batch, frames, vocab = log_probs.shape
    if uniforms is None:
        uniforms = torch.rand(batch, num_samples, frames, generator=generator, device=log_probs.device)
    elif uniforms.shape != (batch, num_samples, frames):
        raise ValueError(f"uniforms must be [B, K, T] = {(batch, num_samples, frames)}, got {tuple(uniforms.shape)}")
    cdf = log_probs.detach().float().exp().cumsum(dim=-1)  # [B, T, V]
    draws = torch.searchsorted(cdf, uniforms.to(cdf.device, cdf.dtype).transpose(1, 2).contiguous(), right=True)
    alignments = draws.clamp_(max=vocab - 1).transpose(1, 2)  # [B, K, T]; clamp: CDF_T may round below 1
    valid = frame_mask(encoded_len, frames).unsqueeze(1)  # [B, 1, T]
    return torch.where(valid, alignments, torch.full_like(alignments, blank_id))


def greedy_alignments(log_probs: torch.Tensor, encoded_len: torch.Tensor, blank_id: int) -> torch.Tensor:
    """Most likely label per frame: [B, T], ``blank_id`` past encoded_len."""
    best = log_probs.argmax(dim=-1)
    valid = frame_mask(encoded_len, log_probs.shape[1])
    return torch.where(valid, best, torch.full_like(best, blank_id))


def collapse_alignments(alignments: torch.Tensor, blank_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse CTC alignments: merge repeated labels, then drop blanks.

    ``a a _ a b b`` -> ``a a b`` (a blank between two equal labels keeps both).
    Vectorised: no Python loop over frames or hypotheses.

    Args:
        alignments: [N, T] int64 (padding frames must already be ``blank_id``).
    Returns:
        labels: [N, L] int64, padded with 0 past each length (L >= 1 so empty batches still work).
        label_len: [N] int64.
    """
    if alignments.dim() != 2:
        raise ValueError(f"alignments must be [N, T], got shape {tuple(alignments.shape)}")
    previous = F.pad(alignments[:, :-1], (1, 0), value=blank_id)
    keep = (alignments != blank_id) & (alignments != previous)
    label_len = keep.sum(dim=1)
    max_len = max(int(label_len.max().item()) if label_len.numel() else 0, 1)
    # A stable sort of "not kept" puts kept frames first, in their original order.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :max_len]
    labels = torch.gather(alignments, 1, order)
    positions = torch.arange(max_len, device=alignments.device).unsqueeze(0)
    labels = torch.where(positions < label_len.unsqueeze(1), labels, torch.zeros_like(labels))
    return labels, label_len


def sequence_log_probs(
    log_probs: torch.Tensor,
    encoded_len: torch.Tensor,
    labels: torch.Tensor,
    label_len: torch.Tensor,
    blank_id: int,
) -> torch.Tensor:
    """log p(y | x) of K hypotheses per utterance, marginalised over all CTC alignments.

    Computed as minus the CTC loss, for all B*K hypotheses in one ``F.ctc_loss`` call. The
    per-utterance log-probs are broadcast to the K hypotheses with ``expand`` (gradients flow
    back into the single copy). Infeasible hypotheses (more labels than frames allow) get -inf.

    Args:
        log_probs: [B, T, V] (temperature applied; may require grad).
        encoded_len: [B].
        labels: [B, K, L] int64.
        label_len: [B, K] int64.
    Returns:
        [B, K] float32 log-probabilities.
    """
    batch, frames, vocab = log_probs.shape
    num_samples = labels.shape[1]
    # ctc_loss wants [T, N, V]; N = B*K with the K copies of utterance b adjacent.
    expanded = log_probs.float().transpose(0, 1).unsqueeze(2).expand(frames, batch, num_samples, vocab)
    expanded = expanded.reshape(frames, batch * num_samples, vocab)
    input_lengths = encoded_len.repeat_interleave(num_samples)
    targets = labels.reshape(batch * num_samples, -1)
    if targets.shape[1] == 0:
        targets = F.pad(targets, (0, 1))
    nll = F.ctc_loss(
        expanded,
        targets,
        input_lengths,
        label_len.reshape(-1),
        blank=blank_id,
        reduction="none",
        zero_infinity=False,
    )
    return -nll.reshape(batch, num_samples)


def distinct_sequence_log_probs(
    log_probs: torch.Tensor,
    encoded_len: torch.Tensor,
    labels: torch.Tensor,
    label_len: torch.Tensor,
    blank_id: int,
) -> torch.Tensor:
    """``sequence_log_probs`` with each distinct hypothesis of an utterance computed once.

    A peaked policy draws the same transcript many times among its K samples; the CTC forward and
    backward (and the [T, N, V] copy they need) then run over the N distinct (utterance, hypothesis)
    pairs only, and the values are gathered back to [B, K] (gradients of repeats add up, exactly as
    before). Same arguments, shapes and result as ``sequence_log_probs``.
    """
    batch, num_samples = label_len.shape
    lengths = label_len.tolist()
    rows = labels.tolist()
    index: dict[tuple, int] = {}
    owner: list[int] = []  # utterance of each distinct pair
    position = []  # [B * K] -> distinct pair
    for b in range(batch):
        for k in range(num_samples):
            key = (b, *rows[b][k][: lengths[b][k]])
            if key not in index:
                index[key] = len(owner)
                owner.append(b)
            position.append(index[key])
    if len(owner) == batch * num_samples:
        return sequence_log_probs(log_probs, encoded_len, labels, label_len, blank_id)
    device = log_probs.device
    first = {}
    for flat, pair in enumerate(position):
        first.setdefault(pair, flat)
    chosen = torch.tensor([first[pair] for pair in range(len(owner))], device=labels.device)
    owners = torch.tensor(owner, device=device)
    flat_labels = labels.reshape(batch * num_samples, -1)[chosen]
    flat_len = label_len.reshape(-1)[chosen]
    distinct = sequence_log_probs(log_probs.index_select(0, owners), encoded_len.index_select(0, owners.to(
        encoded_len.device)), flat_labels.unsqueeze(1), flat_len.unsqueeze(1), blank_id)[:, 0]
    return distinct[torch.tensor(position, device=distinct.device)].reshape(batch, num_samples)


def first_occurrences(labels: torch.Tensor, label_len: torch.Tensor) -> torch.Tensor:
    """[B, K] bool: True for the first occurrence of each label sequence among an utterance's K
    hypotheses. The one de-duplication key of a hypothesis list (as in ``distinct_sequence_log_probs``):
    two spellings of one text (BPE pieces 'a'+'b' and 'ab') are two hypotheses, each with its own
    probability, and their equal rewards weigh the same as the text's summed probability would.
    labels [B, K, L], label_len [B, K]."""
    lengths = label_len.tolist()
    rows = labels.tolist()
    marks = []
    for group, group_lengths in zip(rows, lengths):
        seen: set[tuple[int, ...]] = set()
        row = []
        for sequence, length in zip(group, group_lengths):
            key = tuple(sequence[:length])
            row.append(key not in seen)
            seen.add(key)
        marks.append(row)
    return torch.tensor(marks, dtype=torch.bool, device=labels.device)


def blank_share(log_probs: torch.Tensor, encoded_len: torch.Tensor, blank_id: int) -> float:
    """The policy's expected share of blank frames: mean of p_t(blank) over every valid frame of the
    batch. The same for any rollout source (samples or a beam's N-best); a sampled alignment's blank
    share estimates it."""
    mask = frame_mask(encoded_len, log_probs.shape[1])
    frames = int(mask.sum())
    if frames == 0:
        return 0.0
    return float((log_probs[..., blank_id].float().exp() * mask).sum() / frames)


def exact_kl(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    encoded_len: torch.Tensor,
) -> torch.Tensor:
    """Exact KL(pi || pi_ref) over alignments, per utterance.

    The alignment distribution is a product of per-frame categoricals, so its KL is the sum of
    the per-frame KLs: sum_t sum_v p_t(v) (log p_t(v) - log q_t(v)), over valid frames only.

    Args:
        log_probs, ref_log_probs: [B, T, V].
        encoded_len: [B].
    Returns:
        [B] KL in nats (differentiable w.r.t. ``log_probs``).
    """
    log_p = log_probs.float()
    p = log_p.exp()
    # 0 * log(0/q) = 0: guard frames where p underflowed to 0 (log_p = -inf would give NaN).
    terms = torch.where(p > 0, p * (log_p - ref_log_probs.float()), torch.zeros_like(p))
    per_frame = terms.sum(dim=-1)  # [B, T]
    return (per_frame * frame_mask(encoded_len, log_probs.shape[1])).sum(dim=1)


def kl_k1(seq_log_probs: torch.Tensor, ref_seq_log_probs: torch.Tensor) -> torch.Tensor:
    """k1 estimator of KL(pi || pi_ref) from samples y ~ pi: log pi(y) - log pi_ref(y). [B, K]."""
    return seq_log_probs - ref_seq_log_probs


def kl_k3(seq_log_probs: torch.Tensor, ref_seq_log_probs: torch.Tensor) -> torch.Tensor:
    """k3 estimator (Schulman, "Approximating KL divergence"): (r - 1) - log r, r = pi_ref(y)/pi(y).

    Unbiased for KL(pi || pi_ref) in value and always >= 0. [B, K]. Only the exponent is bounded:
    for log r > MAX_LOG_RATIO (pi_ref(y) > e^20 pi(y)) e^x continues as its tangent line there, so
    the value stays finite and the gradient keeps its sign; a drifted policy (log pi - log pi_ref of
    40 nats, log r = -40) gets k3 = 39 and d k3 / d log pi = 1 - r ~ 1, with no clamp at all. As a
    loss its gradient estimates grad KL(pi_ref || pi), not grad KL(pi || pi_ref): use
    ``rlnf.kl.k3_loss``; folded into a reward it is refused (``rlnf.kl.K3``).
    """
    log_ratio = ref_seq_log_probs - seq_log_probs
    bounded = log_ratio.clamp(max=MAX_LOG_RATIO)
    # expm1(x) for x <= bound; past it expm1(bound) + e^bound (x - bound), with no inf in either branch.
    return torch.expm1(bounded) + bounded.exp() * (log_ratio - bounded) - log_ratio


def frame_entropy(log_probs: torch.Tensor, encoded_len: torch.Tensor) -> torch.Tensor:
    """Mean per-frame entropy of each utterance, in nats: [B]."""
    log_p = log_probs.float()
    p = log_p.exp()
    per_frame = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=-1)
    mask = frame_mask(encoded_len, log_probs.shape[1])
    return (per_frame * mask).sum(dim=1) / encoded_len.clamp(min=1).to(per_frame.dtype)


def min_frames(labels: torch.Tensor, label_len: torch.Tensor) -> torch.Tensor:
    """Fewest frames that can emit each target: its length plus one blank between every pair of
    equal adjacent labels. labels [N, L], label_len [N] -> [N]. A target is CTC-feasible on T frames
    iff min_frames <= T; otherwise its loss is infinite and ``ctc_loss`` backward gives NaN gradients."""
    if labels.shape[1] < 2:
        return label_len.clone()
    positions = torch.arange(1, labels.shape[1], device=labels.device).unsqueeze(0)
    repeats = ((labels[:, 1:] == labels[:, :-1]) & (positions < label_len.unsqueeze(1))).sum(dim=1)
    return label_len + repeats
