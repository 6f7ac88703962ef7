"""A few RL updates push the policy the right way, for every preset, through the recipe's own step."""

from __future__ import annotations

import json

import pytest
import torch

from rapidfuzz.distance import Levenshtein

from rlnf import ctc


class TargetReward:
    """Prefers one hypothesis per utterance: (normalised edit similarity to the manifest row's
    ``target``)^4 -- 1 for the target itself, falling quickly with every edit, yet graded so the
    K samples of a group get different rewards."""

    def __call__(self, batch):
        return [[Levenshtein.normalized_similarity(row["target"], h) ** 4 for h in group]
                for group, row in zip(batch.hypotheses, batch.metadata)]


def log_prob_of(policy, batch, texts_per_utterance):
    """log p(y|x) [B, N] of given transcripts under the current policy (tau = 1)."""
    from rlnf.policy import labels_to_padded

    policy.set_mode("eval")
    with torch.no_grad():
        log_probs, encoded_len = policy.forward(batch.audio, batch.audio_len)
    rows = [[policy.encode_text(t, oov="drop") for t in texts] for texts in texts_per_utterance]
    n = len(rows[0])
    labels, lengths = labels_to_padded([r for row in rows for r in row])
    return ctc.sequence_log_probs(log_probs.float(), encoded_len, labels.reshape(len(rows), n, -1),
                                  lengths.reshape(len(rows), n), policy.blank_id)


@pytest.mark.parametrize("preset", ["reinforce", "rloo", "grpo", "ppo", "mwer"])
def test_updates_raise_the_preferred_hypothesis_and_lower_the_others(preset, corpus, pretrained_tiny_nemo, tmp_path):
    from recipes.rl_finetune import RLFinetuneRecipe
    from rlnf.config import RLFinetuneConfig, load_config
    from rlnf.data.manifest import read_manifest

    # One short utterance (so that no other utterance shares the update) and a pretrained, peaked policy.
    utterances, _ = read_manifest(corpus["train"])
    utterance = min(utterances, key=lambda u: u.duration)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"audio_filepath": utterance.audio_filepath, "target": ""}) + "\n")
    overrides = [f"policy.path={pretrained_tiny_nemo}", f"data.train_manifest={manifest}",
                 f"output_dir={tmp_path / 'run'}", f"algorithm.name={preset}", "algorithm.num_samples=64", "algorithm.kl_coef=0.01",
                 "trainer.batch_size=1", "trainer.lr=3e-4", "trainer.lr_schedule=constant",
                 "trainer.progress_bar=false", "rewards=[{name: tests.test_rl_update.TargetReward}]"]
    recipe = RLFinetuneRecipe(load_config(RLFinetuneConfig, None, overrides))
    recipe.setup()
    batch = next(iter(recipe.stream))
    policy = recipe.policy

    # K = 64 so that the preferred hypothesis (p ~ 1 %) is sampled now and then: a method learns only
    # from what it samples (the self-critical baseline gives no push towards an unseen hypothesis).
    # The preferred hypothesis: the most likely sampled transcript that is NOT the greedy one (so the
    # self-critical baseline, the greedy reward, is below the best reward and every preset has a signal).
    policy.set_mode("eval")
    greedy = policy.transcribe(batch.audio, batch.audio_len)[0]
    with torch.no_grad():
        pool = sorted({t for t in policy.sample(*policy.forward(batch.audio, batch.audio_len), 64,
                                                 torch.Generator().manual_seed(0)).texts[0] if t != greedy})
    pool_log_probs = log_prob_of(policy, batch, [pool])[0]
    target = pool[int(pool_log_probs.argmax())]
    others = [greedy] + [t for t in pool if t != target][:7]
    batch.utterances[0].fields["target"] = target

    before_target = log_prob_of(policy, batch, [[target]])
    before_others = log_prob_of(policy, batch, [others])
    rewards = []
    for _ in range(8):
        metrics, _ = recipe.train_step([batch])
        rewards.append(metrics["reward/mean"])
    after_target = log_prob_of(policy, batch, [[target]])
    after_others = log_prob_of(policy, batch, [others])

    assert after_target.item() > before_target.item() + 0.5, (target, before_target, after_target)
    assert after_others.mean() < before_others.mean(), (before_others, after_others)
    assert sum(rewards[-2:]) / 2 > rewards[0]
    assert recipe.skipped_steps == 0


class LengthReward:
    """Scores a transcript by its length; counts calls and records group sizes."""

    calls: list[int] = []

    def __call__(self, batch):
        type(self).calls.append(len(batch.hypotheses[0]))
        return [[min(1.0, len(h) / 100) for h in group] for group in batch.hypotheses]


