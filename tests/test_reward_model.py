"""The learned reward model: layout compatibility, batch invariance, training, scoring, RL plug-in."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlnf.errors import CheckpointError

PUBLISHED_HYPERPARAMETERS = {"n_mel": 64, "vocab_size": 2048, "sample_rate": 16000, "embed_dim": 128,
                             "lstm_hidden": 128, "lstm_layers": 1, "audio_conv_channels": 128,
                             "audio_conv_layers": 3, "kernel_size": 5, "stride": 1, "padding": 2,
                             "head_hidden": 256, "dropout": 0.1, "pad_token_id": 1,
                             "max_audio_len": 3000, "unused_flag": True}


# ----------------------------------------------------------------------------------- helpers
def tiny_tokenizer(folder: Path) -> Path:
    from rlnf.reward_model.checkpoint import train_sentencepiece
    from rlnf.synth import load_sentences

    return train_sentencepiece(load_sentences(300), folder / "tokenizer", vocab_size=200)


def random_published_folder(folder: Path, seed: int = 0) -> Path:
    """A folder in the published layout with random weights, written without our code."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=generator) * scale

    state = {}
    channels_in = 64
    for block in range(3):
        conv, norm = 3 * block, 3 * block + 1
        state[f"audio_encoder.{conv}.weight"] = rand(128, channels_in, 5)
        state[f"audio_encoder.{conv}.bias"] = rand(128)
        state[f"audio_encoder.{norm}.weight"] = 1 + rand(128)
        state[f"audio_encoder.{norm}.bias"] = rand(128)
        state[f"audio_encoder.{norm}.running_mean"] = rand(128)
        state[f"audio_encoder.{norm}.running_var"] = 1 + rand(128).abs()
        state[f"audio_encoder.{norm}.num_batches_tracked"] = torch.tensor(100)
        channels_in = 128
    state["embedding.weight"] = rand(2048, 128)
    state["embedding.weight"][1] = 0
    for suffix in ("", "_reverse"):
        state[f"lstm.weight_ih_l0{suffix}"] = rand(512, 128)
        state[f"lstm.weight_hh_l0{suffix}"] = rand(512, 128)
        state[f"lstm.bias_ih_l0{suffix}"] = rand(512)
        state[f"lstm.bias_hh_l0{suffix}"] = rand(512)
    for index, (out_dim, in_dim) in {0: (256, 384), 3: (256, 256), 5: (1, 256)}.items():
        state[f"head.{index}.weight"] = rand(out_dim, in_dim)
        state[f"head.{index}.bias"] = rand(out_dim)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "reward-model", "pretrained_config": PUBLISHED_HYPERPARAMETERS, "override": {},
        "architectures": ["RewardModel"]}))
    return folder


def reference_forward(state: dict, audio, text, mask) -> torch.Tensor:
    """Independent forward of the published architecture from its state dict (functional ops,
    a hand-written LSTM cell, average over all frames including padding)."""
    hidden = audio
    for block in range(3):
        conv, norm = 3 * block, 3 * block + 1
        hidden = F.conv1d(hidden, state[f"audio_encoder.{conv}.weight"], state[f"audio_encoder.{conv}.bias"], padding=2)
        hidden = (hidden - state[f"audio_encoder.{norm}.running_mean"][:, None]) / torch.sqrt(
            state[f"audio_encoder.{norm}.running_var"][:, None] + 1e-5)
        hidden = hidden * state[f"audio_encoder.{norm}.weight"][:, None] + state[f"audio_encoder.{norm}.bias"][:, None]
        hidden = torch.relu(hidden)
    audio_embedding = hidden.mean(dim=-1)

    def lstm_direction(x, suffix, reverse):
        w_ih, w_hh = state[f"lstm.weight_ih_l0{suffix}"], state[f"lstm.weight_hh_l0{suffix}"]
        bias = state[f"lstm.bias_ih_l0{suffix}"] + state[f"lstm.bias_hh_l0{suffix}"]
        h = torch.zeros(128)
        c = torch.zeros(128)
        outputs = [None] * len(x)
        steps = range(len(x) - 1, -1, -1) if reverse else range(len(x))
        for t in steps:
            gates = w_ih @ x[t] + w_hh @ h + bias
            i, f, g, o = gates.chunk(4)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs[t] = h
        return torch.stack(outputs)

    text_embeddings = []
    for row in range(text.shape[0]):
        length = int(mask[row].sum())
        x = state["embedding.weight"][text[row, :length]]
        both = torch.cat([lstm_direction(x, "", False), lstm_direction(x, "_reverse", True)], dim=-1)
        text_embeddings.append(both.mean(dim=0))
    combined = torch.cat([audio_embedding, torch.stack(text_embeddings)], dim=-1)
    hidden = torch.relu(F.linear(combined, state["head.0.weight"], state["head.0.bias"]))
    hidden = torch.relu(F.linear(hidden, state["head.3.weight"], state["head.3.bias"]))
    return torch.sigmoid(F.linear(hidden, state["head.5.weight"], state["head.5.bias"])).squeeze(-1)


