"""RL fine-tuning of a NeMo CTC model against one or more rewards, with a KL penalty.

    rlnf run rl_finetune --config configs/rl/rloo.yaml policy.path=model.nemo \
        data.train_manifest=train.json output_dir=runs/rloo

Each step: rollout (one encoder pass, K sampled hypotheses per utterance, rewards, advantages)
-> policy update(s) -> log -> validate -> checkpoint. See ``rlnf/rl.py`` for the step itself.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from rlnf.config import RLFinetuneConfig, to_yaml
from rlnf.errors import TrainingInterrupted

CONFIG_CLASS = RLFinetuneConfig
log = logging.getLogger("rlnf.rl_finetune")



class RLFinetuneRecipe:
    def __init__(self, cfg: RLFinetuneConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir).expanduser().resolve()
        self.step = 0

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        import torch

        from rlnf.checkpoint import CheckpointManager, seed_everything
        from rlnf.data.loader import AudioDataset, TrainStream
        from rlnf.metric_logging import build_logger
        from rlnf.policy import CTCPolicy
        from rlnf.rewards import build_rewards
        from rlnf.recipe_utils import load_utterances, resolve_best_metric, restore_policy_trainer_state
        from rlnf.training import build_optimizer, build_scheduler, resolve_device, resolve_precision

        cfg, trainer = self.cfg, self.cfg.trainer
        seed_everything(trainer.seed)
        self.device = resolve_device(trainer.device)
        self.autocast_dtype = resolve_precision(trainer.precision, self.device)

        # Rewards first: a bad reward name or checkpoint fails before the policy loads.
        self.rewards = build_rewards(cfg.rewards)
        needing = [item.label for item in self.rewards.rewards if item.needs_references]
        reason = f"reward '{needing[0]}' needs a reference transcript" if needing else False
        train, self.train_stats = load_utterances(cfg.data, cfg.data.train_manifest, reason)
        self.rewards.check_references([u.text for u in train], [u.where for u in train])
        self.val = None
        if cfg.data.val_manifest:
            self.val, _ = load_utterances(cfg.data, cfg.data.val_manifest, False, limit=cfg.data.max_val_samples)

        self.policy = CTCPolicy.load(cfg.policy.path, self.device)
        self.reference = None
        if cfg.algorithm.kl_coef > 0:
            self.reference = CTCPolicy.load(cfg.policy.path, self.device).freeze()
        self.stream = TrainStream(AudioDataset(train, self.policy.sample_rate, cfg.data.skip_bad_samples),
                                  trainer.batch_size, cfg.data.bucket_size, cfg.data.shuffle, trainer.seed,
                                  cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        self.val_dataset = AudioDataset(self.val, self.policy.sample_rate, cfg.data.skip_bad_samples) if self.val else None

        self.optimizer = build_optimizer(self.policy.model.parameters(), trainer)
        self.updates_per_step = cfg.algorithm.ppo_epochs
        self.scheduler = build_scheduler(self.optimizer, trainer.max_steps * self.updates_per_step, trainer)
        self.generator = torch.Generator(device=self.device).manual_seed(trainer.seed)

        metric, mode = resolve_best_metric(trainer, self.val)
        self.checkpoints = CheckpointManager(self.run_dir, metric, mode, keep_last=trainer.keep_last)
        self.skipped_steps = 0
        resume_step = None
        if cfg.resume and self.checkpoints.state_path.exists():
            state = self.checkpoints.load_state()
            self.step = resume_step = restore_policy_trainer_state(state, self.policy.model, self.optimizer,
                                                                   self.scheduler, self.stream, self.generator)
            self.skipped_steps = int(state.get("skipped_steps", 0))
            log.info("resumed from step %d", self.step)
        elif cfg.resume:
            log.warning("resume=true but %s has no trainer state: starting a new run", self.checkpoints.state_path)
        self.logger = build_logger(self.run_dir, resume_step)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        self._window_rewards: list[float] = []

    def _autocast(self):
        from rlnf.training import autocast

        return autocast(self.device, self.autocast_dtype)

    # ------------------------------------------------------------------------------ one step
    def train_step(self, micro_batches: list) -> tuple[dict[str, float], list]:
        """Rollout and update(s) on ``grad_accum_steps`` micro-batches; returns metrics and rollouts."""
        import torch

        from rlnf.rl import make_rollout, reference_targets, rl_loss
        from rlnf.training import clip_gradients

        cfg, algo = self.cfg, self.cfg.algorithm
        # The rollout's graph can serve the update when the update is on-policy and its modules
        # behave exactly as in the rollout (frozen BatchNorm, no dropout).
        reuse_graph = algo.ppo_epochs == 1 and cfg.policy.batchnorm == "frozen" and not cfg.policy.dropout
        metrics: dict[str, list[float]] = {}

        def record(values: dict[str, float]) -> None:
            for key, value in values.items():
                metrics.setdefault(key, []).append(value)

        rollouts = []
        accum = len(micro_batches)
        for epoch in range(algo.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            finite = True
            for index, batch in enumerate(micro_batches):
                if epoch == 0:
                    rollout = make_rollout(self.policy, self.reference, self.rewards, batch.to(self.device), algo,
                                           self.generator, keep_graph=reuse_graph, autocast=self._autocast)
                    rollouts.append(rollout)
                    record(rollout.metrics)
                rollout = rollouts[index]
                self.policy.set_mode("update", cfg.policy.batchnorm, cfg.policy.dropout)
                targets = None
                if algo.supervised_coef > 0:
                    targets = reference_targets(self.policy, rollout.batch, cfg.data.oov, cfg.data.lowercase)
                loss, loss_metrics = rl_loss(self.policy, rollout, algo, targets, autocast=self._autocast)
                record(loss_metrics)
                if not torch.isfinite(loss):
                    finite = False
                    continue
                (loss / accum).backward()
            grad_norm = clip_gradients(self.policy.model.parameters(), cfg.trainer.max_grad_norm)
            if finite and math.isfinite(grad_norm):
                self.optimizer.step()
            else:  # a NaN/inf loss or gradient: skip this update rather than corrupt the weights
                self.skipped_steps += 1
                log.warning("step %d: non-finite loss or gradient, update skipped", self.step + 1)
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            record({"grad_norm": grad_norm})
        averaged = {key: sum(values) / len(values) for key, values in metrics.items()}
        averaged["train/skipped_steps"] = self.skipped_steps
        averaged["lr"] = self.scheduler.get_last_lr()[0]
        return averaged, rollouts

    # ------------------------------------------------------------------------------ loop
    def train(self) -> None:
        from tqdm.auto import tqdm

        from rlnf.training import StopSignal

        trainer = self.cfg.trainer
        iterator = iter(self.stream)
        # A time-boxed run shows steps and elapsed time rather than a meaningless ETA to max_steps.
        bar = tqdm(total=None if trainer.max_minutes else trainer.max_steps, initial=self.step, desc="rl_finetune",
                   dynamic_ncols=True,
                   disable=not trainer.progress_bar)
        from rlnf.recipe_utils import out_of_time

        started_training = time.perf_counter()
        with StopSignal() as stop:
            while self.step < trainer.max_steps:
                started = time.perf_counter()
                micro_batches = [next(iterator) for _ in range(trainer.grad_accum_steps)]
                metrics, rollouts = self.train_step(micro_batches)
                self.step += 1
                elapsed = time.perf_counter() - started
                utterances = sum(len(batch) for batch in micro_batches)
                audio_seconds = sum(float(b.audio_len.sum()) for b in micro_batches) / self.policy.sample_rate
                metrics.update({"perf/step_time": elapsed, "perf/utterances_per_s": utterances / elapsed,
                                "perf/audio_seconds_per_s": audio_seconds / elapsed})
                self._window_rewards.append(metrics["reward/mean"])
                last = self.step == trainer.max_steps or out_of_time(started_training, trainer.max_minutes)
                validated = None
                if self.val is not None and ((trainer.val_every and self.step % trainer.val_every == 0) or last):
                    validated = self.validate()
                if self.step % trainer.log_every == 0 or last or validated:
                    self.logger.log_dict({**metrics, **(validated or {})}, self.step)
                if trainer.samples_every and self.step % trainer.samples_every == 0:
                    self.log_samples(rollouts[0])
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics.get('kl', 0.0):.3f}")
                if (trainer.save_every and self.step % trainer.save_every == 0) or last or stop.received:
                    self.save_checkpoint(validated)
                if stop.received:
                    bar.close()
                    raise TrainingInterrupted(
                        f"stopped by signal {stop.received} after step {self.step}; checkpoint written to "
                        f"{self.checkpoints.folder}. Continue with: resume=true")
                if last:
                    break
        bar.close()

    def log_samples(self, rollout) -> None:
        from rlnf.metric_logging import markdown_table

        rows = []
        for b, utterance in enumerate(rollout.batch.utterances[:4]):
            rows.append([b, "reference", utterance.text or "(none)", ""])
            rows.append([b, "greedy", rollout.greedy.texts[b][0],
                         "" if rollout.greedy_rewards is None else float(rollout.greedy_rewards[b])])
            for k, text in enumerate(rollout.samples.texts[b]):
                rows.append([b, f"sample {k}", text, float(rollout.rewards[b, k])])
        self.logger.log_text("samples", markdown_table(["utt", "kind", "text", "reward"], rows), self.step)
        batch = rollout.batch
        for b in range(min(2, len(batch))):
            clip = batch.audio[b, : int(batch.audio_len[b])].float().cpu().numpy()
            self.logger.log_audio(f"audio/{b}", clip, self.policy.sample_rate, self.step)

    def validate(self) -> dict[str, float]:
        from rlnf.evaluation import evaluate_policy

        result = evaluate_policy(self.policy, self.val_dataset, self.cfg.trainer.batch_size, self.device,
                                 rewards=self.rewards, autocast=self._autocast)
        return {f"val/{key}": value for key, value in result.metrics.items()}

    # ------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, validated: dict[str, float] | None) -> None:
        from rlnf.recipe_utils import policy_trainer_state

        save_model = lambda path: self.policy.model.save_to(str(path))  # noqa: E731
        best = self.checkpoints.update_best_from(validated, self._window_rewards, save_model)
        self._window_rewards = []  # without validation data, best.nemo follows the reward since the last save
        if best is not None:
            log.info("step %d: new best %s = %.4f", self.step, self.checkpoints.best_metric, best)
        self.checkpoints.save_last(save_model, policy_trainer_state(
            self.step, self.policy.model, self.optimizer, self.scheduler, self.stream, self.generator,
            skipped_steps=self.skipped_steps))

    def cleanup(self) -> dict[str, Any]:
        from rlnf.recipe_utils import write_summary

        self.logger.close()
        return write_summary(self.run_dir, self.step, self.checkpoints, skipped_steps=self.skipped_steps,
                             train_manifest=self.train_stats.summary())


def main(cfg: RLFinetuneConfig) -> dict[str, Any]:
    recipe = RLFinetuneRecipe(cfg)
    recipe.setup()
    try:
        recipe.train()
    except TrainingInterrupted:
        recipe.logger.close()
        raise
    return recipe.cleanup()
