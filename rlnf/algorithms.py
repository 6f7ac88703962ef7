"""Pure RL math: advantages and policy losses over groups of K hypotheses per utterance.

Shapes: ``rewards``, ``advantages``, ``log_probs`` are [B, K] (B utterances, K samples each).
Every function here is side-effect free and unit-tested against hand-computed values.

The presets ("reinforce", "rloo", "grpo", "ppo") are combinations of these pieces; see
``PRESETS`` and docs/algorithms.md for the formulas.
"""

from __future__ import annotations

import torch

from rlnf.ctc import MAX_LOG_RATIO

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "POLICY_LOSSES",
    "RATIOS",
    "ROLLOUTS",
    "MIN_STD",
    "PRESETS",
    "rloo_advantages",
    "group_advantages",
    "self_critical_advantages",
    "compute_advantages",
    "uninformative_groups",
    "whiten",
    "whiten_together",
    "reinforce_loss",
    "mwer_loss",
    "importance_ratio",
    "clipped_surrogate_loss",
    "adaptive_kl_coef",
    "KLController",
]

ADVANTAGE_ESTIMATORS = ("rloo", "group", "self_critical", "none")
POLICY_LOSSES = ("reinforce", "clipped", "mwer")
RATIOS = ("sequence", "per_frame")
ROLLOUTS = ("sample", "nbest", "mixed")

# Below this spread a set of rewards is taken as constant: dividing by the std of float rounding
# (1e-8 on rewards near 1) would turn noise into full-size advantages.
MIN_STD = 1e-6

# Defaults each preset gives to the algorithm keys the user leaves unset (null).
PRESETS: dict[str, dict] = {
    # REINFORCE with the self-critical baseline (SCST): A = r - r(greedy hypothesis).
    "reinforce": dict(advantage="self_critical", scale_by_std=False, policy_loss="reinforce",
                      ppo_epochs=1, kl_estimator="exact", kl_in_reward=False, rollout="sample"),
    # RLOO (Ahmadian et al. 2024): leave-one-out baseline, KL folded into the reward per sample.
    "rloo": dict(advantage="rloo", scale_by_std=False, policy_loss="reinforce",
                 ppo_epochs=1, kl_estimator="k1", kl_in_reward=True, rollout="sample"),
    # GRPO (Shao et al. 2024): group-normalised advantages, clipped ratio, KL as a loss term.
    "grpo": dict(advantage="group", scale_by_std=True, policy_loss="clipped",
                 ppo_epochs=1, kl_estimator="exact", kl_in_reward=False, rollout="sample"),
    # PPO without a critic: leave-one-out baseline, several clipped epochs per rollout, KL in reward.
    "ppo": dict(advantage="rloo", scale_by_std=False, policy_loss="clipped",
                ppo_epochs=2, kl_estimator="k1", kl_in_reward=True, rollout="sample"),
    # MWER (Prabhavalkar et al. 2018): the K-best list of a CTC prefix beam search, expected reward
    # under the policy renormalised over the list, minus the list's mean; exact KL in the loss.
    "mwer": dict(advantage="group", scale_by_std=False, policy_loss="mwer", ppo_epochs=1,
                 kl_estimator="exact", kl_in_reward=False, rollout="nbest"),
}