# ----------------------------------------------------------------------------------- model
def test_defaults_match_the_card_and_the_published_parameter_count():
    from rlnf import RewardConfig, RewardModel

    model = RewardModel(RewardConfig())
    assert sum(p.numel() for p in model.parameters()) == 896_897
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["audio_encoder.0.weight"] == (128, 64, 5) and shapes["audio_encoder.6.weight"] == (128, 128, 5)
    assert shapes["lstm.weight_ih_l0_reverse"] == (512, 128) and shapes["head.0.weight"] == (256, 384)
    assert model.embedding.padding_idx == 1


def test_forward_outputs_and_mse_loss():
    from rlnf import RewardConfig, RewardModel

    model = RewardModel(RewardConfig(vocab_size=50)).eval()
    audio = torch.randn(3, 64, 40)
    out = model(audio, torch.tensor([40, 30, 12]), torch.randint(2, 50, (3, 6)), torch.ones(3, 6, dtype=torch.long))
    assert out.logits.shape == (3,) and ((out.logits >= 0) & (out.logits <= 1)).all() and out.loss is None
    labels = torch.tensor([0.0, 0.5, 1.0])
    out = model(audio, torch.tensor([40, 30, 12]), torch.randint(2, 50, (3, 6)), torch.ones(3, 6, dtype=torch.long),
                labels=labels)
    assert out.loss.item() == pytest.approx(F.mse_loss(out.logits, labels).item())


def test_save_load_round_trip_keeps_config_and_scores(tmp_path):
    from transformers import AutoConfig, AutoModel

    from rlnf import RewardConfig, RewardModel

    model = RewardModel(RewardConfig(vocab_size=1024, lstm_hidden=32, pooling="masked")).eval()
    model.save_pretrained(tmp_path)
    loaded = RewardModel.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == 1024 and loaded.config.lstm_hidden == 32  # no silent fallback to defaults
    assert isinstance(AutoModel.from_pretrained(tmp_path), RewardModel)
    assert AutoConfig.from_pretrained(tmp_path).vocab_size == 1024
    inputs = (torch.randn(2, 64, 33), torch.tensor([33, 20]), torch.randint(2, 1024, (2, 5)), torch.ones(2, 5, dtype=torch.long))
    assert torch.equal(model(*inputs).logits, loaded(*inputs).logits)


def test_masked_pooling_is_batch_invariant_and_legacy_is_not():
    from rlnf import RewardConfig, RewardModel

    torch.manual_seed(0)
    masked = RewardModel(RewardConfig(vocab_size=60)).eval()
    legacy = RewardModel(RewardConfig(vocab_size=60, pooling="legacy")).eval()
    legacy.load_state_dict(masked.state_dict())
    clip = torch.randn(1, 64, 30)
    long_clip = torch.randn(1, 64, 300)
    text = torch.randint(2, 60, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.long)
    batch = torch.zeros(2, 64, 300)
    batch[0, :, :30] = clip[0]
    batch[1] = long_clip[0]
    lengths = torch.tensor([30, 300])
    with torch.no_grad():
        alone = masked(clip, torch.tensor([30]), text[:1], mask[:1]).logits
        beside = masked(batch, lengths, text, mask).logits[:1]
        assert torch.allclose(alone, beside, atol=1e-6)
        legacy_alone = legacy(clip, torch.tensor([30]), text[:1], mask[:1]).logits
        legacy_beside = legacy(batch, lengths, text, mask).logits[:1]
        assert not torch.allclose(legacy_alone, legacy_beside, atol=1e-4)  # the published defect


