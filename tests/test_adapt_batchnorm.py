"""`rlnf adapt-batchnorm`: test-time BatchNorm adaptation of a .nemo on untranscribed audio."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rlnf.cli import main
from rlnf.policy import CTCPolicy


def test_adapt_batchnorm_writes_a_model_with_new_statistics_and_the_same_weights(pretrained_tiny_nemo, corpus,
                                                                                 tmp_path, capsys):
    audio_only = tmp_path / "audio.json"  # no text: the command needs none
    rows = [json.loads(line) for line in Path(corpus["heldout_train"]).read_text().splitlines()]
    base = Path(corpus["heldout_train"]).parent
    audio_only.write_text("".join(json.dumps({"audio_filepath": str(base / row["audio_filepath"]),
                                              "duration": row["duration"]}) + "\n" for row in rows))
    out = tmp_path / "adapted.nemo"
    assert main(["adapt-batchnorm", "--model", pretrained_tiny_nemo, "--manifest", str(audio_only),
                 "--output", str(out), "--batch-size", "4", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["utterances"] == len(rows) and printed["batches"] == -(-len(rows) // 4) and printed["layers"] > 0

    before, after = CTCPolicy.load(pretrained_tiny_nemo), CTCPolicy.load(str(out))
    state_before, state_after = before.model.state_dict(), after.model.state_dict()
    statistics = [name for name in state_before if name.endswith(("running_mean", "running_var"))]
    assert statistics and all(not torch.equal(state_before[name], state_after[name]) for name in statistics)
    weights = [name for name, _ in before.model.named_parameters()]
    assert all(torch.equal(state_before[name], state_after[name]) for name in weights)
    # It transcribes; the training voices' statistics are what it lost, not its ability to decode.
    assert main(["evaluate", "--model", str(out), "--manifest", corpus["heldout_val"], "--device", "cpu"]) == 0


def test_adapt_batchnorm_refuses_to_overwrite_its_model_and_names_a_missing_manifest(pretrained_tiny_nemo, tmp_path,
                                                                                     capsys):
    assert main(["adapt-batchnorm", "--model", pretrained_tiny_nemo, "--manifest", str(tmp_path / "m.json"),
                 "--output", pretrained_tiny_nemo]) == 2
    assert "is the model: writing it would destroy the input" in capsys.readouterr().err
    assert main(["adapt-batchnorm", "--model", pretrained_tiny_nemo, "--manifest", str(tmp_path / "missing.json"),
                 "--output", str(tmp_path / "a.nemo")]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and not (tmp_path / "a.nemo").exists()


def test_adapt_batchnorm_errors_name_the_model_or_the_manifest(pretrained_tiny_nemo, corpus, tmp_path, capsys,
                                                               monkeypatch):
    from rlnf.errors import CheckpointError, DataError

    for error, named in ((CheckpointError("EncDecCTCModel: the encoder has no BatchNorm layer to adapt"),
                          f"--model {pretrained_tiny_nemo}"),
                         (DataError("BatchNorm adaptation got no audio"), f"--manifest {corpus['heldout_val']}")):
        def fail(self, batches, error=error):
            raise error

        monkeypatch.setattr(CTCPolicy, "adapt_batchnorm", fail)
        assert main(["adapt-batchnorm", "--model", pretrained_tiny_nemo, "--manifest", corpus["heldout_val"],
                     "--output", str(tmp_path / "a.nemo")]) == 2
        err = capsys.readouterr().err
        assert named in err and str(error) in err and not (tmp_path / "a.nemo").exists()
