"""KL estimators, PPO ratios, whitening, micro-batch weights and the reference-cache check, against
enumeration of every alignment of tiny CTC cases or exact formulas."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rlnf import algorithms, ctc, kl
from tests.test_ctc import BLANK, collapse_reference  # V = 3: labels 0, 1 and the blank (2)


def hypotheses_of(frames: int, vocabulary: int = 3) -> list[tuple[int, ...]]:
    """Every transcript that T frames can emit (each alignment collapses to exactly one)."""
    return sorted({collapse_reference(alignment) for alignment in itertools.product(range(vocabulary), repeat=frames)})


def brute_force_log_probs(log_probs: torch.Tensor, hypotheses: list[tuple[int, ...]]) -> torch.Tensor:
    """log p(y) [N] by summing over every alignment (independent of ctc_loss). log_probs [T, V]."""
    frames, vocabulary = log_probs.shape
    per_hypothesis: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for alignment in itertools.product(range(vocabulary), repeat=frames):
        per_hypothesis.setdefault(collapse_reference(alignment), []).append(
            log_probs[torch.arange(frames), torch.tensor(alignment)].sum())
    return torch.stack([torch.logsumexp(torch.stack(per_hypothesis[y]), 0) for y in hypotheses])


def ctc_log_probs(log_probs: torch.Tensor, hypotheses: list[tuple[int, ...]]) -> torch.Tensor:
    """log p(y) [N] through ``ctc.sequence_log_probs``, as the trainer computes it."""
    from rlnf.policy import labels_to_padded

    labels, lengths = labels_to_padded([list(y) for y in hypotheses])
    frames = torch.tensor([log_probs.shape[0]])
    return ctc.sequence_log_probs(log_probs.unsqueeze(0), frames, labels.unsqueeze(0), lengths.unsqueeze(0), BLANK)[0]


@pytest.fixture()
def toy():
    """Policy logits theta (old: theta_0; current: theta_1, as in a later PPO epoch) and a reference."""
    torch.manual_seed(3)
    frames = 3
    old_logits = torch.randn(frames, 3)
    new_logits = (old_logits + 0.4 * torch.randn(frames, 3)).requires_grad_(True)
    ref_logits = old_logits + 0.8 * torch.randn(frames, 3)
    return frames, old_logits, new_logits, ref_logits, hypotheses_of(frames)


def transcript_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    return (log_p.exp() * (log_p - log_q)).sum()


def expected_gradient(per_sample_loss: torch.Tensor, sampling_log_probs: torch.Tensor, logits: torch.Tensor):
    """E_{y ~ pi_sampling}[grad loss(y)], exactly: the samples' probabilities are constants."""
    (grad,) = torch.autograd.grad((sampling_log_probs.detach().exp() * per_sample_loss).sum(), logits,
                                  retain_graph=True)
    return grad


def test_the_ctc_marginal_matches_the_enumeration(toy):
    frames, old_logits, _, _, hypotheses = toy
    log_probs = torch.log_softmax(old_logits, -1)
    brute = brute_force_log_probs(log_probs, hypotheses)
    torch.testing.assert_close(ctc_log_probs(log_probs, hypotheses), brute, atol=1e-5, rtol=1e-5)
    assert float(brute.exp().sum()) == pytest.approx(1.0, abs=1e-6)  # the transcript list is complete


@pytest.mark.parametrize("on_policy", [True, False])
def test_k3_loss_term_gradient_is_the_gradient_of_kl_policy_to_reference(toy, on_policy):
    """E_{y~pi_old}[grad(rho * k3)] = grad KL(pi || pi_ref) over transcripts, on-policy and in a later
    PPO epoch (pi != pi_old), by enumerating every transcript."""
    frames, old_logits, new_logits, ref_logits, hypotheses = toy
    logits = old_logits.clone().requires_grad_(True) if on_policy else new_logits
    log_p = ctc_log_probs(torch.log_softmax(logits, -1), hypotheses)
    log_old = ctc_log_probs(torch.log_softmax(old_logits, -1), hypotheses)
    log_ref = ctc_log_probs(torch.log_softmax(ref_logits, -1), hypotheses)
    estimated = expected_gradient(kl.k3_loss(log_p.unsqueeze(0), log_old.unsqueeze(0),
                                             log_ref.unsqueeze(0))[0], log_old, logits)
    exact_log_p = brute_force_log_probs(torch.log_softmax(logits, -1), hypotheses)
    exact_log_ref = brute_force_log_probs(torch.log_softmax(ref_logits, -1), hypotheses)
    (exact,) = torch.autograd.grad(transcript_kl(exact_log_p, exact_log_ref), logits)
    torch.testing.assert_close(estimated, exact, atol=1e-5, rtol=1e-4)
    assert exact.norm() > 1e-3  # a real gradient, not two zeros