def test_window_means_match_a_per_clip_brute_force():
    from rlnf.reward_model.modeling import window_means

    torch.manual_seed(0)
    lengths = torch.tensor([13, 7, 1])
    hidden = torch.randn(3, 5, 13) * (torch.arange(13)[None, :] < lengths[:, None]).unsqueeze(1)
    means, new_lengths = window_means(hidden, lengths, 4)
    assert new_lengths.tolist() == [4, 2, 1] and means.shape == (3, 5, 4)
    for b, length in enumerate(lengths.tolist()):
        for w in range(new_lengths[b]):
            frames = hidden[b, :, 4 * w: min(4 * w + 4, length)]
            torch.testing.assert_close(means[b, :, w], frames.mean(dim=-1))


def attention_model(seed: int = 0, **config):
    from rlnf import RewardConfig, RewardModel

    torch.manual_seed(seed)
    return RewardModel(RewardConfig(vocab_size=60, lstm_hidden=32, fusion="attention", attention_dim=16,
                                    **config)).eval()


def test_attention_fusion_is_batch_invariant_and_round_trips(tmp_path):
    from rlnf import RewardConfig, RewardModel

    model = attention_model()
    assert any(name.startswith("cross.") for name in model.state_dict())
    clip, long_clip = torch.randn(1, 64, 37), torch.randn(1, 64, 300)
    batch = torch.zeros(2, 64, 300)
    batch[0, :, :37], batch[1] = clip[0], long_clip[0]
    text = torch.randint(2, 60, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 5:] = 0  # the first text is shorter: padded beside the second
    with torch.no_grad():
        alone = model(clip, torch.tensor([37]), text[:1, :5], mask[:1, :5]).logits
        beside = model(batch, torch.tensor([37, 300]), text, mask).logits
    torch.testing.assert_close(alone, beside[:1], atol=1e-6, rtol=1e-6)
    model.save_pretrained(tmp_path)
    loaded = RewardModel.from_pretrained(tmp_path)
    assert (loaded.config.fusion, loaded.config.attention_dim, loaded.config.attention_stride) == ("attention", 16, 4)
    with torch.no_grad():
        assert torch.equal(loaded(batch, torch.tensor([37, 300]), text, mask).logits, beside)
    # The card's layout cannot take these weights: the error names a tensor the config does not expect.
    (tmp_path / "config.json").write_text(json.dumps({**json.loads((tmp_path / "config.json").read_text()),
                                                       "fusion": "pooled"}))
    with pytest.raises(CheckpointError, match="cross"):
        RewardModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="fusion"):
        RewardConfig(fusion="concat")


def test_reward_config_and_the_recipe_model_section_share_one_architecture_definition():
    """Defaults, values and checks come from RewardArchitecture on both routes; only the key's name
    differs (``model.<key>`` in the recipe's config)."""
    from rlnf import RewardConfig
    from rlnf.config import RewardModelSection
    from rlnf.errors import ConfigError
    from rlnf.reward_model.architecture import ARCHITECTURE_KEYS

    assert {key: getattr(RewardConfig(), key) for key in ARCHITECTURE_KEYS} == RewardModelSection().hyper_parameters()
    section = RewardModelSection(vocab_size=60, fusion="attention", ctc_head=True, ctc_alphabet="ab ")
    config = RewardConfig(**section.hyper_parameters())
    assert {key: config.to_dict()[key] for key in ARCHITECTURE_KEYS} == section.hyper_parameters()
    with pytest.raises(ConfigError, match=r"^model\.ctc_stride=0 must be > 0$"):
        RewardModelSection(ctc_stride=0)
    with pytest.raises(ValueError, match=r"^ctc_stride=0 must be > 0$"):
        RewardConfig(ctc_stride=0)
    with pytest.raises(ValueError, match="ctc_head needs pooling 'masked'"):
        RewardConfig(ctc_head=True, pooling="legacy")


