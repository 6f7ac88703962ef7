"""A reward model whose ears are a NeMo CTC model's encoder (``model.asr_encoder_from``): the encoder's
weights come from the .nemo and stay frozen (no gradient, eval mode while training), a clip scores the
same beside padding, the checkpoint carries the encoder and loads without the .nemo, and a preprocessor
that computes other features is refused, naming the key."""

from __future__ import annotations

import math

import pytest
import torch

ALPHABET = " abcdefghijklmnopqrstuvwxyz'"


@pytest.fixture(scope="module")
def ears(tiny_nemo):
    from recipes.train_reward_model import RewardTrainer

    return RewardTrainer.asr_encoder(tiny_nemo)


def ears_model(ears, **config):
    from rlnf import RewardConfig, RewardModel

    torch.manual_seed(0)
    settings = dict(vocab_size=200, embed_dim=16, lstm_hidden=16, audio_conv_channels=16, head_hidden=32, ctc_head=True,
                    ctc_hidden=16, ctc_stride=1, asr_encoder=ears.config, asr_encoder_dim=ears.dim)
    model = RewardModel(RewardConfig(**{**settings, **config}))
    model.asr_encoder.load_state_dict(ears.state)
    return model


def test_the_encoder_is_the_nemo_models_and_stays_frozen(ears, tiny_nemo):
    from rlnf.policy import load_nemo_model

    nemo = load_nemo_model(tiny_nemo)
    assert ears.dim == nemo.cfg.decoder.feat_in
    model = ears_model(ears).train()
    assert not model.asr_encoder.training  # its BatchNorm statistics stay those of the ASR model
    for name, tensor in nemo.encoder.state_dict().items():
        assert torch.equal(model.asr_encoder.state_dict()[name], tensor)
    audio = model.embed_audio(torch.randn(2, 64, 80), torch.tensor([80, 50]))
    reference = model.embed_text(torch.tensor([[5, 6, 7, 2], [8, 9, 2, 1]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    (model.ctc_nll(audio, reference).sum() + audio.pooled.sum()).backward()
    assert all(p.grad is None for p in model.asr_encoder.parameters())
    assert model.audio_projection[0].weight.grad.abs().sum() > 0
    # The encoder's frames with its stride: the CTC head reads every one of them (ctc_stride 1).
    assert audio.ctc_lengths.tolist() == [40, 25]


def test_a_clip_scores_the_same_beside_padding_and_the_checkpoint_loads_without_the_nemo(ears, tmp_path):
    from rlnf.reward_model.checkpoint import save_reward_folder
    from rlnf.reward_model.processor import RewardProcessor, load_reward_checkpoint
    from tests.test_reward_model import tiny_tokenizer

    model = ears_model(ears, ctc_alphabet=ALPHABET).eval()
    processor = RewardProcessor(model.config, tiny_tokenizer(tmp_path / "sp"))
    model.config.eos_token_id = processor.eos_id
    model.set_spelling([processor.sp.id_to_piece(i) for i in range(processor.sp.get_piece_size())])
    clip, other = torch.randn(1, 64, 48), torch.randn(1, 64, 96)
    ids, mask = processor.encode_texts(["and the lord said"])
    batch = torch.zeros(2, 64, 96)
    batch[0, :, :48], batch[1] = clip[0], other[0]
    with torch.no_grad():
        alone = model(clip, torch.tensor([48]), ids, mask).logits
        beside = model(batch, torch.tensor([48, 96]), ids.repeat(2, 1), mask.repeat(2, 1)).logits
    torch.testing.assert_close(alone, beside[:1], atol=1e-6, rtol=1e-6)
    assert beside[0].item() != pytest.approx(beside[1].item(), abs=1e-7)  # the same text, other audio
    save_reward_folder(model, processor, tmp_path / "reward")
    loaded, _ = load_reward_checkpoint(tmp_path / "reward", "cpu")
    assert loaded.config.asr_encoder == ears.config and loaded.config.asr_encoder_dim == ears.dim
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch, torch.tensor([48, 96]), ids.repeat(2, 1), mask.repeat(2, 1)).logits,
                                   beside)


def test_a_preprocessor_with_other_features_is_refused_naming_the_key(ears, tiny_nemo, monkeypatch):
    import dataclasses

    from recipes.train_reward_model import RewardTrainer
    from rlnf.errors import ConfigError
    from rlnf.reward_model import asr_encoder
    from rlnf.reward_model.modeling import FEATURE_DEFAULTS

    assert asr_encoder.feature_mismatches(ears.preprocessor, FEATURE_DEFAULTS) == []
    other = dataclasses.replace(ears, preprocessor={**ears.preprocessor, "window_stride": 0.02, "features": 80})
    assert asr_encoder.feature_mismatches(other.preprocessor, FEATURE_DEFAULTS) == [
        "n_mel 80 (reward model: 64)", "window_stride 0.02 (reward model: 0.01)"]
    monkeypatch.setattr(asr_encoder, "read_asr_encoder", lambda path: other)
    with pytest.raises(ConfigError, match=r"model.asr_encoder_from=.*tiny.nemo.*n_mel 80 \(reward model: 64\)"):
        RewardTrainer.asr_encoder(tiny_nemo)
    # NeMo's own n_fft for a null one (2^ceil(log2(0.02 * 16000)) = 512) matches; another front end does not.
    assert asr_encoder.feature_mismatches({**ears.preprocessor, "n_fft": None}, FEATURE_DEFAULTS) == []
    mfcc = {**ears.preprocessor, "_target_": "nemo.collections.asr.modules.AudioToMFCCPreprocessor"}
    assert asr_encoder.feature_mismatches(mfcc, FEATURE_DEFAULTS) == [
        "front end nemo.collections.asr.modules.AudioToMFCCPreprocessor (reward model: AudioToMelSpectrogramPreprocessor)"]
    assert asr_encoder.feature_mismatches({**ears.preprocessor, "frame_splicing": 3}, FEATURE_DEFAULTS) == [
        "frame_splicing 3 (reward model: 1)"]


def test_a_file_that_is_not_a_nemo_model_is_refused_naming_the_key(tmp_path):
    from recipes.train_reward_model import RewardTrainer
    from rlnf.errors import ConfigError

    bogus = tmp_path / "policy.nemo"
    bogus.write_bytes(b"not a tar archive")
    with pytest.raises(ConfigError, match=r"model.asr_encoder_from=.*policy.nemo: not a NeMo ASR model"):
        RewardTrainer.asr_encoder(str(bogus))


def test_a_checkpoint_builds_only_nemo_asr_modules(ears, tmp_path):
    """config.json's asr_encoder._target_ names the class a load builds: anything but NeMo's ASR modules
    is refused, naming the file, before any code of it runs."""
    import json

    from rlnf.errors import CheckpointError
    from rlnf.reward_model.checkpoint import save_reward_folder
    from rlnf.reward_model.processor import RewardProcessor, load_reward_checkpoint
    from tests.test_reward_model import tiny_tokenizer

    model = ears_model(ears, ctc_alphabet=ALPHABET)
    processor = RewardProcessor(model.config, tiny_tokenizer(tmp_path / "sp"))
    save_reward_folder(model, processor, tmp_path / "reward")
    config = json.loads((tmp_path / "reward" / "config.json").read_text())
    config["asr_encoder"]["_target_"] = "os.system"
    (tmp_path / "reward" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json: invalid settings .*os.system.*NeMo's ASR modules"):
        load_reward_checkpoint(tmp_path / "reward", "cpu")


@pytest.mark.parametrize("overrides, message", [
    (["model.init_from=runs/reward/checkpoints/best"], "model.asr_encoder_from and model.init_from"),
    (["model.pooling=legacy", "model.ctc_head=false"], "model.asr_encoder_from needs model.pooling 'masked'"),
])
def test_settings_that_cannot_go_with_asr_ears_are_refused(overrides, message, tiny_nemo):
    from rlnf.config import RewardTrainConfig, load_config
    from rlnf.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(RewardTrainConfig, None, ["output_dir=unused", "data.train_manifest=pairs.json",
                                              f"model.asr_encoder_from={tiny_nemo}", *overrides])


@pytest.mark.slow
def test_recipe_trains_a_reward_model_on_asr_ears(corpus, tiny_nemo, tmp_path, nemo_quiet):
    """Through the CLI: the listening config with the tiny QuartzNet's encoder; the encoder's weights
    are unchanged after training, the head's CTC transcripts are judged (val/ctc_wer), and the scorer
    RL uses loads the checkpoint."""
    from rlnf.cli import main
    from rlnf.metric_logging import read_metrics
    from rlnf.policy import load_nemo_model
    from rlnf.reward_model.scorer import RewardScorer
    from tests.test_reward_model import scored_manifest

    train = scored_manifest(corpus["train"], tmp_path / "scored.json")
    val = scored_manifest(corpus["val"], tmp_path / "scored_val.json", seed=1)
    code = main(["run", "train_reward_model", "--config", "reward/listening", f"data.train_manifest={train}",
                 f"data.val_manifest={val}", f"output_dir={tmp_path / 'run'}", "data.score_scale=100",
                 f"model.asr_encoder_from={tiny_nemo}", "model.ctc_stride=1", "model.vocab_size=128",
                 "model.ctc_hidden=32", "trainer.ctc_pretrain_epochs=1", "trainer.epochs=1", "trainer.batch_size=16",
                 "trainer.progress_bar=false"])
    assert code == 0
    rows = read_metrics(tmp_path / "run")
    last = [row for row in rows if "val/ctc_wer" in row][-1]
    assert math.isfinite(last["val/group_spearman"]) and 0 <= last["val/ctc_cer"]
    scorer = RewardScorer(str(tmp_path / "run" / "checkpoints" / "last"), "cpu")
    for name, tensor in load_nemo_model(tiny_nemo).encoder.state_dict().items():
        assert torch.equal(scorer.model.asr_encoder.state_dict()[name], tensor)
    audio = torch.randn(2, 16000)
    scores = scorer.score_groups(audio, torch.tensor([16000, 12000]), 16000, [["a b", "the lord"], ["", "and"]])
    assert scores.shape == (2, 2) and bool(((scores >= 0) & (scores <= 1)).all())
