"""The NeMo CTC policy wrapper on a tiny in-process QuartzNet."""

from __future__ import annotations

import pytest
import torch

from rlnf import ctc
from rlnf.errors import CheckpointError, DataError
from rlnf.policy import CTCPolicy


def batch_of(seconds=(1.0, 0.6), rate=16000):
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor([int(s * rate) for s in seconds])
    audio = torch.randn(len(seconds), int(lengths.max()), generator=generator) * 0.1
    for row, length in enumerate(lengths):
        audio[row, length:] = 0
    return audio, lengths


def test_forward_trims_padding_frames_and_samples_share_one_pass(tiny_policy):
    tiny_policy.set_mode("rollout")
    audio, lengths = batch_of()
    with torch.no_grad():
        log_probs, encoded_len = tiny_policy.forward(audio, lengths)
    assert log_probs.shape[1] == int(encoded_len.max()) and encoded_len[1] < encoded_len[0]
    samples = tiny_policy.sample(log_probs, encoded_len, 5, torch.Generator().manual_seed(0))
    assert samples.labels.shape[:2] == (2, 5) and len(samples.texts) == 2 and len(samples.texts[0]) == 5
    seq = ctc.sequence_log_probs(log_probs, encoded_len, samples.labels, samples.label_len, tiny_policy.blank_id)
    assert torch.isfinite(seq).all()  # every sampled hypothesis is feasible on its own frames
    assert all(set(text) <= set(tiny_policy.vocabulary) for group in samples.texts for text in group)


def test_rollout_is_deterministic_in_eval_mode(tiny_policy):
    audio, lengths = batch_of()
    tiny_policy.set_mode("rollout")
    with torch.no_grad():
        first, _ = tiny_policy.forward(audio, lengths)
        second, _ = tiny_policy.forward(audio, lengths)
    assert torch.equal(first, second)  # no dither, no SpecAugment, no dropout


