"""Advantages and policy losses against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from rlnf import algorithms


def test_rloo_leave_one_out_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5]])
    # A_0 = 1 - (0 + .5 + .5)/3 = 2/3 ; A_1 = 0 - (1 + .5 + .5)/3 = -2/3 ; A_2 = .5 - 1.5/3 = 0
    expected = torch.tensor([[2 / 3, -2 / 3, 0.0, 0.0]])
    torch.testing.assert_close(algorithms.rloo_advantages(rewards), expected)
    with pytest.raises(ValueError):
        algorithms.rloo_advantages(torch.tensor([[1.0]]))


def test_group_advantages_with_and_without_std():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    centred = torch.tensor([[-1.0, 0.0, 1.0], [-1.0, -1.0, 2.0]])
    torch.testing.assert_close(algorithms.group_advantages(rewards, scale_by_std=False), centred)
    std = torch.tensor([[1.0], [3.0 ** 0.5]])  # unbiased: var([1,2,3]) = 1, var([0,0,3]) = 3
    torch.testing.assert_close(algorithms.group_advantages(rewards, scale_by_std=True, eps=0.0), centred / std)


def test_group_with_equal_rewards_gives_zero_advantage_not_nan():
    rewards = torch.full((2, 4), 0.7)
    for scale in (True, False):
        advantages = algorithms.group_advantages(rewards, scale_by_std=scale)
        assert torch.equal(advantages, torch.zeros_like(rewards))
    assert torch.equal(algorithms.rloo_advantages(rewards), torch.zeros_like(rewards))


def test_self_critical_subtracts_greedy_reward():
    rewards = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    greedy = torch.tensor([0.5, 0.1])
    torch.testing.assert_close(algorithms.self_critical_advantages(rewards, greedy),
                               torch.tensor([[-0.3, 0.3], [0.4, 0.4]]))


def test_compute_advantages_dispatch_and_whitening():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(algorithms.compute_advantages(rewards, "none"), rewards)
    first, second = algorithms.whiten_together([rewards, torch.tensor([[3.0, 1.0]])])  # one mean and std for both
    assert first.shape == (2, 2) and second.shape == (1, 2)
    pooled = torch.cat([first.reshape(-1), second.reshape(-1)])
    assert pooled.mean().abs() < 1e-6 and (pooled.std() - 1).abs() < 1e-5
    torch.testing.assert_close(pooled, algorithms.whiten(torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0])))
    with pytest.raises(ValueError, match="greedy"):
        algorithms.compute_advantages(rewards, "self_critical")
    with pytest.raises(ValueError, match="unknown"):
        algorithms.compute_advantages(rewards, "critic")
    assert torch.equal(algorithms.whiten(torch.ones(3)), torch.zeros(3))


def test_reinforce_loss_value_and_gradient():
    log_probs = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    advantages = torch.tensor([[1.0, -0.5]])
    loss = algorithms.reinforce_loss(log_probs, advantages)
    assert loss.item() == pytest.approx(-(1.0 * -1.0 + -0.5 * -2.0) / 2)
    loss.backward()
    torch.testing.assert_close(log_probs.grad, -advantages / 2)


def test_clipped_surrogate_against_hand_values():
    old = torch.zeros(1, 4)
    # ratios: e^0.5 ~ 1.65 (A>0: clipped to 1.2), e^-0.5 ~ 0.61 (A<0: clipped to 0.8), 1.1 (A>0: not clipped),
    # e^0.5 with A<0 (unclipped term is the min -> not clipped).
    new = torch.tensor([[0.5, -0.5, torch.log(torch.tensor(1.1)).item(), 0.5]], requires_grad=True)
    advantages = torch.tensor([[1.0, -1.0, 2.0, -1.0]])
    loss, clip_fraction = algorithms.clipped_surrogate_loss(new, old, advantages, clip_eps=0.2)
    r = torch.exp(new.detach())
    expected_terms = torch.tensor([1.2 * 1.0, 0.8 * -1.0, r[0, 2] * 2.0, r[0, 3] * -1.0])
    assert loss.item() == pytest.approx(-expected_terms.mean().item(), rel=1e-5)
    assert clip_fraction["high"].item() == pytest.approx(0.25) and clip_fraction["low"].item() == pytest.approx(0.25)
    loss.backward()
    # Clipped samples carry no gradient; unclipped ones carry -A * ratio / N.
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == 0
    assert new.grad[0, 2].item() == pytest.approx(-(2.0 * r[0, 2]).item() / 4, rel=1e-5)


def test_clipped_equals_reinforce_gradient_on_policy():
    log_probs = torch.tensor([[-1.0, -3.0, -2.0]], requires_grad=True)
    advantages = torch.tensor([[0.5, -1.0, 0.2]])
    loss, _ = algorithms.clipped_surrogate_loss(log_probs, log_probs.detach(), advantages, 0.2)
    (grad_clipped,) = torch.autograd.grad(loss, log_probs)
    (grad_reinforce,) = torch.autograd.grad(algorithms.reinforce_loss(log_probs, advantages), log_probs)
    torch.testing.assert_close(grad_clipped, grad_reinforce)


def test_presets_are_complete():
    for name, preset in algorithms.PRESETS.items():
        assert preset["advantage"] in algorithms.ADVANTAGE_ESTIMATORS, name
        assert preset["policy_loss"] in algorithms.POLICY_LOSSES, name


def test_adaptive_kl_coef_is_the_proportional_controller():
    # Independent form: the clipped proportional error of Ziegler et al. (2019), step by step.
    beta = 0.1
    for kl, expected_error in [(15.0, 0.2), (11.0, 0.1), (9.0, -0.1), (0.0, -0.2), (10.0, 0.0)]:
        new = algorithms.adaptive_kl_coef(beta, kl, target=10.0, horizon=1000, batch_size=8)
        assert new == pytest.approx(beta * (1 + expected_error * 8 / 1000), rel=1e-12)
    # Held above target, beta grows geometrically: 1000 steps of 8 utterances ~ e^(0.2*8) at most.
    beta = 0.05
    for _ in range(1000):
        beta = algorithms.adaptive_kl_coef(beta, 100.0, 10.0, 1000, 8)
    assert beta == pytest.approx(0.05 * (1 + 0.2 * 8 / 1000) ** 1000)
