"""Pure RL math: advantages and policy losses over groups of K hypotheses per utterance.

Shapes: ``rewards``, ``advantages``, ``log_probs`` are [B, K] (B utterances, K samples each).
Every function here is side-effect free and unit-tested against hand-computed values.

The presets ("reinforce", "rloo", "grpo", "ppo") are combinations of these pieces; see
``PRESETS`` and the README's "Algorithms" section for the formulas.
"""

from __future__ import annotations

import torch

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "POLICY_LOSSES",
    "PRESETS",
    "rloo_advantages",
    "group_advantages",
    "self_critical_advantages",
    "compute_advantages",
    "whiten",
    "reinforce_loss",
    "clipped_surrogate_loss",
    "adaptive_kl_coef",
]

ADVANTAGE_ESTIMATORS = ("rloo", "group", "self_critical", "none")
POLICY_LOSSES = ("reinforce", "clipped")

# Defaults each preset gives to the algorithm keys the user leaves unset (null).
PRESETS: dict[str, dict] = {
    # REINFORCE with the self-critical baseline (SCST): A = r - r(greedy hypothesis).
    "reinforce": dict(advantage="self_critical", scale_by_std=False, policy_loss="reinforce",
                      ppo_epochs=1, kl_estimator="exact", kl_in_reward=False),
    # RLOO (Ahmadian et al. 2024): leave-one-out baseline, KL folded into the reward per sample.
    "rloo": dict(advantage="rloo", scale_by_std=False, policy_loss="reinforce",
                 ppo_epochs=1, kl_estimator="k1", kl_in_reward=True),
    # GRPO (Shao et al. 2024): group-normalised advantages, clipped ratio, KL as a loss term.
    "grpo": dict(advantage="group", scale_by_std=True, policy_loss="clipped",
                 ppo_epochs=1, kl_estimator="exact", kl_in_reward=False),
    # PPO without a critic: leave-one-out baseline, several clipped epochs per rollout, KL in reward.
    "ppo": dict(advantage="rloo", scale_by_std=False, policy_loss="clipped",
                ppo_epochs=2, kl_estimator="k1", kl_in_reward=True),
}


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j.  [B, K] -> [B, K], K >= 2."""
    num_samples = rewards.shape[1]
    if num_samples < 2:
        raise ValueError("RLOO needs at least 2 samples per utterance (algorithm.num_samples >= 2)")
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (num_samples - 1)
    return rewards - others_mean


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean(r)) / (std(r) + eps) within each group; [B, K] -> [B, K].

    ``std`` is the unbiased sample std of the group. A group whose K rewards are all equal gets
    advantage 0 (not NaN) whatever ``scale_by_std`` is.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    if rewards.shape[1] < 2:
        raise ValueError("std-scaled group advantages need at least 2 samples per utterance")
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def self_critical_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """Self-critical baseline: A_i = r_i - r(greedy hypothesis of the same utterance).

    rewards [B, K], greedy_rewards [B] -> [B, K].
    """
    return rewards - greedy_rewards.unsqueeze(1)


def whiten(values: torch.Tensor, eps: float = 1e-8, all_reduce_sum=None) -> torch.Tensor:
    """Batch whitening: (v - mean) / (std + eps) over all elements (0 where all are equal).

    ``all_reduce_sum`` (multi-process runs) sums a tensor over processes, so mean and unbiased std
    are those of the global batch, computed from (count, sum, sum of squares)."""
    if all_reduce_sum is None:
        centred = values - values.mean()
        if values.numel() < 2:
            return centred
        return centred / (values.std() + eps)
    flat = values.detach().double().reshape(-1)
    count, total, squares = all_reduce_sum(torch.stack([flat.new_tensor(flat.numel()), flat.sum(), (flat * flat).sum()]))
    mean = total / count.clamp(min=1)
    centred = values - mean.to(values.dtype)
    if count < 2:
        return centred
    variance = ((squares - count * mean * mean) / (count - 1)).clamp(min=0)
    return centred / (variance.sqrt().to(values.dtype) + eps)


def compute_advantages(
    rewards: torch.Tensor,
    estimator: str,
    greedy_rewards: torch.Tensor | None = None,
    scale_by_std: bool = False,
    whiten_batch: bool = False,
    all_reduce_sum=None,
) -> torch.Tensor:
    """Dispatch to one advantage estimator, then optionally whiten over the (global) batch. [B, K]."""
    if estimator == "rloo":
        advantages = rloo_advantages(rewards)
    elif estimator == "group":
        advantages = group_advantages(rewards, scale_by_std=scale_by_std)
    elif estimator == "self_critical":
        if greedy_rewards is None:
            raise ValueError("the self_critical advantage needs the greedy hypotheses' rewards")
        advantages = self_critical_advantages(rewards, greedy_rewards)
    elif estimator == "none":
        advantages = rewards.clone()
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {ADVANTAGE_ESTIMATORS}")
    return whiten(advantages, all_reduce_sum=all_reduce_sum) if whiten_batch else advantages


def reinforce_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Policy-gradient loss  -mean(A * log pi(y)); advantages are constants. [B, K] -> scalar."""
    return -(advantages.detach() * log_probs).mean()


def clipped_surrogate_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate on the sequence-level ratio rho = pi(y) / pi_old(y).

        loss = -mean( min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) )

    Args:
        log_probs: [B, K] under the current parameters (requires grad).
        old_log_probs: [B, K] stored at rollout time.
        advantages: [B, K].
        clip_eps: epsilon.
    Returns:
        (loss scalar, clip_fraction scalar: share of samples where the clipped term was active).
    """
    advantages = advantages.detach()
    ratio = torch.exp(log_probs - old_log_probs.detach())
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -torch.minimum(unclipped, clipped).mean()
    clip_fraction = (clipped < unclipped).float().mean()
    return loss, clip_fraction.detach()


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, batch_size: int) -> float:
    """The adaptive KL controller of Ziegler et al. (2019), as in TRL: a proportional step towards
    the target,  beta' = beta * (1 + clip(kl / target - 1, -0.2, 0.2) * batch_size / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * batch_size / horizon)