def test_update_mode_keeps_batchnorm_frozen_by_default(tiny_policy):
    tiny_policy.set_mode("update", batchnorm="frozen")
    norms = [m for m in tiny_policy.model.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and not any(m.training for m in norms)
    tiny_policy.set_mode("update", batchnorm="train")
    assert all(m.training for m in norms)
    assert not tiny_policy.model.preprocessor.training and not tiny_policy.model.spec_augmentation.training


def test_decode_and_encode_text(tiny_policy):
    ids = tiny_policy.encode_text("Hello  World")
    assert tiny_policy.decode(torch.tensor([ids]), torch.tensor([len(ids)])) == ["hello world"]
    with pytest.raises(DataError, match=r"m\.json:4.*'é'"):
        tiny_policy.encode_text("café", oov="error", where="m.json:4")
    assert tiny_policy.encode_text("café", oov="skip") is None
    assert tiny_policy.decode(torch.tensor([tiny_policy.encode_text("café", oov="drop")]), torch.tensor([3])) == ["caf"]


def test_greedy_matches_nemo_argmax(tiny_policy):
    tiny_policy.set_mode("eval")
    audio, lengths = batch_of()
    texts = tiny_policy.transcribe(audio, lengths)
    with torch.no_grad():
        log_probs, encoded_len, greedy = tiny_policy.model(input_signal=audio, input_signal_length=lengths)
    for b, text in enumerate(texts):
        alignment = greedy[b, : int(encoded_len[b])].tolist()
        collapsed = [a for i, a in enumerate(alignment) if (i == 0 or a != alignment[i - 1])]
        assert text == "".join(tiny_policy.vocabulary[a] for a in collapsed if a != tiny_policy.blank_id)


def test_save_and_reload_round_trip(tiny_policy, tmp_path):
    path = tmp_path / "copy.nemo"
    tiny_policy.save(path)
    reloaded = CTCPolicy.load(str(path))
    for (name, a), (_, b) in zip(tiny_policy.model.state_dict().items(), reloaded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        CTCPolicy.load(str(tmp_path / "missing.nemo"))
    bad = tmp_path / "bad.nemo"
    bad.write_bytes(b"not a tar")
    with pytest.raises(CheckpointError, match="not a readable .nemo"):
        CTCPolicy.load(str(bad))


def test_encoder_passes_wait_on_no_other_process(tiny_nemo, monkeypatch):
    """NeMo's encoders all-reduce the batch length on every forward in a process group; a policy's
    passes must not (a pass on one process only would hang), and must give the same outputs."""
    from nemo.collections.asr.modules import ConformerEncoder

    from rlnf.policy import load_nemo_model

    policy, untouched = CTCPolicy.load(tiny_nemo), load_nemo_model(tiny_nemo)
    policy.set_mode("rollout")
    untouched.eval()
    lengths_seen = []
    for seconds in ((0.5, 0.3), (1.0, 0.6), (2.2, 0.4)):  # the last one grows the length buffers again
        audio, lengths = batch_of(seconds)
        with torch.no_grad():
            expected, expected_len, _ = untouched(input_signal=audio, input_signal_length=lengths)
            with monkeypatch.context() as patched:
                patched.setattr(torch.distributed, "is_initialized", lambda: True)
                patched.setattr(torch.distributed, "all_reduce", lambda *a, **k: pytest.fail("collective in forward"))
                got, got_len = policy.forward(audio, lengths)
        assert torch.equal(got, expected[:, : int(expected_len.max())]) and torch.equal(got_len, expected_len)
        lengths_seen.append(policy.model.encoder.max_audio_length)
    assert lengths_seen == sorted(lengths_seen) and lengths_seen[-1] > lengths_seen[0]
    assert lengths_seen[-1] == untouched.encoder.max_audio_length  # NeMo's own sizing rule

    conformer = ConformerEncoder(feat_in=16, n_layers=1, d_model=16, n_heads=2)
    from rlnf.policy import keep_encoder_passes_local

    keep_encoder_passes_local(conformer)
    assert conformer.sync_max_audio_length is False


def test_adapt_batchnorm_averages_each_layers_batch_statistics(tiny_policy, tiny_nemo):
    """Every encoder BatchNorm ends with the plain average over batches of its input's batch mean and
    unbiased variance, computed here independently with hooks on a copy whose BatchNorms normalise by
    batch statistics; weights, momenta and eval mode are unchanged, and a model without BatchNorm is
    refused."""
    from types import SimpleNamespace

    batches = [SimpleNamespace(audio=audio * scale, audio_len=lengths)
               for scale, (audio, lengths) in zip((1.0, 3.0, 0.5), (batch_of(), batch_of((0.8, 0.8, 0.5)),
                                                                     batch_of((0.7,))))]
    twin = CTCPolicy.load(tiny_nemo)
    twin.set_mode("eval")  # no dither or SpecAugment
    layers = twin.batchnorm_layers()
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {index: [] for index in range(len(layers))}

    def record(index):
        def hook(module, inputs):
            x = inputs[0].transpose(0, 1).reshape(inputs[0].shape[1], -1).double()  # [C, B*T]
            seen[index].append((x.mean(dim=1), x.var(dim=1, unbiased=True)))
        return hook

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(record(index))
        layer.train()
    with torch.no_grad():
        for batch in batches:
            twin.forward(batch.audio, batch.audio_len)

    weights = {name: value.clone() for name, value in tiny_policy.model.named_parameters()}
    momenta = [layer.momentum for layer in tiny_policy.batchnorm_layers()]
    counted = tiny_policy.adapt_batchnorm(batches)
    assert counted == {"layers": len(layers), "batches": 3, "utterances": 6} and len(layers) > 2
    for index, layer in enumerate(tiny_policy.batchnorm_layers()):
        mean = torch.stack([m for m, _ in seen[index]]).mean(dim=0)
        var = torch.stack([v for _, v in seen[index]]).mean(dim=0)
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-4, atol=1e-5)
        assert not layer.training and int(layer.num_batches_tracked) == 3
    assert [layer.momentum for layer in tiny_policy.batchnorm_layers()] == momenta
    assert not tiny_policy.model.training
    assert all(torch.equal(value, weights[name]) for name, value in tiny_policy.model.named_parameters())

    adapted = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in tiny_policy.batchnorm_layers()]

    def failing():  # a clip that cannot be read, after one good batch
        yield batches[0]
        raise DataError("clip.wav: unreadable")

    for bad, message in (([], "no audio"), (failing(), "unreadable")):
        with pytest.raises(DataError, match=message):
            tiny_policy.adapt_batchnorm(bad)
        for layer, (mean, var) in zip(tiny_policy.batchnorm_layers(), adapted):  # statistics as they were
            assert torch.equal(layer.running_mean, mean) and torch.equal(layer.running_var, var)
            assert int(layer.num_batches_tracked) == 3 and layer.momentum == momenta[0] and not layer.training
    for layer in tiny_policy.batchnorm_layers():  # no BatchNorm left: nothing to adapt
        layer.__class__ = torch.nn.Identity
    with pytest.raises(CheckpointError, match="no BatchNorm"):
        tiny_policy.adapt_batchnorm(batches)