def test_attention_prior_places_token_i_of_l_at_its_share_of_the_clip():
    """With the content scores switched off, token i of L attends around frame (i + 0.5) / L of its
    own clip, and never to padding."""
    model = attention_model(attention_stride=1)
    torch.nn.init.zeros_(model.cross.query.weight)
    torch.nn.init.zeros_(model.cross.query.bias)
    lengths = torch.tensor([200, 120])
    tokens = torch.tensor([10, 4])
    with torch.no_grad():
        audio = model.embed_audio(torch.randn(2, 64, 200), lengths)
        text = model.embed_text(torch.randint(2, 60, (2, 10)), (torch.arange(10)[None, :] < tokens[:, None]).long())
        _, weights = model.cross.attention(audio, text)
    assert weights.shape == (2, 10, 200)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 10))
    assert weights[1, :, 120:].max() < 1e-6  # padding frames of the shorter clip get no weight
    for b in range(2):
        for i in range(int(tokens[b])):
            expected = (i + 0.5) / int(tokens[b]) * int(lengths[b]) - 0.5
            assert abs(int(weights[b, i].argmax()) - expected) <= 1.0


def test_attention_reward_reuse_matches_every_pair_alone(tmp_path):
    """The RL scorer's reuse (audio encoded once per clip, keys and values included) gives the
    scores of each (audio, text) pair through the full forward on its own."""
    from rlnf.reward_model.checkpoint import save_reward_folder
    from rlnf.reward_model.processor import RewardProcessor
    from rlnf import RewardConfig, RewardModel
    from rlnf.reward_model.scorer import RewardScorer

    torch.manual_seed(3)
    config = RewardConfig(vocab_size=200, lstm_hidden=32, fusion="attention", attention_dim=16)
    processor = RewardProcessor(config, tiny_tokenizer(tmp_path))
    config.eos_token_id = processor.eos_id
    folder = save_reward_folder(RewardModel(config).eval(), processor, tmp_path / "reward")
    scorer = RewardScorer(folder, device="cpu", batch_size=4)
    generator = torch.Generator().manual_seed(0)
    audio = torch.randn(3, 16000, generator=generator) * 0.1
    audio_len = torch.tensor([16000, 9000, 4000])
    hypotheses = [["in the beginning", "in the", "", "in the beginning", "god created"]] * 3
    fast = scorer.score_groups(audio, audio_len, 16000, hypotheses)
    slow = scorer.score_pairs_separately(audio, audio_len, 16000, hypotheses)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert fast[0].unique().numel() == 4 and fast[1, 1] != fast[2, 1]  # audio matters per clip


def test_published_layout_loads_and_matches_an_independent_forward(tmp_path):
    from safetensors.torch import load_file

    from rlnf import RewardModel

    folder = random_published_folder(tmp_path / "published")
    model = RewardModel.from_pretrained(folder)
    assert model.config.pooling == "legacy" and model.config.vocab_size == 2048 and not model.training
    state = load_file(str(folder / "model.safetensors"))
    audio = torch.randn(2, 64, 48)
    audio[1, :, 30:] = 0  # a padded clip: legacy pooling averages the padding too
    text = torch.tensor([[5, 17, 300, 2, 1, 1], [9, 2, 1, 1, 1, 1]])
    mask = (text != 1).long()
    with torch.no_grad():
        ours = model(audio, torch.tensor([48, 30]), text, mask).logits
    torch.testing.assert_close(ours, reference_forward(state, audio, text, mask), atol=1e-5, rtol=1e-5)


