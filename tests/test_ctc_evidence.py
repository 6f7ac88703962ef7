"""The reward model's acoustic evidence: CTC likelihoods against brute force, the features, and a
model with ``ctc_head`` that listens (its score moves with the audio), is batch-invariant and round-trips."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from rlnf.errors import CheckpointError
from rlnf.reward_model.ctc_evidence import MAX_NLL_PER_TOKEN, ctc_nll, ctc_targets, evidence_features


def brute_force_nll(log_probs: torch.Tensor, target: list[int], blank: int) -> float:
    """-log of the summed probability of every frame labelling that collapses to ``target``."""
    frames, labels = log_probs.shape
    total = 0.0
    for path in itertools.product(range(labels), repeat=frames):
        collapsed = [label for index, label in enumerate(path)
                     if label != blank and (index == 0 or label != path[index - 1])]
        if collapsed == target:
            total += math.exp(sum(float(log_probs[t, label]) for t, label in enumerate(path)))
    return -math.log(total) if total > 0 else math.inf


def test_ctc_nll_matches_every_alignment_enumerated():
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(3, 5, 4, generator=generator), dim=-1)  # blank = 3
    targets = torch.tensor([[0, 1, 0], [2, 2, 0], [1, 0, 0]])
    target_lengths = torch.tensor([2, 2, 0])
    lengths = torch.tensor([5, 4, 3])  # the second and third rows are shorter than the batch
    nll = ctc_nll(log_probs, lengths, targets, target_lengths, blank=3)
    for row in range(3):
        expected = brute_force_nll(log_probs[row, : lengths[row]], targets[row, : target_lengths[row]].tolist(), 3)
        assert nll[row].item() == pytest.approx(expected, rel=1e-5)


def test_ctc_nll_caps_a_transcript_the_clip_cannot_hold():
    log_probs = torch.log_softmax(torch.randn(1, 3, 5), dim=-1)
    # 3 labels with a repeated neighbour need 4 frames: 3 are too few.
    nll = ctc_nll(log_probs, torch.tensor([3]), torch.tensor([[1, 1, 2]]), torch.tensor([3]), blank=4)
    assert nll.item() == pytest.approx(3 * MAX_NLL_PER_TOKEN)


def test_ctc_targets_drop_end_of_sequence_and_padding():
    ids = torch.tensor([[5, 6, 2, 1], [2, 1, 1, 1], [1, 7, 8, 2]])  # eos 2, pad 1
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    targets, lengths = ctc_targets(ids, mask, (2, 1))
    assert lengths.tolist() == [2, 0, 2]
    assert targets[0, :2].tolist() == [5, 6] and targets[2, :2].tolist() == [7, 8]
    assert (targets[1] == 0).all()


def test_evidence_features_shapes_and_caps():
    features = evidence_features(torch.tensor([2.0, 1e4, 0.0]), torch.tensor([4, 2, 0]), torch.tensor([50, 50, 10]))
    assert features.shape == (3, 3)
    assert features[0].tolist() == pytest.approx([-0.05, -0.04, 0.08])
    assert features[1, 0].item() == pytest.approx(-MAX_NLL_PER_TOKEN / 10) and features[1, 1] >= -MAX_NLL_PER_TOKEN
    assert torch.isfinite(features).all()


def ctc_model(**overrides):
    from rlnf import RewardConfig, RewardModel

    torch.manual_seed(0)
    config = RewardConfig(vocab_size=60, embed_dim=16, lstm_hidden=16, audio_conv_channels=16, head_hidden=32,
                          ctc_head=True, ctc_hidden=16, eos_token_id=2, **overrides)
    return RewardModel(config).eval()


@pytest.mark.parametrize("fusion", ["pooled", "attention"])
def test_ctc_head_scores_move_with_the_audio_and_are_batch_invariant(fusion):
    model = ctc_model(fusion=fusion, attention_dim=16)
    assert any(name.startswith("ctc.") for name in model.state_dict())
    clip, other = torch.randn(1, 64, 41), torch.randn(1, 64, 90)
    text = torch.tensor([[5, 9, 12, 2, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        own = model(clip, torch.tensor([41]), text, mask).logits
        audio_a, audio_b = model.embed_audio(clip, torch.tensor([41])), model.embed_audio(other, torch.tensor([90]))
        encoded_text = model.embed_text(text, mask)
        assert model.ctc_nll(audio_a, encoded_text).item() != pytest.approx(model.ctc_nll(audio_b, encoded_text).item())
        batch = torch.zeros(2, 64, 90)
        batch[0, :, :41], batch[1] = clip[0], other[0]
        beside = model(batch, torch.tensor([41, 90]), text.repeat(2, 1), mask.repeat(2, 1)).logits
    assert beside.shape == (2,)
    torch.testing.assert_close(own, beside[:1], atol=1e-6, rtol=1e-6)  # padding beside a clip changes nothing
    assert beside[0].item() != pytest.approx(beside[1].item(), abs=1e-7)  # the same text, other audio


def test_ctc_head_has_gradients_from_the_reference_loss():
    model = ctc_model().train()
    audio = model.embed_audio(torch.randn(2, 64, 60), torch.tensor([60, 45]))
    reference = model.embed_text(torch.tensor([[5, 6, 7, 2], [8, 9, 2, 1]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))
    model.ctc_nll(audio, reference).sum().backward()
    assert model.ctc.output.weight.grad.abs().sum() > 0
    assert model.audio_encoder[0].weight.grad.abs().sum() > 0  # the evidence trains the shared encoder too


def test_ctc_head_round_trips_through_the_checkpoint_folder(tmp_path):
    from rlnf import RewardModel
    from rlnf.reward_model.checkpoint import save_reward_folder
    from rlnf.reward_model.processor import RewardProcessor, load_reward_checkpoint
    from tests.test_reward_model import tiny_tokenizer

    tokenizer = tiny_tokenizer(tmp_path / "sp")
    model = ctc_model()
    model.config.vocab_size = 200  # the tokenizer's
    model = type(model)(model.config).eval()
    processor = RewardProcessor(model.config, tokenizer)
    save_reward_folder(model, processor, tmp_path / "reward")
    loaded, loaded_processor = load_reward_checkpoint(tmp_path / "reward", "cpu")
    assert (loaded.config.ctc_head, loaded.config.ctc_hidden, loaded.config.ctc_stride) == (True, 16, 2)
    ids, mask = processor.encode_texts(["and the lord", "said"])
    audio, lengths = torch.randn(2, 64, 80), torch.tensor([80, 61])
    with torch.no_grad():
        assert torch.equal(model(audio, lengths, ids, mask).logits, loaded(audio, lengths, ids, mask).logits)
    # Not the card's layout: loading these weights as the card's names a ctc tensor.
    config = json.loads((tmp_path / "reward" / "config.json").read_text())
    (tmp_path / "reward" / "config.json").write_text(json.dumps({**config, "ctc_head": False}))
    with pytest.raises(CheckpointError, match="ctc"):
        RewardModel.from_pretrained(tmp_path / "reward")


def test_ctc_options_are_checked_before_any_model_loads():
    from rlnf.config import RewardTrainConfig, load_config
    from rlnf.errors import ConfigError

    with pytest.raises(ConfigError, match="model.ctc_head"):
        load_config(RewardTrainConfig, None, ["output_dir=x", "data.train_manifest=y", "trainer.ctc_loss_weight=1"])
    with pytest.raises(ConfigError, match="model.ctc_stride"):
        load_config(RewardTrainConfig, None, ["output_dir=x", "data.train_manifest=y", "model.ctc_head=true",
                                              "model.ctc_stride=0"])


def test_pieces_are_spelt_in_the_alphabet_without_edge_spaces():
    from rlnf.reward_model.ctc_evidence import spell, spelling_table

    alphabet = " abdehilnortw'"
    pieces = ["<unk>", "<s>", "</s>", "\u2581and", "\u2581i", "\u2581w", "ill", "!", "\u2581he'll"]
    table = spelling_table(pieces, alphabet, max_chars=8)
    assert table[2].tolist() == [-1] * 8 and table[7].tolist() == [-1] * 8  # control piece; no letter in alphabet
    targets, lengths = ctc_targets(torch.tensor([[3, 4, 5, 6, 7, 2], [8, 2, 1, 1, 1, 1]]),
                                   torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]]), (2, 1))
    letters, letter_lengths = spell(targets, lengths, table, space=0)
    decoded = ["".join(alphabet[i] for i in row[:n]) for row, n in zip(letters.tolist(), letter_lengths.tolist())]
    assert decoded == ["and i will", "he'll"]


def test_greedy_spelling_is_the_most_probable_frame_path_collapsed():
    """Against enumeration: the transcript of the single most probable frame labelling, repeats merged
    and blanks dropped (a blank between two equal letters keeps both), spaces as spelt_text writes them."""
    from rlnf.reward_model.ctc_evidence import greedy_spelling

    alphabet = " ab"
    generator = torch.Generator().manual_seed(3)
    log_probs = torch.log_softmax(torch.randn(6, 5, len(alphabet) + 1, generator=generator), dim=-1)
    lengths = torch.tensor([5, 5, 4, 3, 1, 0])
    texts = greedy_spelling(log_probs, lengths, alphabet)
    for clip in range(6):
        frames = int(lengths[clip])
        best = max(itertools.product(range(len(alphabet) + 1), repeat=frames),
                   key=lambda path: sum(float(log_probs[clip, t, label]) for t, label in enumerate(path)))
        letters = [alphabet[label] for index, label in enumerate(best)
                   if label != len(alphabet) and (index == 0 or label != best[index - 1])]
        assert texts[clip] == " ".join("".join(letters).split())
    pinned = torch.full((1, 7, 4), -9.0)
    for t, label in enumerate([1, 1, 3, 1, 0, 0, 2]):  # a a <blank> a ' ' ' ' b
        pinned[0, t, label] = 0.0
    assert greedy_spelling(pinned, torch.tensor([7]), alphabet) == ["aa b"]


def test_references_are_spelt_as_the_head_writes():
    from rlnf.reward_model.ctc_evidence import spelt_text

    assert spelt_text("  And THE Lord's 3 sheep,  said ", " abcdefghijklmnopqrstuvwxyz'") == "and the lord's sheep said"
    assert spelt_text("A b", "ab") == "ab"


def test_letter_ctc_head_round_trips_its_spelling(tmp_path):
    from rlnf.reward_model.checkpoint import save_reward_folder
    from rlnf.reward_model.processor import RewardProcessor, load_reward_checkpoint
    from tests.test_reward_model import tiny_tokenizer

    tokenizer = tiny_tokenizer(tmp_path / "sp")
    from rlnf import RewardConfig, RewardModel

    config = RewardConfig(vocab_size=200, embed_dim=16, lstm_hidden=16, audio_conv_channels=16, head_hidden=32,
                          ctc_head=True, ctc_hidden=16, ctc_alphabet=" abcdefghijklmnopqrstuvwxyz'")
    processor = RewardProcessor(config, tokenizer)
    config.eos_token_id = processor.eos_id
    model = RewardModel(config).eval()
    model.set_spelling([processor.sp.id_to_piece(i) for i in range(processor.sp.get_piece_size())])
    assert model.ctc.output.out_features == 29  # 28 letters + blank
    ids, mask = processor.encode_texts(["and the lord said", ""])
    text = model.embed_text(ids, mask)
    spelt = "".join(config.ctc_alphabet[i] for i in text.targets[0, : text.target_lengths[0]].tolist())
    assert spelt == "and the lord said" and text.target_lengths[1] == 0
    save_reward_folder(model, processor, tmp_path / "reward")
    loaded, _ = load_reward_checkpoint(tmp_path / "reward", "cpu")
    assert torch.equal(loaded.ctc_spelling, model.ctc_spelling)
    audio, lengths = torch.randn(2, 64, 120), torch.tensor([120, 77])
    with torch.no_grad():
        assert torch.equal(model(audio, lengths, ids, mask).logits, loaded(audio, lengths, ids, mask).logits)


@pytest.mark.slow
def test_recipe_trains_the_ctc_head_on_the_references(corpus, tmp_path, nemo_quiet):
    """Through the CLI: CTC pre-training, the auxiliary loss beside the MSE, and a checkpoint that scores."""
    import soundfile

    from rlnf.cli import main
    from rlnf.data.manifest import read_manifest
    from rlnf.metric_logging import read_metrics
    from rlnf.metrics import corpus_error_rate
    from rlnf.reward_model.ctc_evidence import spelt_text
    from rlnf.reward_model.scorer import RewardScorer
    from tests.test_reward_model import scored_manifest

    manifest = scored_manifest(corpus["train"], tmp_path / "scored.json")  # score-100 rows are the references
    val = scored_manifest(corpus["val"], tmp_path / "scored_val.json", seed=1)
    code = main(["run", "train_reward_model", "--config", "reward/listening", f"data.train_manifest={manifest}",
                 f"output_dir={tmp_path / 'run'}", "data.score_scale=100", f"data.val_manifest={val}", "model.vocab_size=128",
                 "model.ctc_hidden=32", "trainer.ctc_pretrain_epochs=2", "trainer.epochs=1", "trainer.batch_size=16",
                 "trainer.log_every=1", "trainer.progress_bar=false"])
    assert code == 0
    rows = read_metrics(tmp_path / "run")
    pretraining = [row["ctc_pretrain/loss"] for row in rows if "ctc_pretrain/loss" in row]
    assert len(pretraining) == 2 and all(math.isfinite(loss) for loss in pretraining)
    assert any("train/ctc_loss" in row for row in rows)
    scorer = RewardScorer(str(tmp_path / "run" / "checkpoints" / "best"), "cpu")
    assert scorer.model.config.ctc_head and scorer.model.ctc_spelling.max() >= 0  # the spelling table was filled
    # val/ctc_wer of the last validation: the last checkpoint's greedy transcripts of the validation clips,
    # computed again here one clip at a time through the scorer's own audio path.
    logged = [row for row in rows if "val/ctc_wer" in row][-1]
    last = RewardScorer(str(tmp_path / "run" / "checkpoints" / "last"), "cpu")
    alphabet = last.model.config.ctc_alphabet
    references, hypotheses = [], []
    for utterance in read_manifest(corpus["val"])[0]:
        wave, rate = soundfile.read(utterance.audio_filepath, dtype="float32")
        audio, audio_len = last._prepare_audio(torch.from_numpy(wave)[None], torch.tensor([len(wave)]), rate)
        with torch.no_grad():
            features, frames = last.processor.features(audio, audio_len)
            hypotheses += last.model.ctc_transcripts(last.model.embed_audio(features, frames))
        references.append(spelt_text(utterance.text, alphabet))
    assert logged["val/ctc_wer"] == pytest.approx(corpus_error_rate(references, hypotheses, "word"), abs=1e-9)
    assert logged["val/ctc_cer"] == pytest.approx(corpus_error_rate(references, hypotheses, "char"), abs=1e-9)
