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
import time
from pathlib import Path
from typing import Any

from rlnf.config import RLFinetuneConfig, to_yaml
from rlnf.errors import DataError, RewardError, RlnfError

CONFIG_CLASS = RLFinetuneConfig
log = logging.getLogger("rlnf.rl_finetune")


def describe_error(error: Exception) -> str:
    """An error's message as other processes report it: a user error's own, else with its type."""
    return str(error) if isinstance(error, RlnfError) else f"{type(error).__name__}: {error}"


class RLFinetuneRecipe:
    def __init__(self, cfg: RLFinetuneConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir).expanduser().resolve()
        self.step = 0

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from rlnf.algorithms import KLController
        from rlnf.checkpoint import CheckpointManager, seed_everything
        from rlnf.data.loader import AudioDataset, TrainStream
        from rlnf.distributed import Distributed
        from rlnf.metric_logging import NullLogger, build_logger
        from rlnf.policy import CTCPolicy
        from rlnf.rewards import build_rewards
        from rlnf.recipe_utils import load_utterances, resolve_best_metric, restore_policy_trainer_state
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
            from rlnf.rl import checked_reference_cache

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

        self.optimizer = build_optimizer(self.policy.model.parameters(), trainer)
        self.updates_per_step = cfg.algorithm.ppo_epochs
        self.scheduler = build_scheduler(self.optimizer, trainer.max_steps * self.updates_per_step, trainer)
        metric, mode = resolve_best_metric(trainer, self.val)
        self.checkpoints = CheckpointManager(self.run_dir, metric, mode, keep_last=trainer.keep_last)
        self.skipped_steps = 0
        self.skipped_batches = 0
        resume_step = None
        if cfg.resume and self.checkpoints.state_path.exists():
            state = self.checkpoints.load_state()
            self.step = resume_step = restore_policy_trainer_state(state, self.policy.model, self.optimizer,
                                                                   self.scheduler, self.stream,
                                                                   source=self.checkpoints.state_path)
            self.skipped_steps = int(state.get("skipped_steps", 0))
            self.skipped_batches = int(state.get("skipped_batches", 0))
            self.kl.load_state_dict(state)
            log.info("resumed from step %d", self.step)
        elif cfg.resume:
            log.warning("resume=true but %s has no trainer state: starting a new run", self.checkpoints.state_path)
        # Gradient-carrying forwards run through DDP in a process group (identity otherwise).
        self.policy.train_module = dist.wrap(self.policy.model)
        if dist.is_main:  # only rank 0 writes
            self.logger = build_logger(self.run_dir, cfg, resume_step)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        else:
            self.logger = NullLogger()
        self._window_rewards: list[float] = []

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

    # ------------------------------------------------------------------------------ one step
    def next_micro_batches(self, iterator) -> tuple[list, list[float]]:
        """``grad_accum_steps`` micro-batches, and each one's loss weight (``micro_batch_weights``), so
        that the accumulated (and DDP-averaged) gradient is that of the per-utterance mean over the
        whole step, whatever the micro-batch and shard sizes. When a process's shard is all unreadable
        audio (skip_bad_samples), every process skips it."""
        from rlnf.distributed import micro_batch_weights

        accum, world = self.cfg.trainer.grad_accum_steps, self.dist.world_size
        while True:
            error = None
            try:
                batches = [next(iterator) for _ in range(accum)]
            except Exception as exc:  # unreadable audio with skip_bad_samples off, or a data worker that raised
                if world == 1:
                    raise
                error, batches = describe_error(exc), [None] * accum
            counts = [0 if batch is None else len(batch) for batch in batches]
            if world == 1:
                return batches, micro_batch_weights([counts], 0)
            every = self.dist.all_gather_object((counts, None if error is None else str(error)))
            self.raise_together([message for _, message in every], DataError)
            every = [rank_counts for rank_counts, _ in every]
            if all(count > 0 for rank_counts in every for count in rank_counts):
                return batches, micro_batch_weights(every, self.dist.rank)
            self.skipped_batches += 1
            log.warning("step %d: a process has no readable audio in its shard; every process skips these batches",
                        self.step + 1)

    def raise_together(self, messages: list[str | None], error_class: type) -> None:
        """Every process raises when any reported an error (so none waits forever on a collective)."""
        failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
        if failed:
            rank, message = failed[0]
            raise error_class(message if rank == self.dist.rank or len(messages) == 1 else f"process {rank}: {message}")

    def rollout(self, batch, index: int, keep_graph: bool):
        """make_rollout on one micro-batch; in a process group, an error on any process (a reward
        returning NaN, or raising) is raised on all of them before anyone starts the update, so they
        stop together, with a checkpoint."""
        from rlnf.rl import make_rollout

        cfg = self.cfg
        # Sampling keyed by (seed, step, micro-batch, manifest line): the same hypotheses whichever
        # process or batch an utterance lands in.
        keys = [(cfg.trainer.seed, self.step, index, u.line) for u in batch.utterances]
        distributed = self.dist.world_size > 1
        try:
            rollout = make_rollout(self.policy, self.reference, self.rewards, batch.to(self.device), cfg.algorithm,
                                   keep_graph=keep_graph, autocast=self._autocast, sample_keys=keys,
                                   all_reduce_sum=self.dist.all_reduce_sum if distributed else None,
                                   reference_cache=self.reference_cache, kl_coef=self.kl.value)
            error = None
        except Exception as exc:  # bad input, or a reward that raised: every process must hear of it
            if not distributed:
                raise
            rollout, error = None, exc
        if distributed and self.dist.any(error is not None):
            messages = self.dist.all_gather_object(None if error is None else (type(error).__name__,
                                                                               describe_error(error)))
            kinds = {name for name, _ in filter(None, messages)}
            self.raise_together([None if m is None else m[1] for m in messages],
                                RewardError if kinds == {"RewardError"} else RlnfError)
        return rollout

    def train_step(self, micro_batches: list, weights: list[float] | None = None) -> tuple[dict[str, float], list]:
        """Rollout and update(s) on ``grad_accum_steps`` micro-batches; returns this process's metrics
        and rollouts. ``weights``: per micro-batch loss weights (see ``next_micro_batches``)."""
        import torch

        from rlnf.distributed import micro_batch_weights, pool_metrics
        from rlnf.rl import reference_targets, rl_loss
        from rlnf.training import clip_gradients

        cfg, algo = self.cfg, self.cfg.algorithm
        # The rollout's graph can serve the update when the update is on-policy and its modules
        # behave exactly as in the rollout (frozen BatchNorm, no dropout).
        reuse_graph = algo.ppo_epochs == 1 and cfg.policy.batchnorm == "frozen" and not cfg.policy.dropout
        # (metrics, utterances) per micro-batch: the step's metrics are utterance-weighted means
        # (stds pooled), so they describe the whole step's batch however it was cut up.
        entries: list[tuple[dict[str, float], float]] = []

        def record(values: dict[str, float], weight: float = 1.0) -> None:
            entries.append((values, weight))

        rollouts = []
        accum = len(micro_batches)
        weights = weights or micro_batch_weights([[len(batch) for batch in micro_batches]], 0)
        distributed = self.dist.world_size > 1
        for epoch in range(algo.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            finite = True
            for index, batch in enumerate(micro_batches):
                # Gradients are all-reduced once per update, after the last micro-batch.
                with self.dist.no_sync(self.policy.train_module, enabled=index < accum - 1):
                    if epoch == 0:
                        rollout = self.rollout(batch, index, reuse_graph)
                        rollouts.append(rollout)
                        record(rollout.metrics, len(batch))
                    rollout = rollouts[index]
                    self.policy.set_mode("update", cfg.policy.batchnorm, cfg.policy.dropout)
                    targets = None
                    if algo.supervised_coef > 0:
                        targets = reference_targets(self.policy, rollout.batch, cfg.data.oov, cfg.data.lowercase)
                    loss, loss_metrics = rl_loss(self.policy, rollout, algo, targets, autocast=self._autocast,
                                                 kl_coef=self.kl.value)
                    record(loss_metrics, len(batch))
                    if not torch.isfinite(loss):
                        finite = False
                        if not distributed:
                            continue
                        # Every process must take part in the gradient all-reduce: back-propagate
                        # anyway (the gradients are discarded: the update is skipped everywhere).
                    (loss * weights[index]).backward()
            finite = not self.dist.any(not finite)
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

    # ------------------------------------------------------------------------------ loop
    def train(self) -> None:
        from rlnf.recipe_utils import interrupted, out_of_time, step_progress_bar
        from rlnf.training import StopSignal

        trainer = self.cfg.trainer
        iterator = iter(self.stream)
        bar = step_progress_bar(trainer, self.step, "rl_finetune", enabled=self.dist.is_main)
        started_training = time.perf_counter()
        with StopSignal() as stop:
            while self.step < trainer.max_steps:
                started = time.perf_counter()
                position = self.stream.state_dict()
                try:
                    micro_batches, weights = self.next_micro_batches(iterator)
                    metrics, rollouts = self.train_step(micro_batches, weights)
                except Exception as exc:
                    # Bad input, or a reward or data worker that raised, mid-run: keep the work done
                    # so far (the failed step changed no weights) and say how to go on.
                    bar.close()
                    self.stream.load_state_dict(position)
                    raise self.stopped(exc, together=isinstance(exc, RlnfError))
                self.step += 1
                utterances = sum(len(batch) for batch in micro_batches)
                audio_seconds = sum(float(b.audio_len.sum()) for b in micro_batches) / self.policy.sample_rate
                # Every process agrees on stopping: a signal or the time budget on any one stops all.
                stopping = stop.received is not None
                timed_out = out_of_time(started_training, trainer.max_minutes)
                if self.dist.world_size > 1:
                    metrics, utterances, audio_seconds, stopping, timed_out = self.pool(
                        metrics, utterances, audio_seconds, stopping, timed_out)
                if self.kl.enabled:  # beta of this step, then one controller step on the pooled penalised KL
                    metrics["kl/coef"] = self.kl.value
                    self.kl.update(metrics["kl/penalised"], utterances)
                elapsed = time.perf_counter() - started
                metrics.update({"perf/step_time": elapsed, "perf/utterances_per_s": utterances / elapsed,
                                "perf/audio_seconds_per_s": audio_seconds / elapsed})
                self._window_rewards.append(metrics["reward/mean"])
                last = self.step == trainer.max_steps or timed_out
                validated = None
                if self.val is not None and ((trainer.val_every and self.step % trainer.val_every == 0) or last):
                    validated = self.validate()
                if self.step % trainer.log_every == 0 or last or validated:
                    self.logger.log_dict({**metrics, **(validated or {})}, self.step)
                if trainer.samples_every and self.step % trainer.samples_every == 0 and self.dist.is_main:
                    self.log_samples(rollouts[0])
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl', 0.0):.3f}")
                if (trainer.save_every and self.step % trainer.save_every == 0) or last or stopping:
                    self.save_checkpoint(validated)
                if stopping:
                    bar.close()
                    raise interrupted(stop.received or "on another process", self.step, self.checkpoints)
                if last:
                    break
        bar.close()

    def pool(self, metrics: dict[str, float], utterances: int, audio_seconds: float, stopping: bool,
             timed_out: bool) -> tuple[dict[str, float], int, float, bool, bool]:
        """One collective per step: the global batch's metrics (weighted by utterances; pooled stds),
        its size, and whether any process was signalled or ran out of time."""
        from rlnf.distributed import pool_metrics

        parts = self.dist.all_gather_object((metrics, utterances, audio_seconds, stopping, timed_out))
        pooled = pool_metrics([(part[0], part[1]) for part in parts], std_scale=self.cfg.algorithm.num_samples)
        pooled["train/skipped_batches"] = self.skipped_batches
        pooled["train/skipped_clips"] = sum(part[0]["train/skipped_clips"] for part in parts)
        return (pooled, sum(p[1] for p in parts), sum(p[2] for p in parts), any(p[3] for p in parts),
                any(p[4] for p in parts))

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

    def stopped(self, exc: Exception, together: bool) -> Exception:
        """What to raise when ``exc`` stops training: an error whose checkpoint keeps the last
        completed step. In a process group only an error every process raised (``together``) can
        be checkpointed (the save is a collective); any other is raised as it is."""
        from rlnf.recipe_utils import stopped_by_error

        if self.dist.world_size > 1 and not together:
            return exc
        return stopped_by_error(exc, self.step, self.checkpoints, lambda: self.save_checkpoint(None))

    def validate(self) -> dict[str, float]:
        """Greedy WER/CER/reward on the validation set; each process transcribes its shard and the
        rows are pooled, so corpus WER is computed over the whole set on every process."""
        from rlnf.evaluation import evaluate_policy, summarize

        try:
            result = evaluate_policy(self.policy, self.val_dataset, self.cfg.trainer.batch_size, self.device,
                                     rewards=self.rewards, autocast=self._autocast)
        except Exception as exc:  # a reward that raised on validation: the step before it is complete
            raise self.stopped(exc, together=False)
        metrics = result.metrics
        if self.dist.world_size > 1:
            metrics = summarize([row for rows in self.dist.all_gather_object(result.rows) for row in rows])
        return {f"val/{key}": value for key, value in metrics.items()}

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, validated: dict[str, float] | None) -> None:
        from rlnf.recipe_utils import policy_trainer_state

        self.dist.check_identical(self.policy.model)  # every process must hold the same weights
        window, self._window_rewards = self._window_rewards, []
        if not self.dist.is_main:
            return
        save_model = lambda path: self.policy.model.save_to(str(path))  # noqa: E731
        # Without validation data, best.nemo follows the training reward averaged since the last save.
        best = self.checkpoints.update_best_from(validated, window, save_model)
        if best is not None:
            log.info("step %d: new best %s = %.4f", self.step, self.checkpoints.best_metric, best)
        self.checkpoints.save_last(save_model, policy_trainer_state(
            self.step, self.policy.model, self.optimizer, self.scheduler, self.stream,
            skipped_steps=self.skipped_steps, skipped_batches=self.skipped_batches, **self.kl.state_dict()))

    def cleanup(self) -> dict[str, Any]:
        from rlnf.recipe_utils import write_summary

        self.logger.close()
        self.dist.barrier()
        if not self.dist.is_main:
            return {}
        return write_summary(self.run_dir, self.step, self.checkpoints, skipped_steps=self.skipped_steps,
                             skipped_batches=self.skipped_batches, world_size=self.dist.world_size,
                             train_manifest=self.train_stats.summary())


def main(cfg: RLFinetuneConfig) -> dict[str, Any]:
    from rlnf.recipe_utils import run_recipe

    return run_recipe(RLFinetuneRecipe(cfg))