def test_incompatible_checkpoints_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    from rlnf import RewardModel
    from rlnf.reward_model.processor import RewardProcessor

    folder = random_published_folder(tmp_path / "bad_vocab")
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_config"]["vocab_size"] = 1024
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"embedding\.weight.*\(2048, 128\).*vocab_size"):
        RewardModel.from_pretrained(folder)

    folder = random_published_folder(tmp_path / "bad_shape")
    state = load_file(str(folder / "model.safetensors"))
    state["head.3.weight"] = torch.zeros(256, 128)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"head\.3\.weight"):
        RewardModel.from_pretrained(folder)

    folder = random_published_folder(tmp_path / "missing")
    state = load_file(str(folder / "model.safetensors"))
    del state["lstm.weight_hh_l0"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lstm\.weight_hh_l0"):
        RewardModel.from_pretrained(folder)

    tokenizer = tiny_tokenizer(tmp_path)  # 200 pieces
    from rlnf import RewardConfig

    with pytest.raises(CheckpointError, match="200 pieces.*vocab_size is 100"):
        RewardProcessor(RewardConfig(vocab_size=100), tokenizer)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        RewardModel.from_pretrained(tmp_path / "empty")


def test_processor_features_match_nemo_quartznet_front_end(tmp_path):
    """Features equal a QuartzNet model's own preprocessor (eval mode): no ASR .nemo needed."""
    from rlnf import RewardConfig
    from rlnf.models import ENGLISH_LABELS, build_ctc_model
    from rlnf.reward_model.processor import RewardProcessor

    processor = RewardProcessor(RewardConfig(vocab_size=256), tiny_tokenizer(tmp_path))
    asr = build_ctc_model(ENGLISH_LABELS, "tiny").eval()
    audio = torch.randn(2, 16000) * 0.1
    lengths = torch.tensor([16000, 9000])
    ours, frames = processor.features(audio, lengths)
    with torch.no_grad():
        theirs, their_frames = asr.preprocessor(input_signal=audio, length=lengths)
    assert torch.equal(frames, their_frames)
    torch.testing.assert_close(ours, theirs)
    ids, mask = processor.encode_texts(["and the lord", ""])
    assert ids[0, int(mask[0].sum()) - 1] == processor.eos_id and mask[1].sum() == 1 and ids[1, 0] == processor.eos_id


# ----------------------------------------------------------------------------------- training
def scored_manifest(corpus_manifest: str, out: Path, seed: int = 0) -> Path:
    """References (score 1) plus corrupted, empty and truncated transcripts scored 1 - CER."""
    from rlnf.data.manifest import read_manifest
    from rlnf.reward_model.negatives import hard_negatives

    utterances, _ = read_manifest(corpus_manifest)
    rng = random.Random(seed)
    rows = []
    for u in utterances:
        rows.append({"audio_filepath": u.audio_filepath, "text": u.text, "score": 100.0})
        for text, score, _ in hard_negatives(u.text, [], rng, error_rates=[0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8],
                                             other_clip=False):
            rows.append({"audio_filepath": u.audio_filepath, "text": text, "score": round(100 * score, 3)})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="session")
def trained_reward(corpus, tmp_path_factory, nemo_quiet):
    """Train through the CLI on synthetic scored pairs (0-100 scores, score_scale 100)."""
    from rlnf.cli import main

    folder = tmp_path_factory.mktemp("reward")
    manifest = scored_manifest(corpus["train"], folder / "scored.json")
    code = main(["run", "train_reward_model", "--config", "reward/card", f"data.train_manifest={manifest}",
                 f"output_dir={folder / 'run'}", "data.score_scale=100", "data.val_split=0.2", "model.vocab_size=256",
                 "trainer.epochs=6", "trainer.lr=1e-3", "trainer.batch_size=16", "hard_negatives.enabled=false",
                 "trainer.progress_bar=false"])
    assert code == 0
    return folder / "run"


