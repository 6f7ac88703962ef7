"""The RL step for CTC policies: rollout, then loss. Reads top to bottom like the README's
"Algorithms" section; all the math lives in ``rlnf.ctc`` and ``rlnf.algorithms``.

Rollout (no update yet):
  1. one encoder pass: log-probs [B, T, V] of pi_tau = softmax(logits / tau)
  2. sample K alignments per utterance, collapse them to hypotheses (or take a prefix beam search's K
     best, or both: algorithm.rollout); greedy hypothesis too
  3. rewards of the K hypotheses (and of the greedy one for the self-critical baseline); groups
     whose K rewards are all equal are optionally re-drawn from the same frame distributions
  4. log pi(y) of each distinct hypothesis (marginal over alignments) -> old log-probs
  5. reference policy (frozen) log-probs, when the KL coefficient is > 0 (from a per-utterance
     cache when the utterance was seen before: the reference is frozen and deterministic)
  6. optionally fold -beta * k1 into each sample's reward
  7. advantages from the group of K

Loss (one call per update epoch):
  policy-gradient term (REINFORCE or PPO-clipped) + beta * KL (unless folded into the reward)
  - entropy bonus + lambda * supervised CTC on references (when configured).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from rlnf import algorithms, ctc
from rlnf.data.loader import AudioBatch
from rlnf.errors import DataError
from rlnf.policy import CTCPolicy, Samples, batch_dependence, first_occurrences, labels_to_padded
from rlnf.rewards import RewardInputs, RewardSet

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """Everything the update needs about one batch. Shapes: [B, K] unless noted."""

    batch: AudioBatch
    samples: Samples
    greedy: Samples
    encoded_len: torch.Tensor  # [B]
    old_log_probs: torch.Tensor  # log pi_old(y), detached
    rewards: torch.Tensor  # total task reward (weighted sum), before any KL shaping
    reward_components: dict[str, torch.Tensor]
    advantages: torch.Tensor
    ref_frame_log_probs: torch.Tensor | None = None  # [B, T, V]
    ref_seq_log_probs: torch.Tensor | None = None  # log pi_ref(y)
    greedy_rewards: torch.Tensor | None = None  # [B]
    distinct: torch.Tensor | None = None  # [B, K] first occurrence of each transcript (MWER's list)
    frame_log_probs: torch.Tensor | None = None  # [B, T, V] with graph, when the update re-uses the rollout pass
    seq_log_probs: torch.Tensor | None = None  # [B, K] with graph, likewise
    raw_log_probs: torch.Tensor | None = None  # [B, T, V] at tau = 1, with graph (supervised term)
    metrics: dict[str, float] = field(default_factory=dict)


def _kl_reduce(kl: torch.Tensor, encoded_len: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sum over frames as is, or divide by the number of frames ('mean'). kl [B] or [B, K]."""
    if reduction == "sum":
        return kl
    frames = encoded_len.clamp(min=1).to(kl.dtype)
    return kl / (frames if kl.dim() == 1 else frames.unsqueeze(1))


def group_stats(rewards: torch.Tensor, texts: list[list[str]]) -> dict[str, float]:
    """Diagnostics of the K-sample groups: zero-spread groups and diversity."""
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    unique = [len(set(group)) / len(group) for group in texts]
    return {
        "rollout/frac_zero_std": float(zero_spread(rewards).float().mean()),
        "rollout/unique_ratio": sum(unique) / len(unique),
        "reward/group_spread": float(spread.mean()),
    }


def sampling_uniforms(keys: Sequence[Sequence[int]], encoded_len: torch.Tensor, num_samples: int,
                      frames: int | None = None) -> torch.Tensor:
    """Uniform draws [B, K, T] for ``ctc.sample_alignments``, one independent stream per utterance.

    Row b depends only on ``keys[b]`` (e.g. (seed, step, micro-batch, manifest line)) and its own
    ``encoded_len[b]``: an utterance gets the same samples whatever else shares its batch, how the
    batch is padded, and how a global batch is split over processes. Frames past encoded_len are 0.
    """
    lengths = encoded_len.tolist()
    frames = int(max(lengths, default=0)) if frames is None else frames
    uniforms = torch.zeros(len(lengths), num_samples, frames)
    for row, (key, length) in enumerate(zip(keys, lengths)):
        seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0])
        generator = torch.Generator().manual_seed(seed)
        uniforms[row, :, :length] = torch.rand(num_samples, int(length), generator=generator)
    return uniforms.to(encoded_len.device)


