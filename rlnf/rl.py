"""The RL step for CTC policies: rollout, then loss. Reads top to bottom like the docs' Algorithms
page; the math lives in ``rlnf.ctc``, ``rlnf.algorithms`` and ``rlnf.kl``.

Rollout (``make_rollout``, no update yet):
  1. one encoder pass: log-probs [B, T, V] of pi_tau = softmax(logits / tau)
  2. the frozen reference's log-probs on the same batch (from a per-utterance cache where it can)
  3. K hypotheses per utterance from a ``HypothesisSource`` (samples, a beam's N-best, or both),
     and the greedy hypothesis
  4. judge them (``judge``): rewards (the greedy hypothesis joins its group for the self-critical
     baseline), log pi(y) and log pi_ref(y), the KL penalty per sample, the shaped rewards
     (r - beta * KL when the penalty goes in the reward), advantages within each group of K
  5. optionally re-draw the groups whose advantages are all 0 (``resample``)

Between rollout and loss the recipe may whiten the step's advantages (``algorithms.whiten_together``).

Loss (``rl_loss``, one call per update epoch):
  policy-gradient term (REINFORCE, PPO-clipped or MWER) + beta * KL (when the penalty is a loss term)
  - entropy bonus + lambda * supervised CTC on references (when configured).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Sequence

import torch

from rlnf import algorithms, ctc
from rlnf.data.loader import AudioBatch
from rlnf.hypotheses import HypothesisSource, hypothesis_source
from rlnf.kl import PENALISED_METRIC, KLInputs, KLPenalty
from rlnf.policy import CTCPolicy, Samples, labels_to_padded
from rlnf.reference import ReferenceCache, reference_log_probs
from rlnf.rewards import RewardInputs, RewardSet


@dataclass(frozen=True)
class StepContext:
    """What one training step adds to a rollout besides the models, the batch and the algorithm."""

    beta: float  # this step's KL coefficient (the recipe's KLController owns it)
    sample_keys: Sequence[Sequence[int]] | None = None  # per-utterance sampling keys (see sampling_uniforms)
    generator: torch.Generator | None = None  # draws for the whole batch when there are no keys
    reference_cache: ReferenceCache | None = None
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    keep_graph: bool = False  # the rollout's forward keeps its graph for an on-policy update to re-use


@dataclass(frozen=True)
class PolicyPass:
    """One forward of the policy on a batch. raw_log_probs [B, T, V] at tau = 1 (the supervised term),
    log_probs [B, T, V] at tau, encoded_len [B], and log pi_tau(y) [B, K] of the rollout's hypotheses.
    Carries the autograd graph when it was made for the update."""

    raw_log_probs: torch.Tensor
    log_probs: torch.Tensor
    encoded_len: torch.Tensor
    seq_log_probs: torch.Tensor | None = None


@dataclass(frozen=True)
class Judged:
    """A batch's K hypotheses per utterance and what the update needs about them, [B, K] unless noted.
    ``seq_log_probs`` carries the rollout forward's graph when it was kept; the rest has none."""

    samples: Samples
    rewards: torch.Tensor  # total task reward (weighted sum), before any KL shaping
    components: dict[str, torch.Tensor]
    greedy_rewards: torch.Tensor | None  # [B], self-critical baseline only
    seq_log_probs: torch.Tensor
    ref_seq_log_probs: torch.Tensor | None
    penalised: torch.Tensor | None  # the KL penalty per sample (reduced), when there is a reference
    advantages: torch.Tensor

    def with_rows(self, rows: Sequence[int], other: "Judged") -> "Judged":
        """These groups with utterances ``rows`` replaced by ``other``'s (one row of ``other`` each)."""
        def merge(mine: torch.Tensor | None, theirs: torch.Tensor | None) -> torch.Tensor | None:
            if mine is None:
                return None
            merged = mine.clone()
            merged[list(rows)] = theirs
            return merged

        return Judged(samples=self.samples.with_rows(rows, other.samples),
                      rewards=merge(self.rewards, other.rewards),
                      components={k: merge(v, other.components[k]) for k, v in self.components.items()},
                      greedy_rewards=self.greedy_rewards, seq_log_probs=merge(self.seq_log_probs, other.seq_log_probs),
                      ref_seq_log_probs=merge(self.ref_seq_log_probs, other.ref_seq_log_probs),
                      penalised=merge(self.penalised, other.penalised), advantages=merge(self.advantages, other.advantages))