@pytest.mark.slow
def test_trainer_reaches_a_clear_correlation(trained_reward):
    from rlnf.metric_logging import read_metrics

    summary = json.loads((trained_reward / "summary.json").read_text())
    assert summary["best_value"] > 0.8, summary
    evals = [row for row in read_metrics(trained_reward) if "val/pearson" in row]
    assert len(evals) == 6  # once per epoch
    for key in ("val/mse", "val/rmse", "val/r2", "val/pearson", "val/spearman"):
        assert key in evals[-1]
    best = trained_reward / "checkpoints" / "best"
    assert {p.name for p in best.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.model"}
    assert (trained_reward / "tensorboard").is_dir()


@pytest.mark.slow
def test_audio_gain_is_zero_for_a_model_that_ignores_the_audio(trained_reward, tmp_path):
    """val/audio_gain = within-clip Spearman minus the same with each clip's transcripts scored against
    another clip's audio. Cut the head's audio inputs and the two Spearmans must be equal."""
    from recipes.train_reward_model import RewardTrainer
    from rlnf.config import RewardTrainConfig, load_config

    cfg = load_config(RewardTrainConfig, trained_reward / "config.yaml",
                      [f"model.init_from={trained_reward / 'checkpoints' / 'best'}", f"output_dir={tmp_path}"])
    trainer = RewardTrainer(cfg)
    trainer.setup()
    metrics = trainer.evaluate()
    assert all(math.isfinite(metrics[k]) for k in ("val/group_spearman", "val/group_spearman_wrong_audio"))
    assert metrics["val/audio_gain"] == pytest.approx(metrics["val/group_spearman"] -
                                                      metrics["val/group_spearman_wrong_audio"])
    with torch.no_grad():
        trainer.model.head[0].weight[:, : trainer.model.config.audio_conv_channels] = 0
    deaf = trainer.evaluate()
    assert deaf["val/audio_gain"] == pytest.approx(0.0, abs=1e-9)
    assert deaf["val/group_spearman"] == pytest.approx(deaf["val/group_spearman_wrong_audio"])
    trainer.logger.close()


@pytest.mark.slow
def test_reuse_of_audio_embedding_gives_the_same_scores(trained_reward, corpus):
    from rlnf.data.loader import AudioDataset, collate
    from rlnf.data.manifest import read_manifest
    from rlnf.reward_model.scorer import RewardScorer

    scorer = RewardScorer(trained_reward / "checkpoints" / "best", device="cpu", batch_size=5)
    utterances, _ = read_manifest(corpus["val"])
    batch = collate([AudioDataset(utterances, 16000)[i] for i in range(3)])
    hypotheses = [[u.text, u.text[:10], "", u.text, "xyz"] for u in batch.utterances]  # duplicates on purpose
    fast = scorer.score_groups(batch.audio, batch.audio_len, 16000, hypotheses)
    slow = scorer.score_pairs_separately(batch.audio, batch.audio_len, 16000, hypotheses)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[:, 0], fast[:, 3])
    # Different sample rate for the policy: resampled, with the same result within resampling error.
    from rlnf.data.audio import resample

    waves = [resample(batch.audio[b, : int(batch.audio_len[b])].numpy(), 16000, 8000) for b in range(3)]
    audio8 = torch.zeros(3, max(len(w) for w in waves))
    for b, w in enumerate(waves):
        audio8[b, : len(w)] = torch.from_numpy(w)
    resampled = scorer.score_groups(audio8, torch.tensor([len(w) for w in waves]), 8000, hypotheses)
    assert (resampled - fast).abs().max() < 0.1


@pytest.mark.slow
def test_learned_reward_in_rl_finetune(trained_reward, corpus, pretrained_tiny_nemo, tmp_path):
    from rlnf.cli import main
    from rlnf.metric_logging import read_metrics

    # The held-out manifest without references: the learned reward needs none.
    unlabelled = tmp_path / "unlabelled.json"
    rows = [json.loads(line) for line in Path(corpus["heldout_train"]).read_text().splitlines()]
    unlabelled.write_text("".join(json.dumps({"audio_filepath": str(Path(corpus["heldout_train"]).parent / r["audio_filepath"])}) + "\n"
                                  for r in rows))
    checkpoint = trained_reward / "checkpoints" / "best"
    code = main(["run", "rl_finetune", "--config", "rl/rloo", f"policy.path={pretrained_tiny_nemo}",
                 f"data.train_manifest={unlabelled}", f"data.val_manifest={corpus['heldout_val']}",
                 f"output_dir={tmp_path / 'run'}", "trainer.max_steps=2", "trainer.batch_size=2",
                 "algorithm.num_samples=4", "trainer.progress_bar=false", "trainer.val_every=2",
                 f"rewards=[{{name: learned, path: '{checkpoint}', device: cpu}}, {{name: wer, weight: 0.0}}]"])
    assert code == 2  # 'wer' needs references the unlabelled manifest lacks: refused before training
    code = main(["run", "rl_finetune", "--config", "rl/rloo", f"policy.path={pretrained_tiny_nemo}",
                 f"data.train_manifest={unlabelled}", f"data.val_manifest={corpus['heldout_val']}",
                 f"output_dir={tmp_path / 'run2'}", "trainer.max_steps=2", "trainer.batch_size=2",
                 "algorithm.num_samples=4", "trainer.progress_bar=false", "trainer.val_every=2",
                 f"rewards=[{{name: learned, path: '{checkpoint}', device: cpu}}]"])
    assert code == 0
    rows = read_metrics(tmp_path / "run2")
    assert all(0.0 <= row["reward/learned/mean"] <= 1.0 for row in rows)
    assert "val/wer" in rows[-1] and "val/reward" in rows[-1]