def test_self_critical_scores_greedy_in_the_same_reward_call(pretrained_tiny_nemo, corpus):
    from rlnf.config import AlgorithmConfig, RLFinetuneConfig, RewardSpec, finalize_config
    from rlnf.data.loader import AudioDataset, collate
    from rlnf.data.manifest import read_manifest
    from rlnf.policy import CTCPolicy
    from rlnf.rewards import build_rewards
    from rlnf.rl import StepContext, make_rollout

    cfg = finalize_config(RLFinetuneConfig(output_dir="unused", algorithm=AlgorithmConfig(name="rloo", kl_coef=0.01)))
    algo = cfg.algorithm
    algo.name, algo.advantage, algo.num_samples = "reinforce", "self_critical", 5
    utterances, _ = read_manifest(corpus["train"])
    batch = collate([AudioDataset(utterances, 16000)[i] for i in range(3)])
    LengthReward.calls = []
    rollout, _ = make_rollout(CTCPolicy.load(pretrained_tiny_nemo), None,
                              build_rewards([RewardSpec(name="tests.test_rl_update.LengthReward")]), batch, algo,
                              StepContext(beta=0.0, generator=torch.Generator().manual_seed(0)))
    assert LengthReward.calls == [6]  # one call, K + 1 transcripts per group
    expected_greedy = torch.tensor([min(1.0, len(g[0]) / 100) for g in rollout.greedy.texts])
    torch.testing.assert_close(rollout.greedy_rewards, expected_greedy)
    expected = torch.tensor([[min(1.0, len(t) / 100) for t in group] for group in rollout.samples.texts])
    torch.testing.assert_close(rollout.rewards, expected)
    torch.testing.assert_close(rollout.advantages, expected - expected_greedy.unsqueeze(1))
    assert rollout.reward_components["LengthReward"].shape == (3, 5)


def test_reference_cache_evicts_least_recently_used_beyond_its_budget():
    from rlnf.reference import ReferenceCache

    cache = ReferenceCache(max_bytes=3 * 40)  # room for three [10] float32 entries
    for key in "abc":
        cache.put(key, torch.full((10,), float(ord(key))))
    assert cache.get("a", 10) is not None  # "a" becomes the most recently used
    cache.put("d", torch.zeros(10))  # evicts "b", the least recently used
    assert cache.get("b", 10) is None and len(cache) == 3 and cache.bytes == 120
    assert cache.get("c", 10) is not None and cache.get("d", 10) is not None
    cache.put("huge", torch.zeros(100))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get("huge", 100) is None and len(cache) == 3
    cache.put("a", torch.zeros(5))  # replacing an entry frees its old bytes
    assert cache.bytes == 100
    assert (cache.hits, cache.misses) == (3, 2)


