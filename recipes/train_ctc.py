"""Supervised CTC training (or fine-tuning) of a NeMo QuartzNet-style model.

    rlnf run train_ctc --config ctc/small data.train_manifest=train.json data.val_manifest=val.json \
        output_dir=runs/ctc

The same data, logging and run-folder conventions as rl_finetune. It makes the demo's starting
policy and is the supervised baseline RL is compared with.
"""

from __future__ import annotations

import logging
from typing import Any

from rlnf.config import CTCTrainConfig, to_yaml
from rlnf.recipe_loop import Recipe

CONFIG_CLASS = CTCTrainConfig
log = logging.getLogger("rlnf.train_ctc")


class CTCTrainRecipe(Recipe):
    name = "train_ctc"
    train_metric = "train/loss"

    def setup(self) -> None:
        import numpy as np
        from omegaconf import OmegaConf

        from rlnf.checkpoint import CheckpointManager, seed_everything
        from rlnf.data.loader import AudioDataset, TrainStream
        from rlnf.distributed import resolve_layout
        from rlnf.errors import ConfigError
        from rlnf.metric_logging import build_logger
        from rlnf.models import quartznet_config
        from rlnf.policy import CTCPolicy
        from rlnf.recipe_utils import load_utterances, resolve_best_metric
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
        # References become CTC targets here, so a bad line fails before training: once per distinct
        # transcript (a large manifest repeats them), its error naming the first line that has it.
        text_ids, first_rows = np.unique(train.text_index, return_index=True)
        self.targets: dict[str, list[int]] = {}
        for text_id, row in zip(text_ids.tolist(), first_rows.tolist()):
            text = train.distinct_texts[text_id]
            ids = self.policy.encode_text(text, oov=cfg.data.oov, where=train.where(row), lowercase=cfg.data.lowercase)
            if ids is not None:
                self.targets[text] = ids
        kept = train[train.rows_with_text(self.targets.__contains__)]
        if len(kept) < len(train):
            log.warning("skipped %d utterances with characters outside the vocabulary (data.oov=skip)",
                        len(train) - len(kept))
        self.stream = TrainStream(AudioDataset(kept, self.policy.sample_rate, cfg.data.skip_bad_samples),
                                  trainer.batch_size, cfg.data.bucket_size, cfg.data.shuffle, trainer.seed,
                                  cfg.data.num_workers, pin_memory=self.device.type == "cuda")
        self.val_dataset = AudioDataset(self.val, self.policy.sample_rate) if self.val else None
        self.has_validation = self.val is not None
        self.max_steps = trainer.max_steps
        self.trained_model = self.policy.model
        self.optimizer = build_optimizer(self.policy.model.parameters(), trainer)
        self.scheduler = build_scheduler(self.optimizer, trainer.max_steps, trainer)
        metric, mode = resolve_best_metric(trainer, self.val, train_metric=self.train_metric)
        self.checkpoints = CheckpointManager(self.run_dir, metric, mode, keep_last=trainer.keep_last)
        self.logger = build_logger(self.run_dir, cfg, self.restore())
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
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
        labels, label_len = labels_to_padded([self.targets[u.text] for u in batch.utterances], self.device)
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

    def run_step(self, iterator) -> tuple[dict[str, float], dict[str, float]]:
        batch = next(iterator)
        return self.train_step(batch), {"utterances": len(batch)}

    def validate(self) -> dict[str, float]:
        from rlnf.evaluation import evaluate_policy
        from rlnf.training import autocast

        result = evaluate_policy(self.policy, self.val_dataset, self.cfg.trainer.batch_size, self.device,
                                 autocast=lambda: autocast(self.device, self.autocast_dtype))
        return {f"val/{key}": value for key, value in result.metrics.items()}

    def cleanup(self) -> dict[str, Any]:
        from rlnf.recipe_utils import write_summary

        self.logger.close()
        return write_summary(self.run_dir, self.step, self.checkpoints, skipped_steps=self.skipped_steps,
                             train_manifest=self.train_stats.summary())


def main(cfg: CTCTrainConfig) -> dict[str, Any]:
    return CTCTrainRecipe(cfg).run()