@pytest.mark.slow
def test_a_learned_ensemble_scores_mean_minus_k_std_of_its_members_and_logs_their_spread(
        trained_reward, corpus, pretrained_tiny_nemo, tmp_path):
    """Two members (the run's best and last checkpoints): the reward equals mean - k * std of the
    members' own scores, and an RL run with it logs reward/learned/ensemble_std/mean."""
    from rlnf.cli import main
    from rlnf.config import RewardSpec
    from rlnf.data.loader import AudioDataset, collate
    from rlnf.data.manifest import read_manifest
    from rlnf.metric_logging import read_metrics
    from rlnf.reward_model.scorer import RewardScorer
    from rlnf.rewards import RewardInputs, build_rewards

    members = [str(trained_reward / "checkpoints" / name) for name in ("best", "last")]
    utterances, _ = read_manifest(corpus["val"])
    batch = collate([AudioDataset(utterances, 16000)[i] for i in range(2)])
    hypotheses = [[u.text, u.text[:8], "zzz"] for u in batch.utterances]
    singles = torch.stack([RewardScorer(path, device="cpu").score_groups(batch.audio, batch.audio_len, 16000, hypotheses)
                           for path in members])
    rewards = build_rewards([RewardSpec(name="learned", paths=members, std_coef=1.5, device="cpu")])
    total, components = rewards(RewardInputs(batch.audio, batch.audio_len, 16000, hypotheses, [None, None]))
    spread = singles.std(dim=0, correction=0)
    torch.testing.assert_close(total, (singles.mean(dim=0) - 1.5 * spread).clamp(min=0.0))
    torch.testing.assert_close(components["learned/ensemble_std"], spread)

    paths = ", ".join(f"'{path}'" for path in members)
    code = main(["run", "rl_finetune", "--config", "rl/grpo_learned_reward", f"policy.path={pretrained_tiny_nemo}",
                 f"data.train_manifest={corpus['train']}", f"output_dir={tmp_path / 'run'}", "trainer.max_steps=1",
                 "trainer.batch_size=2", "algorithm.num_samples=3", "trainer.progress_bar=false",
                 "trainer.val_every=0", f"rewards=[{{name: learned, paths: [{paths}], std_coef: 1.0, device: cpu}}]"])
    assert code == 0
    row = read_metrics(tmp_path / "run")[-1]
    assert 0.0 <= row["reward/learned/mean"] <= 1.0 and row["reward/learned/ensemble_std/mean"] >= 0.0


@pytest.mark.slow
def test_policy_and_reward_sample_rates_differ_through_the_rl_command(trained_reward, corpus, tmp_path, warnings_of):
    """An 8 kHz policy with the 16 kHz reward model: the policy hears 8 kHz audio, the reward model
    gets it resampled to 16 kHz, with one warning."""
    from rlnf.cli import main
    from rlnf.metric_logging import read_metrics
    from rlnf.models import ENGLISH_LABELS, build_ctc_model

    policy = tmp_path / "policy_8k.nemo"
    build_ctc_model(ENGLISH_LABELS, "tiny", seed=0, sample_rate=8000).save_to(str(policy))
    checkpoint = trained_reward / "checkpoints" / "best"
    messages = warnings_of("rlnf.reward_model.scorer")
    code = main(["run", "rl_finetune", "--config", "rl/rloo", f"policy.path={policy}",
                 f"data.train_manifest={corpus['train']}", f"output_dir={tmp_path / 'run'}",
                 "trainer.max_steps=2", "trainer.batch_size=2", "algorithm.num_samples=4",
                 "trainer.progress_bar=false", f"rewards=[{{name: learned, path: '{checkpoint}', device: cpu}}]"])
    assert code == 0
    assert messages.count("resampling audio from 8000 Hz (policy) to 16000 Hz (reward model)") == 1, messages
    assert all(0.0 <= row["reward/learned/mean"] <= 1.0 for row in read_metrics(tmp_path / "run"))


