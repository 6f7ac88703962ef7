"""rlnf.demo.Stages: a stage reruns when what it read changed, even under the same path."""

from __future__ import annotations

from pathlib import Path

from rlnf.demo import Stages, content_key
from rlnf.io import file_sha256


def test_a_downstream_stage_reruns_when_an_upstream_file_changes_under_the_same_path(tmp_path):
    runs: list[str] = []

    def pipeline(text: str) -> dict:
        stages = Stages(tmp_path, fresh=False)

        def write(folder: Path) -> dict:
            runs.append("up")
            (folder / "data.txt").write_text(text)
            return {"path": str(folder / "data.txt"), "lines": 1, "sha256": file_sha256(folder / "data.txt")}

        up = stages.run("up", {"text": text}, write)
        # One stage keyed by the whole result, one by the path and content_key (as pretrain keys the corpus).
        whole = stages.run("whole", {"up": up}, lambda folder: runs.append("whole") or {"read": Path(up["path"]).read_text()})
        by_path = stages.run("by_path", {"path": up["path"], **content_key(up, "up")},
                             lambda folder: runs.append("by_path") or {"read": Path(up["path"]).read_text()})
        return {"whole": whole["read"], "by_path": by_path["read"]}

    assert pipeline("a") == {"whole": "a", "by_path": "a"} and runs == ["up", "whole", "by_path"]
    assert pipeline("a") == {"whole": "a", "by_path": "a"} and runs == ["up", "whole", "by_path"]  # all cached
    # Same path, same line count, new content: without the digest both would stay cached and read "a".
    assert pipeline("b") == {"whole": "b", "by_path": "b"} and runs[3:] == ["up", "whole", "by_path"]
    assert content_key({"path": "x"}, "up") == {}  # a result cached before digests keeps its old key


def test_the_demo_report_gives_every_run_on_both_test_sets(tmp_path, monkeypatch, capsys):
    """run_demo's report.json and table from faked stages: each run's other-text WER / CER and its
    change against pretrained on that set."""
    import json
    import re

    import rlnf.demo as demo

    names = ("pretrained", "batchnorm_adapted", *demo.TRAINED_RUNS)
    wer = dict(zip(names, (0.8, 0.7, 0.6, 0.5, 0.75, 0.65)))
    other = dict(zip(names, (0.9, 0.85, 0.81, 0.72, 0.9, 0.99)))

    def prepare(stages, settings):
        stages.timings.update({"pretrain": 270.0, "batchnorm_adapted": 5.0})
        return {"data": {"heldout_test": "/test.json"}, "other_text": {demo.OTHER_TEXT: "/other.json"},
                "pseudo_labels": {"kept": 3, "dropped": 1}, "start": "/adapted.nemo", "start_stage": {}}

    def trained_runs(stages, settings, base, reward):
        stages.timings.update({name: 50.0 for name in demo.TRAINED_RUNS})
        return {}

    def evaluate_runs(stages, base, reward, runs, device):
        return {"models": {name: f"/{name}.nemo" for name in names}, "pretrained_val": {"wer": 0.8},
                **{name: {"wer": wer[name], "cer": wer[name] / 2, "reward": 0.9, "n": 2,
                          "other_text": {"wer": other[name], "cer": other[name] / 2, "n": 3}} for name in names}}

    monkeypatch.setattr(demo, "prepare", prepare)
    monkeypatch.setattr(demo, "train_reward", lambda stages, settings, base: {
        "best_checkpoint": "/reward", "final_metrics": {}, "heldout": {"group_spearman": 0.6, "audio_gain": 0.2}})
    monkeypatch.setattr(demo, "trained_runs", trained_runs)
    monkeypatch.setattr(demo, "evaluate_runs", evaluate_runs)
    monkeypatch.setattr(demo, "_plot", lambda *args: None)
    suta_calls = []

    def suta_stage(stages, base, name, model, upstream, device, suta_settings=None, other_text=True):
        suta_calls.append((name, model, other_text))  # SUTA of the start, in-domain only
        return {"wer": wer["suta"], "cer": wer["suta"] / 2, "seconds": 60.0, "other_text": None}

    wer["suta"] = 0.66
    monkeypatch.setattr(demo, "suta_stage", suta_stage)
    demo.run_demo(str(tmp_path))
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["other_text_test_manifest"] == "/other.json"
    runs = {run["name"]: run for run in report["runs"]}
    assert suta_calls == [("suta", "/adapted.nemo", False)]
    names = ("pretrained", "batchnorm_adapted", "suta", *demo.TRAINED_RUNS)  # SUTA right after its start
    assert list(runs) == list(names) and runs["suta"]["reward"] is None and runs["suta"]["seconds"] == 60.0
    for name in names:
        assert runs[name]["wer_relative_change"] == round((wer[name] - 0.8) / 0.8, 4)
        assert runs[name]["other_text"] == (None if name == "suta" else {
            "wer": other[name], "cer": other[name] / 2, "wer_relative_change": round((other[name] - 0.9) / 0.9, 4)})
    table = capsys.readouterr().out
    assert "other WER" in table and "other text: 3 everyday sentences" in table
    assert "+10.0 %" in table  # self_training on the other text: 0.99 against 0.9
    assert re.search(r"^suta .* n/a ", table, re.M)  # the demo adapts on the in-domain test set only


def test_rlnf_demo_no_suta_leaves_the_suta_row_out(monkeypatch, tmp_path):
    import rlnf.demo
    from rlnf.cli import main

    calls = []
    monkeypatch.setattr(rlnf.demo, "run_demo", lambda **kwargs: calls.append(kwargs))
    assert main(["demo", "--output", str(tmp_path), "--no-suta"]) == 0
    assert main(["demo", "--output", str(tmp_path)]) == 0
    assert [call["settings"] for call in calls] == [{"suta": False}, None]
