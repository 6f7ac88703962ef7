"""Supervised CTC training (or fine-tuning) of a NeMo QuartzNet-style model.

    rlnf run train_ctc --config ctc/small data.train_manifest=train.json data.val_manifest=val.json \
        output_dir=runs/ctc

The same data, logging and run-folder conventions as rl_finetune. It makes the demo's starting
policy and is the supervised baseline RL is compared with.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from rlnf.config import CTCTrainConfig, to_yaml

CONFIG_CLASS = CTCTrainConfig
log = logging.getLogger("rlnf.train_ctc")


class CTCTrainRecipe:
    def __init__(self, cfg: CTCTrainConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir).expanduser().resolve()
        self.step = 0

    def setup(self) -> None:
        from omegaconf import OmegaConf

        from rlnf.checkpoint import CheckpointManager, seed_everything
        from rlnf.data.loader import AudioDataset, TrainStream
        from rlnf.distributed import resolve_layout
        from rlnf.errors import ConfigError
        from rlnf.metric_logging import build_logger
        from rlnf.models import quartznet_config
        from rlnf.policy import CTCPolicy
        from rlnf.recipe_utils import load_utterances, resolve_best_metric, restore_policy_trainer_state
        from rlnf.training import build_optimizer, build_scheduler, resolve_device, resolve_precision

        cfg, trainer = self.cfg, self.cfg.trainer
        devices, num_nodes = resolve_layout(trainer.devices, trainer.num_nodes)
        if devices * num_nodes > 1:
            raise ConfigError(f"train_ctc runs in one process (trainer.devices x trainer.num_nodes = "
                              f"{devices} x {num_nodes}); multi-process training is rl_finetune's")
        seed_everything(trainer.seed)
        self.device = resolve_device(trainer.device)
        self.autocast_dtype = resolve_precision(trainer.precision, self.device)
        train, self.train_stats = load_utterances(cfg.data, cfg.data.train_manifest, require_text=True)
        self.val = None
        if cfg.data.val_manifest:
            self.val, _ = load_utterances(cfg.data, cfg.data.val_manifest, True, limit=cfg.data.max_val_samples)

        if cfg.model.path:
            self.policy = CTCPolicy.load(cfg.model.path, self.device)
        else:
            from nemo.collections.asr.models import EncDecCTCModel

            model_cfg = quartznet_config(cfg.model.vocabulary(), size=cfg.model.size,
                                         spec_augment=cfg.model.spec_augment, dropout=cfg.model.dropout)
            self.policy = CTCPolicy(EncDecCTCModel(cfg=OmegaConf.create(model_cfg)))
            self.policy.model.to(self.device)
        # References become CTC targets here: map them now, so a bad line fails before training.
        self.targets: dict[str, list[int] | None] = {}
        kept = []
        for utterance in train:
            ids = self.policy.encode_text(utterance.text, oov=cfg.data.oov, where=utterance.where,
                                          lowercase=cfg.data.lowercase)
            if ids is not None:
                self.targets[utterance.where] = ids
                kept.append(utterance)
        if len(kept) < len(train):
            log.warning("skipped %d utterances with characters outside the vocabulary (data.oov=skip)",
                        len(train) - len(kept))
        self.stream = TrainStream(AudioDataset(kept, self.policy.sample_rate, cfg.data.skip_bad_samples),
                                  trainer.batch_size, cfg.data.bucket_size, cfg.data.shuffle, trainer.seed,
                                  cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        self.val_dataset = AudioDataset(self.val, self.policy.sample_rate) if self.val else None
        self.optimizer = build_optimizer(self.policy.model.parameters(), trainer)
        self.scheduler = build_scheduler(self.optimizer, trainer.max_steps, trainer)
        metric, mode = resolve_best_metric(trainer, self.val, train_metric="train/loss")
        self.checkpoints = CheckpointManager(self.run_dir, metric, mode, keep_last=trainer.keep_last)
        self.skipped_steps = 0
        resume_step = None
        if cfg.resume and self.checkpoints.state_path.exists():
            state = self.checkpoints.load_state()
            self.step = resume_step = restore_policy_trainer_state(state, self.policy.model, self.optimizer,
                                                                   self.scheduler, self.stream,
                                                                   source=self.checkpoints.state_path)
            self.skipped_steps = int(state.get("skipped_steps", 0))
        self.logger = build_logger(self.run_dir, cfg, resume_step)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        self._window_losses: list[float] = []
        log.info("train_ctc: %d parameters, %d training utterances",
                 sum(p.numel() for p in self.policy.model.parameters()), len(kept))

    def train_step(self, batch) -> dict[str, float]:
        """One supervised step: SpecAugment, dither and dropout on (train mode), CTC loss, AdamW."""
        import math

        import torch

        from rlnf import ctc
        from rlnf.policy import labels_to_padded
        from rlnf.training import autocast, clip_gradients

        batch = batch.to(self.device)
        self.policy.model.train()
        labels, label_len = labels_to_padded([self.targets[u.where] for u in batch.utterances], self.device)
        with autocast(self.device, self.autocast_dtype):
            log_probs, encoded_len, _ = self.policy.model(input_signal=batch.audio, input_signal_length=batch.audio_len)
        # A target longer than its frames allow has no alignment: its loss is infinite and its CTC
        # gradient NaN, so it is left out of the loss (and counted) rather than poisoning the step.
        feasible = ctc.min_frames(labels, label_len) <= encoded_len
        if feasible.any():
            per_utterance = torch.nn.functional.ctc_loss(
                log_probs.float().transpose(0, 1)[:, feasible], labels[feasible], encoded_len[feasible],
                label_len[feasible], blank=self.policy.blank_id, reduction="none", zero_infinity=False)
            loss = per_utterance.mean()
        else:
            loss = log_probs.sum() * 0.0
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(self.policy.model.parameters(), self.cfg.trainer.max_grad_norm)
        if math.isfinite(grad_norm) and feasible.any():
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.scheduler.step()
        return {"train/loss": float(loss.detach()), "train/infeasible": float((~feasible).float().mean()),
                "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0], "train/skipped_steps": self.skipped_steps}

    def train(self) -> None:
        from rlnf.recipe_utils import interrupted, out_of_time, step_progress_bar, stopped_by_error
        from rlnf.training import StopSignal

        trainer = self.cfg.trainer
        iterator = iter(self.stream)
        bar = step_progress_bar(trainer, self.step, "train_ctc")
        started_training = time.perf_counter()
        with StopSignal() as stop:
            while self.step < trainer.max_steps:
                started = time.perf_counter()
                position = self.stream.state_dict()
                try:
                    batch = next(iterator)
                    metrics = self.train_step(batch)
                except Exception as exc:  # bad audio or a data worker that raised: keep the work done
                    bar.close()
                    self.stream.load_state_dict(position)
                    raise stopped_by_error(exc, self.step, self.checkpoints, lambda: self.save_checkpoint(None))
                self.step += 1
                elapsed = time.perf_counter() - started
                metrics.update({"perf/step_time": elapsed, "perf/utterances_per_s": len(batch) / elapsed})
                self._window_losses.append(metrics["train/loss"])
                last = self.step == trainer.max_steps or out_of_time(started_training, trainer.max_minutes)
                validated = None
                if self.val is not None and ((trainer.val_every and self.step % trainer.val_every == 0) or last):
                    validated = self.validate()
                if self.step % trainer.log_every == 0 or last or validated:
                    self.logger.log_dict({**metrics, **(validated or {})}, self.step)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
                if (trainer.save_every and self.step % trainer.save_every == 0) or last or stop.received:
                    self.save_checkpoint(validated)
                if stop.received:
                    bar.close()
                    raise interrupted(stop.received, self.step, self.checkpoints)
                if last:
                    break
        bar.close()

    def validate(self) -> dict[str, float]:
        from rlnf.evaluation import evaluate_policy
        from rlnf.training import autocast

        result = evaluate_policy(self.policy, self.val_dataset, self.cfg.trainer.batch_size, self.device,
                                 autocast=lambda: autocast(self.device, self.autocast_dtype))
        return {f"val/{key}": value for key, value in result.metrics.items()}

    def save_checkpoint(self, validated: dict[str, float] | None) -> None:
        from rlnf.recipe_utils import policy_trainer_state

        save_model = lambda path: self.policy.model.save_to(str(path))  # noqa: E731
        self.checkpoints.update_best_from(validated, self._window_losses, save_model)
        self._window_losses = []  # without validation data, best.nemo follows the loss since the last save
        self.checkpoints.save_last(save_model, policy_trainer_state(
            self.step, self.policy.model, self.optimizer, self.scheduler, self.stream,
            skipped_steps=self.skipped_steps))

    def cleanup(self) -> dict[str, Any]:
        from rlnf.recipe_utils import write_summary

        self.logger.close()
        return write_summary(self.run_dir, self.step, self.checkpoints, skipped_steps=self.skipped_steps,
                             train_manifest=self.train_stats.summary())


def main(cfg: CTCTrainConfig) -> dict[str, Any]:
    from rlnf.recipe_utils import run_recipe

    return run_recipe(CTCTrainRecipe(cfg))