def test_plain_k3_as_a_loss_has_the_forward_kl_gradient_and_k3_in_the_reward_cancels(toy):
    """Why the code uses rho * k3 in the loss and refuses k3 in the reward (enumeration, on-policy):
    E[grad k3] = grad KL(ref || pi), and E[k3 * grad log pi] = grad KL(pi||ref) - grad KL(ref||pi);
    k1 in the reward, E[k1 * grad log pi], is grad KL(pi || ref)."""
    frames, old_logits, _, ref_logits, hypotheses = toy
    logits = old_logits.clone().requires_grad_(True)
    log_p = ctc_log_probs(torch.log_softmax(logits, -1), hypotheses)
    log_ref = ctc_log_probs(torch.log_softmax(ref_logits, -1), hypotheses).detach()
    (reverse,) = torch.autograd.grad(transcript_kl(log_p, log_ref), logits, retain_graph=True)
    (forward,) = torch.autograd.grad(transcript_kl(log_ref, log_p), logits, retain_graph=True)
    plain_k3 = expected_gradient(ctc.kl_k3(log_p, log_ref), log_p, logits)
    torch.testing.assert_close(plain_k3, forward, atol=1e-5, rtol=1e-4)
    assert (plain_k3 - reverse).norm() > 0.05 * reverse.norm()
    k3_reward = expected_gradient(ctc.kl_k3(log_p, log_ref).detach() * log_p, log_p, logits)
    torch.testing.assert_close(k3_reward, reverse - forward, atol=1e-5, rtol=1e-4)
    k1_reward = expected_gradient(ctc.kl_k1(log_p, log_ref).detach() * log_p, log_p, logits)
    torch.testing.assert_close(k1_reward, reverse, atol=1e-5, rtol=1e-4)


def test_k3_in_the_reward_is_refused_with_the_reason():
    from rlnf.config import RLFinetuneConfig, load_config
    from rlnf.errors import ConfigError

    required = ["policy.path=m.nemo", "data.train_manifest=t.json", "output_dir=o"]
    with pytest.raises(ConfigError, match="kl_in_reward=true with kl_estimator=k3"):
        load_config(RLFinetuneConfig, None, required + ["algorithm.kl_estimator=k3", "algorithm.kl_in_reward=true"])
    cfg = load_config(RLFinetuneConfig, None, required + ["algorithm.kl_estimator=k3", "algorithm.kl_in_reward=false"])
    assert cfg.algorithm.kl_estimator == "k3"


def test_ctc_loss_gradient_is_right_only_through_a_log_softmax(toy):
    """F.ctc_loss returns p - gamma as the gradient w.r.t. its log-prob input (gamma the alignment
    posterior occupancy), which is the gradient w.r.t. the logits, not the -gamma a bare log-prob
    tensor should get. The trainer is right because its log-probs always come out of a log_softmax
    (the policy's decoder, apply_temperature): this test notices if PyTorch or that path changes."""
    frames, old_logits, _, _, hypotheses = toy
    y = [hypothesis for hypothesis in hypotheses if len(hypothesis) == 2][0]
    # Through log_softmax: the gradient w.r.t. the logits equals the enumeration's.
    logits = old_logits.clone().requires_grad_(True)
    (through,) = torch.autograd.grad(ctc_log_probs(torch.log_softmax(logits, -1), [y])[0], logits)
    logits_bf = old_logits.clone().requires_grad_(True)
    (brute,) = torch.autograd.grad(brute_force_log_probs(torch.log_softmax(logits_bf, -1), [y])[0], logits_bf)
    torch.testing.assert_close(through, brute, atol=1e-5, rtol=1e-4)
    # A bare log-prob leaf: ctc_loss's gradient is gamma - p (of log p(y)), not gamma.
    leaf = torch.log_softmax(old_logits, -1).detach().requires_grad_(True)
    (bare,) = torch.autograd.grad(ctc_log_probs(leaf, [y])[0], leaf)
    gamma_leaf = leaf.detach().clone().requires_grad_(True)
    (gamma,) = torch.autograd.grad(brute_force_log_probs(gamma_leaf, [y])[0], gamma_leaf)  # true d log p(y)/d lp
    torch.testing.assert_close(bare, gamma - leaf.detach().exp(), atol=1e-5, rtol=1e-4)
    # Temperature keeps a log_softmax last.
    assert "LogSoftmax" in ctc.apply_temperature(torch.log_softmax(logits, -1), 1.3).grad_fn.name()