def test_reference_cache_gives_the_reference_forward_and_runs_only_the_missing_utterances(pretrained_tiny_nemo,
                                                                                           corpus):
    """Through make_rollout: a batch whose utterances are partly cached sends only the others
    through the reference, as one smaller batch, and every rollout quantity matches the run
    without a cache."""
    from rlnf.config import AlgorithmConfig, RLFinetuneConfig, RewardSpec, finalize_config
    from rlnf.data.loader import AudioDataset, collate
    from rlnf.data.manifest import read_manifest
    from rlnf.policy import CTCPolicy
    from rlnf.rewards import build_rewards
    from rlnf.reference import ReferenceCache
    from rlnf.rl import StepContext, make_rollout

    cfg = finalize_config(RLFinetuneConfig(output_dir="unused", algorithm=AlgorithmConfig(name="rloo", kl_coef=0.01)))
    algo = cfg.algorithm
    algo.kl_estimator, algo.kl_in_reward, algo.temperature = "k1", True, 1.3
    utterances, _ = read_manifest(corpus["train"])
    dataset = AudioDataset(utterances, 16000)
    policy = CTCPolicy.load(pretrained_tiny_nemo)
    reference = CTCPolicy.load(pretrained_tiny_nemo).freeze()
    rewards = build_rewards([RewardSpec(name="tests.test_rl_update.LengthReward")])
    calls = []
    forward = reference.forward
    reference.forward = lambda audio, audio_len: calls.append(len(audio)) or forward(audio, audio_len)

    cache = ReferenceCache(max_bytes=2**24)
    first = collate([dataset[i] for i in (0, 1)])
    beta = algo.kl_coef
    make_rollout(policy, reference, rewards, first, algo,
                 StepContext(beta, generator=torch.Generator().manual_seed(0), reference_cache=cache))
    assert calls == [2] and len(cache) == 2
    mixed = collate([dataset[i] for i in (2, 0, 3, 1)])  # two cached, two new
    keys = [(0, 0, 0, u.line) for u in mixed.utterances]
    cached, _ = make_rollout(policy, reference, rewards, mixed, algo, StepContext(beta, keys, reference_cache=cache))
    assert calls == [2, 2] and cached.metrics["perf/ref_cache_hit_rate"] == 0.5
    plain, _ = make_rollout(policy, reference, rewards, mixed, algo, StepContext(beta, keys))
    assert calls == [2, 2, 4]
    torch.testing.assert_close(cached.ref_frame_log_probs.isfinite(), plain.ref_frame_log_probs.isfinite())
    for b, frames in enumerate(plain.encoded_len.tolist()):
        torch.testing.assert_close(cached.ref_frame_log_probs[b, :frames], plain.ref_frame_log_probs[b, :frames],
                                   atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached.ref_seq_log_probs, plain.ref_seq_log_probs, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(cached.advantages, plain.advantages, atol=1e-4, rtol=1e-4)
    assert cached.metrics["kl"] == pytest.approx(plain.metrics["kl"], rel=1e-5, abs=1e-6)
    again, _ = make_rollout(policy, reference, rewards, mixed, algo, StepContext(beta, keys, reference_cache=cache))
    assert calls == [2, 2, 4] and again.metrics["perf/ref_cache_hit_rate"] == 1.0  # no forward at all


class ParityReward:
    """1 for a transcript of odd length, else 0: many groups of K = 2 get equal rewards."""

    def __call__(self, batch):
        return [[float(len(h) % 2) for h in group] for group in batch.hypotheses]


def test_dynamic_resampling_redraws_uninformative_groups_from_the_tempered_policy(pretrained_tiny_nemo, corpus):
    """Groups whose advantages are all 0 are re-drawn from the same tempered frame distributions
    (draw n of utterance b keyed by key_b + (n,)), other groups are untouched, and the old log-probs
    are those of the final samples under pi_tau: they count as samples of the policy the loss uses."""
    from rlnf.config import AlgorithmConfig, RLFinetuneConfig, RewardSpec, finalize_config
    from rlnf.data.loader import AudioDataset, collate
    from rlnf.data.manifest import read_manifest
    from rlnf.policy import CTCPolicy
    from rlnf.rewards import build_rewards
    from rlnf.algorithms import uninformative_groups
    from rlnf.hypotheses import sampling_uniforms
    from rlnf.rl import StepContext, make_rollout

    cfg = finalize_config(RLFinetuneConfig(output_dir="unused", algorithm=AlgorithmConfig(name="rloo", kl_coef=0.01)))
    algo = cfg.algorithm
    algo.num_samples, algo.temperature, tries = 2, 1.3, 4
    utterances, _ = read_manifest(corpus["train"])
    batch = collate([AudioDataset(utterances, 16000)[i] for i in range(8)])
    keys = [(0, 0, 0, u.line) for u in batch.utterances]
    policy = CTCPolicy.load(pretrained_tiny_nemo)
    rewards = build_rewards([RewardSpec(name="tests.test_rl_update.ParityReward")])
    plain, _ = make_rollout(policy, None, rewards, batch, algo, StepContext(0.0, keys))
    algo.resample_zero_std = tries
    resampled, _ = make_rollout(policy, None, rewards, batch, algo, StepContext(0.0, keys))

    degenerate = uninformative_groups(plain.advantages).tolist()
    assert any(degenerate) and not all(degenerate)
    with torch.no_grad():
        raw, encoded_len = policy.forward(batch.audio, batch.audio_len)
    log_probs = ctc.apply_temperature(raw.float(), algo.temperature)
    for b, was_degenerate in enumerate(degenerate):
        if not was_degenerate:
            assert resampled.samples.texts[b] == plain.samples.texts[b]
            continue
        for attempt in range(1, tries + 1):  # replay the draws
            uniforms = sampling_uniforms([(*keys[b], attempt)], encoded_len[b:b + 1], 2, frames=log_probs.shape[1])
            texts = policy.sample(log_probs[b:b + 1], encoded_len[b:b + 1], 2, None, uniforms).texts[0]
            if len({len(text) % 2 for text in texts}) > 1:
                break
        assert resampled.samples.texts[b] == texts
    assert resampled.metrics["rollout/frac_uninformative_before"] == plain.metrics["rollout/frac_uninformative"]
    assert resampled.metrics["rollout/frac_uninformative"] < plain.metrics["rollout/frac_uninformative"]
    assert resampled.metrics["perf/resample_time"] > 0
    expected = torch.tensor([[float(len(t) % 2) for t in group] for group in resampled.samples.texts])
    torch.testing.assert_close(resampled.rewards, expected)
    torch.testing.assert_close(resampled.old_log_probs, ctc.sequence_log_probs(
        log_probs, encoded_len, resampled.samples.labels, resampled.samples.label_len, policy.blank_id))