class ReferenceCache:
    """The frozen reference's log-probs per utterance (its valid frames only, float32, on the CPU),
    least recently used first out beyond ``max_bytes``.

    The reference runs in eval mode on the same audio every time it meets an utterance, so from the
    second epoch on its forward can be skipped (as TRL's ``precompute_ref_log_probs``). That needs a
    clip's outputs not to depend on the rest of its batch beyond float rounding (masked convolutions,
    attention with padding masks): ``checked_reference_cache`` measures it before making one."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[object, torch.Tensor] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: object, frames: int) -> torch.Tensor | None:
        """The entry for ``key`` if it holds ``frames`` frames. An entry of another length means the
        audio changed on disk since it was cached: it is dropped (a miss), with a warning."""
        entry = self._entries.get(key)
        if entry is not None and entry.shape[0] != frames:
            log.warning("%s: the reference's cached log-probs have %d frames but the audio now gives %d (the file "
                        "changed during the run); recomputing them", key, entry.shape[0], frames)
            self._entries.pop(key)
            self.bytes -= entry.numel() * entry.element_size()
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: object, log_probs: torch.Tensor) -> None:
        size = log_probs.numel() * log_probs.element_size()
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.numel() * old.element_size()
        while self._entries and self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = log_probs
        self.bytes += size


# Largest batch dependence (nats, ``batch_dependence``) the reference cache accepts: float32 rounding
# of the supported families is ~1e-6 (README "Model families"); a forward whose padding leaks into a
# clip's output (an unmasked convolution or pooling) differs by orders of magnitude more.
CACHE_TOLERANCE = 1e-3


def checked_reference_cache(reference: CTCPolicy, dataset, max_bytes: int, clips: int = 2) -> ReferenceCache | None:
    """A ``ReferenceCache`` of ``max_bytes`` when the reference's log-probs of a clip do not depend on the
    rest of its batch, measured with ``batch_dependence`` on the first ``clips`` readable items of
    ``dataset`` (an ``AudioDataset``); None, with a warning, when they do (the cache would serve a
    clip's log-probs from another batch's padding)."""
    audio = []
    for index in range(min(len(dataset), 32 * clips)):  # a few readable clips; the rest is training's
        try:
            item = dataset[index]
        except DataError:  # a bad clip is reported when training reaches it, with a checkpoint
            continue
        if item is not None:
            audio.append(torch.from_numpy(item[0]))
        if len(audio) == clips:
            break
    if not audio:
        return ReferenceCache(max_bytes)
    difference = batch_dependence(reference, audio)
    log.info("reference log-probs' batch dependence: %.2e nats (cache tolerance %.0e)", difference, CACHE_TOLERANCE)
    if difference > CACHE_TOLERANCE:
        log.warning("the reference's log-probs of a clip depend on the rest of its batch (largest difference %.3g "
                    "nats > %g, e.g. padding reaching an unmasked layer): the reference cache is off and the "
                    "reference runs every step (algorithm.reference_cache_mb=0 silences this)",
                    difference, CACHE_TOLERANCE)
        return None
    return ReferenceCache(max_bytes)


def reference_log_probs(reference: CTCPolicy, batch: AudioBatch, encoded_len: torch.Tensor, frames: int,
                        autocast, cache: ReferenceCache | None = None,
                        keys: Sequence[object] | None = None) -> torch.Tensor:
    """The reference's log-probs at tau = 1, [B, frames, V] float32 (frames past an utterance's
    ``encoded_len`` hold log(1/V) and are never read). With a cache, only the utterances it lacks go
    through the reference, as one smaller batch; their outputs are stored under ``keys``."""
    cached = [None] * len(batch) if cache is None else [
        cache.get(key, length) for key, length in zip(keys, encoded_len.tolist())]
    missing = [b for b, entry in enumerate(cached) if entry is None]
    if missing:
        sub = batch if len(missing) == len(batch) else batch.subset(missing)
        with torch.no_grad(), autocast():
            computed, computed_len = reference.forward(sub.audio, sub.audio_len)
        expected = encoded_len[torch.tensor(missing, device=encoded_len.device)]
        if not torch.equal(computed_len.to(expected.device), expected):
            raise RuntimeError(f"reference and policy disagree on frame counts ({computed_len.tolist()} vs "
                               f"{expected.tolist()}): different front ends?")
        computed = computed.float()
        for row, (b, length) in enumerate(zip(missing, expected.tolist())):
            cached[b] = computed[row, :length]  # a view
            if cache is not None:
                cache.put(keys[b], cached[b].detach().to("cpu", copy=True))
        if len(missing) == len(batch) and computed.shape[1] == frames:
            return computed  # the whole batch in one forward: already the right shape
    vocabulary = cached[0].shape[-1]
    out = torch.full((len(batch), frames, vocabulary), -float(np.log(vocabulary)), device=encoded_len.device)
    for b, entry in enumerate(cached):
        out[b, : entry.shape[0]] = entry.to(out.device, non_blocking=True)
    return out


def zero_spread(rewards: torch.Tensor) -> torch.Tensor:
    """[B] True where a group's K rewards are all equal (it gives every sample the same advantage)."""
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) <= 1e-8