def test_the_policy_feeds_ctc_log_softmax_outputs(tiny_nemo):
    from rlnf.policy import CTCPolicy

    policy = CTCPolicy.load(tiny_nemo)
    policy.set_mode("update")
    audio = torch.randn(2, 8000)
    log_probs, _ = policy.forward(audio, torch.tensor([8000, 6000]))
    node, seen = log_probs.grad_fn, []
    while node is not None and "LogSoftmax" not in node.name() and len(seen) < 5:  # through slices and casts
        seen.append(node.name())
        node = node.next_functions[0][0]
    assert node is not None and "LogSoftmax" in node.name(), seen
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(log_probs.shape[:2]), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- PPO ratios
def test_per_frame_ratio_is_the_length_normalised_ratio_and_keeps_the_on_policy_gradient():
    old = torch.tensor([[-10.0, -12.0], [-30.0, -31.0]])
    new = torch.tensor([[-9.0, -12.5], [-29.0, -33.0]], requires_grad=True)
    frames = torch.tensor([50, 200])
    expected = torch.exp((new.detach() - old) / frames.unsqueeze(1))
    torch.testing.assert_close(algorithms.importance_ratio(new, old, frames), expected)
    torch.testing.assert_close(algorithms.importance_ratio(new, old), torch.exp(new.detach() - old))
    # On-policy, the per-frame loss has REINFORCE's gradient (w = T cancels the 1/T of the ratio).
    advantages = torch.tensor([[0.5, -1.0], [0.2, 0.3]])
    log_probs = old.clone().requires_grad_(True)
    loss, _ = algorithms.clipped_surrogate_loss(log_probs, old, advantages, 0.001, frames=frames)
    (per_frame,) = torch.autograd.grad(loss, log_probs)
    (reinforce,) = torch.autograd.grad(algorithms.reinforce_loss(log_probs, advantages), log_probs)
    torch.testing.assert_close(per_frame, reinforce)


def test_per_frame_ratio_clips_by_the_per_frame_drift():
    """A sequence log-ratio of 0.5 over 200 frames is a per-frame drift of 0.0025: the sequence ratio
    (1.65) is clipped at eps 0.2, the per-frame one (1.0025) is not at eps 0.005 but is at 0.002."""
    old = torch.zeros(1, 1)
    new = torch.full((1, 1), 0.5, requires_grad=True)
    frames, advantages = torch.tensor([200]), torch.ones(1, 1)
    _, sequence = algorithms.clipped_surrogate_loss(new, old, advantages, 0.2)
    assert sequence["high"] == 1
    _, loose = algorithms.clipped_surrogate_loss(new, old, advantages, 0.005, frames=frames)
    _, tight = algorithms.clipped_surrogate_loss(new, old, advantages, 0.002, frames=frames)
    assert loose["high"] == 0 and tight["high"] == 1