def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j.  [B, K] -> [B, K], K >= 2."""
    num_samples = rewards.shape[1]
    if num_samples < 2:
        raise ValueError("RLOO needs at least 2 samples per utterance (algorithm.num_samples >= 2)")
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (num_samples - 1)
    return rewards - others_mean


def _divide_by_std(centred: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    """centred / (std + eps), and exactly 0 where std < MIN_STD (constant rewards up to rounding)."""
    return torch.where(std < MIN_STD, torch.zeros_like(centred), centred / (std + eps))


def group_advantages(rewards: torch.Tensor, scale_by_std: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: A_i = (r_i - mean(r)) / (std(r) + eps) within each group; [B, K] -> [B, K].

    ``std`` is the unbiased sample std of the group. A group whose K rewards are all equal (std below
    ``MIN_STD``) gets advantage 0 (not NaN, not amplified rounding) whatever ``scale_by_std`` is.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    if rewards.shape[1] < 2:
        raise ValueError("std-scaled group advantages need at least 2 samples per utterance")
    return _divide_by_std(centred, rewards.std(dim=1, keepdim=True), eps)


def self_critical_advantages(rewards: torch.Tensor, greedy_rewards: torch.Tensor) -> torch.Tensor:
    """Self-critical baseline: A_i = r_i - r(greedy hypothesis of the same utterance).

    rewards [B, K], greedy_rewards [B] -> [B, K].
    """
    return rewards - greedy_rewards.unsqueeze(1)


def whiten(values: torch.Tensor, eps: float = 1e-8, all_reduce_sum=None) -> torch.Tensor:
    """Batch whitening: (v - mean) / (std + eps) over all elements; all 0 when the std is below
    ``MIN_STD`` (every value equal up to float rounding).

    ``all_reduce_sum`` (multi-process runs) sums a tensor over processes, so mean and unbiased std
    are those of the global batch, computed from (count, sum, sum of squares)."""
    if all_reduce_sum is None:
        centred = values - values.mean()
        if values.numel() < 2:
            return centred
        return _divide_by_std(centred, values.std(), eps)
    flat = values.detach().double().reshape(-1)
    count, total, squares = all_reduce_sum(torch.stack([flat.new_tensor(flat.numel()), flat.sum(), (flat * flat).sum()]))
    mean = total / count.clamp(min=1)
    centred = values - mean.to(values.dtype)
    if count < 2:
        return centred
    variance = ((squares - count * mean * mean) / (count - 1)).clamp(min=0)
    return _divide_by_std(centred, variance.sqrt().to(values.dtype), eps)


def uninformative_groups(advantages: torch.Tensor) -> torch.Tensor:
    """[B] True where every advantage of a group is 0 up to rounding (|A| < ``MIN_STD``): the group
    adds nothing to the policy gradient. The one criterion for "this group teaches nothing", used by
    ``compute_advantages`` (such groups get exactly 0) and by dynamic resampling (they are re-drawn).
    It looks at the advantages themselves, not the task rewards: a group with equal task rewards
    still carries gradient when a KL folded into the reward or the greedy baseline separates it."""
    return advantages.abs().amax(dim=1) < MIN_STD


def compute_advantages(
    rewards: torch.Tensor,
    estimator: str,
    greedy_rewards: torch.Tensor | None = None,
    scale_by_std: bool = False,
) -> torch.Tensor:
    """One advantage estimator on the (shaped) rewards, [B, K] -> [B, K]; the groups that are
    ``uninformative_groups`` come out exactly 0. Whitening over the step's whole batch is a separate
    step (``whiten_together``), since it needs every micro-batch (and process) of the step."""
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
    return advantages.masked_fill(uninformative_groups(advantages).unsqueeze(1), 0.0)


def whiten_together(advantages: list[torch.Tensor], eps: float = 1e-8, all_reduce_sum=None) -> list[torch.Tensor]:
    """``whiten`` over several tensors at once (a step's micro-batches), with one mean and std for
    all of them (and all processes, through ``all_reduce_sum``); returns each tensor whitened."""
    if not advantages:
        return []
    whitened = whiten(torch.cat([a.reshape(-1) for a in advantages]), eps, all_reduce_sum)
    parts = whitened.split([a.numel() for a in advantages])
    return [part.reshape(a.shape) for part, a in zip(parts, advantages)]


def reinforce_loss(log_probs: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """Policy-gradient loss  -mean(A * log pi(y)); advantages are constants. [B, K] -> scalar."""
    return -(advantages.detach() * log_probs).mean()


def importance_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor, frames: torch.Tensor | None = None,
                     ) -> torch.Tensor:
    """rho = pi(y) / pi_old(y) per sample [B, K], from a log-ratio clamped to +-MAX_LOG_RATIO.

    With ``frames`` [B] it is the per-frame (length-normalised) ratio exp((log pi - log pi_old) / T),
    T the utterance's encoder frames: the geometric mean of the per-frame ratios for a single
    alignment. Gradients flow through ``log_probs`` only."""
    log_ratio = log_probs - old_log_probs.detach()
    if frames is not None:
        log_ratio = log_ratio / frames.clamp(min=1).to(log_ratio.dtype).unsqueeze(1)
    return torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))


def mwer_loss(log_probs: torch.Tensor, advantages: torch.Tensor, distinct: torch.Tensor) -> torch.Tensor:
    """Minimum (word) error rate training over a list of hypotheses (Prabhavalkar et al. 2018):

        loss = -mean_b sum_i P_hat(y_i) * A_i,   P_hat(y_i) = pi(y_i) / sum_{j in list} pi(y_j)

    the expected advantage under the policy renormalised over each utterance's distinct hypotheses
    (``distinct`` [B, K] marks first occurrences; repeats get no weight). With A_i = r_i - mean(r)
    this is MWER's risk with the list-mean baseline: the baseline does not change the gradient, since
    P_hat sums to 1. log_probs [B, K] (requires grad), advantages [B, K] (constants) -> scalar."""
    weights = torch.softmax(log_probs.masked_fill(~distinct, float("-inf")), dim=1)
    return -(weights * advantages.detach()).sum(dim=1).mean()


def clipped_surrogate_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    frames: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate with a lower and an upper clip (DAPO's clip-higher):

        loss = -mean( w * min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) )

    ``frames`` None: the sequence ratio rho = pi(y)/pi_old(y), w = 1. ``frames`` [B] given: the
    per-frame ratio s = rho^(1/T) of ``importance_ratio`` (GSPO's length normalisation, with T the
    encoder frames, the number of per-frame choices an alignment makes) and w = T, held constant,
    so that on-policy (s = 1) the gradient is exactly REINFORCE's A * grad log pi(y), as with the
    sequence ratio; what changes is only what gets clipped: eps bounds the per-frame drift.

    Args:
        log_probs: [B, K] under the current parameters (requires grad).
        old_log_probs: [B, K] stored at rollout time.
        advantages: [B, K].
        clip_eps: eps_low. clip_eps_high: eps_high (None: eps_low).
    Returns:
        (loss scalar, {"low", "high"}: share of samples whose clipped term is active on each side;
        low: rho < 1 - eps_low with A < 0, high: rho > 1 + eps_high with A > 0; no gradient flows
        through those samples).
    """
    clip_eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = advantages.detach()
    ratio = importance_ratio(log_probs, old_log_probs, frames)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps_high) * advantages
    objective = torch.minimum(unclipped, clipped)
    if frames is not None:
        objective = objective * frames.clamp(min=1).to(objective.dtype).unsqueeze(1)
    active = clipped < unclipped
    fractions = {"low": (active & (advantages < 0)).float().mean().detach(),
                 "high": (active & (advantages > 0)).float().mean().detach()}
    return -objective.mean(), fractions