@pytest.mark.slow
def test_score_and_evaluate_commands(trained_reward, corpus, pretrained_tiny_nemo, tmp_path, capsys):
    from rlnf.cli import main

    rows = [json.loads(line) for line in Path(corpus["val"]).read_text().splitlines()]
    manifest = tmp_path / "systems.json"
    base = Path(corpus["val"]).parent
    manifest.write_text("".join(json.dumps({"audio_filepath": str(base / r["audio_filepath"]), "good": r["text"],
                                            "bad": r["text"][: len(r["text"]) // 3]}) + "\n" for r in rows))
    checkpoint = str(trained_reward / "checkpoints" / "best")
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--reward", checkpoint, "--manifest", str(manifest), "--text-key", "good",
                 "--text-key", "bad", "--output", str(out), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert table.index("good") < table.index("bad")  # sorted best first: references beat truncations
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(scored) == len(rows) and all({"score_good", "score_bad", "good"} <= set(r) for r in scored)

    result = tmp_path / "eval.json"
    assert main(["evaluate", "--model", pretrained_tiny_nemo, "--manifest", corpus["val"], "--reward", checkpoint,
                 "--output", str(result), "--device", "cpu"]) == 0
    metrics = json.loads(result.read_text())
    assert {"wer", "cer", "reward", "n"} <= set(metrics) and metrics["n"] == len(rows)
    transcripts = Path(metrics["transcripts"]).read_text().splitlines()
    assert len(transcripts) == len(rows) and "pred_text" in json.loads(transcripts[0])
    with pytest.raises(SystemExit):
        main(["score", "--manifest", str(manifest)])  # --reward is required


@pytest.mark.parametrize("case, message", [
    ("wrong_shape", "head.3.weight"),
    ("tokenizer_too_large", "vocab_size is 100"),
    ("no_tokenizer", "reward tokenizer not found"),
])
def test_incompatible_reward_checkpoint_through_the_rl_command(case, message, tmp_path, capsys):
    """A bad reward folder stops `rlnf run` before the policy loads (its path does not even exist),
    with a message naming the tensor or file."""
    import shutil

    from safetensors.torch import load_file, save_file

    from rlnf.cli import main

    folder = random_published_folder(tmp_path / case)
    if case != "no_tokenizer":
        shutil.copyfile(tiny_tokenizer(tmp_path), folder / "tokenizer.model")  # 200 pieces
    if case == "wrong_shape":
        state = load_file(str(folder / "model.safetensors"))
        state["head.3.weight"] = torch.zeros(256, 128)
        save_file(state, str(folder / "model.safetensors"))
    if case == "tokenizer_too_large":  # the config promises 100 ids; the tokenizer has 200 pieces
        config = json.loads((folder / "config.json").read_text())
        config["pretrained_config"]["vocab_size"] = 100
        (folder / "config.json").write_text(json.dumps(config))
        state = load_file(str(folder / "model.safetensors"))
        state["embedding.weight"] = state["embedding.weight"][:100].clone()
        save_file(state, str(folder / "model.safetensors"))
    code = main(["run", "rl_finetune", "--config", "rl/rloo", "policy.path=/nonexistent/model.nemo",
                 f"data.train_manifest={tmp_path / 'train.json'}", f"output_dir={tmp_path / 'out'}",
                 f"rewards=[{{name: learned, path: '{folder}', device: cpu}}]"])
    assert code == 2
    assert message in capsys.readouterr().err