def score(reward_set: RewardSet, batch: AudioBatch, sample_rate: int, groups: list[list[str]],
          rows: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards [B', K'] of ``groups`` (one list of hypotheses per utterance of ``rows``, or of the
    whole batch): references reach only the rewards that need them."""
    if rows is not None:
        batch = batch.subset(rows)
    inputs = RewardInputs(audio=batch.audio, audio_len=batch.audio_len, sample_rate=sample_rate, hypotheses=groups,
                          references=batch.references, metadata=[u.fields for u in batch.utterances])
    return reward_set(inputs)


def resample_zero_spread(policy: CTCPolicy, reward_set: RewardSet, batch: AudioBatch, log_probs: torch.Tensor,
                         encoded_len: torch.Tensor, samples: Samples, rewards: torch.Tensor,
                         components: dict[str, torch.Tensor], tries: int, generator: torch.Generator | None,
                         sample_keys: Sequence[Sequence[int]] | None) -> tuple[Samples, torch.Tensor, dict]:
    """Dynamic resampling: re-draw, up to ``tries`` times, the K samples of each group whose rewards
    are all equal, from the same (tempered) frame distributions ``log_probs`` [B, T, V], so no encoder
    pass and no importance weight is needed: the new samples are samples of the policy the loss uses.

    A group is kept at the first draw whose rewards differ (or the last one). Conditioning on an
    informative draw scales each utterance's expected gradient by 1 / P(informative), its direction
    unchanged (the same bias as DAPO's dynamic sampling): a degenerate group's gradient is 0 anyway.
    Draw ``n`` of utterance b uses the key ``sample_keys[b] + (n,)``. Returns the samples, rewards
    [B, K] and reward components with the re-drawn rows replaced."""
    for attempt in range(1, tries + 1):
        rows = zero_spread(rewards).nonzero().flatten().tolist()
        if not rows:
            break
        index = torch.tensor(rows, device=log_probs.device)
        uniforms = None
        if sample_keys is not None:
            uniforms = sampling_uniforms([(*sample_keys[b], attempt) for b in rows], encoded_len[index],
                                         rewards.shape[1], frames=log_probs.shape[1])
        fresh = policy.sample(log_probs[index], encoded_len[index], rewards.shape[1], generator, uniforms)
        fresh_rewards, fresh_components = score(reward_set, batch, policy.sample_rate, fresh.texts, rows)
        samples = samples.with_rows(rows, fresh)
        rewards = rewards.clone()
        rewards[rows] = fresh_rewards
        components = {label: values.clone() for label, values in components.items()}
        for label, values in fresh_components.items():
            components[label][rows] = values
    return samples, rewards, components


def make_rollout(
    policy: CTCPolicy,
    reference: CTCPolicy | None,
    reward_set: RewardSet,
    batch: AudioBatch,
    algo,
    generator: torch.Generator | None = None,
    keep_graph: bool = False,
    autocast=None,
    sample_keys: Sequence[Sequence[int]] | None = None,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    reference_cache: ReferenceCache | None = None,
    kl_coef: float | None = None,
) -> Rollout:
    """Steps 1-7 above. With ``keep_graph`` the policy forward keeps its autograd graph so an
    on-policy update (one epoch, frozen BatchNorm, no dropout) needs no second forward.

    ``sample_keys`` (one per utterance) make the sampling per-utterance deterministic (see
    ``sampling_uniforms``); otherwise ``generator`` draws for the whole batch. ``all_reduce_sum``
    sums a tensor over processes, for the statistics that span the global batch (whitening).
    ``reference_cache`` keeps the reference's log-probs per utterance (keyed by manifest file and line).
    ``kl_coef``: this step's beta (the recipe's ``KLController``); None takes ``algo.kl_coef``."""
    import contextlib

    autocast = autocast or contextlib.nullcontext
    kl_coef = algo.kl_coef if kl_coef is None else kl_coef
    policy.set_mode("rollout")
    need_raw = algo.supervised_coef > 0 and all(r is not None for r in batch.references)

    # 1. One encoder pass for all K samples.
    with torch.set_grad_enabled(keep_graph), autocast():
        raw_log_probs, encoded_len = policy.forward(batch.audio, batch.audio_len)
    raw_log_probs = raw_log_probs.float()
    log_probs = ctc.apply_temperature(raw_log_probs, algo.temperature)

    # 2. K hypotheses per utterance: samples (vectorised), a beam's best, or both; and the greedy one.
    detached = log_probs.detach()
    best = algo.num_samples if algo.rollout == "nbest" else algo.num_samples // 2 if algo.rollout == "mixed" else 0
    samples = policy.nbest(detached, encoded_len, best) if best else None
    if best < algo.num_samples:
        uniforms = None
        if sample_keys is not None:
            uniforms = sampling_uniforms(sample_keys, encoded_len, algo.num_samples - best, frames=detached.shape[1])
        drawn = policy.sample(detached, encoded_len, algo.num_samples - best, generator, uniforms)
        samples = drawn if samples is None else samples.concat(drawn)
    greedy = policy.greedy(detached, encoded_len)

    # 3. Rewards of every hypothesis. For the self-critical baseline the greedy transcript joins its
    #    group in the same call, so a learned reward embeds each utterance's audio once (and scores
    #    a greedy text equal to a sample once).
    metrics: dict[str, float] = {}
    self_critical = algo.advantage == "self_critical"
    groups = [texts + greedy_texts for texts, greedy_texts in zip(samples.texts, greedy.texts)] if self_critical \
        else samples.texts
    rewards, components = score(reward_set, batch, policy.sample_rate, groups)
    greedy_rewards = None
    if self_critical:
        k = algo.num_samples
        greedy_rewards, rewards = rewards[:, k], rewards[:, :k]
        components = {label: values[:, :k] for label, values in components.items()}
        metrics["reward/greedy_mean"] = float(greedy_rewards.mean())
    if algo.resample_zero_std > 0:
        started = time.perf_counter()
        metrics["rollout/frac_zero_std_before"] = float(zero_spread(rewards).float().mean())
        samples, rewards, components = resample_zero_spread(policy, reward_set, batch, detached, encoded_len,
                                                            samples, rewards, components, algo.resample_zero_std,
                                                            generator, sample_keys)
        metrics["perf/resample_time"] = time.perf_counter() - started

    # 4. log pi(y), the marginal over alignments, for the distinct hypotheses in one CTC call.
    seq_log_probs = ctc.distinct_sequence_log_probs(log_probs if keep_graph else detached, encoded_len,
                                                    samples.labels, samples.label_len, policy.blank_id)

    # 5. Frozen reference (no_grad rather than inference_mode: its tensors enter the KL loss), and the
    #    KL that is penalised ('kl/penalised', what the adaptive controller steers).
    ref_frame_log_probs = ref_seq_log_probs = None
    penalised = None
    if reference is not None:
        hits_before = reference_cache.hits if reference_cache is not None else 0
        ref_raw = reference_log_probs(reference, batch, encoded_len, detached.shape[1], autocast, reference_cache,
                                      [u.where for u in batch.utterances] if reference_cache is not None else None)
        if reference_cache is not None:
            metrics["perf/ref_cache_hit_rate"] = (reference_cache.hits - hits_before) / max(1, len(batch))
        ref_frame_log_probs = ctc.apply_temperature(ref_raw, algo.temperature)
        with torch.no_grad():
            kl_exact = ctc.exact_kl(detached, ref_frame_log_probs, encoded_len)
            penalised = kl_exact
            if algo.kl_estimator in ("k1", "k3"):  # sequence-level estimators need log pi_ref(y)
                ref_seq_log_probs = ctc.distinct_sequence_log_probs(ref_frame_log_probs, encoded_len,
                                                                    samples.labels, samples.label_len, policy.blank_id)
                k1 = ctc.kl_k1(seq_log_probs.detach(), ref_seq_log_probs)
                metrics["kl/k1"] = float(k1.mean())
                penalised = k1
                if algo.kl_estimator == "k3":
                    penalised = ctc.kl_k3(seq_log_probs.detach(), ref_seq_log_probs)
                    metrics["kl/k3"] = float(penalised.mean())
            penalised = _kl_reduce(penalised, encoded_len, algo.kl_reduction)
        metrics["kl"] = float(kl_exact.mean())
        metrics["kl/per_frame"] = float((kl_exact / encoded_len.clamp(min=1)).mean())
        metrics["kl/penalised"] = float(penalised.mean())

    # 6. KL folded into the reward, per sample (RLOO / PPO style): k1 only (the config refuses k3 there).
    shaped = rewards
    if reference is not None and algo.kl_in_reward:
        shaped = rewards - kl_coef * penalised

    # 7. Advantages within each group of K.
    advantages = algorithms.compute_advantages(shaped, algo.advantage, greedy_rewards=greedy_rewards,
                                               scale_by_std=algo.scale_by_std, whiten_batch=algo.whiten_advantages,
                                               all_reduce_sum=all_reduce_sum)

    distinct = None
    if algo.policy_loss == "mwer":  # MWER renormalises pi over each utterance's distinct hypotheses
        distinct = first_occurrences(samples.texts).to(seq_log_probs.device)
        list_log_mass = torch.logsumexp(seq_log_probs.detach().masked_fill(~distinct, float("-inf")), dim=1)
        metrics["mwer/list_mass"] = float(list_log_mass.exp().mean())

    metrics.update({
        "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
        **{f"reward/{label}/mean": float(values.mean()) for label, values in components.items()},
        "advantage/mean": float(advantages.mean()),
        "advantage/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "entropy": float(ctc.frame_entropy(detached, encoded_len).mean()),
        "rollout/hyp_len": float(samples.label_len.float().mean()),
        "rollout/blank_ratio": samples.blank_ratio,
        "rollout/empty_ratio": float((samples.label_len == 0).float().mean()),
        "rollout/log_prob": float(seq_log_probs.detach().mean()),
        **group_stats(rewards, samples.texts),
    })
    return Rollout(
        batch=batch, samples=samples, greedy=greedy, encoded_len=encoded_len,
        old_log_probs=seq_log_probs.detach(), rewards=rewards, reward_components=components,
        advantages=advantages, ref_frame_log_probs=ref_frame_log_probs, ref_seq_log_probs=ref_seq_log_probs,
        greedy_rewards=greedy_rewards, metrics=metrics,
        distinct=distinct,
        frame_log_probs=log_probs if keep_graph else None,
        seq_log_probs=seq_log_probs if keep_graph else None,
        raw_log_probs=raw_log_probs if keep_graph and need_raw else None,
    )


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


def rl_loss(
    policy: CTCPolicy,
    rollout: Rollout,
    algo,
    supervised_targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    autocast=None,
    kl_coef: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one update epoch on one rollout, and its metrics.

    loss = L_pg + beta * KL (when not in the reward) - c_H * H + lambda * L_ctc(references)

    The KL term is ``exact`` (the alignment KL, differentiable) or ``k3`` as rho * k3 with
    rho = pi(y)/pi_old(y) (``algorithms.k3_loss_term``: its gradient estimates grad KL(pi || pi_ref)).
    ``kl_coef``: this step's beta; None takes ``algo.kl_coef``.
    """
    import contextlib

    autocast = autocast or contextlib.nullcontext
    kl_coef = algo.kl_coef if kl_coef is None else kl_coef
    if rollout.frame_log_probs is not None:  # on-policy, first epoch: re-use the rollout's graph
        log_probs, raw_log_probs, encoded_len = rollout.frame_log_probs, rollout.raw_log_probs, rollout.encoded_len
        seq_log_probs = rollout.seq_log_probs
        rollout.frame_log_probs = rollout.raw_log_probs = rollout.seq_log_probs = None  # the graph is consumed once
    else:
        with autocast():
            raw_log_probs, encoded_len = policy.forward(rollout.batch.audio, rollout.batch.audio_len)
        raw_log_probs = raw_log_probs.float()
        log_probs = ctc.apply_temperature(raw_log_probs, algo.temperature)
        seq_log_probs = ctc.distinct_sequence_log_probs(log_probs, encoded_len, rollout.samples.labels,
                                                        rollout.samples.label_len, policy.blank_id)
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
    # KL penalty as a loss term.
    loss_kl = torch.zeros((), device=log_probs.device)
    if rollout.ref_frame_log_probs is not None and not algo.kl_in_reward:
        if algo.kl_estimator == "exact":
            kl = ctc.exact_kl(log_probs, rollout.ref_frame_log_probs, encoded_len)
        else:
            kl = algorithms.k3_loss_term(seq_log_probs, rollout.old_log_probs, rollout.ref_seq_log_probs)
        loss_kl = kl_coef * _kl_reduce(kl, encoded_len, algo.kl_reduction).mean()
    # Entropy bonus and supervised term.
    entropy = ctc.frame_entropy(log_probs, encoded_len).mean()
    loss = loss_policy + loss_kl - algo.entropy_coef * entropy
    ratio = algorithms.importance_ratio(seq_log_probs.detach(), rollout.old_log_probs, frames)
    metrics = {"loss/policy": float(loss_policy.detach()), "loss/kl": float(loss_kl.detach()),
               "ppo/clip_ratio": float(clip["low"] + clip["high"]), "ppo/clip_ratio_low": float(clip["low"]),
               "ppo/clip_ratio_high": float(clip["high"]), "ppo/ratio_mean": float(ratio.mean())}
    if algo.supervised_coef > 0 and supervised_targets is not None:
        if raw_log_probs is None:
            raise RuntimeError("supervised term needs the tau=1 log-probs")
        labels, label_len = supervised_targets
        # Only CTC-feasible references: an infeasible one has an infinite loss and NaN gradients.
        # The mean is over all utterances (infeasible ones add 0), like every other term, so the
        # loss stays a per-utterance mean that multi-process runs can weight by utterance count.
        feasible = ctc.min_frames(labels, label_len) <= encoded_len
        if feasible.any():
            ref_log_probs = ctc.sequence_log_probs(raw_log_probs[feasible], encoded_len[feasible],
                                                   labels[feasible].unsqueeze(1), label_len[feasible].unsqueeze(1),
                                                   policy.blank_id)
            loss_supervised = -ref_log_probs.sum() / len(labels)
        else:
            loss_supervised = torch.zeros((), device=log_probs.device)
        metrics["train/infeasible"] = float((~feasible).float().mean())
        loss = loss + algo.supervised_coef * loss_supervised
        metrics["loss/supervised"] = float(loss_supervised.detach())
    metrics["loss/total"] = float(loss.detach())
    return loss, metrics
