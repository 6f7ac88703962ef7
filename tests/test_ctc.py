"""CTC math against brute force: enumerate every alignment of tiny examples."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlnf import ctc

BLANK = 2  # vocabulary {0, 1} + blank


def collapse_reference(alignment, blank=BLANK):
    """The textbook rule, written independently: merge repeats, then drop blanks."""
    merged = [a for i, a in enumerate(alignment) if i == 0 or a != alignment[i - 1]]
    return tuple(a for a in merged if a != blank)


def brute_force_label_distribution(log_probs: torch.Tensor, length: int) -> dict[tuple, float]:
    """p(y) = sum over alignments of the first ``length`` frames, by enumeration. log_probs [T, V]."""
    vocab = log_probs.shape[-1]
    probs = log_probs.exp()
    distribution: dict[tuple, float] = {}
    for alignment in itertools.product(range(vocab), repeat=length):
        p = math.prod(float(probs[t, a]) for t, a in enumerate(alignment))
        y = collapse_reference(list(alignment))
        distribution[y] = distribution.get(y, 0.0) + p
    return distribution


def random_log_probs(batch=2, frames=5, vocab=3, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(batch, frames, vocab, generator=generator) * 1.5, dim=-1)


@pytest.mark.parametrize("alignment, expected", [
    ([0, 0, 2, 0, 1, 1], [0, 0, 1]),        # blank separates two equal labels
    ([0, 0, 0, 0], [0]),                     # repeats merge
    ([2, 2, 2], []),                         # all blank
    ([1, 2, 1, 2, 1], [1, 1, 1]),
    ([0, 1, 0, 1], [0, 1, 0, 1]),
    ([2, 0, 2, 2, 0, 0, 2], [0, 0]),
])
def test_collapse_rules(alignment, expected):
    labels, length = ctc.collapse_alignments(torch.tensor([alignment]), BLANK)
    assert labels[0, : int(length[0])].tolist() == expected
    assert collapse_reference(alignment) == tuple(expected)


def test_collapse_batch_matches_reference_on_random_alignments():
    generator = torch.Generator().manual_seed(1)
    alignments = torch.randint(0, 3, (200, 9), generator=generator)
    labels, lengths = ctc.collapse_alignments(alignments, BLANK)
    for row, alignment in enumerate(alignments.tolist()):
        assert tuple(labels[row, : int(lengths[row])].tolist()) == collapse_reference(alignment)
        assert (labels[row, int(lengths[row]):] == 0).all()


def test_sequence_log_prob_equals_brute_force_over_alignments():
    log_probs = random_log_probs(batch=2, frames=5, vocab=3)
    encoded_len = torch.tensor([5, 4])  # the second utterance has a padding frame
    for b in range(2):
        distribution = brute_force_label_distribution(log_probs[b], int(encoded_len[b]))
        assert sum(distribution.values()) == pytest.approx(1.0, abs=1e-6)
        hypotheses = sorted(distribution, key=distribution.get, reverse=True)[:6] + [(0, 0), (1, 1, 1)]
        hypotheses = [h for h in hypotheses if h in distribution]
        labels = torch.zeros(1, len(hypotheses), 5, dtype=torch.long)
        label_len = torch.zeros(1, len(hypotheses), dtype=torch.long)
        for k, h in enumerate(hypotheses):
            labels[0, k, : len(h)] = torch.tensor(h, dtype=torch.long) if h else labels[0, k, :0]
            label_len[0, k] = len(h)
        got = ctc.sequence_log_probs(log_probs[b:b + 1], encoded_len[b:b + 1], labels, label_len, BLANK)
        expected = torch.tensor([math.log(distribution[h]) for h in hypotheses])
        torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)


def test_sequence_log_prob_infeasible_hypothesis_is_minus_inf():
    log_probs = random_log_probs(batch=1, frames=3)
    labels = torch.tensor([[[0, 0, 0]]])  # needs 5 frames (blanks between repeats)
    got = ctc.sequence_log_probs(log_probs, torch.tensor([3]), labels, torch.tensor([[3]]), BLANK)
    assert torch.isinf(got).all() and got.item() < 0


def test_sequence_log_prob_gradient_flows_through_expanded_copies():
    log_probs = random_log_probs(batch=1, frames=4).requires_grad_(True)
    labels = torch.tensor([[[0, 1], [1, 0]]])
    total = ctc.sequence_log_probs(log_probs, torch.tensor([4]), labels, torch.tensor([[2, 2]]), BLANK).sum()
    total.backward()
    assert log_probs.grad is not None and torch.isfinite(log_probs.grad).all() and log_probs.grad.abs().sum() > 0


def test_sampling_frequencies_match_per_frame_distribution():
    log_probs = random_log_probs(batch=2, frames=4, vocab=3, seed=3)
    encoded_len = torch.tensor([4, 2])
    generator = torch.Generator().manual_seed(0)
    samples = ctc.sample_alignments(log_probs, encoded_len, 40000, BLANK, generator)
    assert samples.shape == (2, 40000, 4)
    for b in range(2):
        for t in range(4):
            counts = torch.bincount(samples[b, :, t], minlength=3).float() / 40000
            if t < int(encoded_len[b]):
                torch.testing.assert_close(counts, log_probs[b, t].exp(), atol=0.012, rtol=0)
            else:
                assert counts[BLANK] == 1.0  # padding frames hold blank


def test_sampled_hypotheses_follow_the_label_distribution():
    """Sampling alignments then collapsing gives exact samples of p(y) (brute force)."""
    log_probs = random_log_probs(batch=1, frames=4, vocab=3, seed=5)
    samples = ctc.sample_alignments(log_probs, torch.tensor([4]), 30000, BLANK, torch.Generator().manual_seed(1))
    labels, lengths = ctc.collapse_alignments(samples[0], BLANK)
    counts: dict[tuple, int] = {}
    for row, n in zip(labels.tolist(), lengths.tolist()):
        counts[tuple(row[:n])] = counts.get(tuple(row[:n]), 0) + 1
    distribution = brute_force_label_distribution(log_probs[0], 4)
    for y, p in sorted(distribution.items(), key=lambda item: -item[1])[:5]:
        assert counts.get(y, 0) / 30000 == pytest.approx(p, abs=0.012)


def test_greedy_alignment_respects_encoded_len():
    log_probs = random_log_probs(batch=2, frames=5)
    best = ctc.greedy_alignments(log_probs, torch.tensor([5, 2]), BLANK)
    assert torch.equal(best[0], log_probs[0].argmax(-1))
    assert (best[1, 2:] == BLANK).all()


def test_exact_kl_equals_torch_distributions_summed_over_valid_frames():
    p = random_log_probs(batch=3, frames=6, vocab=5, seed=1)
    q = random_log_probs(batch=3, frames=6, vocab=5, seed=2)
    encoded_len = torch.tensor([6, 3, 1])
    got = ctc.exact_kl(p, q, encoded_len)
    per_frame = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p),
                                                  torch.distributions.Categorical(logits=q))
    expected = torch.stack([per_frame[b, : int(encoded_len[b])].sum() for b in range(3)])
    torch.testing.assert_close(got, expected)
    assert torch.all(ctc.exact_kl(p, p, encoded_len).abs() < 1e-6)


def test_exact_kl_is_finite_when_probabilities_underflow():
    p = torch.log_softmax(torch.tensor([[[0.0, -200.0, -200.0]]]), dim=-1)
    p[..., 1] = float("-inf")
    q = random_log_probs(batch=1, frames=1)
    assert torch.isfinite(ctc.exact_kl(p, q, torch.tensor([1]))).all()


def test_k1_and_k3_estimate_the_label_level_kl():
    """Mean of k1 / k3 over samples from pi approaches KL(pi(y) || pi_ref(y)) by enumeration."""
    p = random_log_probs(batch=1, frames=3, vocab=3, seed=7)
    q = random_log_probs(batch=1, frames=3, vocab=3, seed=8)
    dist_p = brute_force_label_distribution(p[0], 3)
    dist_q = brute_force_label_distribution(q[0], 3)
    true_kl = sum(prob * math.log(prob / dist_q[y]) for y, prob in dist_p.items())
    samples = ctc.sample_alignments(p, torch.tensor([3]), 40000, BLANK, torch.Generator().manual_seed(2))
    labels, lengths = ctc.collapse_alignments(samples[0], BLANK)
    lp = ctc.sequence_log_probs(p, torch.tensor([3]), labels.unsqueeze(0), lengths.unsqueeze(0), BLANK)
    lq = ctc.sequence_log_probs(q, torch.tensor([3]), labels.unsqueeze(0), lengths.unsqueeze(0), BLANK)
    assert float(ctc.kl_k1(lp, lq).mean()) == pytest.approx(true_kl, abs=0.03)
    assert float(ctc.kl_k3(lp, lq).mean()) == pytest.approx(true_kl, abs=0.03)
    assert (ctc.kl_k3(lp, lq) >= 0).all()
    # The alignment-level exact KL upper-bounds the label-level KL (data processing inequality).
    assert float(ctc.exact_kl(p, q, torch.tensor([3]))) >= true_kl - 1e-6


def test_frame_entropy_matches_torch_distributions():
    p = random_log_probs(batch=2, frames=4, vocab=5)
    encoded_len = torch.tensor([4, 2])
    entropy = torch.distributions.Categorical(logits=p).entropy()
    expected = torch.stack([entropy[0].mean(), entropy[1, :2].mean()])
    torch.testing.assert_close(ctc.frame_entropy(p, encoded_len), expected)


def test_temperature_equals_softmax_of_scaled_logits():
    logits = torch.randn(2, 3, 4)
    log_probs = torch.log_softmax(logits, -1)
    torch.testing.assert_close(ctc.apply_temperature(log_probs, 0.5), torch.log_softmax(logits / 0.5, -1))
    assert ctc.apply_temperature(log_probs, 1.0) is log_probs
    with pytest.raises(ValueError):
        ctc.apply_temperature(log_probs, 0.0)


def test_min_frames_decides_feasibility_like_the_ctc_loss():
    generator = torch.Generator().manual_seed(4)
    for _ in range(50):
        frames = int(torch.randint(1, 7, (1,), generator=generator))
        length = int(torch.randint(0, 6, (1,), generator=generator))
        labels = torch.randint(0, 2, (1, 1, max(length, 1)), generator=generator)
        log_probs = random_log_probs(batch=1, frames=frames, seed=int(torch.randint(0, 99, (1,), generator=generator)))
        finite = torch.isfinite(ctc.sequence_log_probs(log_probs, torch.tensor([frames]), labels,
                                                       torch.tensor([[length]]), BLANK)).item()
        needed = ctc.min_frames(labels[0], torch.tensor([length])).item()
        assert finite == (needed <= frames), (labels, length, frames)


def test_distinct_sequence_log_probs_equal_the_full_computation_in_value_and_gradient():
    """Repeated hypotheses (a peaked policy) are computed once and gathered back."""
    torch.manual_seed(0)
    batch, frames, vocabulary, num_samples = 3, 12, 4, 16
    logits = (torch.randn(batch, frames, vocabulary) * 4).requires_grad_(True)
    log_probs = torch.log_softmax(logits, -1)
    encoded_len = torch.tensor([12, 9, 5])
    alignments = ctc.sample_alignments(log_probs, encoded_len, num_samples, vocabulary - 1)
    labels, label_len = ctc.collapse_alignments(alignments.reshape(batch * num_samples, -1), vocabulary - 1)
    labels, label_len = labels.reshape(batch, num_samples, -1), label_len.reshape(batch, num_samples)
    distinct = {(b, tuple(labels[b, k, : label_len[b, k]].tolist())) for b in range(batch) for k in range(num_samples)}
    assert len(distinct) < batch * num_samples  # repeats present: the dedup path runs
    full = ctc.sequence_log_probs(log_probs, encoded_len, labels, label_len, vocabulary - 1)
    deduped = ctc.distinct_sequence_log_probs(log_probs, encoded_len, labels, label_len, vocabulary - 1)
    torch.testing.assert_close(deduped, full)
    weights = torch.randn(batch, num_samples)
    (expected,) = torch.autograd.grad((full * weights).sum(), logits, retain_graph=True)
    (got,) = torch.autograd.grad((deduped * weights).sum(), logits)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
