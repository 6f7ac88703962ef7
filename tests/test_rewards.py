"""Reward interface: built-in error-rate rewards, user callables, validation of outputs."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

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


def raising_reward(batch):
    raise ValueError("the scoring service went away")


def nan_reward(batch):
    return [[float("nan")] * batch.num_samples for _ in range(batch.batch_size)]


def test_a_failing_reward_is_named_by_its_place_in_the_list_and_its_name():
    rewards = build_rewards([RewardSpec(name="cer"), RewardSpec(name="tests.test_rewards.raising_reward")])
    with pytest.raises(RewardError) as caught:
        rewards(inputs([["abc", "x"]], ["abc"]))
    assert str(caught.value) == ("rewards[1] (tests.test_rewards.raising_reward) raised ValueError: the scoring "
                                 "service went away")
    assert isinstance(caught.value.__cause__, ValueError)
    rewards = build_rewards([RewardSpec(name="tests.test_rewards.nan_reward")])
    with pytest.raises(RewardError, match=re.escape("rewards[0] (tests.test_rewards.nan_reward) returned 2 "
                                                    "NaN/infinite score(s)")):
        rewards(inputs([["abc", "x"]], ["abc"]))


def test_references_reach_only_the_rewards_that_need_them():
    seen = {}

    def record(key, needs):
        def reward(batch):
            seen[key] = list(batch.references)
            return [[1.0] * batch.num_samples for _ in range(batch.batch_size)]
        reward.needs_references = needs
        return reward

    rewards = RewardSet([WeightedReward("a", 1.0, record("a", True)), WeightedReward("b", 1.0, record("b", False))])
    rewards(inputs([["x"], ["y"]], ["ref one", "ref two"]))
    assert seen == {"a": ["ref one", "ref two"], "b": [None, None]}


@pytest.fixture()
def module_in(tmp_path, monkeypatch):
    """``module_in(name, code)``: a module file in a fresh working folder that is not on sys.path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry not in ("", ".", str(tmp_path))])
    created = []

    def write(name: str, code: str) -> Path:
        (tmp_path / f"{name}.py").write_text(code)
        created.append(name)
        return tmp_path

    yield write
    for name in created:
        sys.modules.pop(name, None)


def test_a_dotted_path_finds_a_module_in_the_working_folder(module_in):
    folder = module_in("cwd_reward_module", "def half(batch):\n"
                                            "    return [[0.5] * batch.num_samples for _ in batch.hypotheses]\n")
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("rlnf.rewards")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    try:
        rewards = build_rewards([RewardSpec(name="cwd_reward_module.half")])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
    total, _ = rewards(inputs([["a", "b"]]))
    torch.testing.assert_close(total, torch.full((1, 2), 0.5))
    assert str(folder) in sys.path
    assert any("found in the working folder" in message and str(folder) in message for message in messages)


def test_a_module_found_nowhere_says_where_it_looked_and_how_to_fix_it(module_in):
    folder = module_in("cwd_reward_broken_dependency", "import no_such_dependency_xyz\n")
    with pytest.raises(ConfigError) as caught:
        build_rewards([RewardSpec(name="no_such_module_xyz.reward")])
    message = str(caught.value)
    assert "No module named 'no_such_module_xyz'" in message and f"working folder {folder}" in message
    assert "PYTHONPATH" in message and "pip install" in message
    assert str(folder) not in sys.path  # tried, and taken off again
    # A module that is there but imports a missing package: that package is named, with no hint about
    # where the reward's module was looked for.
    with pytest.raises(ConfigError, match="No module named 'no_such_dependency_xyz'") as caught:
        build_rewards([RewardSpec(name="cwd_reward_broken_dependency.reward")])
    assert "PYTHONPATH" not in str(caught.value)


def test_ensemble_score_is_mean_minus_k_population_std_clamped_at_zero():
    """Against a brute force over every (b, k): statistics.fmean / pstdev of the members' scores."""
    import statistics

    from rlnf.rewards.learned import ensemble_score

    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 4, 5, generator=generator, dtype=torch.float64)
    scores[:, 0, 0] = torch.tensor([0.0, 0.0, 1.0])  # a wide disagreement: clamped at 0 for k = 2
    for k in (0.0, 0.5, 2.0):
        combined, std = ensemble_score(scores, k)
        for b in range(4):
            for j in range(5):
                members = scores[:, b, j].tolist()
                spread = statistics.pstdev(members)
                assert std[b, j].item() == pytest.approx(spread, abs=1e-12)
                assert combined[b, j].item() == pytest.approx(max(0.0, statistics.fmean(members) - k * spread),
                                                              abs=1e-12)
    assert ensemble_score(scores, 2.0)[0][0, 0] == 0.0
    one, spread = ensemble_score(scores[:1], 1.0)  # one member: no spread, its own scores
    assert torch.equal(one, scores[0]) and not spread.any()


def test_a_reward_s_diagnostics_are_logged_beside_it_not_summed():
    class Rated:
        def __init__(self):
            self.diagnostics = {}

        def __call__(self, inputs):
            self.diagnostics = {"ensemble_std": torch.full((inputs.batch_size, inputs.num_samples), 0.25)}
            return torch.full((inputs.batch_size, inputs.num_samples), 0.5)

    total, components = RewardSet([WeightedReward("learned", 2.0, Rated())])(inputs([["a", "b"]]))
    torch.testing.assert_close(total, torch.tensor([[1.0, 1.0]]))
    assert set(components) == {"learned", "learned/ensemble_std"}
    torch.testing.assert_close(components["learned/ensemble_std"], torch.tensor([[0.25, 0.25]]))


@pytest.mark.parametrize("fields, message", [
    ({"paths": ["a"]}, "two or more checkpoints"),
    ({"path": "a", "paths": ["b", "c"]}, "not both"),
    ({"paths": ["a", "a"]}, "lists a checkpoint twice"),
    ({"paths": ["a", "b"], "std_coef": -1.0}, "std_coef: must be a finite number >= 0"),
    ({"paths": ["a", "b"], "std_coef": float("nan")}, "std_coef: must be a finite number >= 0"),
    ({"path": "a", "std_coef": 1.0}, "std_coef is for a 'learned' ensemble"),
    ({}, "needs 'path'"),
])
def test_a_learned_ensemble_s_config_is_checked(fields, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        RewardSpec(name="learned", **fields)


def test_paths_belong_to_the_learned_reward():
    with pytest.raises(ConfigError, match="'paths' is for the 'learned' reward"):
        RewardSpec(name="cer", paths=["a", "b"])
    spec = RewardSpec(name="learned", paths=["a", "b"], std_coef=1.0)
    assert spec.label == "learned" and list(spec.paths) == ["a", "b"]