@dataclass(frozen=True)
class Rollout:
    """Everything the update needs about one micro-batch, without autograd graphs. [B, K] unless noted."""

    batch: AudioBatch
    samples: Samples
    greedy: Samples
    encoded_len: torch.Tensor  # [B]
    old_log_probs: torch.Tensor  # log pi_old(y)
    rewards: torch.Tensor  # total task reward, before any KL shaping
    reward_components: dict[str, torch.Tensor]
    advantages: torch.Tensor
    penalty: KLPenalty  # the KL penalty that shaped the rewards; the loss applies the same one
    ref_frame_log_probs: torch.Tensor | None = None  # [B, T, V] at tau
    ref_seq_log_probs: torch.Tensor | None = None  # log pi_ref(y), for the sequence-level KL estimators
    greedy_rewards: torch.Tensor | None = None  # [B]
    distinct: torch.Tensor | None = None  # [B, K] first occurrence of each label sequence (MWER's list)
    metrics: dict[str, float] = field(default_factory=dict)

    def with_advantages(self, advantages: torch.Tensor) -> "Rollout":
        """This rollout with new advantages (whitened over the step) and their metrics."""
        return dataclasses.replace(self, advantages=advantages, metrics={**self.metrics, **advantage_metrics(advantages)})


# ------------------------------------------------------------------------------------- the rollout
def make_rollout(policy: CTCPolicy, reference: CTCPolicy | None, rewards: RewardSet, batch: AudioBatch, algo,
                 step: StepContext) -> tuple[Rollout, PolicyPass | None]:
    """Steps 1-5 above on one micro-batch. Returns the rollout and, when ``step.keep_graph``, the
    forward pass with its graph, for the first (on-policy) update to re-use: ``rl_loss(current=...)``."""
    penalty = KLPenalty.from_config(algo)
    policy.set_mode("rollout")
    # 1. One encoder pass for all K hypotheses.
    current = policy_pass(policy, batch, algo.temperature, step.autocast, step.keep_graph)
    frames = current.log_probs.detach()
    # 2. The frozen reference on the same frames.
    ref_log_probs, metrics = None, {}
    if reference is not None:
        ref_log_probs, metrics = reference_pass(reference, batch, current.encoded_len, frames.shape[1], algo.temperature,
                                                step)
    # 3. The hypotheses.
    source = hypothesis_source(algo.rollout, algo.num_samples)
    samples = source.draw(policy, frames, current.encoded_len, step.sample_keys, step.generator)
    greedy = policy.greedy(frames, current.encoded_len)
    # 4. Rewards, log-probs, KL, shaped rewards, advantages. The exact KL per utterance (logged as "kl"
    # whatever the estimator) is computed once here; the exact estimator's penalty re-uses it.
    exact = None if ref_log_probs is None else ctc.exact_kl(frames, ref_log_probs, current.encoded_len)
    inputs = KLInputs(current.log_probs, ref_log_probs, current.encoded_len, exact=exact)
    judge = Judge(policy, rewards, algo, penalty, step.beta)
    judged = judge(batch, inputs, samples, greedy)
    # 5. Dynamic resampling of the groups that teach nothing.
    if algo.resample_zero_std > 0:
        started = time.perf_counter()
        metrics["rollout/frac_uninformative_before"] = float(algorithms.uninformative_groups(judged.advantages).float().mean())
        judged = resample(judge, source, batch, inputs, judged, greedy, step, algo.resample_zero_std)
        metrics["perf/resample_time"] = time.perf_counter() - started

    if judged.greedy_rewards is not None:
        metrics["reward/greedy_mean"] = float(judged.greedy_rewards.mean())
    distinct = None
    if algo.policy_loss == "mwer":
        distinct = ctc.first_occurrences(judged.samples.labels, judged.samples.label_len)
        metrics["mwer/list_mass"] = float(list_mass(judged.seq_log_probs.detach(), distinct).mean())
    metrics.update(rollout_metrics(judged, frames, current.encoded_len, policy.blank_id, exact))
    rollout = Rollout(batch=batch, samples=judged.samples, greedy=greedy, encoded_len=current.encoded_len,
                      old_log_probs=judged.seq_log_probs.detach(), rewards=judged.rewards,
                      reward_components=judged.components, advantages=judged.advantages,
                      ref_frame_log_probs=ref_log_probs, ref_seq_log_probs=judged.ref_seq_log_probs,
                      greedy_rewards=judged.greedy_rewards, distinct=distinct, metrics=metrics, penalty=penalty)
    live = dataclasses.replace(current, seq_log_probs=judged.seq_log_probs) if step.keep_graph else None
    return rollout, live


