"""The KL penalty to the frozen reference, as one piece: which estimator, where it goes, its shape,
the value the adaptive controller steers and its loss term.

Three estimators of KL(pi || pi_ref), pi and pi_ref the policy and the reference at temperature tau:

  exact  sum over frames of the per-frame KL of the alignment distributions (a product of per-frame
         categoricals, so its KL is exact and differentiable). One value per utterance: it is the
         same for the K samples of a group, so it cannot change their advantages. It goes in the
         LOSS. (It upper-bounds the KL of the transcript distributions: data processing.)
  k1     log pi(y) - log pi_ref(y) of each sampled transcript y. Unbiased in value, but as a loss its
         expected gradient is 0 (E[grad log pi] = 0), so it goes in the REWARD: each sample's return
         is r - beta * k1, and the policy gradient carries grad KL(pi || pi_ref).
  k3     (r - 1) - log r, r = pi_ref(y) / pi(y) (Schulman, "Approximating KL divergence"): unbiased,
         >= 0, lower variance than k1. It goes in the LOSS as w * k3 whose gradient is
         w * k1 * grad log pi(y), an estimate of grad KL(pi || pi_ref) (w = 1 on-policy; see
         ``k3_loss``). In the reward it is refused: E[k3 * grad log pi] cancels to first order.

Every penalty is measured per sample, [B, K] (the exact KL repeated over K), so shaping a reward
is a plain broadcast-free subtraction whatever the estimator. ``kl_reduction='mean'`` divides each
value by the utterance's number of frames.

Shapes: B utterances, K hypotheses each, T frames, V classes (see ``rlnf.ctc``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import rlnf.ctc as ctc
from rlnf.ctc import MAX_LOG_RATIO
from rlnf.errors import ConfigError

__all__ = ["PENALISED_METRIC", "KLInputs", "KLEstimator", "ExactKL", "K1", "K3", "ESTIMATORS", "KLPenalty",
           "reduce", "k3_loss"]

# The metric holding the mean penalised KL of a step: what ``KLPenalty.controller_value`` reads back
# (pooled over processes) for the adaptive controller.
PENALISED_METRIC = "kl/penalised"


@dataclass(frozen=True)
class KLInputs:
    """What an estimator reads, for one batch.

    log_probs, ref_log_probs: [B, T, V] per-frame log-probs of pi (may carry a graph) and pi_ref.
    encoded_len: [B] valid frames.
    seq_log_probs: [B, K] log pi(y) of the K hypotheses (may carry a graph; None before they are drawn).
    ref_seq_log_probs: [B, K] log pi_ref(y), for the sequence-level estimators (None otherwise).
    exact: [B] KL(pi || pi_ref) of each utterance summed over frames, no graph, when the rollout has it
    already (it logs it as ``kl`` whatever the estimator); ``ExactKL.value`` re-uses it.
    """

    log_probs: torch.Tensor
    ref_log_probs: torch.Tensor | None
    encoded_len: torch.Tensor
    seq_log_probs: torch.Tensor | None = None
    ref_seq_log_probs: torch.Tensor | None = None
    exact: torch.Tensor | None = None


def reduce(kl: torch.Tensor, encoded_len: torch.Tensor, reduction: str) -> torch.Tensor:
    """KL summed over frames as is ('sum'), or divided by the number of frames ('mean').
    kl [B] or [B, K], encoded_len [B]."""
    if reduction == "sum":
        return kl
    frames = encoded_len.clamp(min=1).to(kl.dtype)
    return kl / (frames if kl.dim() == 1 else frames.unsqueeze(1))


def k3_loss(seq_log_probs: torch.Tensor, old_seq_log_probs: torch.Tensor, ref_seq_log_probs: torch.Tensor,
            max_weight: float | None = None) -> torch.Tensor:
    """The k3 penalty as a loss term: value w * k3, gradient w * k1 * grad log pi(y). [B, K].

    w = rho = pi(y) / pi_old(y) makes E_{y ~ pi_old}[w * k3] = KL(pi || pi_ref), so the gradient is an
    unbiased estimate of grad KL(pi || pi_ref) (k3 alone, rho dropped, would estimate the forward KL's
    gradient instead). On-policy rho = 1. In later PPO epochs rho is truncated from above at
    ``max_weight`` (the clipped loss's 1 + eps_high) and held constant: a truncated importance weight,
    as V-trace's min(rho_bar, rho), so one stale sample whose ratio reached e^20 cannot dominate the
    penalty. It is not raised from below: rho * k3 ~ pi_ref / pi_old stays bounded for a sample whose
    probability fell, while a raised weight would multiply its exploding k3.

    The surrogate w * (sg(k3) + sg(k1) * (log pi - sg(log pi))) has the value w * k3 and the gradient
    w * k1 * grad log pi, computed directly: differentiating k3 itself (d k3 / d log pi = 1 - r) and
    adding k3 would give the same only through a cancellation of r = e^x, which breaks past k3's
    exponent bound and loses precision near it."""
    log_ratio = (seq_log_probs.detach() - old_seq_log_probs.detach()).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    weight = log_ratio.exp()
    if max_weight is not None:
        weight = weight.clamp(max=max_weight)
    k3 = ctc.kl_k3(seq_log_probs.detach(), ref_seq_log_probs)
    k1 = ctc.kl_k1(seq_log_probs.detach(), ref_seq_log_probs)
    return weight * (k3 + k1 * (seq_log_probs - seq_log_probs.detach()))


class KLEstimator:
    """One estimator of KL(pi || pi_ref): its value per sample, its loss term, and where it belongs."""

    name: ClassVar[str]
    in_reward: ClassVar[bool]  # where its penalty is correct: folded into the reward, or a loss term
    sequence_level: ClassVar[bool]  # needs log pi_ref(y), and samples of pi (not a beam's N-best)
    misplaced: ClassVar[str]  # why the other placement is wrong (the config error's reason)

    def value(self, inputs: KLInputs) -> torch.Tensor:
        """The KL per sample in nats summed over frames, [B, K], no graph."""
        raise NotImplementedError

    def loss_term(self, inputs: KLInputs, old_seq_log_probs: torch.Tensor, max_weight: float | None) -> torch.Tensor:
        """The differentiable penalty, [B] or [B, K] (its mean is the loss); only for in-loss estimators."""
        raise NotImplementedError(f"the {self.name} KL is not a loss term: {self.misplaced}")


class ExactKL(KLEstimator):
    name, in_reward, sequence_level = "exact", False, False
    misplaced = ("the exact KL is the same for all K samples of an utterance, so in the reward it cancels in the "
                 "group baseline; use it in the loss (kl_in_reward=false), or k1 in the reward")

    def value(self, inputs: KLInputs) -> torch.Tensor:
        per_utterance = inputs.exact
        if per_utterance is None:
            with torch.no_grad():
                per_utterance = ctc.exact_kl(inputs.log_probs.detach(), inputs.ref_log_probs, inputs.encoded_len)
        return per_utterance.unsqueeze(1).expand_as(inputs.seq_log_probs)

    def loss_term(self, inputs, old_seq_log_probs, max_weight):
        return ctc.exact_kl(inputs.log_probs, inputs.ref_log_probs, inputs.encoded_len)  # [B]


class K1(KLEstimator):
    name, in_reward, sequence_level = "k1", True, True
    misplaced = ("k1 as a loss term has zero expected gradient; use k1 in the reward (kl_in_reward=true), or exact "
                 "or k3 in the loss")

    def value(self, inputs: KLInputs) -> torch.Tensor:
        return ctc.kl_k1(inputs.seq_log_probs.detach(), inputs.ref_seq_log_probs)


class K3(KLEstimator):
    name, in_reward, sequence_level = "k3", False, True
    misplaced = ("k3 in the reward is refused: E[k3 * grad log pi] = grad KL(pi||ref) - grad KL(ref||pi), which "
                 "cancels to first order, so it barely pulls towards the reference; use k1 in the reward, or k3 / "
                 "exact in the loss (kl_in_reward=false)")

    def value(self, inputs: KLInputs) -> torch.Tensor:
        return ctc.kl_k3(inputs.seq_log_probs.detach(), inputs.ref_seq_log_probs)

    def loss_term(self, inputs, old_seq_log_probs, max_weight):
        return k3_loss(inputs.seq_log_probs, old_seq_log_probs, inputs.ref_seq_log_probs, max_weight)


ESTIMATORS: dict[str, type[KLEstimator]] = {cls.name: cls for cls in (ExactKL, K1, K3)}


@dataclass(frozen=True)
class KLPenalty:
    """The configured penalty: an estimator, where it goes (``in_reward``) and the frame reduction.

    The rollout asks for ``value`` (per sample, reduced) and ``shape`` (the rewards the advantages
    see); the loss asks for ``loss``; the adaptive controller reads ``controller_value``. Nothing
    else branches on the estimator."""

    estimator: KLEstimator
    in_reward: bool
    reduction: str = "sum"

    @classmethod
    def from_config(cls, algo) -> "KLPenalty":
        """From an ``AlgorithmConfig`` whose presets are applied; raises ConfigError for a placement
        the estimator does not support."""
        estimator = ESTIMATORS[algo.kl_estimator]()
        penalty = cls(estimator, bool(algo.kl_in_reward), algo.kl_reduction)
        if algo.kl_coef > 0:
            penalty.check(rollout=algo.rollout)
        return penalty

    def check(self, rollout: str = "sample") -> None:
        """Refuse a placement or rollout the estimator is not correct for (names the config keys)."""
        if self.in_reward != self.estimator.in_reward:
            raise ConfigError(f"algorithm.kl_in_reward={str(self.in_reward).lower()} with "
                              f"kl_estimator={self.estimator.name}: {self.estimator.misplaced}")
        if self.estimator.sequence_level and rollout != "sample":
            raise ConfigError(f"algorithm.rollout={rollout} needs algorithm.kl_estimator=exact: "
                              f"{self.estimator.name} estimates the KL from samples of the policy")

    @property
    def needs_sequence_reference(self) -> bool:
        """Whether the rollout must compute log pi_ref(y) of every hypothesis."""
        return self.estimator.sequence_level

    def value(self, inputs: KLInputs) -> torch.Tensor:
        """The penalised KL per sample, [B, K], reduced, no graph (logged as ``kl/penalised``)."""
        return reduce(self.estimator.value(inputs), inputs.encoded_len, self.reduction)

    def shape(self, rewards: torch.Tensor, penalised: torch.Tensor, beta: float) -> torch.Tensor:
        """The rewards the advantages are computed from, [B, K]: r - beta * KL when the penalty
        goes in the reward, r otherwise."""
        if penalised.shape != rewards.shape:
            raise ValueError(f"KL penalty {tuple(penalised.shape)} and rewards {tuple(rewards.shape)} differ in shape")
        return rewards - beta * penalised if self.in_reward else rewards

    def loss(self, inputs: KLInputs, old_seq_log_probs: torch.Tensor, beta: float,
             max_weight: float | None = None) -> torch.Tensor:
        """beta * mean(penalty) as a loss term (a scalar; 0 when the penalty is in the reward)."""
        if self.in_reward or beta == 0:
            return torch.zeros((), device=inputs.log_probs.device)
        term = self.estimator.loss_term(inputs, old_seq_log_probs, max_weight)
        return beta * reduce(term, inputs.encoded_len, self.reduction).mean()

    @staticmethod
    def controller_value(metrics: dict[str, float]) -> float:
        """The step's mean penalised KL (what the adaptive controller holds at its target)."""
        return metrics[PENALISED_METRIC]