def test_clip_higher_and_the_clip_ratio_of_each_side():
    old = torch.zeros(1, 4)
    ratios = torch.tensor([[1.25, 1.25, 0.75, 0.9]])
    new = ratios.log().requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, -1.0, -1.0]])
    loss, symmetric = algorithms.clipped_surrogate_loss(new, old, advantages, 0.2)
    assert (symmetric["high"], symmetric["low"]) == (0.25, 0.25)  # 1.25 with A>0; 0.75 with A<0
    loss, higher = algorithms.clipped_surrogate_loss(new, old, advantages, 0.2, clip_eps_high=0.28)
    assert (higher["high"], higher["low"]) == (0.0, 0.25)  # clip-higher lets 1.25 with A > 0 through
    terms = torch.tensor([1.25 * 1.0, 1.25 * -1.0, 0.8 * -1.0, 0.9 * -1.0])
    assert loss.item() == pytest.approx(-terms.mean().item(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, new)
    assert grad[0, 0] != 0 and grad[0, 2] == 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_huge_log_ratios_give_a_finite_loss_and_gradient(sign):
    """log-ratio 100 overflowed before (inf loss for A < 0, NaN gradient for A > 0)."""
    old = torch.zeros(1, 2)
    new = torch.tensor([[100.0, -100.0]], requires_grad=True)
    for frames in (None, torch.tensor([1])):
        loss, _ = algorithms.clipped_surrogate_loss(new, old, torch.full((1, 2), sign), 0.2, frames=frames)
        (grad,) = torch.autograd.grad(loss, new)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    penalty = kl.k3_loss(new, old, torch.zeros(1, 2))
    (grad,) = torch.autograd.grad(penalty.sum(), new)
    assert torch.isfinite(penalty).all() and torch.isfinite(grad).all()


def test_long_utterances_clip_far_less_with_the_per_frame_ratio():
    """The review's case: 200 frames, per-frame KL 7e-4. Log-ratios of whole sequences then spread
    with std sqrt(2 * 200 * 7e-4) ~ 0.53: most sequence ratios leave [0.8, 1.2]; per frame, with
    a per-frame eps of 0.005, about 3 % do."""
    generator = torch.Generator().manual_seed(0)
    log_ratio = torch.randn(1, 20000, generator=generator) * math.sqrt(2 * 200 * 7e-4)
    advantages = torch.where(torch.rand(1, 20000, generator=generator) < 0.5, -1.0, 1.0)
    frames = torch.tensor([200])
    _, sequence = algorithms.clipped_surrogate_loss(log_ratio, torch.zeros_like(log_ratio), advantages, 0.2)
    _, per_frame = algorithms.clipped_surrogate_loss(log_ratio, torch.zeros_like(log_ratio), advantages, 0.005,
                                                     frames=frames)
    assert sequence["low"] + sequence["high"] > 0.3
    assert per_frame["low"] + per_frame["high"] < 0.05


# ------------------------------------------------------------------------------------- beta, whitening
def test_kl_controller_owns_beta():
    fixed = algorithms.KLController(0.05)
    fixed.update(10.0, 8)
    assert fixed.value == 0.05 and fixed.enabled
    adaptive = algorithms.KLController(0.05, target=0.5, horizon=16)
    adaptive.update(0.0, 4)
    assert adaptive.value == pytest.approx(algorithms.adaptive_kl_coef(0.05, 0.0, 0.5, 16, 4))
    restored = algorithms.KLController(0.05, target=0.5, horizon=16)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value
    assert not algorithms.KLController(0.0).enabled


def test_whitening_and_std_scaling_give_zero_on_rounding_noise():
    """Equal rewards up to float rounding gave a constant advantage of 0.4-0.85 before."""
    rewards = torch.full((4, 8), 0.7) + torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 1e-8
    (whitened,) = algorithms.whiten_together([algorithms.compute_advantages(rewards, "none")])
    assert torch.equal(whitened, torch.zeros_like(rewards))
    summed = algorithms.whiten(rewards, all_reduce_sum=lambda tensor: tensor)  # the multi-process form
    assert torch.equal(summed, torch.zeros_like(rewards))
    assert torch.equal(algorithms.group_advantages(rewards, scale_by_std=True), torch.zeros_like(rewards))
    varied = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    whitened = algorithms.whiten(varied)
    assert whitened.std().item() == pytest.approx(1.0, abs=1e-5)  # real spread still whitened


# ------------------------------------------------------------------------------------- accumulation
def test_micro_batch_weights_make_the_step_a_per_utterance_mean():
    from rlnf.distributed import micro_batch_weights

    assert micro_batch_weights([[3, 1]], 0) == [0.75, 0.25]
    # Two processes, two micro-batches each: world * n / N, so the DDP average of the accumulated
    # gradients weighs every utterance of the step by 1 / N.
    every = [[2, 1], [1, 2]]
    assert micro_batch_weights(every, 0) == pytest.approx([2 * 2 / 6, 2 * 1 / 6])
    per_utterance = [[w / n for w, n in zip(micro_batch_weights(every, rank), every[rank])] for rank in range(2)]
    assert all(weight / 2 == pytest.approx(1 / 6) for row in per_utterance for weight in row)


def test_accumulated_micro_batches_are_averaged_as_documented(corpus, pretrained_tiny_nemo, tmp_path, monkeypatch):
    """Through the recipe's step: micro-batches of 3 and 1 utterances count 3/4 and 1/4 (each the mean
    over its utterances), so the step's gradient is that of the mean over its 4 utterances."""
    import rlnf.rl as rl_module
    import rlnf.training as training
    from recipes.rl_finetune import RLFinetuneRecipe
    from rlnf.config import RLFinetuneConfig, load_config
    from rlnf.data.loader import collate

    overrides = [f"policy.path={pretrained_tiny_nemo}", f"data.train_manifest={corpus['train']}",
                 f"output_dir={tmp_path / 'run'}", "algorithm.name=grpo", "algorithm.num_samples=2",
                 "trainer.batch_size=3", "trainer.progress_bar=false", "trainer.max_grad_norm=null"]
    recipe = RLFinetuneRecipe(load_config(RLFinetuneConfig, None, overrides))
    recipe.setup()
    items = [recipe.stream.dataset[i] for i in range(4)]
    parameter = next(recipe.policy.model.parameters())

    def per_utterance_loss(policy, rollout, *args, **kwargs):  # loss = mean_b line_b * sum(parameter)
        lines = torch.tensor([float(u.line) for u in rollout.batch.utterances])
        return (lines * parameter.sum()).mean(), {}

    captured = []
    monkeypatch.setattr(rl_module, "rl_loss", per_utterance_loss)
    monkeypatch.setattr(training, "clip_gradients", lambda params, norm: captured.append(parameter.grad.clone()) or 0.0)
    recipe.train_step([collate(items[:3]), collate(items[3:])])
    lines = [utterance.line for _, utterance in items]
    expected = sum(lines) / 4
    torch.testing.assert_close(captured[0], torch.full_like(parameter, float(expected)))


# ------------------------------------------------------------------------------------- reference cache
class FrozenReference:
    """A stand-in reference: fixed log-probs per frame count; records its batch sizes."""

    def __init__(self):
        self.calls = []

    def forward(self, audio, audio_len):
        self.calls.append(len(audio))
        frames = audio_len // 100
        log_probs = torch.log_softmax(torch.arange(int(frames.max()) * 4.0).reshape(1, -1, 4).repeat(len(audio), 1, 1)
                                      / 10, -1)
        return log_probs, frames


def test_a_cached_entry_of_another_length_is_recomputed_not_padded(caplog):
    """An audio file that changed on disk mid-run (another frame count) used to be padded with
    log(1/V) from the stale entry: 2.4 nats of spurious KL. Now the entry is dropped and recomputed."""
    import contextlib

    from rlnf.data.loader import AudioBatch
    from rlnf.reference import ReferenceCache, reference_log_probs

    reference, cache = FrozenReference(), ReferenceCache(2**20)
    batch = AudioBatch(torch.zeros(1, 1000), torch.tensor([1000]), utterances=[None])
    first = reference_log_probs(reference, batch, torch.tensor([10]), 10, contextlib.nullcontext, cache, ["m.json:1"])
    assert first.shape == (1, 10, 4) and reference.calls == [1]
    longer = AudioBatch(torch.zeros(1, 1500), torch.tensor([1500]), utterances=[None])
    with caplog.at_level("WARNING"):
        second = reference_log_probs(reference, longer, torch.tensor([15]), 15, contextlib.nullcontext, cache,
                                     ["m.json:1"])
    assert reference.calls == [1, 1] and "m.json:1" in caplog.text and "changed" in caplog.text
    fresh = reference.forward(longer.audio, longer.audio_len)[0]
    torch.testing.assert_close(second, fresh)
    assert (cache.hits, cache.misses) == (0, 2) and cache.get("m.json:1", 15) is not None


# ------------------------------------------------------------------------------------- MWER
@pytest.mark.parametrize("complete", [False, True])
def test_mwer_gradient_is_the_gradient_of_the_renormalised_expected_reward(toy, complete):
    """Against enumeration: for a list of distinct transcripts (repeats masked out) the MWER loss's
    gradient is -grad sum_list pi(y) r(y) / sum_list pi(y); for the complete list, -grad E_pi[r]."""
    frames, old_logits, _, _, hypotheses = toy
    chosen = hypotheses if complete else [hypotheses[i] for i in (0, 3, 5, 8)]
    listed = chosen + [chosen[1]]  # a repeat, as a short beam is padded
    generator = torch.Generator().manual_seed(1)
    reward_of = {y: float(torch.rand((), generator=generator)) for y in hypotheses}
    rewards = torch.tensor([[reward_of[y] for y in listed]])
    distinct = torch.tensor([[True] * len(chosen) + [False]])
    logits = old_logits.clone().requires_grad_(True)
    log_p = ctc_log_probs(torch.log_softmax(logits, -1), listed).unsqueeze(0)
    advantages = algorithms.group_advantages(rewards, scale_by_std=False)
    (grad,) = torch.autograd.grad(algorithms.mwer_loss(log_p, advantages, distinct), logits)
    logits_bf = old_logits.clone().requires_grad_(True)
    probabilities = brute_force_log_probs(torch.log_softmax(logits_bf, -1), chosen).exp()
    risk = (probabilities * torch.tensor([reward_of[y] for y in chosen])).sum() / probabilities.sum()
    (expected,) = torch.autograd.grad(-risk, logits_bf)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
    assert expected.norm() > 1e-3
    if complete:
        assert float(probabilities.sum()) == pytest.approx(1.0, abs=1e-5)


def test_nbest_is_the_top_k_of_the_enumeration(tiny_nemo):
    """NeMo's batched CTC prefix beam search, as the policy calls it, returns the K most likely
    transcripts (exact here: few frames, a beam wider than the hypotheses that matter)."""
    from rlnf.policy import CTCPolicy

    policy = CTCPolicy.load(tiny_nemo)
    vocabulary = policy.blank_id + 1
    generator = torch.Generator().manual_seed(0)
    logits = torch.full((1, 3, vocabulary), -30.0)
    logits[0, :, [0, 1, policy.blank_id]] = torch.randn(3, 3, generator=generator)  # labels 0, 1 and blank
    log_probs = torch.log_softmax(logits, -1)
    best = policy.nbest(log_probs, torch.tensor([3]), 4)
    assert ctc.first_occurrences(best.labels, best.label_len).all()
    small = torch.log_softmax(logits[0][:, [0, 1, policy.blank_id]], -1)
    everything = hypotheses_of(3)
    exact = brute_force_log_probs(small, everything)
    top = [everything[i] for i in exact.argsort(descending=True)[:4].tolist()]
    found = [tuple(best.labels[0, k, : int(best.label_len[0, k])].tolist()) for k in range(4)]
    assert found == top


def test_first_occurrences_marks_repeated_label_sequences():
    labels = torch.tensor([[[1, 2], [3, 0], [1, 2]], [[4, 0], [4, 0], [4, 9]]])
    label_len = torch.tensor([[2, 1, 2], [1, 1, 1]])  # [4, 9] has length 1: the same sequence as [4]
    assert ctc.first_occurrences(labels, label_len).tolist() == [[True, True, False], [True, False, False]]


def test_beam_rollouts_need_the_mwer_loss_and_the_exact_kl():
    from rlnf.config import RLFinetuneConfig, load_config
    from rlnf.errors import ConfigError

    required = ["policy.path=m.nemo", "data.train_manifest=t.json", "output_dir=o"]
    cfg = load_config(RLFinetuneConfig, None, required + ["algorithm.name=mwer"])
    assert (cfg.algorithm.rollout, cfg.algorithm.policy_loss, cfg.algorithm.kl_estimator) == ("nbest", "mwer", "exact")
    for extra, message in [(["algorithm.name=grpo", "algorithm.rollout=nbest"], "policy_loss=mwer"),
                           (["algorithm.name=mwer", "algorithm.kl_estimator=k3"], "kl_estimator=exact"),
                           (["algorithm.name=mwer", "algorithm.resample_zero_std=2"], "rollout=sample")]:
        with pytest.raises(ConfigError, match=message):
            load_config(RLFinetuneConfig, None, required + extra)
    mixed = load_config(RLFinetuneConfig, None, required + ["algorithm.name=mwer", "algorithm.rollout=mixed"])
    assert mixed.algorithm.rollout == "mixed"