def policy_pass(policy: CTCPolicy, batch: AudioBatch, temperature: float, autocast: Callable[[], ContextManager],
                keep_graph: bool) -> PolicyPass:
    """The policy's log-probs on ``batch`` at tau = 1 and at ``temperature`` (float32)."""
    with torch.set_grad_enabled(keep_graph), autocast():
        raw_log_probs, encoded_len = policy.forward(batch.audio, batch.audio_len)
    raw_log_probs = raw_log_probs.float()
    return PolicyPass(raw_log_probs, ctc.apply_temperature(raw_log_probs, temperature), encoded_len)


def reference_pass(reference: CTCPolicy, batch: AudioBatch, encoded_len: torch.Tensor, frames: int, temperature: float,
                   step: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
    """The reference's log-probs at ``temperature``, [B, frames, V], and the cache's hit rate."""
    cache = step.reference_cache
    hits_before = cache.hits if cache is not None else 0
    keys = [u.where for u in batch.utterances] if cache is not None else None
    raw = reference_log_probs(reference, batch, encoded_len, frames, step.autocast, cache, keys)
    metrics = {} if cache is None else {"perf/ref_cache_hit_rate": (cache.hits - hits_before) / max(1, len(batch))}
    return ctc.apply_temperature(raw, temperature), metrics


@dataclass(frozen=True)
class Judge:
    """Step 4: turns hypotheses into rewards, log-probs, KL penalties and advantages, for a whole
    batch or for the groups being re-drawn."""

    policy: CTCPolicy
    rewards: RewardSet
    algo: Any
    penalty: KLPenalty
    beta: float

    def __call__(self, batch: AudioBatch, frames: KLInputs, samples: Samples, greedy: Samples,
                 greedy_rewards: torch.Tensor | None = None) -> Judged:
        """``frames``: the policy's (maybe with graph) and the reference's (or None) frame log-probs.
        The self-critical baseline scores ``greedy`` with the samples, unless its ``greedy_rewards``
        [B] are already known (re-drawn groups keep their baseline)."""
        algo = self.algo
        to_score = greedy if algo.advantage == "self_critical" and greedy_rewards is None else None
        rewards, components, scored_greedy = score(self.rewards, batch, self.policy.sample_rate, samples, to_score)
        greedy_rewards = scored_greedy if to_score is not None else greedy_rewards
        # Rewards come back on the CPU (RewardSet); the KL, advantages and loss live with the log-probs.
        device = frames.log_probs.device
        rewards = rewards.to(device)
        greedy_rewards = None if greedy_rewards is None else greedy_rewards.to(device)
        seq_log_probs = ctc.distinct_sequence_log_probs(frames.log_probs, frames.encoded_len, samples.labels,
                                                        samples.label_len, self.policy.blank_id)
        ref_seq_log_probs = penalised = None
        shaped = rewards
        if frames.ref_log_probs is not None:
            if self.penalty.needs_sequence_reference:
                with torch.no_grad():
                    ref_seq_log_probs = ctc.distinct_sequence_log_probs(frames.ref_log_probs, frames.encoded_len,
                                                                        samples.labels, samples.label_len,
                                                                        self.policy.blank_id)
            penalised = self.penalty.value(dataclasses.replace(frames, seq_log_probs=seq_log_probs,
                                                               ref_seq_log_probs=ref_seq_log_probs))
            shaped = self.penalty.shape(rewards, penalised, self.beta)
        advantages = algorithms.compute_advantages(shaped, algo.advantage, greedy_rewards=greedy_rewards,
                                                   scale_by_std=algo.scale_by_std)
        return Judged(samples, rewards, components, greedy_rewards, seq_log_probs, ref_seq_log_probs, penalised,
                      advantages)


def score(reward_set: RewardSet, batch: AudioBatch, sample_rate: int, samples: Samples,
          greedy: Samples | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
    """Rewards [B, K] of the hypotheses, their components, and the greedy hypotheses' rewards [B] when
    ``greedy`` is given: it joins its group in the same call, so a learned reward embeds each
    utterance's audio once. References reach only the rewards that need them."""
    groups = samples.texts if greedy is None else [texts + g for texts, g in zip(samples.texts, greedy.texts)]
    inputs = RewardInputs(audio=batch.audio, audio_len=batch.audio_len, sample_rate=sample_rate, hypotheses=groups,
                          references=batch.references, metadata=[u.fields for u in batch.utterances])
    rewards, components = reward_set(inputs)
    if greedy is None:
        return rewards, components, None
    k = samples.label_len.shape[1]
    return rewards[:, :k], {label: values[:, :k] for label, values in components.items()}, rewards[:, k]


def resample(judge: Judge, source: HypothesisSource, batch: AudioBatch, frames: KLInputs, judged: Judged,
             greedy: Samples, step: StepContext, tries: int) -> Judged:
    """Dynamic resampling: re-draw, up to ``tries`` times, the K samples of each group whose
    advantages are all 0 (``algorithms.uninformative_groups``: the criterion the advantages use), from
    the same (tempered) frame distributions, so no encoder pass and no importance weight is needed.

    A group is kept at the first draw that carries gradient (or the last one). Conditioning on an
    informative draw scales each utterance's expected gradient by 1 / P(informative), its direction
    unchanged (the same bias as DAPO's dynamic sampling): a degenerate group's gradient is 0 anyway.
    Re-draw n of utterance b uses the key ``sample_keys[b] + (n,)``."""
    for attempt in range(1, tries + 1):
        rows = algorithms.uninformative_groups(judged.advantages).nonzero().flatten().tolist()
        if not rows:
            break
        index = torch.tensor(rows, device=frames.encoded_len.device)
        sub = KLInputs(frames.log_probs[index], None if frames.ref_log_probs is None else frames.ref_log_probs[index],
                       frames.encoded_len[index], exact=None if frames.exact is None else frames.exact[index])
        keys = None if step.sample_keys is None else [step.sample_keys[b] for b in rows]
        fresh = source.draw(judge.policy, sub.log_probs.detach(), sub.encoded_len, keys, step.generator, attempt)
        known = None if judged.greedy_rewards is None else judged.greedy_rewards[index]
        judged = judged.with_rows(rows, judge(batch.subset(rows), sub, fresh, greedy.select(rows), known))
    return judged


def list_mass(seq_log_probs: torch.Tensor, distinct: torch.Tensor) -> torch.Tensor:
    """pi's total probability on each utterance's list of distinct hypotheses, [B]."""
    return torch.logsumexp(seq_log_probs.masked_fill(~distinct, float("-inf")), dim=1).exp()


def advantage_metrics(advantages: torch.Tensor) -> dict[str, float]:
    return {"advantage/mean": float(advantages.mean()),
            "advantage/std": float(advantages.std()) if advantages.numel() > 1 else 0.0}


def rollout_metrics(judged: Judged, frames: torch.Tensor, encoded_len: torch.Tensor, blank_id: int,
                    exact: torch.Tensor | None) -> dict[str, float]:
    """The rollout's logged metrics (see the docs' Monitoring page); ``exact``: the exact KL to the
    reference per utterance [B], None without a reference."""
    rewards, samples = judged.rewards, judged.samples
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    unique = [len(set(group)) / len(group) for group in samples.texts]
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        **{f"reward/{label}/mean": float(values.mean()) for label, values in judged.components.items()},
        **advantage_metrics(judged.advantages),
        "entropy": float(ctc.frame_entropy(frames, encoded_len).mean()),
        "rollout/hyp_len": float(samples.label_len.float().mean()),
        "rollout/blank_ratio": ctc.blank_share(frames, encoded_len, blank_id),
        "rollout/empty_ratio": float((samples.label_len == 0).float().mean()),
        "rollout/log_prob": float(judged.seq_log_probs.detach().mean()),
        "rollout/frac_zero_std": float((spread <= 1e-8).float().mean()),
        "rollout/frac_uninformative": float(algorithms.uninformative_groups(judged.advantages).float().mean()),
        "rollout/unique_ratio": sum(unique) / len(unique),
        "reward/group_spread": float(spread.mean()),
    }
    if exact is not None:
        metrics["kl"] = float(exact.mean())
        metrics["kl/per_frame"] = float((exact / encoded_len.clamp(min=1)).mean())
        metrics[PENALISED_METRIC] = float(judged.penalised.mean())
        if judged.ref_seq_log_probs is not None:
            seq = judged.seq_log_probs.detach()
            metrics["kl/k1"] = float(ctc.kl_k1(seq, judged.ref_seq_log_probs).mean())
            metrics["kl/k3"] = float(ctc.kl_k3(seq, judged.ref_seq_log_probs).mean())
    return metrics


# ------------------------------------------------------------------------------------- the loss
def reference_targets(policy: CTCPolicy, batch: AudioBatch, oov: str, lowercase: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """References as CTC targets for the supervised term (None when any utterance lacks one)."""
    sequences = []
    for utterance in batch.utterances:
        if utterance.text is None:
            return None
        ids = policy.encode_text(utterance.text, oov=oov, where=utterance.where, lowercase=lowercase)
        if ids is None:
            return None
        sequences.append(ids)
    return labels_to_padded(sequences, device=batch.audio.device)


def rl_loss(policy: CTCPolicy, rollout: Rollout, algo, beta: float, current: PolicyPass | None = None,
            supervised_targets: tuple[torch.Tensor, torch.Tensor] | None = None,
            autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one update epoch on one rollout, and its metrics.

    loss = L_pg + beta * KL (when the penalty is a loss term) - c_H * H + lambda * L_ctc(references)

    ``current``: the rollout's own forward pass with its graph (``make_rollout``'s second result), for
    the on-policy first epoch; None runs a new forward (later PPO epochs, or a policy whose modules
    act differently in the update: BatchNorm in training mode, dropout)."""
    if current is None:
        current = policy_pass(policy, rollout.batch, algo.temperature, autocast, keep_graph=True)
        current = dataclasses.replace(current, seq_log_probs=ctc.distinct_sequence_log_probs(
            current.log_probs, current.encoded_len, rollout.samples.labels, rollout.samples.label_len, policy.blank_id))
    log_probs, encoded_len, seq_log_probs = current.log_probs, current.encoded_len, current.seq_log_probs
    # Policy-gradient term.
    clip = {"low": torch.zeros(()), "high": torch.zeros(())}
    frames = encoded_len if algo.ratio == "per_frame" else None  # the ratio's length normalisation
    if algo.policy_loss == "clipped":
        loss_policy, clip = algorithms.clipped_surrogate_loss(seq_log_probs, rollout.old_log_probs, rollout.advantages,
                                                              algo.clip_eps, algo.clip_eps_high, frames)
    elif algo.policy_loss == "mwer":
        loss_policy = algorithms.mwer_loss(seq_log_probs, rollout.advantages, rollout.distinct)
    else:
        loss_policy = algorithms.reinforce_loss(seq_log_probs, rollout.advantages)
    # KL penalty as a loss term (0 when it went into the reward).
    loss_kl = torch.zeros((), device=log_probs.device)
    if rollout.ref_frame_log_probs is not None:
        inputs = KLInputs(log_probs, rollout.ref_frame_log_probs, encoded_len, seq_log_probs, rollout.ref_seq_log_probs)
        eps_high = algo.clip_eps if algo.clip_eps_high is None else algo.clip_eps_high
        loss_kl = rollout.penalty.loss(inputs, rollout.old_log_probs, beta, max_weight=1.0 + eps_high)
    # Entropy bonus (with its graph only when it is part of the loss) and supervised term.
    with torch.set_grad_enabled(algo.entropy_coef > 0 and torch.is_grad_enabled()):
        entropy = ctc.frame_entropy(log_probs, encoded_len).mean()
    loss = loss_policy + loss_kl - algo.entropy_coef * entropy
    ratio = algorithms.importance_ratio(seq_log_probs.detach(), rollout.old_log_probs, frames)
    metrics = {"loss/policy": float(loss_policy.detach()), "loss/kl": float(loss_kl.detach()),
               "ppo/clip_ratio": float(clip["low"] + clip["high"]), "ppo/clip_ratio_low": float(clip["low"]),
               "ppo/clip_ratio_high": float(clip["high"]), "ppo/ratio_mean": float(ratio.mean())}
    if algo.supervised_coef > 0 and supervised_targets is not None:
        loss_supervised, infeasible = supervised_loss(current, supervised_targets, policy.blank_id)
        metrics["train/infeasible"] = infeasible
        loss = loss + algo.supervised_coef * loss_supervised
        metrics["loss/supervised"] = float(loss_supervised.detach())
    metrics["loss/total"] = float(loss.detach())
    return loss, metrics


def supervised_loss(current: PolicyPass, targets: tuple[torch.Tensor, torch.Tensor], blank_id: int,
                    ) -> tuple[torch.Tensor, float]:
    """-mean_b log pi_1(reference_b) at tau = 1, and the share of CTC-infeasible references.

    Only feasible references count: an infeasible one has an infinite loss and NaN gradients. The
    mean is over all utterances (infeasible ones add 0), like every other term, so the loss stays a
    per-utterance mean that multi-process runs can weight by utterance count."""
    labels, label_len = targets
    encoded_len = current.encoded_len
    feasible = ctc.min_frames(labels, label_len) <= encoded_len
    if not feasible.any():
        return torch.zeros((), device=current.raw_log_probs.device), float((~feasible).float().mean())
    ref_log_probs = ctc.sequence_log_probs(current.raw_log_probs[feasible], encoded_len[feasible],
                                           labels[feasible].unsqueeze(1), label_len[feasible].unsqueeze(1), blank_id)
    return -ref_log_probs.sum() / len(labels), float((~feasible).float().mean())
