"""RL fine-tuning of a NeMo CTC model against one or more rewards, with a KL penalty.

    rlnf run rl_finetune --config configs/rl/rloo.yaml policy.path=model.nemo \
        data.train_manifest=train.json output_dir=runs/rloo

Each step: rollout (one encoder pass, K sampled hypotheses per utterance, rewards, advantages)
-> policy update(s) -> log -> validate -> checkpoint. See ``rlnf/rl.py`` for the step itself.

With trainer.devices x trainer.num_nodes > 1 (or under torchrun / srun) every process takes its
shard of each global batch; see ``rlnf/distributed.py`` for what is reduced and how.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from rlnf.config import RLFinetuneConfig, to_yaml
from rlnf.errors import RlnfError
from rlnf.recipe_loop import Recipe

CONFIG_CLASS = RLFinetuneConfig
log = logging.getLogger("rlnf.rl_finetune")


class RLFinetuneRecipe(Recipe):
    name = "rl_finetune"
    train_metric = "reward/mean"  # picks best.nemo without a validation set

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from rlnf.algorithms import KLController
        from rlnf.checkpoint import CheckpointManager, seed_everything
        from rlnf.data.loader import AudioDataset, TrainStream
        from rlnf.distributed import Distributed
        from rlnf.metric_logging import NullLogger, build_logger
        from rlnf.policy import CTCPolicy
        from rlnf.rewards import build_rewards
        from rlnf.recipe_utils import load_utterances, resolve_best_metric
        from rlnf.training import build_optimizer, build_scheduler, resolve_device, resolve_precision

        cfg, trainer = self.cfg, self.cfg.trainer
        # Processes first (a multi-process run launches or joins them here), models after.
        self.dist = dist = Distributed(trainer, resolve_device(trainer.device))
        self.device = dist.device
        seed_everything(trainer.seed)
        self.autocast_dtype = resolve_precision(trainer.precision, self.device)

        # Rewards first: a bad reward name or checkpoint fails before the policy loads.
        self.rewards = build_rewards(cfg.rewards)
        needing = [item.label for item in self.rewards.rewards if item.needs_references]
        reason = f"reward '{needing[0]}' needs a reference transcript" if needing else False
        train, self.train_stats = load_utterances(cfg.data, cfg.data.train_manifest, reason)
        self.rewards.check_references(train.texts, train.wheres)
        self.val = None
        if cfg.data.val_manifest:
            self.val, _ = load_utterances(cfg.data, cfg.data.val_manifest, False, limit=cfg.data.max_val_samples)

        self.policy = CTCPolicy.load(cfg.policy.path, self.device, cfg.policy.decoder, cfg.policy.adapters)
        self.warn_unreachable_references(train)
        self.reference = None
        self.reference_cache = None
        algo = cfg.algorithm
        self.kl = KLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)  # the one owner of beta
        train_dataset = AudioDataset(train, self.policy.sample_rate, cfg.data.skip_bad_samples)
        if self.kl.enabled:
            from rlnf.reference import checked_reference_cache

            self.reference = self.policy.frozen_reference(cfg.policy.path)
            if cfg.algorithm.reference_cache_mb > 0:
                self.reference_cache = checked_reference_cache(self.reference, train_dataset,
                                                               int(cfg.algorithm.reference_cache_mb * 2**20))
        self.stream = TrainStream(train_dataset,
                                  trainer.batch_size, cfg.data.bucket_size, cfg.data.shuffle, trainer.seed,
                                  cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                                  rank=dist.rank, world_size=dist.world_size)
        # Validation is sharded too: each process transcribes every world_size-th utterance.
        self.val_dataset = None
        if self.val:
            self.val_dataset = AudioDataset(self.val[dist.rank::dist.world_size], self.policy.sample_rate,
                                            cfg.data.skip_bad_samples)

        self.has_validation = self.val is not None
        self.max_steps = trainer.max_steps
        self.trained_model = self.policy.model
        self.optimizer = build_optimizer(self.policy.model.parameters(), trainer)
        self.updates_per_step = cfg.algorithm.ppo_epochs
        self.scheduler = build_scheduler(self.optimizer, trainer.max_steps * self.updates_per_step, trainer)
        metric, mode = resolve_best_metric(trainer, self.val, train_metric=self.train_metric)
        self.checkpoints = CheckpointManager(self.run_dir, metric, mode, keep_last=trainer.keep_last)
        resume_step = self.restore()
        # Gradient-carrying forwards run through DDP in a process group (identity otherwise).
        self.policy.train_module = dist.wrap(self.policy.model)
        if dist.is_main:  # only rank 0 writes
            self.logger = build_logger(self.run_dir, cfg, resume_step)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        else:
            self.logger = NullLogger()
        self.rollouts: list = []  # the last step's, for the sample tables

    def warn_unreachable_references(self, train: list) -> None:
        """References the policy can never spell (digits, punctuation outside its vocabulary): a
        reference-based reward cannot reach 1 on them. Counted and reported once (train_ctc's
        data.oov decides the same question for CTC targets)."""
        if not self.rewards.needs_references:
            return
        unreachable = train.rows_with_text(self.policy.outside_vocabulary)
        if len(unreachable) and self.dist.is_main:
            first = train[unreachable[0]]
            log.warning("%d of %d training references hold characters the policy cannot produce (first: %s: %r); "
                        "reference-based rewards cannot reach 1 on them. Normalise the references to the policy's "
                        "vocabulary for a reachable target", len(unreachable), len(train), first.where,
                        self.policy.outside_vocabulary(first.text))

    def _autocast(self):
        from rlnf.training import autocast

        return autocast(self.device, self.autocast_dtype)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    # ------------------------------------------------------------------------------ one step
    def run_step(self, iterator) -> tuple[dict[str, float], dict[str, float]]:
        """The step's micro-batches (agreed between processes, see ``Distributed.agree_on_batches``),
        then rollout and update(s)."""
        micro_batches, weights = self.dist.agree_on_batches(lambda: next(iterator), self.cfg.trainer.grad_accum_steps)
        metrics, self.rollouts = self.train_step(micro_batches, weights)
        audio_seconds = sum(float(batch.audio_len.sum()) for batch in micro_batches) / self.policy.sample_rate
        return metrics, {"utterances": sum(len(batch) for batch in micro_batches), "audio_seconds": audio_seconds}

    def rollout(self, batch, index: int, keep_graph: bool):
        """make_rollout on one micro-batch; an error on any process (a reward returning NaN, or
        raising) stops every process before the update, so they stop together, with a checkpoint.
        No collective runs inside ``together``: a process that failed is already in its own."""
        from rlnf.rl import StepContext, make_rollout

        cfg = self.cfg
        # Sampling keyed by (seed, step, micro-batch, manifest line): the same hypotheses whichever
        # process or batch an utterance lands in.
        step = StepContext(beta=self.kl.value, sample_keys=[(cfg.trainer.seed, self.step, index, u.line)
                                                            for u in batch.utterances],
                           reference_cache=self.reference_cache, autocast=self._autocast, keep_graph=keep_graph)
        return self.dist.together(lambda: make_rollout(self.policy, self.reference, self.rewards,
                                                       batch.to(self.device), cfg.algorithm, step))

    def whiten(self, rollouts: list) -> list:
        """The step's advantages whitened with one mean and std over every micro-batch and process."""
        from rlnf.algorithms import whiten_together

        advantages = whiten_together([rollout.advantages for rollout in rollouts], all_reduce_sum=self.dist.group_sum)
        return [rollout.with_advantages(whitened) for rollout, whitened in zip(rollouts, advantages)]

    def train_step(self, micro_batches: list, weights: list[float] | None = None) -> tuple[dict[str, float], list]:
        """Rollout and update(s) on ``grad_accum_steps`` micro-batches; returns this process's metrics
        and rollouts. ``weights``: per micro-batch loss weights (see ``Distributed.agree_on_batches``)."""
        import torch

        from rlnf.distributed import micro_batch_weights, pool_metrics
        from rlnf.rl import reference_targets, rl_loss
        from rlnf.training import clip_gradients

        cfg, algo = self.cfg, self.cfg.algorithm
        # Advantages whitened over the step need every micro-batch's rollout before the first update;
        # otherwise each micro-batch is rolled out just before its update, and when that update is
        # on-policy with modules acting as in the rollout (frozen BatchNorm, no dropout), it re-uses
        # the rollout's forward pass and its graph instead of running a second one.
        rollouts_first = algo.whiten_advantages
        reuse_graph = (algo.ppo_epochs == 1 and cfg.policy.batchnorm == "frozen" and not cfg.policy.dropout
                       and not rollouts_first)
        # (metrics, utterances) per micro-batch: the step's metrics are utterance-weighted means
        # (stds pooled), so they describe the whole step's batch however it was cut up.
        entries: list[tuple[dict[str, float], float]] = []

        def record(values: dict[str, float], weight: float = 1.0) -> None:
            entries.append((values, weight))

        rollouts = []
        if rollouts_first:
            rollouts = self.whiten([self.rollout(batch, index, keep_graph=False)[0]
                                    for index, batch in enumerate(micro_batches)])
            for rollout in rollouts:
                record(rollout.metrics, len(rollout.batch))
        accum = len(micro_batches)
        weights = weights or micro_batch_weights([[len(batch) for batch in micro_batches]], 0)
        for epoch in range(algo.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            finite = True
            for index, batch in enumerate(micro_batches):
                # Gradients are all-reduced once per update, after the last micro-batch.
                with self.dist.no_sync(self.policy.train_module, enabled=index < accum - 1):
                    current = None  # the rollout's forward pass, when the update re-uses it
                    if epoch == 0 and not rollouts_first:
                        rollout, current = self.rollout(batch, index, reuse_graph)
                        rollouts.append(rollout)
                        record(rollout.metrics, len(batch))
                    rollout = rollouts[index]
                    self.policy.set_mode("update", cfg.policy.batchnorm, cfg.policy.dropout)
                    targets = None
                    if algo.supervised_coef > 0:
                        targets = reference_targets(self.policy, rollout.batch, cfg.data.oov, cfg.data.lowercase)
                    loss, loss_metrics = rl_loss(self.policy, rollout, algo, self.kl.value, current, targets,
                                                 autocast=self._autocast)
                    record(loss_metrics, len(batch))
                    finite = finite and bool(torch.isfinite(loss))
                    self.dist.backward(loss * weights[index])
            finite = self.dist.all_finite(finite)
            grad_norm = clip_gradients(self.policy.model.parameters(), cfg.trainer.max_grad_norm)
            if finite and math.isfinite(grad_norm):
                self.optimizer.step()
            else:  # a NaN/inf loss or gradient: skip this update rather than corrupt the weights
                self.skipped_steps += 1
                log.warning("step %d: non-finite loss or gradient, update skipped", self.step + 1)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            record({"grad_norm": grad_norm})
        averaged = pool_metrics(entries, std_scale=algo.num_samples)
        averaged["train/skipped_steps"] = self.skipped_steps
        averaged["train/skipped_clips"] = self.stream.skipped_clips
        averaged["lr"] = self.scheduler.get_last_lr()[0]
        return averaged, rollouts

    # ------------------------------------------------------------------------------ loop hooks
    def agree(self, metrics: dict[str, float], sizes: dict[str, float], stopping: bool,
              timed_out: bool) -> tuple[dict[str, float], dict[str, float], bool, bool]:
        """The global batch's metrics and stop flags (pooled over processes), then one step of the
        KL controller on the pooled penalised KL."""
        metrics, sizes, stopping, timed_out = self.dist.pool_step(metrics, sizes, stopping, timed_out,
                                                                  std_scale=self.cfg.algorithm.num_samples)
        if self.kl.enabled:  # beta of this step, then one controller step
            from rlnf.kl import KLPenalty

            metrics["kl/coef"] = self.kl.value
            self.kl.update(KLPenalty.controller_value(metrics), sizes["utterances"])
        return metrics, sizes, stopping, timed_out

    def after_log(self, metrics: dict[str, float]) -> None:
        every = self.cfg.trainer.samples_every
        if every and self.step % every == 0 and self.dist.is_main:
            self.log_samples(self.rollouts[0])

    def progress(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['reward/mean']:.3f}", "kl": f"{metrics.get('kl', 0.0):.3f}"}

    def log_samples(self, rollout) -> None:
        rows = []
        for b, utterance in enumerate(rollout.batch.utterances[:4]):
            rows.append([b, "reference", utterance.text or "(none)", ""])
            rows.append([b, "greedy", rollout.greedy.texts[b][0],
                         "" if rollout.greedy_rewards is None else float(rollout.greedy_rewards[b])])
            for k, text in enumerate(rollout.samples.texts[b]):
                rows.append([b, f"sample {k}", text, float(rollout.rewards[b, k])])
        self.logger.log_table("samples", ["utt", "kind", "text", "reward"], rows, self.step)
        batch = rollout.batch
        for b in range(min(2, len(batch))):
            clip = batch.audio[b, : int(batch.audio_len[b])].float().cpu().numpy()
            self.logger.log_audio(f"audio/{b}", clip, self.policy.sample_rate, self.step)

    def stopped(self, exc: Exception, together: bool | None = None) -> Exception:
        """What to raise when ``exc`` stops training: an error whose checkpoint keeps the last
        completed step. In a process group only an error every process raised (``together``; by
        default a user error, which the step's named operations raise on every process) can be
        checkpointed (the save is a collective); any other is raised as it is."""
        if together is None:
            together = isinstance(exc, RlnfError)
        if self.dist.world_size > 1 and not together:
            return exc
        return super().stopped(exc)

    def validate(self) -> dict[str, float]:
        """Greedy WER/CER/reward on the validation set; each process transcribes its shard and the
        rows are pooled, so corpus WER is computed over the whole set on every process."""
        from rlnf.evaluation import evaluate_policy, summarize

        try:
            result = evaluate_policy(self.policy, self.val_dataset, self.cfg.trainer.batch_size, self.device,
                                     rewards=self.rewards, autocast=self._autocast)
        except Exception as exc:  # a reward that raised on validation: the step before it is complete
            raise self.stopped(exc, together=False)
        return {f"val/{key}": value for key, value in summarize(self.dist.concatenate(result.rows)).items()}

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, validated: dict[str, float] | None) -> None:
        self.dist.check_identical(self.policy.model)  # every process must hold the same weights
        if self.dist.is_main:  # only rank 0 writes
            super().save_checkpoint(validated)
        else:
            self.train_window = []

    def extra_state(self) -> dict[str, Any]:
        return {"skipped_batches": self.dist.skipped_batches, **self.kl.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.dist.skipped_batches = int(state.get("skipped_batches", 0))
        self.kl.load_state_dict(state)

    def cleanup(self) -> dict[str, Any]:
        from rlnf.recipe_utils import write_summary

        self.logger.close()
        self.dist.barrier()
        if not self.dist.is_main:
            return {}
        return write_summary(self.run_dir, self.step, self.checkpoints, skipped_steps=self.skipped_steps,
                             skipped_batches=self.dist.skipped_batches, world_size=self.dist.world_size,
                             train_manifest=self.train_stats.summary())


def main(cfg: RLFinetuneConfig) -> dict[str, Any]:
    return RLFinetuneRecipe(cfg).run()
