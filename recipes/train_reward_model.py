"""Train a reward model on scored (audio, transcript) pairs (MSE on scores in [0, 1]).

    rlnf run train_reward_model --config reward/card data.train_manifest=scored.json output_dir=runs/reward

The model card's recipe by default: AdamW lr 1e-4, betas (0.9, 0.999), eps 1e-8, cosine schedule,
batch 8, 10 epochs, seed 42. Augmentation acts on features (time/frequency masks) and on levels
(gain, additive noise at an SNR), never silencing a clip. Optional synthetic hard negatives.
The best checkpoint (by ``trainer.best_metric``) and the last are self-contained folders; the
trainer state beside them resumes the run exactly (``resume=true``), as the other recipes do.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

from rlnf.config import RewardTrainConfig, to_yaml
from rlnf.errors import ConfigError, DataError
from rlnf.recipe_loop import Recipe

CONFIG_CLASS = RewardTrainConfig
log = logging.getLogger("rlnf.train_reward_model")


def read_scored_pairs(data_cfg, manifest: str) -> list[dict[str, Any]]:
    """Rows {audio_filepath, text, score, reference, where} with scores scaled to [0, 1]."""
    from rlnf.data.manifest import read_manifest

    utterances, stats = read_manifest(manifest, text_key=data_cfg.text_key, require_text=True,
                                      skip_bad=data_cfg.skip_bad_samples, max_duration=data_cfg.max_duration,
                                      warn_duplicates=False)  # many transcripts per clip is the norm here
    pairs = []
    for utterance in utterances:
        raw = utterance.fields.get(data_cfg.score_key)
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            message = f"{utterance.where}: '{data_cfg.score_key}' must be a number, got {raw!r}"
            if data_cfg.skip_bad_samples:
                log.warning("skipping %s", message)
                continue
            raise DataError(message)
        score = raw / data_cfg.score_scale
        if not 0.0 <= score <= 1.0:
            raise DataError(f"{utterance.where}: score {raw} / score_scale {data_cfg.score_scale} = {score:.4g} is "
                            "outside [0, 1] (set data.score_scale, e.g. 100 for 0-100 scores)")
        reference = utterance.fields.get(data_cfg.reference_key)
        pairs.append({"audio_filepath": utterance.audio_filepath, "text": utterance.text, "score": score,
                      "reference": reference if isinstance(reference, str) else (utterance.text if score >= 0.999 else None),
                      "where": utterance.where})
    log.info("%s: %s", manifest, stats.summary())
    return pairs


def within_clip_rank_loss(scores, targets, clip_index):
    """Margin ranking loss over pairs of transcripts of the same clip: the predicted difference should
    be at least the true one, mean(relu(|dy| - sign(dy) * ds)). RL's group baselines see only these
    within-clip differences, which plain MSE under-weights next to differences between clips."""
    import torch

    same = clip_index[:, None] == clip_index[None, :]
    true_difference = targets[:, None] - targets[None, :]
    mask = same & (true_difference.abs() > 0.01)
    if not mask.any():
        return scores.sum() * 0.0
    predicted_difference = scores[:, None] - scores[None, :]
    return torch.relu(true_difference.abs() - torch.sign(true_difference) * predicted_difference)[mask].mean()


class PairStream:
    """Batches of training pairs, epoch after epoch: shuffled pairs (the card's), or shuffled clips
    with each clip's pairs together (``group_by_clip``: one audio embedding serves many pairs of a
    batch). An epoch's order is a pure function of (seed, epoch), so the data position is
    (epoch, next pair) and a resumed run continues with the same batches."""

    def __init__(self, pairs: list[dict[str, Any]], batch_size: int, seed: int, group_by_clip: bool):
        self.pairs, self.batch_size, self.seed, self.group_by_clip = pairs, batch_size, seed, group_by_clip
        self.epoch = 0
        self.next = 0
        self.progress = 0.0  # epochs done when the last batch was drawn (the 'epoch' metric)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next": self.next}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.next = int(state["epoch"]), int(state["next"])

    @property
    def at_epoch_end(self) -> bool:
        return self.next >= len(self.pairs)

    def __iter__(self):
        while True:
            order = self.epoch_order(self.epoch)
            while self.next < len(order):
                start = self.next
                self.progress = self.epoch + start / len(order)
                self.next = start + self.batch_size
                yield [self.pairs[i] for i in order[start:self.next]]
            self.epoch, self.next = self.epoch + 1, 0

    def epoch_order(self, epoch: int) -> list[int]:
        """Pair indices for one epoch."""
        rng = random.Random(self.seed * 1000 + epoch)
        if not self.group_by_clip:
            order = list(range(len(self.pairs)))
            rng.shuffle(order)
            return order
        by_clip: dict[str, list[int]] = {}
        for index, pair in enumerate(self.pairs):
            by_clip.setdefault(pair["audio_filepath"], []).append(index)
        groups = list(by_clip.values())
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
        return [index for group in groups for index in group]


class RewardTrainer(Recipe):
    name = "train_reward_model"

    # ------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        from rlnf.checkpoint import CheckpointManager, seed_everything
        from rlnf.metric_logging import build_logger
        from rlnf.reward_model.checkpoint import train_sentencepiece
        from rlnf.reward_model.modeling import RewardConfig, RewardModel
        from rlnf.reward_model.negatives import hard_negatives
        from rlnf.reward_model.processor import RewardProcessor, load_reward_checkpoint
        from rlnf.recipe_utils import resolve_best_metric
        from rlnf.training import build_optimizer, build_scheduler, resolve_device, resolve_precision

        cfg = self.cfg
        seed_everything(cfg.trainer.seed)
        self.device = resolve_device(cfg.trainer.device)
        self.autocast_dtype = resolve_precision(cfg.trainer.precision, self.device)
        self.rng = random.Random(cfg.trainer.seed)

        train = read_scored_pairs(cfg.data, cfg.data.train_manifest)
        if cfg.data.val_manifest:
            val = read_scored_pairs(cfg.data, cfg.data.val_manifest)
        else:  # hold out whole clips, so no clip is both trained and validated on
            clips = sorted({p["audio_filepath"] for p in train})
            random.Random(cfg.trainer.seed).shuffle(clips)
            held = set(clips[: max(1, int(round(cfg.data.val_split * len(clips))))]) if cfg.data.val_split else set()
            val = [p for p in train if p["audio_filepath"] in held]
            train = [p for p in train if p["audio_filepath"] not in held]
        if not train or not val:
            raise DataError("reward training needs both training and validation pairs (check data.val_split)")
        if len({p["score"] for p in train}) == 1:
            raise DataError(f"{cfg.data.train_manifest}: every training score is {train[0]['score']:.4g} (after "
                            f"score_scale): a reward model learns nothing from constant targets; check "
                            f"data.score_key={cfg.data.score_key!r}")
        if len({p["score"] for p in val}) == 1 and cfg.trainer.best_metric not in ("val/mse", "val/rmse"):
            raise DataError(f"every validation score is {val[0]['score']:.4g}: {cfg.trainer.best_metric} is undefined "
                            "on constant targets, so no best checkpoint could be chosen; validate on varied scores "
                            "or set trainer.best_metric=val/mse")

        if cfg.hard_negatives.enabled:
            references = {p["audio_filepath"]: p["reference"] for p in train if p["reference"]}
            others = sorted(set(references.values()))
            added = []
            for audio_filepath, reference in sorted(references.items()):
                for text, score, kind in hard_negatives(reference, others, self.rng, cfg.hard_negatives.error_rates,
                                                        cfg.hard_negatives.empty, cfg.hard_negatives.truncated,
                                                        cfg.hard_negatives.other_clip, cfg.hard_negatives.repeated):
                    added.append({"audio_filepath": audio_filepath, "text": text, "score": score, "reference": reference,
                                  "where": f"hard negative ({kind})"})
            log.info("hard negatives: %d pairs added to %d", len(added), len(train))
            train += added
        self.train_pairs, self.val_pairs = train, val

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.model.init_from:
            self.model, processor = load_reward_checkpoint(cfg.model.init_from, "cpu")
            if cfg.model.tokenizer:
                processor = RewardProcessor(self.model.config, cfg.model.tokenizer)
        else:
            tokenizer = cfg.model.tokenizer
            trained = self.run_dir / "tokenizer.model"
            if tokenizer is None and cfg.resume and trained.is_file():  # the one the run's weights were trained with
                tokenizer = trained
            if tokenizer is None:
                texts = [p["text"] for p in train] + [p["reference"] for p in train if p["reference"]]
                tokenizer = train_sentencepiece(texts, self.run_dir / "tokenizer", cfg.model.vocab_size)
            ears = self.asr_encoder(cfg.model.asr_encoder_from) if cfg.model.asr_encoder_from else None
            config = RewardConfig(**cfg.model.hyper_parameters(), padding=cfg.model.kernel_size // 2,
                                  **({"asr_encoder": ears.config, "asr_encoder_dim": ears.dim} if ears else {}))
            processor = RewardProcessor(config, tokenizer)
            config.eos_token_id = processor.eos_id
            self.model = RewardModel(config)
            if ears:
                self.model.asr_encoder.load_state_dict(ears.state)
            if config.ctc_head and config.ctc_alphabet:
                self.model.set_spelling([processor.sp.id_to_piece(i) for i in range(processor.sp.get_piece_size())])
        self.processor = processor
        self.model.to(self.device)
        self.waveforms: dict[str, Any] = {}
        self.feature_cache: dict[str, Any] = {}

        self.stream = PairStream(train, cfg.trainer.batch_size, cfg.trainer.seed, cfg.trainer.group_by_clip)
        self.has_validation = True
        self.max_steps = math.ceil(len(train) / cfg.trainer.batch_size) * cfg.trainer.epochs
        self.trained_model = self.model
        self.optimizer = build_optimizer(self.model.parameters(), cfg.trainer)
        self.scheduler = build_scheduler(self.optimizer, self.max_steps, cfg.trainer)
        metric, mode = resolve_best_metric(cfg.trainer, None)
        self.checkpoints = CheckpointManager(self.run_dir, metric, mode, model_suffix="")
        self.logger = build_logger(self.run_dir, cfg, self.restore())
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        log.info("reward model: %d trainable parameters, %d training pairs, %d validation pairs, %d steps",
                 sum(p.numel() for p in self.model.parameters() if p.requires_grad), len(train), len(val),
                 self.max_steps)
        if cfg.trainer.ctc_pretrain_epochs and self.step == 0:  # a resumed run holds it in its weights
            self.pretrain_ctc()

    @staticmethod
    def asr_encoder(path: str):
        """``model.asr_encoder_from``'s encoder (``asr_encoder.read_asr_encoder``), refused when its
        preprocessor computes other features than the reward model's (naming the key and the setting)."""
        from rlnf.errors import CheckpointError
        from rlnf.reward_model import asr_encoder
        from rlnf.reward_model.modeling import FEATURE_DEFAULTS

        try:
            ears = asr_encoder.read_asr_encoder(path)
        except (CheckpointError, AttributeError, KeyError, ValueError) as exc:
            raise ConfigError(f"model.asr_encoder_from={path}: not a NeMo ASR model with an encoder: {exc}") from None
        problems = asr_encoder.feature_mismatches(ears.preprocessor, FEATURE_DEFAULTS)
        if problems:
            raise ConfigError(f"model.asr_encoder_from={path}: its preprocessor computes other features than the "
                              f"reward model's: {'; '.join(problems)}")
        log.info("reward model: the audio encoder of %s (%d channels, frozen)", path, ears.dim)
        return ears

    # ------------------------------------------------------------------------------ batches
    def waveform(self, path: str):
        from rlnf.data.audio import load_audio

        if path not in self.waveforms:  # every clip is read once and kept (clips are short)
            self.waveforms[path] = load_audio(path, self.processor.sample_rate)
        return self.waveforms[path]

    def clip_features(self, path: str):
        """Log-mel features [n_mel, frames] of one clip, computed once. Normalisation is per clip
        (over its own frames), so a clip's features do not depend on the batch it lands in."""
        import torch

        if path not in self.feature_cache:
            wave = torch.from_numpy(self.waveform(path))
            features, frames = self.processor.features(wave[None].to(self.device), torch.tensor([len(wave)], device=self.device))
            self.feature_cache[path] = features[0, :, : int(frames[0])]
        return self.feature_cache[path]

    def batch_inputs(self, pairs: list[dict[str, Any]], augment: bool) -> dict[str, Any]:
        import numpy as np
        import torch

        from rlnf.synth import add_noise

        aug = self.cfg.augment
        waveform_augmentation = augment and aug.prob > 0 and (aug.gain_db > 0 or aug.noise_snr_db is not None)
        # Pairs of the same clip share one audio embedding (audio_index maps pairs to clips).
        clip_order = list(dict.fromkeys(p["audio_filepath"] for p in pairs))
        audio_index = torch.tensor([clip_order.index(p["audio_filepath"]) for p in pairs], device=self.device)
        if waveform_augmentation:
            audio_index = torch.arange(len(pairs), device=self.device)  # each pair's waveform is augmented alone  # levels change: features must be computed from the augmented waveforms
            waves = []
            for pair in pairs:
                wave = self.waveform(pair["audio_filepath"])
                if self.rng.random() < aug.prob and aug.gain_db > 0:
                    wave = np.clip(wave * 10 ** (self.rng.uniform(-aug.gain_db, aug.gain_db) / 20), -1, 1)
                if aug.noise_snr_db is not None and self.rng.random() < aug.prob:
                    wave = add_noise(wave, aug.noise_snr_db, self.rng.randrange(2**31))
                waves.append(np.asarray(wave, dtype=np.float32))
            lengths = torch.tensor([len(w) for w in waves])
            audio = torch.zeros(len(waves), int(lengths.max()))
            for row, wave in enumerate(waves):
                audio[row, : len(wave)] = torch.from_numpy(wave)
            features, frames = self.processor.features(audio.to(self.device), lengths.to(self.device))
        else:  # cached per clip: each clip's features are computed once for all its pairs and epochs
            clips = [self.clip_features(path) for path in dict.fromkeys(p["audio_filepath"] for p in pairs)]
            frames = torch.tensor([clip.shape[1] for clip in clips], device=self.device)
            features = torch.zeros(len(clips), clips[0].shape[0], int(frames.max()), device=self.device)
            for row, clip in enumerate(clips):
                features[row, :, : clip.shape[1]] = clip
        if augment:
            features = self.mask_features(features, frames)
        ids, mask = self.processor.encode_texts([p["text"] for p in pairs], self.device)
        labels = torch.tensor([p["score"] for p in pairs], dtype=torch.float32, device=self.device)
        inputs = {"audio": features, "audio_len": frames, "audio_index": audio_index, "text": ids,
                  "text_attention_mask": mask, "labels": labels}
        if self.model.config.ctc_head:  # each audio row's reference, for the auxiliary CTC loss
            row_pair = {int(row): index for index, row in reversed(list(enumerate(audio_index.tolist())))}
            references = [pairs[row_pair[row]]["reference"] for row in range(len(row_pair))]
            inputs["reference_rows"] = torch.tensor([r is not None for r in references], device=self.device)
            inputs["reference"], inputs["reference_mask"] = self.processor.encode_texts(
                [r or "" for r in references], self.device)
        return inputs

    def predict(self, inputs: dict[str, Any], with_ctc_loss: bool = False, audio=None):
        """Scores [N] of a batch whose audio holds each distinct clip once (see ``batch_inputs``); with
        ``with_ctc_loss``, also the auxiliary CTC loss of the clips' references (nats per label).
        ``audio``: the batch's audio already embedded (``embed_audio``), re-used instead of a new pass."""
        model = self.model
        audio = model.embed_audio(inputs["audio"], inputs["audio_len"]) if audio is None else audio
        scores = model.score_embeddings(audio[inputs["audio_index"]],
                                        model.embed_text(inputs["text"], inputs["text_attention_mask"]))
        return (scores, self.reference_ctc_loss(audio, inputs)) if with_ctc_loss else scores

    def reference_ctc_loss(self, audio, inputs):
        """Mean over the audio rows that have a reference of the reference's CTC loss per label."""
        rows = inputs["reference_rows"]
        if not rows.any():
            return audio.pooled.sum() * 0.0
        references = self.model.embed_text(inputs["reference"][rows], inputs["reference_mask"][rows])
        nll = self.model.ctc_nll(audio[rows], references)
        return (nll / references.target_lengths.clamp(min=1)).mean()

    def pretrain_ctc(self) -> None:
        """``trainer.ctc_pretrain_epochs`` of the auxiliary CTC loss alone, over the clips with a reference
        (16 clips a step, constant learning rate ``trainer.lr``), before the scored pairs."""
        import torch

        from rlnf.training import clip_gradients

        trainer = self.cfg.trainer
        by_clip = {p["audio_filepath"]: p for p in self.train_pairs if p["reference"]}
        clips = sorted(by_clip)
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # not frozen ASR ears
        optimizer = torch.optim.AdamW(trainable, lr=trainer.lr, betas=tuple(trainer.betas),
                                      eps=trainer.eps, weight_decay=trainer.weight_decay)
        for epoch in range(trainer.ctc_pretrain_epochs):
            random.Random(trainer.seed * 1000 + 500 + epoch).shuffle(clips)
            losses = []
            for start in range(0, len(clips), 16):
                self.model.train()
                inputs = self.batch_inputs([by_clip[c] for c in clips[start:start + 16]], augment=True)
                loss = self.reference_ctc_loss(self.model.embed_audio(inputs["audio"], inputs["audio_len"]), inputs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if math.isfinite(clip_gradients(self.model.parameters(), trainer.max_grad_norm)):
                    optimizer.step()
                losses.append(loss.item())
            log.info("CTC pre-training epoch %d: loss %.3f nats per label", epoch + 1, sum(losses) / len(losses))
            self.logger.log_dict({"ctc_pretrain/loss": sum(losses) / len(losses), "ctc_pretrain/epoch": epoch + 1}, 0)

    def mask_features(self, features, frames):
        """SpecAugment-style masks inside each clip's own frames: at most time_width of them per mask,
        so a clip is never blanked out (the mistake of masking raw waveforms)."""
        aug = self.cfg.augment
        features = features.clone()
        for row in range(features.shape[0]):
            if self.rng.random() >= aug.prob:
                continue
            n_frames = int(frames[row])
            for _ in range(aug.freq_masks):
                width = self.rng.randint(0, aug.freq_width)
                start = self.rng.randint(0, max(0, features.shape[1] - width))
                features[row, start:start + width, :n_frames] = 0.0
            for _ in range(aug.time_masks):
                width = self.rng.randint(0, int(aug.time_width * n_frames))
                start = self.rng.randint(0, max(0, n_frames - width))
                features[row, :, start:start + width] = 0.0
        return features

    # ------------------------------------------------------------------------------ one step
    def train_step(self, pairs: list[dict[str, Any]]) -> dict[str, float]:
        """MSE on the scores (plus the within-clip rank loss when weighted), AdamW; a non-finite
        gradient skips the update."""
        import torch

        from rlnf.training import autocast, clip_gradients

        trainer = self.cfg.trainer
        self.model.train()
        inputs = self.batch_inputs(pairs, augment=True)
        ctc_loss = None
        with autocast(self.device, self.autocast_dtype):
            if trainer.ctc_loss_weight > 0:
                scores, ctc_loss = self.predict(inputs, with_ctc_loss=True)
            else:
                scores = self.predict(inputs)
        loss = torch.nn.functional.mse_loss(scores.float(), inputs["labels"])
        if ctc_loss is not None:
            loss = loss + trainer.ctc_loss_weight * ctc_loss
        if trainer.rank_loss_weight > 0:
            loss = loss + trainer.rank_loss_weight * within_clip_rank_loss(scores.float(), inputs["labels"],
                                                                           inputs["audio_index"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(self.model.parameters(), trainer.max_grad_norm)
        if math.isfinite(grad_norm):  # else skip: a NaN/inf gradient would corrupt the weights
            self.optimizer.step()
        else:
            self.skipped_steps += 1
        self.scheduler.step()
        metrics = {"train/loss": loss.item(), "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "train/skipped_steps": self.skipped_steps}
        if ctc_loss is not None:
            metrics["train/ctc_loss"] = ctc_loss.item()
        return metrics

    # ------------------------------------------------------------------------------ loop hooks
    def run_step(self, iterator) -> tuple[dict[str, float], dict[str, float]]:
        pairs = next(iterator)
        return {**self.train_step(pairs), "epoch": self.stream.progress}, {}

    def validation_due(self, last: bool) -> bool:
        """Every trainer.eval_every steps, else at the end of each epoch; and after the last step."""
        every = self.cfg.trainer.eval_every
        return bool((every and self.step % every == 0) or (not every and self.stream.at_epoch_end) or last)

    def checkpoint_due(self, validated: dict[str, float] | None, last: bool) -> bool:
        return validated is not None or last

    def validate(self) -> dict[str, float]:
        return self.evaluate()

    def evaluate(self) -> dict[str, float]:
        """Regression metrics, the within-clip Spearman, and the same Spearman with every clip's
        transcripts scored against another clip's audio: ``val/group_spearman_wrong_audio``. The gap
        between the two, ``val/audio_gain``, is how much of the ranking comes from the audio at all
        (about 0 for a model that ranks a clip's transcripts by their text alone). With a CTC head over
        letters, also ``val/ctc_wer`` and ``val/ctc_cer`` (``ctc_transcription_metrics``)."""
        import torch

        from rlnf.metrics import regression_metrics, within_group_spearman
        from rlnf.training import autocast

        self.model.eval()
        predictions, wrong_audio = [], []
        heard: dict[str, tuple[str, str]] = {}  # clip -> (reference, the CTC head's transcript)
        with torch.inference_mode():
            for start in range(0, len(self.val_pairs), 32):
                pairs = self.val_pairs[start:start + 32]
                inputs = self.batch_inputs(pairs, augment=False)
                with autocast(self.device, self.autocast_dtype):
                    audio = self.model.embed_audio(inputs["audio"], inputs["audio_len"])  # once for all three
                    predictions.extend(self.predict(inputs, audio=audio).float().cpu().tolist())
                    clips = int(inputs["audio_index"].max()) + 1
                    if clips > 1:  # each clip's pairs get the next clip's audio
                        wrong_audio.extend(self.predict({**inputs, "audio_index": (inputs["audio_index"] + 1) % clips},
                                                        audio=audio).float().cpu().tolist())
                    else:
                        wrong_audio.extend([float("nan")] * len(inputs["labels"]))
                    heard.update(self.ctc_transcripts(pairs, audio, heard))
        targets = [p["score"] for p in self.val_pairs]
        groups = [p["audio_filepath"] for p in self.val_pairs]
        metrics = regression_metrics(predictions, targets)
        metrics["group_spearman"] = within_group_spearman(predictions, targets, groups)
        kept = [i for i, value in enumerate(wrong_audio) if math.isfinite(value)]
        metrics["group_spearman_wrong_audio"] = within_group_spearman(
            [wrong_audio[i] for i in kept], [targets[i] for i in kept], [groups[i] for i in kept])
        metrics["audio_gain"] = metrics["group_spearman"] - metrics["group_spearman_wrong_audio"]
        metrics.update(self.ctc_transcription_metrics(list(heard.values())))
        return {f"val/{key}": value for key, value in metrics.items()}

    def ctc_transcripts(self, pairs: list[dict[str, Any]], audio, known: dict[str, Any],
                        ) -> dict[str, tuple[str, str]]:
        """{clip: (reference, transcript)}: the greedy transcripts of a CTC head over letters of a batch's
        clips that have a reference and are not in ``known``, from the batch's embedded ``audio`` (its
        rows the batch's distinct clips in order: ``batch_inputs`` without augmentation). Empty without
        such a head."""
        if not (self.model.config.ctc_head and self.model.config.ctc_alphabet):
            return {}
        clips = list(dict.fromkeys(p["audio_filepath"] for p in pairs))
        references: dict[str, str] = {}
        for pair in pairs:  # a clip's reference, from whichever of its pairs carries it
            if pair["reference"]:
                references.setdefault(pair["audio_filepath"], pair["reference"])
        rows = [row for row, clip in enumerate(clips) if clip in references and clip not in known]
        if not rows:
            return {}
        texts = self.model.ctc_transcripts(audio[rows])
        return {clips[row]: (references[clips[row]], text) for row, text in zip(rows, texts)}

    def ctc_transcription_metrics(self, heard: list[tuple[str, str]]) -> dict[str, float]:
        """How well a CTC head over letters hears on its own: ``ctc_wer`` and ``ctc_cer``, the corpus WER
        and CER of its greedy transcripts of the validation clips that have a reference (``heard``:
        (reference, transcript) pairs, from ``ctc_transcripts``), against the references as it spells
        them (``spelt_text``); ``ctc_cer`` alone when the alphabet has no space. Compare them with the
        policy's WER: a reward model that hears much worse than the policy it judges cannot tell its
        near-correct transcripts apart by the audio (docs/reward-model.md). Empty without transcripts."""
        from rlnf.metrics import corpus_error_rate
        from rlnf.reward_model.ctc_evidence import spelt_text

        if not heard:
            return {}
        alphabet = self.model.config.ctc_alphabet
        references = [spelt_text(reference, alphabet) for reference, _ in heard]
        hypotheses = [text for _, text in heard]
        words = " " in alphabet  # without a space there are no words to count: the CER alone
        return {**({"ctc_wer": corpus_error_rate(references, hypotheses, "word")} if words else {}),
                "ctc_cer": corpus_error_rate(references, hypotheses, "char")}

    # ------------------------------------------------------------------------------ checkpoints
    def save_model(self, path) -> None:
        from rlnf.reward_model.checkpoint import save_reward_folder

        save_reward_folder(self.model, self.processor, path)

    def extra_state(self) -> dict[str, Any]:
        return {"augment_rng": self.rng.getstate()}  # augmentation draws continue where they stopped

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["augment_rng"])

    def cleanup(self) -> dict[str, Any]:
        from rlnf.recipe_utils import write_summary

        self.logger.close()
        if not self.checkpoints.best_path.exists():
            log.warning("no best checkpoint was written: %s was never finite", self.checkpoints.best_metric)
        return write_summary(self.run_dir, self.step, self.checkpoints, train_pairs=len(self.train_pairs),
                             val_pairs=len(self.val_pairs))


def main(cfg: RewardTrainConfig) -> dict[str, Any]:
    return RewardTrainer(cfg).run()
