"""scripts/hybrid_check.py: the mean/std summary from hand values, and a tiny run end to end (pretrain
with both hybrid losses, RL on the CTC head through `rlnf run`, both heads evaluated, the RNNT head
bit-identical after RL)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_script



def load_hybrid_check():
    return load_script('hybrid_check')


def test_demo_inputs_find_the_reward_model_the_demo_used(tmp_path):
    """The listening model's stage when the demo's report names it (or has no report: today's default), the
    card model's for a report from before the setting existed."""
    script = load_hybrid_check()
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "stage.json").write_text(json.dumps({"result": {"train": "t.json"}}))
    for stage, checkpoint in (("reward_model", "card/best"), ("reward_model-listening", "listening/best")):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "stage.json").write_text(json.dumps({"result": {"best_checkpoint": checkpoint}}))
    assert script.demo_inputs(tmp_path) == ({"train": "t.json"}, "listening/best")
    for settings, expected in (({"reward_model": "card"}, "card/best"), ({}, "card/best"),
                               ({"reward_model": "listening"}, "listening/best")):
        (tmp_path / "report.json").write_text(json.dumps({"settings": settings}))
        assert script.demo_inputs(tmp_path)[1] == expected, settings
    (tmp_path / "reward_model-listening" / "stage.json").unlink()
    assert script.demo_inputs(tmp_path)[1] is None  # the report's model was never trained here


def test_summary_against_hand_values():
    script = load_hybrid_check()
    before = {"ctc": {"wer": 0.8, "cer": 0.4}, "rnnt": {"wer": 0.7, "cer": 0.3}}
    runs = {"rl_cer_reward": {42: {"ctc": {"wer": 0.6, "cer": 0.3}, "rnnt": {"wer": 0.9, "cer": 0.5},
                                   "rnnt_head_unchanged": True},
                              43: {"ctc": {"wer": 0.8, "cer": 0.3}, "rnnt": {"wer": 0.7, "cer": 0.5},
                                   "rnnt_head_unchanged": True}}}
    summary = script.summarize(before, runs)["rl_cer_reward"]
    assert summary["seeds"] == [42, 43] and summary["rnnt_head_unchanged"] is True
    assert summary["ctc"]["wer_before"] == {"mean": 0.8, "std": 0.0}
    assert summary["ctc"]["wer_after"]["mean"] == pytest.approx(0.7)
    assert summary["ctc"]["wer_after"]["std"] == pytest.approx(0.1414, abs=1e-4)  # sample std of 0.6, 0.8
    assert summary["rnnt"]["wer_after"]["mean"] == pytest.approx(0.8)


def test_tiny_run_end_to_end(corpus, tmp_path, nemo_quiet):
    """Two CTC steps, one RNNT + CTC step, two RL steps with the oracle reward on the held-out voice:
    the report has every key, and the RNNT decoder and joint are bit-identical after RL. About 10 s on
    2 CPU cores (not marked slow)."""
    script = load_hybrid_check()
    demo = tmp_path / "demo"
    (demo / "corpus").mkdir(parents=True)
    (demo / "corpus" / "stage.json").write_text(json.dumps({"result": corpus}))
    out = tmp_path / "out"
    report = script.main(["--demo-output", str(demo), "--output", str(out), "--runs", "cer", "--seeds", "42",
                          "--ctc-steps", "2", "--hybrid-steps", "1", "--width", "32", "--layers", "1",
                          "--vocab-size", "48", "--batch-size", "4", "--rl-steps", "2", "--limit", "6"])
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    assert set(report) >= {"before", "summary", "runs", "pretrain", "settings", "timings"}
    row = report["summary"]["rl_cer_reward"]
    assert row["seeds"] == [42] and row["rnnt_head_unchanged"] is True
    for head in ("ctc", "rnnt"):
        assert set(row[head]) == {"wer_before", "wer_after", "cer_before", "cer_after"}
        assert set(row[head]["wer_after"]) == {"mean", "std"}
        assert 0.0 <= report["before"][head]["wer"]
    pretrained = report["pretrain"]["checkpoint"]
    after = report["runs"]["rl_cer_reward"]["42"]
    assert after["rnnt_head_unchanged"] is True
    # The check itself: the encoder moved, so comparing the whole model would say "changed".
    run_checkpoint = out / "seed_42" / "rl_cer_reward" / "run" / "checkpoints" / "last.nemo"
    before_weights, after_weights = script.nemo_state_dict(pretrained), script.nemo_state_dict(str(run_checkpoint))
    assert any(not (before_weights[k] == after_weights[k]).all() for k in before_weights if k.startswith("encoder."))
    assert script.rnnt_head_unchanged(pretrained, str(run_checkpoint))
    assert report["pretrain"]["hybrid_steps"] == 1 and report["pretrain"]["last_log"][0]["rnnt_loss"] is not None