def adaptive_kl_coef(beta: float, kl: float, target: float, horizon: int, batch_size: int) -> float:
    """The adaptive KL controller of Ziegler et al. (2019), as in TRL: a proportional step towards
    the target,  beta' = beta * (1 + clip(kl / target - 1, -0.2, 0.2) * batch_size / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * batch_size / horizon)


class KLController:
    """The one owner of beta, the KL coefficient: fixed, or adaptive towards ``target`` (the KL that
    is actually penalised, as measured on the step's batch). The rollout and the loss read ``value``;
    the recipe calls ``update`` once per optimizer step and checkpoints ``state_dict``."""

    def __init__(self, initial: float, target: float | None = None, horizon: int = 10000):
        self.value = float(initial)
        self.target = target
        self.horizon = horizon

    @property
    def enabled(self) -> bool:
        """Whether a KL penalty is applied (and a reference is needed) at all."""
        return self.value > 0

    def update(self, measured_kl: float, utterances: int) -> None:
        """One controller step on this step's penalised KL (no-op without a target)."""
        if self.target is not None:
            self.value = adaptive_kl_coef(self.value, measured_kl, self.target, self.horizon, utterances)

    def state_dict(self) -> dict[str, float]:
        return {"kl_coef": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state.get("kl_coef", self.value))
