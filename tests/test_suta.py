"""SUTA: the losses against a brute-force computation, their gradients, the per-utterance reset,
and `rlnf adapt suta` end to end on a tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from rlnf.tta import entropy_loss, mcc_loss, suta_loss


# ------------------------------------------------------------------ brute force, one frame and one class pair at a time
def softmax_rows(logits: np.ndarray, temperature: float) -> list[list[float]]:
    rows = []
    for frame in logits:
        exps = [math.exp(value / temperature) for value in frame]
        rows.append([e / sum(exps) for e in exps])
    return rows


def brute_entropy(log_probs, encoded_len, temperature, blank_id=None) -> float:
    total, count = 0.0, 0
    for b, length in enumerate(encoded_len):
        for t in range(length):
            frame = log_probs[b, t]
            if blank_id is not None and int(np.argmax(frame)) == blank_id:
                continue
            probs = softmax_rows(frame[None], temperature)[0]
            total += -sum(p * math.log(p) for p in probs)
            count += 1
    return total / count if count else 0.0


def brute_mcc(log_probs, encoded_len, temperature, reweight=False) -> float:
    values = []
    classes = log_probs.shape[2]
    for b, length in enumerate(encoded_len):
        probs = softmax_rows(log_probs[b, :length], temperature)
        weights = [1.0] * length
        if reweight:
            entropies = [-sum(p * math.log(p) for p in frame) for frame in probs]
            raw = [1.0 + math.exp(-h) for h in entropies]
            weights = [length * w / sum(raw) for w in raw]
        confusion = [[sum(weights[t] * probs[t][i] * probs[t][j] for t in range(length)) for j in range(classes)]
                     for i in range(classes)]
        normalised = [[confusion[i][j] / sum(confusion[i]) for j in range(classes)] for i in range(classes)]
        off_diagonal = sum(normalised[i][j] for i in range(classes) for j in range(classes) if i != j)
        values.append(off_diagonal / classes)
    return sum(values) / len(values)


@pytest.fixture()
def logits():
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(2.0 * torch.randn(3, 6, 5, generator=generator, dtype=torch.float64), dim=-1)
    log_probs[0, :, 4] += 3.0  # utterance 0 is mostly blank (id 4): the blank filter matters
    return log_probs, torch.tensor([6, 4, 1])


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_losses_equal_a_brute_force_computation(logits, temperature):
    log_probs, encoded_len = logits
    array, lengths = log_probs.numpy(), encoded_len.tolist()
    # Padding frames are garbage that must not count.
    padded = log_probs.clone()
    padded[1, 4:] = 50.0
    padded[2, 1:] = -50.0
    assert entropy_loss(padded, encoded_len, temperature).item() == pytest.approx(
        brute_entropy(array, lengths, temperature), rel=1e-12)
    blank_free = brute_entropy(array, lengths, temperature, blank_id=4)
    assert blank_free != pytest.approx(brute_entropy(array, lengths, temperature))
    assert entropy_loss(padded, encoded_len, temperature, blank_id=4).item() == pytest.approx(blank_free, rel=1e-12)
    for reweight in (False, True):
        expected = brute_mcc(array, lengths, temperature, reweight)
        assert mcc_loss(padded, encoded_len, temperature, reweight).item() == pytest.approx(expected, rel=1e-12)
    combined = 0.3 * blank_free + 0.7 * brute_mcc(array, lengths, temperature)
    assert suta_loss(padded, encoded_len, temperature, 0.3, blank_id=4).item() == pytest.approx(combined, rel=1e-12)
    # One utterance as [T, V], encoded_len optional.
    assert mcc_loss(log_probs[0], None, temperature).item() == pytest.approx(
        brute_mcc(array[:1], [6], temperature), rel=1e-12)
    assert entropy_loss(log_probs[1, :4], torch.tensor(4), temperature).item() == pytest.approx(
        brute_entropy(array[1:2], [4], temperature), rel=1e-12)


def test_loss_extremes():
    classes = 5
    uniform = torch.zeros(2, 7, classes, dtype=torch.float64)
    certain = torch.full((2, 7, classes), -1e3, dtype=torch.float64)
    certain[:, :, 0] = 0.0
    assert entropy_loss(uniform).item() == pytest.approx(math.log(classes))
    assert mcc_loss(uniform).item() == pytest.approx((classes - 1) / classes)
    assert entropy_loss(certain).item() == pytest.approx(0.0, abs=1e-12)
    assert mcc_loss(certain).item() == pytest.approx(0.0, abs=1e-12)
    # Every frame blank and blanks left out: nothing to minimise, and no NaN.
    assert entropy_loss(certain, blank_id=0).item() == 0.0
    assert suta_loss(certain, em_weight=1.0, blank_id=0).item() == 0.0


def test_gradients_are_right():
    generator = torch.Generator().manual_seed(1)
    log_probs = torch.randn(2, 4, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    encoded_len = torch.tensor([4, 2])
    assert torch.autograd.gradcheck(lambda x: entropy_loss(x, encoded_len, 2.5), (log_probs,))
    assert torch.autograd.gradcheck(lambda x: entropy_loss(x, encoded_len, 1.0, blank_id=2), (log_probs,))
    assert torch.autograd.gradcheck(lambda x: mcc_loss(x, encoded_len, 2.5), (log_probs,))
    assert torch.autograd.gradcheck(lambda x: suta_loss(x, encoded_len, 2.5, 0.3, 2), (log_probs,))


def test_reweighted_mcc_passes_no_gradient_through_its_frame_weights():
    """MCC's frame weights are constants of the step (detached, as in SUTA's code): the gradient is
    the finite-difference gradient of the loss with the weights held at their current values."""
    generator = torch.Generator().manual_seed(2)
    log_probs = torch.randn(1, 5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    (analytic,) = torch.autograd.grad(mcc_loss(log_probs, None, 2.5, reweight=True), log_probs)
    start = log_probs.detach().numpy()[0]
    entropies = [-sum(p * math.log(p) for p in frame) for frame in softmax_rows(start, 2.5)]
    raw = [1.0 + math.exp(-h) for h in entropies]
    weights = [5 * w / sum(raw) for w in raw]

    def fixed_weight_mcc(values: np.ndarray) -> float:
        probs = softmax_rows(values, 2.5)
        confusion = [[sum(weights[t] * probs[t][i] * probs[t][j] for t in range(5)) for j in range(3)]
                     for i in range(3)]
        return sum(confusion[i][j] / sum(confusion[i]) for i in range(3) for j in range(3) if i != j) / 3

    numeric = np.zeros_like(start)
    for t in range(5):
        for v in range(3):
            step = np.zeros_like(start)
            step[t, v] = 1e-6
            numeric[t, v] = (fixed_weight_mcc(start + step) - fixed_weight_mcc(start - step)) / 2e-6
    np.testing.assert_allclose(analytic[0].numpy(), numeric, atol=1e-8)


# ------------------------------------------------------------------ adaptation of a policy
@pytest.fixture(scope="module")
def clips(corpus):
    from rlnf.data.loader import AudioDataset
    from rlnf.data.manifest import read_manifest

    utterances, _ = read_manifest(corpus["heldout_test"])
    return AudioDataset(list(utterances)[:3], 16000)


def state_of(policy) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in policy.model.state_dict().items()}


def test_suta_resets_the_weights_and_each_utterance_is_adapted_from_the_start(pretrained_tiny_nemo, clips):
    from rlnf.adaptation import SUTAConfig, suta_transcribe
    from rlnf.data.loader import AudioDataset
    from rlnf.policy import CTCPolicy

    policy = CTCPolicy.load(pretrained_tiny_nemo)
    before = state_of(policy)
    config = SUTAConfig(steps=3, lr=1e-2)
    forward = suta_transcribe(policy, clips, config)
    after = state_of(policy)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(parameter.requires_grad for parameter in policy.model.parameters())
    assert not policy.model.training

    backward = suta_transcribe(policy, AudioDataset(list(clips.utterances)[::-1], 16000), config)
    assert [row["pred_text"] for row in forward.rows] == [row["pred_text"] for row in backward.rows][::-1]
    assert forward.losses == backward.losses[::-1]  # to the last bit: nothing carried over
    # The adaptation did something: each utterance's loss fell over its steps.
    assert all(len(losses) == 4 and losses[-1] < losses[0] for losses in forward.losses)

    # BatchNorm on the utterance's own statistics moves the running ones; they are put back too.
    on_batch_statistics = suta_transcribe(policy, clips, SUTAConfig(steps=1, batchnorm="train"))
    after = state_of(policy)
    assert all(torch.equal(before[k], after[k]) for k in before) and not policy.model.training
    assert on_batch_statistics.losses != suta_transcribe(policy, clips, SUTAConfig(steps=1)).losses


def test_suta_with_zero_steps_is_greedy_decoding(pretrained_tiny_nemo, clips):
    from rlnf.adaptation import SUTAConfig, suta_transcribe
    from rlnf.evaluation import evaluate_policy
    from rlnf.policy import CTCPolicy

    policy = CTCPolicy.load(pretrained_tiny_nemo)
    rows = suta_transcribe(policy, clips, SUTAConfig(steps=0)).rows
    greedy = evaluate_policy(policy, clips, 1, policy.device).rows
    by_path = {row["audio_filepath"]: row["pred_text"] for row in greedy}
    assert [row["pred_text"] for row in rows] == [by_path[row["audio_filepath"]] for row in rows]
    assert [row["audio_filepath"] for row in rows] == [u.audio_filepath for u in clips.utterances]


def test_the_loss_falls_over_the_default_steps_and_norm_adapts_only_normalisation(pretrained_tiny_nemo, clips):
    from rlnf.adaptation import SUTAConfig, adapt_and_transcribe, adapted_parameters, single_utterances
    from rlnf.policy import CTCPolicy

    policy = CTCPolicy.load(pretrained_tiny_nemo)
    batch = next(single_utterances(clips))
    _, losses = adapt_and_transcribe(policy, batch, adapted_parameters(policy, "all"), SUTAConfig())
    assert len(losses) == 11 and losses[-1] < losses[5] < losses[0]

    policy = CTCPolicy.load(pretrained_tiny_nemo)
    before = state_of(policy)
    norm = adapted_parameters(policy, "norm")
    batchnorms = policy.batchnorm_layers()
    assert len(norm) == 2 * len(batchnorms) and {id(p) for p in norm} == {
        id(p) for layer in batchnorms for p in (layer.weight, layer.bias)}
    adapt_and_transcribe(policy, batch, norm, SUTAConfig(steps=2, lr=1e-2))
    after = state_of(policy)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    norm_names = {name for name, p in policy.model.named_parameters() if id(p) in {id(q) for q in norm}}
    assert changed and changed <= norm_names  # running statistics (frozen) and every other weight untouched


def test_settings_are_checked_naming_the_key():
    from rlnf.adaptation import SUTAConfig
    from rlnf.errors import ConfigError

    for bad, message in (({"steps": -1}, "steps=-1"), ({"em_weight": 1.5}, "em_weight=1.5"),
                         ({"params": "heads"}, "params='heads'"), ({"temperature": 0.0}, "temperature=0.0"),
                         ({"lr": float("nan")}, "lr=nan")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            SUTAConfig(**bad)


# ------------------------------------------------------------------ the command
def test_adapt_suta_command_writes_pred_text_and_compares_with_greedy(pretrained_tiny_nemo, corpus, tmp_path,
                                                                      capsys):
    from rlnf.cli import main
    from rlnf.metrics import corpus_error_rate, normalize_text

    rows = [json.loads(line) for line in Path(corpus["heldout_val"]).read_text().splitlines()]
    manifest = tmp_path / "audio.json"
    base = Path(corpus["heldout_val"]).parent
    rows = [{**row, "audio_filepath": str(base / row["audio_filepath"]), "speaker": "held-out"} for row in rows]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "hyps.json"
    command = ["adapt", "suta", "--model", pretrained_tiny_nemo, "--manifest", str(manifest),
               "--output-manifest", str(out), "--steps", "2", "--device", "cpu"]
    assert main(command) == 0
    summary = json.loads(capsys.readouterr().out)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in row.items() if k != "pred_text"} for row in written] == rows
    assert all(isinstance(row["pred_text"], str) for row in written)
    assert summary["n"] == len(rows) and summary["settings"]["steps"] == 2 and summary["settings"]["lr"] == 1e-4
    references = [normalize_text(row["text"], lowercase=True) for row in rows]
    assert summary["suta"]["wer"] == pytest.approx(
        corpus_error_rate(references, [row["pred_text"] for row in written], "word"))
    assert summary["wer_change"] == pytest.approx(
        (summary["suta"]["wer"] - summary["greedy"]["wer"]) / summary["greedy"]["wer"])
    # The plain greedy figures are `rlnf evaluate`'s.
    assert main(["evaluate", "--model", pretrained_tiny_nemo, "--manifest", str(manifest), "--device", "cpu"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert summary["greedy"] == {"wer": evaluated["wer"], "cer": evaluated["cer"]}

    assert main(command) == 2  # refuses to overwrite
    assert "--output-manifest" in capsys.readouterr().err and out.read_text().count("\n") == len(rows)
    assert main(command + ["--force", "--steps", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["suta"] == summary["greedy"]


def test_adapt_suta_without_transcripts_and_its_errors(pretrained_tiny_nemo, corpus, tmp_path, capsys):
    from rlnf.cli import main

    base = Path(corpus["heldout_val"]).parent
    rows = [json.loads(line) for line in Path(corpus["heldout_val"]).read_text().splitlines()]
    manifest = tmp_path / "audio.json"
    manifest.write_text("".join(json.dumps({"audio_filepath": str(base / row["audio_filepath"])}) + "\n"
                                for row in rows))
    out = tmp_path / "hyps.json"
    assert main(["adapt", "suta", "--model", pretrained_tiny_nemo, "--manifest", str(manifest),
                 "--output-manifest", str(out), "--steps", "1", "--params", "norm", "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "wer" not in json.dumps(summary) and summary["n"] == len(rows)
    written = [set(json.loads(line)) for line in out.read_text().splitlines()]
    assert written == [{"audio_filepath", "pred_text"}] * len(rows)

    missing = tmp_path / "missing.nemo"
    assert main(["adapt", "suta", "--model", str(missing), "--manifest", str(manifest),
                 "--output-manifest", str(tmp_path / "h2.json")]) == 2
    assert f"--model {missing}" in capsys.readouterr().err and not (tmp_path / "h2.json").exists()
    assert main(["adapt", "suta", "--model", pretrained_tiny_nemo, "--manifest", str(tmp_path / "none.json"),
                 "--output-manifest", str(tmp_path / "h2.json")]) == 2
    error = capsys.readouterr().err
    assert "--manifest" in error and str(tmp_path / "none.json") in error
    assert main(["adapt", "suta", "--model", pretrained_tiny_nemo, "--manifest", str(manifest),
                 "--output-manifest", str(tmp_path / "h2.json"), "--em-weight", "2"]) == 2
    assert "--em-weight 2.0 must be in [0.0, 1.0]" in capsys.readouterr().err
    assert main(["adapt", "suta", "--model", pretrained_tiny_nemo, "--manifest", str(manifest),
                 "--output-manifest", str(manifest)]) == 2
    assert "is the manifest" in capsys.readouterr().err


def test_adapt_batchnorm_has_an_adapt_subcommand_alias():
    from rlnf.cli import build_parser, cmd_adapt_batchnorm

    args = build_parser().parse_args(["adapt", "batchnorm", "--model", "m.nemo", "--manifest", "a.json",
                                      "--output", "b.nemo", "--batch-size", "4"])
    assert args.func is cmd_adapt_batchnorm and (args.model, args.manifest, args.output, args.batch_size,
                                                 args.device) == ("m.nemo", "a.json", "b.nemo", 4, "auto")


def test_suta_defaults_live_in_one_place():
    """The CLI flags and rlnf.commands.adapt_suta's signature take their defaults from SUTAConfig's."""
    import dataclasses
    import inspect

    from rlnf.cli import build_parser
    from rlnf.commands import adapt_suta
    from rlnf.config.suta import SUTAConfig

    defaults = {f.name: f.default for f in dataclasses.fields(SUTAConfig)}
    signature = inspect.signature(adapt_suta).parameters
    assert {name: signature[name].default for name in defaults} == defaults
    args = build_parser().parse_args(["adapt", "suta", "--model", "m.nemo", "--manifest", "a.json",
                                      "--output-manifest", "h.json"])
    assert {name: getattr(args, name) for name in defaults} == defaults
