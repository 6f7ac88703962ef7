"""Reward interface: built-in error-rate rewards, user callables, validation of outputs."""

from __future__ import annotations

import pytest
import torch

from rlnf.config import RewardSpec
from rlnf.errors import ConfigError, RewardError
from rlnf.metrics import corpus_error_rate, error_rate
from rlnf.rewards import ErrorRateReward, RewardInputs, RewardSet, WeightedReward, build_rewards, check_scores


def inputs(hypotheses, references=None) -> RewardInputs:
    batch = len(hypotheses)
    return RewardInputs(audio=torch.zeros(batch, 10), audio_len=torch.full((batch,), 10), sample_rate=16000,
                        hypotheses=hypotheses, references=references or [None] * batch)


def test_error_rates():
    assert error_rate("abc", "abd", "char") == pytest.approx(1 / 3)
    assert error_rate("the cat sat", "the hat sat down", "word") == pytest.approx(2 / 3)
    assert error_rate("", "", "char") == 0.0 and error_rate("", "x", "word") == 1.0
    assert error_rate("a  b", " a b ", "char") == 0.0  # whitespace normalised
    assert corpus_error_rate(["ab", "cdef"], ["ab", "cxef"], "char") == pytest.approx(1 / 6)


def test_cer_and_wer_rewards_clip_at_zero():
    batch = inputs([["abc", "abd", "abcxyzuvw"]], ["abc"])
    torch.testing.assert_close(ErrorRateReward("char")(batch), torch.tensor([[1.0, 2 / 3, 0.0]]))
    batch = inputs([["the cat", "the dog", ""]], ["the cat"])
    torch.testing.assert_close(ErrorRateReward("word")(batch), torch.tensor([[1.0, 0.5, 0.0]]))


@pytest.mark.parametrize("scores, message", [
    ([[float("nan"), 0.5]], "NaN"),
    ([[float("inf"), 0.5]], "infinite"),
    ([[1.5, 0.5]], "outside"),
    ([[-0.2, 0.5]], "outside"),
    ([[0.1, 0.2, 0.3]], "shape"),
    ("not numbers", "not a"),
])
def test_bad_reward_outputs_fail_loudly_with_the_name(scores, message):
    with pytest.raises(RewardError, match=f"'mine'.*{message}|{message}.*"):
        check_scores("mine", scores, 1, 2)


def test_weighted_sum_reports_each_component():
    constant = lambda value: (lambda batch: [[value] * batch.num_samples for _ in range(batch.batch_size)])  # noqa: E731
    rewards = RewardSet([WeightedReward("a", 0.5, constant(1.0)), WeightedReward("b", 2.0, constant(0.25))])
    total, components = rewards(inputs([["x", "y"]]))
    torch.testing.assert_close(total, torch.full((1, 2), 1.0))
    assert set(components) == {"a", "b"}


def test_references_required_by_cer():
    rewards = build_rewards([RewardSpec(name="cer")])
    assert rewards.needs_references
    with pytest.raises(RewardError, match="m.json:3"):
        rewards.check_references(["a", None], ["m.json:2", "m.json:3"])


def length_reward(batch, target=5):
    """A user reward: prefers hypotheses of ``target`` characters."""
    return [[max(0.0, 1 - abs(len(h) - target) / 10) for h in group] for group in batch.hypotheses]


class PrefixReward:
    needs_references = True

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, batch):
        return [[float(h.startswith(self.prefix)) for h in group] for group in batch.hypotheses]


def test_dotted_path_function_and_class():
    rewards = build_rewards([RewardSpec(name="tests.test_rewards.length_reward", kwargs={"target": 3}),
                             RewardSpec(name="tests.test_rewards.PrefixReward", weight=2.0, kwargs={"prefix": "ab"})])
    assert rewards.labels == ["length_reward", "PrefixReward"] and rewards.needs_references
    total, components = rewards(inputs([["abc", "x"]], ["abc"]))
    torch.testing.assert_close(components["length_reward"], torch.tensor([[1.0, 0.8]]))
    torch.testing.assert_close(total, torch.tensor([[3.0, 0.8]]))


def test_dotted_path_errors():
    with pytest.raises(ConfigError, match="cannot import"):
        build_rewards([RewardSpec(name="no_such_module.reward")])
    with pytest.raises(ConfigError, match="no attribute"):
        build_rewards([RewardSpec(name="tests.test_rewards.missing")])


def test_consensus_scores_each_sample_against_the_rest_of_its_group():
    """Against a brute force: the mean of 1 - rate(h_j as reference, h_i) over the other samples j,
    clipped at 0; duplicates agree with each other; a group of one scores 1."""
    import itertools

    from rlnf.rewards import consensus, consensus_scores

    group = ["the cat sat", "the cat sat", "a cat sat", "the hat", ""]
    for unit in ("char", "word"):
        expected = []
        for i, hypothesis in enumerate(group):
            rates = [error_rate(group[j], hypothesis, unit) for j in range(len(group)) if j != i]
            expected.append(max(0.0, 1.0 - sum(rates) / len(rates)))
        assert consensus_scores(group, unit) == pytest.approx(expected)
    scores = consensus_scores(group)
    assert scores[0] == scores[1] and scores[0] > scores[2] > scores[4] == 0.0  # the empty one: every rate 1
    assert consensus_scores(["only"]) == [1.0] and consensus_scores([]) == []
    four = consensus_scores(group[:4])
    for permutation in itertools.permutations(range(4)):  # a sample's score does not depend on the order
        shuffled = [group[k] for k in permutation]
        assert consensus_scores(shuffled) == pytest.approx([four[k] for k in permutation])
    reward = build_rewards([RewardSpec(name="rlnf.rewards.consensus", kwargs={"unit": "word"})])
    assert reward.labels == ["consensus"] and not reward.needs_references
    total, parts = reward(inputs([group[:3], group[2:]], [None, None]))
    assert total.shape == (2, 3) and torch.allclose(total, parts["consensus"])
    assert total[0].tolist() == pytest.approx(consensus_scores(group[:3], "word"))
    with pytest.raises(ValueError, match="unit"):
        consensus(inputs([group[:2]], [None]), unit="letters")
