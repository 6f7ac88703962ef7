"""The no-transcripts workflow exactly as docs/workflow-without-transcripts.md gives it: the page's one
```bash block, run as a script in a folder outside the checkout, on speech and a model the test builds.

What the test changes, and only through the page's own variables (its block reads each from the
environment, with the page's default otherwise):
- MODEL, LABELLED, LABELLED_VAL, AUDIO, TEST, RUNS: the tiny pretrained QuartzNet and the synthesised
  corpus (training voices labelled; the held-out voice's audio without its text; its test sentences);
- PAIRS_OPTIONS, REWARD_OPTIONS, RL_OPTIONS (empty on the page): small sizes so it runs in a minute or
  two on a CPU: 8 clips of pairs, a reward model of 16-wide layers for one epoch, RL for 2 steps of
  2 clips x 2 samples, in each round.
``rlnf`` is this checkout's CLI (a wrapper on PATH running ``python -m rlnf.cli``).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "workflow-without-transcripts.md"

FAST = {
    "PAIRS_OPTIONS": "--limit 8 --samples-per-temperature 1 --device cpu",
    "REWARD_OPTIONS": "model.vocab_size=64 model.embed_dim=16 model.lstm_hidden=16 model.audio_conv_channels=16 "
                      "model.head_hidden=32 model.ctc_hidden=16 trainer.ctc_pretrain_epochs=1 trainer.epochs=1 "
                      "trainer.batch_size=16 trainer.device=cpu trainer.progress_bar=false",
    "RL_OPTIONS": "trainer.max_steps=2 trainer.batch_size=2 algorithm.num_samples=2 trainer.device=cpu "
                  "trainer.progress_bar=false trainer.samples_every=0",
}


def bash_block(page: Path) -> str:
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) == 1, f"{page} should hold exactly one ```bash block, found {len(blocks)}"
    return blocks[0]


def test_the_page_block_uses_only_documented_commands_and_its_variables():
    block = bash_block(PAGE)
    commands = [line.split()[:3] for line in block.splitlines() if line.startswith("rlnf ")]
    assert [c[1] for c in commands] == ["data", "data", "run", "adapt-batchnorm", "run",  # round 1
                                        "data", "data", "run", "run",  # the refresh and round 2
                                        "evaluate", "evaluate", "evaluate"]
    assert "--config reward/listening" in block and "--config rl/grpo_learned_reward" in block
    for name in ("MODEL", "LABELLED", "LABELLED_VAL", "AUDIO", "TEST", "RUNS", *FAST):
        assert re.search(rf"^{name}=\$\{{{name}:-", block, flags=re.M), name  # overridable from the environment
    for name in FAST:
        assert f"{name}=${{{name}:-}}" in block  # empty by default


@pytest.mark.slow
def test_the_documented_workflow_runs_end_to_end(tmp_path, pretrained_tiny_nemo, corpus):
    work = tmp_path / "user"  # a folder outside the checkout, as a user's
    (work / "bin").mkdir(parents=True)
    assert ROOT not in work.parents
    wrapper = work / "bin" / "rlnf"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m rlnf.cli "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    untranscribed = work / "audio.json"  # the held-out voice's audio, its text removed
    folder = Path(corpus["heldout_train"]).parent
    rows = [json.loads(line) for line in Path(corpus["heldout_train"]).read_text().splitlines()]
    untranscribed.write_text("".join(json.dumps({"audio_filepath": str(folder / row["audio_filepath"]),
                                                 "duration": row["duration"]}) + "\n" for row in rows))
    script = work / "workflow.sh"
    script.write_text(bash_block(PAGE))
    env = {**os.environ, "PATH": f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}", "MODEL": pretrained_tiny_nemo,
           "LABELLED": corpus["train"], "LABELLED_VAL": corpus["val"], "AUDIO": str(untranscribed),
           "TEST": corpus["heldout_test"], "RUNS": "runs", **FAST}
    done = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-5000:]}"

    runs = work / "runs"
    pairs = [json.loads(line) for line in (runs / "pairs_train.jsonl").read_text().splitlines()]
    assert len({row["audio_filepath"] for row in pairs}) == 8 and {"policy", "reference"} <= {r["kind"] for r in pairs}
    assert (runs / "reward" / "checkpoints" / "best").is_dir() and (runs / "reward" / "metrics.jsonl").is_file()
    assert (runs / "adapted.nemo").is_file()
    summary = json.loads((runs / "rl" / "summary.json").read_text())
    assert summary["step"] == 2 and Path(work / summary["last_checkpoint"]).is_file()
    config = (runs / "rl" / "config.yaml").read_text()
    assert "name: learned" in config and "kl_coef: 0.05" in config and "name: grpo" in config
    start, result = (json.loads((runs / name).read_text()) for name in ("eval_start.json", "eval_rl.json"))
    for metrics in (start, result):
        assert 0 <= metrics["wer"] and metrics["n"] == len(Path(corpus["heldout_test"]).read_text().splitlines())
    assert result["model"] == "runs/rl/checkpoints/last.nemo"
    # The refresh: the first RL model's pairs added to the old ones; the reward model fine-tuned from its
    # checkpoint for one epoch without CTC-only epochs; round 2 from the first RL model with it.
    both = (runs / "pairs_train_both.jsonl").read_text().splitlines()
    assert both == (runs / "pairs_train.jsonl").read_text().splitlines() + \
        (runs / "pairs_train_2.jsonl").read_text().splitlines()
    refreshed = (runs / "reward_2" / "config.yaml").read_text()
    assert "init_from: runs/reward/checkpoints/best" in refreshed and "ctc_pretrain_epochs: 0" in refreshed
    second = (runs / "rl_2" / "config.yaml").read_text()
    assert "path: runs/rl/checkpoints/last.nemo" in second and "runs/reward_2/checkpoints/best" in second
    assert json.loads((runs / "eval_rl_2.json").read_text())["model"] == "runs/rl_2/checkpoints/last.nemo"
    assert not list(ROOT.glob("runs")), "nothing may be written into the checkout"
