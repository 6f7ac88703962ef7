"""`rlnf run train_ctc`: supervised training through the CLI, resume, and the loss going down."""

from __future__ import annotations

import json

import pytest

from rlnf.cli import main
from rlnf.metric_logging import read_metrics


@pytest.mark.slow
def test_train_ctc_learns_and_resumes(corpus, tmp_path):
    out = tmp_path / "ctc"
    args = ["run", "train_ctc", "--config", "ctc/small", f"data.train_manifest={corpus['train']}",
            f"data.val_manifest={corpus['val']}", f"output_dir={out}", "model.size=tiny", "trainer.batch_size=8",
            "trainer.val_every=20", "trainer.save_every=20", "trainer.log_every=5", "trainer.progress_bar=false",
            "trainer.lr=1e-2", "trainer.warmup_steps=5"]
    assert main(args + ["trainer.max_steps=40"]) == 0
    rows = read_metrics(out)
    losses = [r["train/loss"] for r in rows]
    assert losses[-1] < 0.7 * losses[0]
    assert "val/wer" in rows[-1] and "val/cer" in rows[-1]
    assert (out / "checkpoints" / "best.nemo").exists()
    # A longer schedule, resumed from step 40.
    assert main(args + ["trainer.max_steps=45", "resume=true"]) == 0
    assert json.loads((out / "summary.json").read_text())["step"] == 45


@pytest.mark.slow
def test_bad_reference_characters_are_named(corpus, tmp_path, capsys, warnings_of):
    """Targets are encoded once per distinct transcript: the error names the first line with the bad
    one, and data.oov=skip drops every line that repeats it."""
    manifest = tmp_path / "m.json"
    rows = [json.loads(line) for line in open(corpus["train"])][:2]
    from pathlib import Path

    base = Path(corpus["train"]).parent
    rows[1]["text"] = "naïve café"
    rows += [dict(rows[1]), dict(rows[0])]  # lines 3 and 4 repeat lines 2 and 1
    manifest.write_text("".join(json.dumps({**r, "audio_filepath": str(base / r["audio_filepath"])}) + "\n" for r in rows))
    args = ["run", "train_ctc", "--config", "ctc/small", f"data.train_manifest={manifest}", f"output_dir={tmp_path / 'o'}",
            "model.size=tiny", "trainer.max_steps=1", "trainer.progress_bar=false"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "m.json:2" in err and "'é'" in err and "data.oov" in err
    warnings = warnings_of("rlnf.train_ctc")
    assert main(args[:-2] + [f"output_dir={tmp_path / 'o2'}", "data.oov=skip", "trainer.max_steps=1",
                             "trainer.progress_bar=false"]) == 0
    assert "skipped 2 utterances with characters outside the vocabulary (data.oov=skip)" in warnings, warnings
