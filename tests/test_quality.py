"""scripts/quality.py: the figures from per-seed results (hand values) and a tiny run end to end."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.conftest import load_script



def load_quality():
    return load_script('quality')


RUNS = ("rl_learned_reward", "rl_cer_reward", "supervised_continued", "self_training")


def seed_result(seed, learned, cer, supervised, self_training, gain, spearman, rise=0.0):
    wer = {"pretrained": 0.8, "rl_learned_reward": learned, "rl_cer_reward": cer,
           "supervised_continued": supervised, "self_training": self_training}
    return {"seed": seed, "wer": wer, "cer": {k: v / 2 for k, v in wer.items()},
            "reward_heldout": {"audio_gain": gain, "group_spearman": spearman},
            "reward_val": {"val/group_spearman": 0.5}, "wer_rise": rise, "final_val_wer": learned,
            "val_wer": {"rl_learned_reward": learned + 0.01, "rl_cer_reward": cer + 0.01},
            "steps": {"rl_learned_reward": 300, "rl_cer_reward": 300}}


def test_summary_against_hand_values():
    quality = load_quality()
    per_seed = [seed_result(42, 0.72, 0.60, 0.76, 0.74, 0.1, 0.6, rise=0.01),
                seed_result(43, 0.68, 0.60, 0.76, 0.78, 0.2, 0.7)]
    summary = quality.summarise(per_seed, RUNS)
    learned = summary["runs"]["rl_learned_reward"]
    assert learned["wer_change_per_seed"] == pytest.approx([-0.1, -0.15])
    assert learned["wer_change_mean"] == pytest.approx(-0.125)
    assert learned["wer_change_std"] == pytest.approx((2 * 0.025 ** 2) ** 0.5)  # sample std of two values
    assert learned["cer_change_mean"] == pytest.approx(-0.125)
    assert summary["oracle_fraction_per_seed"] == pytest.approx([0.4, 0.6])
    assert summary["oracle_fraction_mean"] == pytest.approx(0.5)
    assert summary["learned_beats_self_training_every_seed"] is True
    assert summary["reward_model"]["audio_gain_mean"] == pytest.approx(0.15)
    assert summary["reward_model"]["heldout_group_spearman_mean"] == pytest.approx(0.65)
    assert learned["final_val_wer_mean"] == pytest.approx(0.71) and learned["steps_per_seed"] == [300, 300]
    assert "final_val_wer_mean" not in summary["runs"]["self_training"]  # RL runs only
    per_seed[1]["wer"]["self_training"] = 0.66
    assert quality.summarise(per_seed, RUNS)["learned_beats_self_training_every_seed"] is False


def test_largest_wer_rise_counts_rises_while_the_reward_rose():
    quality = load_quality()
    rows = [{"val/wer": 0.70, "val/reward": 0.80}, {"val/wer": 0.72, "val/reward": 0.81},  # +0.02 with reward up
            {"step": 3}, {"val/wer": 0.75, "val/reward": 0.79},  # +0.03 with reward down: not counted
            {"val/wer": 0.70, "val/reward": 0.85}]
    assert quality.largest_wer_rise_while_reward_rose(rows) == pytest.approx(0.02)
    assert quality.finite_or_null({"a": [float("nan"), 1.0]}) == {"a": [None, 1.0]}


def test_variants_are_parsed_with_the_reward_model_and_bad_ones_named():
    from rlnf.demo import SETTINGS

    quality = load_quality()
    settings = {**SETTINGS, "rl_kl_coef": 0.05, "rl_lr": 1e-4, "reward_model": "listening"}  # as scaled_settings gives
    variants = quality.parse_variants(['kl02={"rl_kl_coef": 0.2}',
                                       'card={"reward_model": "card", "rl_lr": 2e-4}'], settings)
    assert variants == {"kl02": {"settings": {"rl_kl_coef": 0.2}, "reward_model": "listening"},  # the demo's
                        "card": {"settings": {"rl_lr": 2e-4}, "reward_model": "card"}}
    settings = {**settings, "adapt_batchnorm": True}
    for item, words in [('a={"rl_kl": 1}', "unknown setting(s) rl_kl"), ("a={bad", "a: bad JSON"),
                        ('a={"adapt_batchnorm": false}', "adapt_batchnorm shape(s) what every run shares"),
                        ("a=[1]", "object"), ('a={"reward_model": "x"}', "one of listening, card"),
                        ("no_json", "NAME=JSON"), ('a b={}', "NAME=JSON"),
                        ('a={"rl_reward_ensemble": 3.0}', "--variant a: demo setting rl_reward_ensemble: a whole number")]:
        with pytest.raises(ValueError, match=None) as raised:
            quality.parse_variants([item], settings)
        assert words in str(raised.value), (item, raised.value)
    with pytest.raises(ValueError, match="new name"):
        quality.parse_variants(["a={}", "a={}"], settings)


@pytest.mark.slow
def test_quality_benchmark_end_to_end_on_a_tiny_corpus(tmp_path):
    """Two seeds of the whole pipeline at toy size: the JSON has the documented keys, and the seeds
    change both the reward model's training and the RL runs."""
    from tests.conftest import require_tool

    require_tool("flite", "espeak-ng", "sox")
    from rlnf.metric_logging import read_metrics

    settings = {"sentences": 16, "split": [0.5, 0.25], "voices": ["flite:kal16", "espeak:en+m3"],
                "voices_per_sentence": 2, "heldout_voice": "flite:rms", "policy_size": "tiny",
                "pretrain_minutes": 0.1, "scored_utterances": 8, "scored_temperatures": [1.0],
                "reward_epochs": 1, "reward_vocab_size": 40, "rl_minutes": 0.03, "rl_num_samples": 2,
                "rl_batch_size": 4, "other_text_sentences": 4, "ctc_finetune_max_minutes": 0.05,
                "ctc_finetune_max_steps": 6, "ctc_finetune_val_every": 2, "ctc_finetune_patience": 1}
    out, figures = tmp_path / "demo", tmp_path / "quality.json"
    # --start strong with toy sizes: more text and a voice for pretraining alone, SpecAugment.
    # --start strong's decay phase (warmup-stable-decay), 3 steps; its runs from the BatchNorm-adapted start
    # here (STRONG_START's own choice is the policy itself), whose rows this test checks, with the demo's
    # reward model and learned-reward run (STRONG_START's, listening-asr after self-training, have their tests).
    settings.update({"pretrain_extra_sentences": 4, "pretrain_extra_voices": ["flite:slt"], "pretrain_decay_steps": 3,
                     "adapt_batchnorm": True, "reward_model": "listening", "rl_after_self_training": False})
    quality = load_quality()
    assert quality.main(["--output", str(out), "--seeds", "2", "--json", str(figures), "--presets", "rloo",
                         "--rl-steps", "3", "--other-reward-model", "--settings", json.dumps(settings),
                         "--start", "strong",
                         "--variant", 'ens2={"rl_reward_ensemble": 2, "rl_reward_std_coef": 1.0}',
                         "--variant", 'ref={"rl_reward_refresh": true}']) == 0
    summary = json.loads(figures.read_text())
    assert summary["start"] == "strong" and 0 <= summary["start_train_voices_wer"]
    pretrain = (out / "pretrain" / "config.yaml").read_text()
    assert "pretrain_corpus/pretrain_train.json" in pretrain and "spec_augment: true" in pretrain
    assert len((out / "pretrain_corpus" / "pretrain_train.json").read_text().splitlines()) == 4 * 2 + 8 * 2
    # The decay phase: from the constant phase's last checkpoint, cosine to 0; the start is its last checkpoint,
    # and the pretrained row's cost is both phases.
    decay = (out / "pretrain_decay" / "config.yaml").read_text()
    assert f"path: {out}/pretrain/checkpoints/last.nemo" in decay and "lr_schedule: cosine" in decay
    assert "max_steps: 3" in decay and "min_lr_ratio: 0.0" in decay
    assert "warmup_steps: 0" in decay  # a tenth of a short decay: here the 3 steps are all cosine
    for stage in ("batchnorm_adapted", "start_train_voices", "scored_pairs", "supervised_continued"):
        assert f"{out}/pretrain_decay/checkpoints/last.nemo" in (out / stage / "stage.json").read_text(), stage
    assert summary["pretrained"]["seconds"] == pytest.approx(sum(
        json.loads((out / part / "stage.json").read_text())["seconds"] for part in ("pretrain", "pretrain_decay")))
    for folder in (out, out / "quality" / "seed_43"):  # the ensemble's second member, trained once per seed
        assert (folder / "reward_model-listening-member1" / "checkpoints").is_dir()
        assert "ensemble_std" in (folder / "rl_learned_reward-ens2" / "metrics.jsonl").read_text()
    assert summary["seeds"] == 2 and summary["seconds"] > 0 and summary["stage_seconds"] >= summary["seconds"] * 0.5
    for name in (*RUNS, "rl_learned_reward-rloo", "rl_cer_reward-rloo", "rl_learned_reward-card", "suta",
                 "rl_learned_reward-ens2", "rl_learned_reward-ref",
                 "rl_learned_reward+suta", *SUPERVISED, "batchnorm_adapted"):
        run = summary["runs"][name]  # the Output section's keys, on both test sets
        assert {"wer_change_mean", "wer_change_std", "wer_change_per_seed", "other_text_wer_change_per_seed",
                "seconds"} <= set(run), name
        assert len(run["wer_change_per_seed"]) == len(run["other_text_wer_change_per_seed"]) == 2
        if name.startswith("rl_") and not name.endswith("+suta"):  # step-boxed by --rl-steps, whatever the load
            assert run["steps_per_seed"] == [3, 3]
    for name in ("suta", "rl_learned_reward+suta"):  # SUTA on the test sentences: cached stages with their time
        assert len(summary["runs"][name]["wer_change_per_seed"]) == 2 and summary["runs"][name]["seconds"] > 0
    assert summary["runs"]["suta"]["wer_change_per_seed"][0] == summary["runs"]["suta"]["wer_change_per_seed"][1]
    assert "learned_beats_suta_every_seed" in summary
    assert summary["targets"]["learned_run"] == "rl_learned_reward"
    assert set(summary["variant_targets"]) == {"rl_learned_reward-ens2", "rl_learned_reward-card",
                                               "rl_learned_reward-ref"}
    for folder in (out, out / "quality" / "seed_43"):  # the refresh's reward model: fine-tuned from the seed's
        tuned = (folder / "reward_model-listening-ref-refreshed" / "config.yaml").read_text()
        assert f"init_from: {folder}/reward_model-listening/checkpoints/best" in tuned
        assert (folder / "rl_learned_reward-ref" / "checkpoints" / "last.nemo").is_file()
    for folder, seconds in zip((out, out / "quality" / "seed_43"), summary["runs"]["rl_learned_reward-ref"]["seconds_per_seed"]):
        # Both rounds and the refresh; round 1 is the plain learned-reward run, re-used, not trained again.
        assert not (folder / "rl_learned_reward-ref-round1").exists()
        parts = ("rl_learned_reward-ref", "rl_learned_reward", "refresh_pairs-ref",
                 "reward_model-listening-ref-refreshed")
        assert seconds == pytest.approx(sum(json.loads((folder / part / "stage.json").read_text())["seconds"]
                                            for part in parts))
    assert summary["variant_targets"]["rl_learned_reward-ens2"]["baselines"] == ["suta", "self_training",
                                                                                 "batchnorm_adapted"]
    assert {"audio_gain_mean", "heldout_group_spearman_mean"} <= set(summary["reward_model"])
    assert summary["reward_model"]["name"] == "listening"  # the demo's; the other one scored the variant
    assert {"audio_gain_mean", "heldout_group_spearman_mean"} <= set(summary["reward_model_card"])
    assert (out / "reward_model-listening" / "checkpoints").is_dir() and (out / "reward_model" / "checkpoints").is_dir()
    assert "oracle_fraction_mean" in summary
    assert {"rl_cer_beats_more_every_seed", "rl_cer_vs_more_gap_mean", "rl_cer_vs_more_gap_std"} <= set(summary)
    assert summary["runs"]["ctc_finetune_heldout+rl_cer"]["steps_per_seed"] == [3, 3]
    converged = (out / "ctc_finetune_heldout" / "config.yaml").read_text()
    assert "heldout_train.json" in converged and "early_stop_patience: 1" in converged
    best = json.loads((out / "ctc_finetune_heldout" / "stage.json").read_text())["result"]["evaluated_checkpoint"]
    assert best == str(out / "ctc_finetune_heldout" / "checkpoints" / "best.nemo")
    for run in ("ctc_finetune_heldout+more", "ctc_finetune_heldout+rl_cer"):  # both from the converged model
        assert best in (out / run / "config.yaml").read_text(), run
    other_rows = (out / "other_text_corpus" / "heldout_other_test.json").read_text().splitlines()
    assert len(other_rows) == 4 and summary["pretrained"]["other_text_wer"] > 0
    # The held-out voice's runs start from the BatchNorm-adapted policy (the demo's adapt_batchnorm), its own row.
    adapted = out / "batchnorm_adapted" / "adapted.nemo"
    assert summary["runs"]["batchnorm_adapted"]["wer_change_per_seed"][0] == \
        summary["runs"]["batchnorm_adapted"]["wer_change_per_seed"][1]  # no seed in it
    assert {"oracle_fraction_from_adapted_mean", "learned_beats_adapted_every_seed"} <= set(summary)
    for run in ("rl_learned_reward", "rl_cer_reward", "self_training"):
        config = (out / run / "config.yaml").read_text()
        assert str(adapted) in config, run
    assert str(adapted) not in (out / "supervised_continued" / "config.yaml").read_text()
    first, second = summary["per_seed"]
    assert first["reward_val"] != second["reward_val"]  # the reward model's training changed
    sampled = [read_metrics(folder / "rl_learned_reward")[0]["rollout/log_prob"]
               for folder in (out, out / "quality" / "seed_43")]
    assert sampled[0] != sampled[1]  # RL sampling changed
    assert (out / "quality" / "quality.png").stat().st_size > 10_000


def test_demo_settings_refuse_an_unknown_key_or_reward_model_before_any_stage():
    from rlnf.demo import scaled_settings
    from rlnf.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown key\(s\) rl_lrr"):
        scaled_settings(15.0, {"rl_lrr": 1e-4})
    with pytest.raises(ConfigError, match="reward_model: 'cards' is not one of listening, card"):
        scaled_settings(15.0, {"reward_model": "cards"})
    assert scaled_settings(7.5, {"reward_model": "card"})["rl_minutes"] == pytest.approx(0.425)


def test_summary_of_the_suta_rows():
    quality = load_quality()
    runs = (*RUNS, "suta", "rl_learned_reward+suta")
    per_seed = [seed_result(42, 0.72, 0.60, 0.76, 0.74, 0.1, 0.6), seed_result(43, 0.68, 0.60, 0.76, 0.78, 0.2, 0.7)]
    for seed, suta, stacked in zip(per_seed, (0.76, 0.70), (0.70, 0.64)):
        seed["wer"].update({"suta": suta, "rl_learned_reward+suta": stacked})
        seed["cer"].update({"suta": suta / 2, "rl_learned_reward+suta": stacked / 2})
        seed["seconds"] = {"suta": 30.0, "rl_learned_reward+suta": 20.0 + seed["seed"] - 42}
    summary = quality.summarise(per_seed, runs)
    assert summary["runs"]["suta"]["wer_change_per_seed"] == pytest.approx([-0.05, -0.125])
    assert summary["runs"]["rl_learned_reward+suta"]["wer_change_per_seed"] == pytest.approx([-0.125, -0.2])
    assert summary["runs"]["suta"]["seconds"] == 30.0 and summary["runs"]["rl_learned_reward+suta"]["seconds"] == 20.5
    assert "seconds" not in summary["runs"]["self_training"] and "final_val_wer_mean" not in summary["runs"]["suta"]
    assert summary["learned_beats_suta_every_seed"] is True  # 0.72 < 0.76 and 0.68 < 0.70
    per_seed[1]["wer"]["suta"] = 0.66
    assert quality.summarise(per_seed, runs)["learned_beats_suta_every_seed"] is False
    assert "learned_beats_suta_every_seed" not in quality.summarise(per_seed, RUNS)  # --no-suta
    alone = quality.summarise(per_seed, (*RUNS, "suta"))  # --no-suta-after-rl (and no batchnorm_adapted row)
    assert set(alone["runs"]) == {*RUNS, "suta"} and alone["learned_beats_suta_every_seed"] is False
    assert quality.issue_targets(per_seed, (*RUNS, "suta"))["baselines"] == ["suta", "self_training"]
    assert "| suta |" in quality.markdown_table(alone)
    assert [quality.suta_rows(*flags) for flags in ((True, True), (True, False), (False, True))] == [
        ("suta", "rl_learned_reward+suta"), ("suta",), ()]


def test_suta_stages_transcribe_the_test_set_and_are_cached(pretrained_tiny_nemo, corpus, tmp_path, monkeypatch):
    """The two SUTA rows as cached stages, on a tiny model (not the benchmark): figures equal to the
    WER of the transcripts they wrote; a second call re-uses both; a new learned-reward model reruns
    only its own row."""
    import rlnf.commands
    from rlnf.demo import Stages
    from rlnf.metrics import corpus_error_rate, normalize_text

    quality = load_quality()
    base = {"data": {"heldout_test": corpus["heldout_test"], "sha256": "corpus"}, "start": pretrained_tiny_nemo,
            "start_stage": {"output": pretrained_tiny_nemo, "sha256": "adapted"},
            "other_text": {"heldout_other_test": corpus["heldout_val"], "sha256": "other"}}  # stands in for it
    learned = {"last_checkpoint": pretrained_tiny_nemo, "sha256": "rl"}
    shared, seeded = Stages(tmp_path, fresh=False), Stages(tmp_path / "seed_43", fresh=False)
    results = quality.suta_runs(shared, seeded, base, learned, "cpu", {"steps": 1})
    assert set(results) == {"suta", "rl_learned_reward+suta"}
    for name, result in results.items():
        for figures, manifest in ((result, corpus["heldout_test"]), (result["other_text"], corpus["heldout_val"])):
            rows = [json.loads(line) for line in open(figures["output_manifest"])]
            assert [row["audio_filepath"] for row in rows] == [
                json.loads(line)["audio_filepath"] for line in open(manifest)]  # both test sets, one pass each
            assert figures["wer"] == pytest.approx(corpus_error_rate(
                [normalize_text(row["text"], lowercase=True) for row in rows], [row["pred_text"] for row in rows],
                "word"))
            assert figures["seconds"] > 0 and set(figures["greedy"]) == {"wer", "cer"}
    assert (tmp_path / "suta" / "hyps.json").exists() and (tmp_path / "seed_43" / "rl_learned_reward+suta").is_dir()
    assert (tmp_path / "suta-other_text" / "hyps.json").exists()

    def fail(*args, **kwargs):
        raise AssertionError("a cached SUTA stage ran again")

    monkeypatch.setattr(rlnf.commands, "adapt_suta", fail)
    again = quality.suta_runs(Stages(tmp_path, fresh=False), Stages(tmp_path / "seed_43", fresh=False), base,
                              learned, "cpu", {"steps": 1})
    assert again == {name: {**result, "seconds": pytest.approx(result["seconds"]),
                            "other_text": {**result["other_text"], "seconds": pytest.approx(result["other_text"]["seconds"])}}
                     for name, result in results.items()}
    with pytest.raises(AssertionError, match="ran again"):  # a new RL model: its row reruns
        quality.suta_runs(Stages(tmp_path, fresh=False), Stages(tmp_path / "seed_43", fresh=False), base,
                          {**learned, "sha256": "rl2"}, "cpu", {"steps": 1})
    # --no-suta-after-rl: SUTA of the start alone (cached), no pass over a learned model.
    alone = quality.suta_runs(Stages(tmp_path, fresh=False), Stages(tmp_path / "seed_44", fresh=False), base,
                              None, "cpu", {"steps": 1})
    assert set(alone) == {"suta"} and not (tmp_path / "seed_44" / "rl_learned_reward+suta").exists()


SUPERVISED = ("ctc_finetune_heldout", "ctc_finetune_heldout+more", "ctc_finetune_heldout+rl_cer")


def test_summary_on_both_test_sets_with_the_supervised_baselines():
    """Hand-made per-seed results: every run's change on the in-domain and the other-text set, its
    seconds, and RL after converged supervised fine-tuning against more of it."""
    quality = load_quality()
    runs = (*RUNS, *SUPERVISED)
    per_seed = [seed_result(42, 0.72, 0.60, 0.76, 0.74, 0.1, 0.6), seed_result(43, 0.68, 0.60, 0.76, 0.78, 0.2, 0.7)]
    # (converged, more, rl_cer) test WER per seed, in-domain and other-text; pretrained: 0.8 and 0.5.
    in_domain, other_text = [(0.50, 0.48, 0.44), (0.50, 0.46, 0.47)], [(0.45, 0.45, 0.40), (0.44, 0.42, 0.41)]
    for seed, wers, others in zip(per_seed, in_domain, other_text):
        seed["wer"].update(zip(SUPERVISED, wers))
        seed["cer"].update(zip(SUPERVISED, (w / 2 for w in wers)))
        seed["other_text_wer"] = {"pretrained": 0.5, "rl_learned_reward": 0.45, "rl_cer_reward": 0.4,
                                  "supervised_continued": 0.5, "self_training": 0.55, **dict(zip(SUPERVISED, others))}
        seed["other_text_cer"] = {k: v / 4 for k, v in seed["other_text_wer"].items()}
        seed["seconds"] = {name: 10.0 * (i + 1) + seed["seed"] - 42 for i, name in enumerate(runs)}
        seed["seconds"]["pretrained"] = 270.0
    summary = quality.summarise(per_seed, runs)
    converged, more, rl = (summary["runs"][name] for name in SUPERVISED)
    assert converged["wer_change_per_seed"] == pytest.approx([-0.375, -0.375])
    assert rl["wer_change_per_seed"] == pytest.approx([-0.45, -0.4125])
    assert rl["other_text_wer_change_per_seed"] == pytest.approx([-0.2, -0.18])
    assert more["other_text_wer_change_per_seed"] == pytest.approx([-0.1, -0.16])
    assert summary["runs"]["self_training"]["other_text_wer_change_mean"] == pytest.approx(0.1)
    assert summary["runs"]["rl_learned_reward"]["other_text_cer_change_per_seed"] == pytest.approx([-0.1, -0.1])
    assert more["seconds_per_seed"] == [60.0, 61.0] and more["seconds"] == pytest.approx(60.5)
    assert summary["pretrained"] == {"wer": 0.8, "cer": 0.4, "other_text_wer": 0.5, "other_text_cer": 0.125,
                                     "seconds": 270.0}
    # rl_cer against more: (0.44 - 0.48) / 0.48 and (0.47 - 0.46) / 0.46: below on seed 42 only.
    gaps = [(0.44 - 0.48) / 0.48, (0.47 - 0.46) / 0.46]
    assert summary["rl_cer_vs_more_gap_per_seed"] == pytest.approx(gaps)
    assert summary["rl_cer_vs_more_gap_mean"] == pytest.approx(sum(gaps) / 2)
    assert summary["rl_cer_vs_more_gap_std"] == pytest.approx(abs(gaps[0] - gaps[1]) / 2 ** 0.5)
    assert summary["rl_cer_beats_more_every_seed"] is False
    assert summary["other_text_rl_cer_beats_more_every_seed"] is True  # 0.40 < 0.45 and 0.41 < 0.42
    per_seed[1]["wer"]["ctc_finetune_heldout+rl_cer"] = 0.45
    assert quality.summarise(per_seed, runs)["rl_cer_beats_more_every_seed"] is True
    assert "rl_cer_beats_more_every_seed" not in quality.summarise(per_seed, RUNS)  # --no-supervised-baselines
    json.dumps(quality.finite_or_null(summary))  # what --json writes


def fake_recipes(monkeypatch):
    """rlnf.demo._run_recipe recording (recipe, {key: value}) and returning a summary naming
    checkpoints in the run's folder (nothing trains)."""
    import rlnf.demo

    calls = []

    def run_recipe(recipe, overrides, config=None):
        keys = dict(item.split("=", 1) for item in overrides)
        calls.append((recipe, keys))
        if recipe == "rl_finetune":
            time.sleep(0.15)  # a measurable wall-clock time for the continuation to match
        folder = keys["output_dir"]
        (Path(folder) / "checkpoints").mkdir(parents=True)
        for name in ("best", "last"):  # what it started from, so a new start makes new files
            (Path(folder) / "checkpoints" / f"{name}.nemo").write_text(keys.get("model.path") or keys.get("policy.path") or folder)
        return {"best_checkpoint": f"{folder}/checkpoints/best.nemo", "last_checkpoint": f"{folder}/checkpoints/last.nemo"}

    monkeypatch.setattr(rlnf.demo, "_run_recipe", run_recipe)
    return calls


@pytest.mark.parametrize("rl_steps", [None, 30])
def test_supervised_baselines_train_on_the_heldout_transcripts_from_the_start_and_its_best(tmp_path, monkeypatch,
                                                                                          rl_steps):
    from rlnf.demo import SETTINGS, Stages

    quality = load_quality()
    calls = fake_recipes(monkeypatch)
    settings = {**SETTINGS, "rl_steps": rl_steps, "run_seed": 43}
    data = {"heldout_train": "/c/heldout_train.json", "heldout_val": "/c/heldout_val.json",
            "heldout_test": "/c/heldout_test.json", "train": "/c/train.json", "sha256": "corpus"}
    base = {"data": data, "start": "/adapted.nemo", "start_stage": {"output": "/adapted.nemo", "sha256": "a"}}
    other = {**base, "start": "/other.nemo", "start_stage": {"output": "/other.nemo", "sha256": "b"}}
    stages = Stages(tmp_path, fresh=False)
    runs = quality.supervised_baselines(stages, settings, base)
    assert list(runs) == list(SUPERVISED)
    (first, converge), (second, rl), (third, more) = calls  # RL runs before the continuation takes its time
    assert (first, second, third) == ("train_ctc", "rl_finetune", "train_ctc")
    best = str(tmp_path / "ctc_finetune_heldout" / "checkpoints" / "best.nemo")
    assert runs["ctc_finetune_heldout"]["evaluated_checkpoint"] == best
    assert converge["model.path"] == "/adapted.nemo"  # the RL runs' start
    assert rl["policy.path"] == best and more["model.path"] == best  # both from the converged model
    for keys in (converge, rl, more):
        assert keys["data.train_manifest"] == data["heldout_train"] and keys["data.val_manifest"] == data["heldout_val"]
        assert keys["trainer.seed"] == "43"
    assert converge["trainer.early_stop_patience"] == "5" and converge["trainer.val_every"] == "50"
    assert converge["trainer.save_every"] == "50"  # every validation offered to best.nemo
    assert converge["trainer.max_minutes"] == "10.0" and converge["trainer.best_metric"] == "val/wer"
    assert more["trainer.early_stop_patience"] == "null" and more["trainer.save_every"] == "0"
    assert rl["rewards"] == "[{name: cer}]" and rl["algorithm.name"] == settings["rl_algorithm"]
    if rl_steps:  # the continuation gets the RL run's wall-clock time
        assert rl["trainer.max_steps"] == "30"
        seconds = stages.timings["ctc_finetune_heldout+rl_cer"]
        assert 0.15 <= seconds < 1 and float(more["trainer.max_minutes"]) == round(seconds / 60, 3)
    else:
        assert rl["trainer.max_minutes"] == more["trainer.max_minutes"] == str(settings["rl_minutes"])
    # Cached: a second call runs nothing; a new start reruns all three.
    quality.supervised_baselines(Stages(tmp_path, fresh=False), settings, base)
    assert len(calls) == 3
    quality.supervised_baselines(Stages(tmp_path, fresh=False), settings, other)
    assert len(calls) == 6 and calls[3][1]["model.path"] == "/other.nemo"


def test_supervised_baselines_with_extra_sentences_train_on_more_transcripts_under_their_own_names(
        tmp_path, monkeypatch):
    """ctc_finetune_extra_sentences N: the held-out voice's extra sentences (a stage of the shared stages)
    are the training data of all three runs, named ctc_finetune_heldout-extraN*, in their own folders:
    the oracle's-transcripts runs stay cached beside them."""
    import rlnf.demo
    from rlnf.demo import SETTINGS, Stages

    quality = load_quality()
    calls = fake_recipes(monkeypatch)
    made = []

    def extra_corpus(stages, settings, data):  # the real stage is tested below, with flite
        made.append(stages.root)
        return {"manifest": "/shared/heldout_train_extra.json", "utterances": 3, "sha256": "e"}

    monkeypatch.setattr(rlnf.demo, "heldout_extra_corpus", extra_corpus)
    data = {"heldout_train": "/c/heldout_train.json", "heldout_val": "/c/heldout_val.json", "sha256": "corpus"}
    base = {"data": data, "start": "/adapted.nemo", "start_stage": {"output": "/adapted.nemo", "sha256": "a"}}
    settings = {**SETTINGS, "rl_steps": 30}
    quality.supervised_baselines(Stages(tmp_path, fresh=False), settings, base)
    assert len(calls) == 3 and not made
    extra = {**settings, "ctc_finetune_extra_sentences": 3}
    names = quality.supervised_names(extra)
    assert names == ("ctc_finetune_heldout-extra3", "ctc_finetune_heldout-extra3+more",
                     "ctc_finetune_heldout-extra3+rl_cer")
    runs = quality.supervised_baselines(Stages(tmp_path / "seed_43", fresh=False), extra, base,
                                        Stages(tmp_path, fresh=False))
    assert list(runs) == list(names) and made == [tmp_path]  # the extra corpus: one stage every seed shares
    (_, converge), (_, rl), (_, more) = calls[3:]
    for keys in (converge, rl, more):
        assert keys["data.train_manifest"] == "/shared/heldout_train_extra.json"
    assert converge["model.path"] == "/adapted.nemo"
    assert converge["output_dir"] == str(tmp_path / "seed_43" / names[0])
    assert rl["policy.path"] == more["model.path"] == str(tmp_path / "seed_43" / names[0] / "checkpoints" / "best.nemo")
    assert rl["rewards"] == "[{name: cer}]"
    # Either naming stays cached; the default's key is the one it had before the setting existed.
    quality.supervised_baselines(Stages(tmp_path, fresh=False), settings, base)
    quality.supervised_baselines(Stages(tmp_path / "seed_43", fresh=False), extra, base, Stages(tmp_path, fresh=False))
    assert len(calls) == 6
    assert json.loads((tmp_path / "ctc_finetune_heldout" / "stage.json").read_text())["key"] == "d72d048f32fd4e58"
    # Other extra transcripts (a new digest) retrain the converged model (the fake writes the same checkpoint,
    # so the two stages from it stay cached; a real one keys them anew through its digest).
    monkeypatch.setattr(rlnf.demo, "heldout_extra_corpus", lambda stages, settings, data: {
        "manifest": "/shared/heldout_train_extra.json", "utterances": 3, "sha256": "f"})
    quality.supervised_baselines(Stages(tmp_path / "seed_43", fresh=False), extra, base, Stages(tmp_path, fresh=False))
    assert [recipe for recipe, _ in calls[6:]] == ["train_ctc"]
    # The report's figures follow the rows present, either naming.
    assert quality.supervised_pair((*RUNS, *SUPERVISED)) == ("ctc_finetune_heldout+rl_cer", "ctc_finetune_heldout+more")
    assert quality.supervised_pair((*RUNS, *names)) == (names[2], names[1])
    assert quality.supervised_pair(RUNS) is None and quality.supervised_pair((*RUNS, names[2])) is None
    per_seed = [seed_result(42, 0.72, 0.60, 0.76, 0.74, 0.1, 0.6)]
    per_seed[0]["wer"].update(zip(names, (0.5, 0.5, 0.45)))
    per_seed[0]["cer"].update(zip(names, (0.2, 0.2, 0.2)))
    summary = quality.summarise(per_seed, (*RUNS, *names))
    assert summary["rl_cer_vs_more_runs"] == [names[2], names[1]]
    assert summary["rl_cer_vs_more_gap_per_seed"] == pytest.approx([-0.1])
    assert quality.issue_targets(per_seed, (*RUNS, *names))["rl_cer_beats_more_by_5_percent_every_seed"] is True


def test_the_continuation_at_a_rate_of_its_own_is_a_row_of_its_own(tmp_path, monkeypatch):
    """ctc_finetune_more_lr X: the continuation runs at X (the converged model and RL stay cached), in a row
    and stage ...+more-lrX beside the default's, which keeps its key; the report compares RL with it."""
    from rlnf.demo import SETTINGS, Stages

    quality = load_quality()
    calls = fake_recipes(monkeypatch)
    data = {"heldout_train": "/c/heldout_train.json", "heldout_val": "/c/heldout_val.json", "sha256": "corpus"}
    base = {"data": data, "start": "/adapted.nemo", "start_stage": {"output": "/adapted.nemo", "sha256": "a"}}
    settings = {**SETTINGS, "rl_steps": None}  # the budget rl_minutes, so the keys do not depend on a timing
    quality.supervised_baselines(Stages(tmp_path, fresh=False), settings, base)
    default_more = json.loads((tmp_path / "ctc_finetune_heldout+more" / "stage.json").read_text())
    # Its key (a fingerprint of these params) is the one it had before the setting existed.
    assert sorted(default_more["params"]) == ["lr", "minutes", "policy", "seed", "val_every"]
    assert default_more["params"]["lr"] == 5e-4
    assert calls[2][1]["trainer.lr"] == "0.0005"
    slower = {**settings, "ctc_finetune_more_lr": 1e-4}
    names = quality.supervised_names(slower)
    assert names == ("ctc_finetune_heldout", "ctc_finetune_heldout+more-lr0.0001", "ctc_finetune_heldout+rl_cer")
    runs = quality.supervised_baselines(Stages(tmp_path, fresh=False), slower, base)
    assert list(runs) == list(names)
    assert [recipe for recipe, _ in calls[3:]] == ["train_ctc"]  # the continuation alone
    more = calls[3][1]
    assert more["trainer.lr"] == "0.0001" and more["output_dir"] == str(tmp_path / names[1])
    assert more["model.path"] == calls[2][1]["model.path"]  # from the same converged checkpoint
    assert more["trainer.max_minutes"] == calls[2][1]["trainer.max_minutes"]  # for the RL run's budget
    assert json.loads((tmp_path / "ctc_finetune_heldout+more" / "stage.json").read_text()) == default_more
    # Cached, and the default's continuation too.
    quality.supervised_baselines(Stages(tmp_path, fresh=False), slower, base)
    quality.supervised_baselines(Stages(tmp_path, fresh=False), settings, base)
    assert len(calls) == 4
    # Its evaluation stage and the report's pair.
    assert quality.supervised_evaluation(settings) == "evaluate_supervised"
    assert quality.supervised_evaluation(slower) == "evaluate_supervised-lr0.0001"
    both = {**slower, "ctc_finetune_extra_sentences": 3}
    assert quality.supervised_names(both)[1] == "ctc_finetune_heldout-extra3+more-lr0.0001"
    assert quality.supervised_evaluation(both) == "evaluate_supervised-extra3-lr0.0001"
    assert quality.supervised_evaluation({**settings, "ctc_finetune_extra_sentences": 3}) == "evaluate_supervised-extra3"
    assert quality.supervised_pair((*RUNS, *names)) == (names[2], names[1])


@pytest.mark.parametrize("rate", [1e-4, 1, None])
def test_the_continuation_s_rate_is_taken_as_a_float_an_int_or_null(rate):
    from rlnf.demo import scaled_settings

    assert scaled_settings(15.0, {"ctc_finetune_more_lr": rate})["ctc_finetune_more_lr"] == rate


def one_row_manifest(path: Path) -> Path:
    """A corpus manifest of one row, its audio path relative ("wav/a.wav", text "x"), at ``path``."""
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"audio_filepath": "wav/a.wav", "duration": 1.0, "text": "x"}) + "\n")
    return path


@pytest.mark.parametrize("argv, message", [
    (["--supervised-extra-sentences", "5201"], "ctc_finetune_extra_sentences: 5201 more than the corpus's 800"),
    (["--supervised-extra-sentences", "-1"], "ctc_finetune_extra_sentences: a whole number >= 0"),
    (["--supervised-extra-sentences", "10", "--no-supervised-baselines"], "no use with --no-supervised-baselines"),
])
def test_supervised_extra_sentences_are_refused_before_any_stage_naming_the_setting(tmp_path, capsys, argv, message):
    quality = load_quality()
    with pytest.raises(SystemExit) as exit_info:
        quality.main([*argv, "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_heldout_extra_corpus_is_the_heldout_voice_reading_none_of_the_corpus_s_sentences(tmp_path):
    """heldout_extra_corpus: the held-out voice reading the next sentences of the corpus's seeded order,
    after the corpus's heldout_train rows, all with absolute paths; cached; nothing when the setting is 0."""
    from tests.conftest import require_tool

    require_tool("flite")
    from rlnf.demo import SETTINGS, Stages, heldout_extra_corpus
    from rlnf.synth import load_sentences

    train = one_row_manifest(tmp_path / "corpus" / "heldout_train.json")
    data = {"heldout_train": str(train), "sha256": "c"}
    assert heldout_extra_corpus(Stages(tmp_path, fresh=False), dict(SETTINGS), data) == {}
    settings = {**SETTINGS, "sentences": 12, "heldout_voice": "flite:rms", "ctc_finetune_extra_sentences": 3}
    made = heldout_extra_corpus(Stages(tmp_path, fresh=False), settings, data)
    rows = [json.loads(line) for line in Path(made["manifest"]).read_text().splitlines()]
    assert made["utterances"] == len(rows) == 1 + 3
    assert rows[0]["audio_filepath"] == str(train.parent / "wav" / "a.wav")
    assert [row["text"] for row in rows[1:]] == load_sentences(15, settings["seed"])[12:]
    assert not {row["text"] for row in rows[1:]} & set(load_sentences(12, settings["seed"]))
    assert {row["speaker"] for row in rows[1:]} == {"flite:rms"}
    assert all(Path(row["audio_filepath"]).is_absolute() and Path(row["audio_filepath"]).exists() for row in rows[1:])
    stamp = (tmp_path / "heldout_extra_corpus" / "stage.json").stat().st_mtime_ns
    assert heldout_extra_corpus(Stages(tmp_path, fresh=False), settings, data) == made
    assert (tmp_path / "heldout_extra_corpus" / "stage.json").stat().st_mtime_ns == stamp


def test_every_evaluation_reads_both_test_sets_at_the_evaluated_checkpoint(tmp_path, monkeypatch):
    import rlnf.commands
    from rlnf.demo import Stages, evaluate_runs

    calls = []

    def evaluate(model, manifest, reward=None, output=None, device="auto"):
        calls.append((model, manifest))
        return {"wer": len(calls) / 100, "cer": 0.1, "reward": 0.5 if reward else None, "n": 2}

    monkeypatch.setattr(rlnf.commands, "evaluate", evaluate)
    base = {"data": {"heldout_test": "/test.json", "heldout_val": "/val.json"}, "policy": "/policy.nemo",
            "start": "/adapted.nemo", "pretrain": {"sha256": "p"}, "start_stage": {"sha256": "a"},
            "other_text": {"heldout_other_test": "/other.json", "sha256": "o"}}
    runs = {"rl": {"last_checkpoint": "/rl/last.nemo"},
            "ctc": {"last_checkpoint": "/ctc/last.nemo", "evaluated_checkpoint": "/ctc/best.nemo"}}
    results = evaluate_runs(Stages(tmp_path, fresh=False), base, {"best_checkpoint": "/reward"}, runs, "cpu")
    models = {"pretrained": "/policy.nemo", "batchnorm_adapted": "/adapted.nemo", "rl": "/rl/last.nemo",
              "ctc": "/ctc/best.nemo"}
    assert results["models"] == models
    for manifest in ("/test.json", "/other.json"):
        assert {model for model, read in calls if read == manifest} == set(models.values())
    for run in models:
        assert set(results[run]["other_text"]) >= {"wer", "cer"} and results[run]["other_text"] != results[run]
    assert (tmp_path / "evaluate-other_text" / "stage.json").exists()
    count = len(calls)
    evaluate_runs(Stages(tmp_path, fresh=False), base, {"best_checkpoint": "/reward"}, runs, "cpu")
    assert len(calls) == count  # both cached
    evaluate_runs(Stages(tmp_path, fresh=False), {**base, "other_text": {**base["other_text"], "sha256": "o2"}},
                  {"best_checkpoint": "/reward"}, runs, "cpu")
    assert {read for _, read in calls[count:]} == {"/other.json"}  # a new other-text set: only its evaluation reruns


def test_a_reward_ensemble_variant_trains_its_members_once_and_scores_with_all(tmp_path, monkeypatch):
    """rl_reward_ensemble = 3: two more reward models of the variant's kind (seeds run_seed + 1000 j,
    their own stages), the learned run scored by all three checkpoints as an ensemble; the default (1)
    leaves the run's rewards and stage key as they were."""
    from omegaconf import OmegaConf

    import rlnf.demo
    from rlnf.config import RewardSpec
    from rlnf.demo import SETTINGS, Stages, rl_keys, rl_runs

    calls = fake_recipes(monkeypatch)
    monkeypatch.setattr(rlnf.demo, "reward_listening", lambda checkpoint, pairs, folder: {"audio_gain": 0.3})
    base = {"data": {"heldout_train": "/c/t.json", "heldout_val": "/c/v.json", "heldout_unlabelled": "/c/u.json"},
            "start": "/adapted.nemo", "start_stage": {"output": "/adapted.nemo", "sha256": "a"},
            "pairs": {"train": "/p/train.json", "val": "/p/val.json", "sha256": "p"}, "heldout_pairs": {"val": "/p/h.json"}}
    reward = {"best_checkpoint": "/rm/best", "sha256": "r"}
    plain = {**SETTINGS, "rl_steps": 5, "run_seed": 43}
    assert "rl_reward_ensemble" not in rl_keys(plain)  # earlier runs' stage keys still match
    rl_runs(Stages(tmp_path / "one", fresh=False), plain, base, reward, oracle=False)
    assert [recipe for recipe, _ in calls] == ["rl_finetune"]
    assert calls[0][1]["rewards"] == "[{name: learned, path: '/rm/best'}]"

    calls.clear()
    ensemble = {**plain, "rl_reward_ensemble": 3, "rl_reward_std_coef": 1.0}
    folder = tmp_path / "three"
    rl_runs(Stages(folder, fresh=False), ensemble, base, reward, suffix="-ens", oracle=False, model="listening")
    trained = [keys for recipe, keys in calls if recipe == "train_reward_model"]
    assert [keys["trainer.seed"] for keys in trained] == ["1043", "2043"]
    assert [keys["output_dir"] for keys in trained] == [str(folder / f"reward_model-listening-member{j}") for j in (1, 2)]
    spec = OmegaConf.to_container(OmegaConf.from_dotlist([f"rewards={calls[-1][1]['rewards']}"]))["rewards"][0]
    assert RewardSpec(**spec).paths == ["/rm/best", *(f"{folder}/reward_model-listening-member{j}/checkpoints/best.nemo"
                                                      for j in (1, 2))]
    assert spec["std_coef"] == 1.0
    # Cached: a second variant with another std_coef re-uses the members and reruns only RL.
    calls.clear()
    rl_runs(Stages(folder, fresh=False), {**ensemble, "rl_reward_std_coef": 0.0}, base, reward, suffix="-ens0",
            oracle=False, model="listening")
    assert [recipe for recipe, _ in calls] == ["rl_finetune"]


def test_the_listening_asr_reward_model_hears_through_the_start_s_encoder_in_its_own_stages(tmp_path, monkeypatch):
    """reward_model "listening-asr": the listening config with model.asr_encoder_from the held-out runs'
    start and one CTC frame per encoder frame, in stage reward_model-listening-asr (its held-out check
    reward_heldout-listening-asr) keyed on that start; the listening model's stage and key are unchanged."""
    import rlnf.demo
    from rlnf.demo import SETTINGS, Stages, train_reward

    calls = fake_recipes(monkeypatch)
    configs = []
    recorded = rlnf.demo._run_recipe
    monkeypatch.setattr(rlnf.demo, "_run_recipe", lambda recipe, overrides, config=None: (
        configs.append(config), recorded(recipe, overrides, config))[1])
    monkeypatch.setattr(rlnf.demo, "reward_listening", lambda checkpoint, pairs, folder: {"audio_gain": 0.3})
    base = {"start": "/start.nemo", "start_stage": {"output": "/start.nemo", "sha256": "s"},
            "pairs": {"train": "/p/train.json", "val": "/p/val.json", "sha256": "p"}, "heldout_pairs": {"val": "/p/h.json"}}
    stages = Stages(tmp_path, fresh=False)
    settings = {**SETTINGS, "run_seed": 43}
    plain = train_reward(stages, settings, base, "listening")
    ears = train_reward(stages, settings, base, "listening-asr")
    (_, listening), (_, asr) = calls
    assert "model.asr_encoder_from" not in listening and "model.ctc_stride" not in listening
    assert asr["model.asr_encoder_from"] == "/start.nemo" and asr["model.ctc_stride"] == "1"
    assert configs == ["reward/listening", "reward/listening"]
    assert asr["output_dir"] == str(tmp_path / "reward_model-listening-asr")
    assert (tmp_path / "reward_heldout-listening-asr" / "stage.json").exists()
    assert ears["best_checkpoint"] != plain["best_checkpoint"]
    key = json.loads((tmp_path / "reward_model-listening-asr" / "stage.json").read_text())["params"]
    assert key["asr_encoder"] == base["start_stage"]
    assert "asr_encoder" not in json.loads((tmp_path / "reward_model-listening" / "stage.json").read_text())["params"]
    # Another start: the ears' stage reruns, the listening model's is cached.
    other = {**base, "start": "/other.nemo", "start_stage": {"output": "/other.nemo", "sha256": "o"}}
    train_reward(Stages(tmp_path, fresh=False), settings, other, "listening")
    train_reward(Stages(tmp_path, fresh=False), settings, other, "listening-asr")
    assert len(calls) == 3 and calls[2][1]["model.asr_encoder_from"] == "/other.nemo"


def test_rl_after_self_training_starts_the_learned_run_from_the_self_trained_policy(tmp_path, monkeypatch):
    """rl_after_self_training: the learned-reward run starts from the self_training run's last checkpoint
    (trained first when missing, the same stage trained_runs makes), which is also its KL reference
    (rl_finetune's policy.path); its cost counts self-training; the oracle still starts from the start."""
    from rlnf.demo import SETTINGS, Stages, check_settings, rl_keys, rl_runs, run_seconds, trained_runs
    from rlnf.errors import ConfigError

    calls = fake_recipes(monkeypatch)
    data = {"heldout_train": "/c/t.json", "heldout_val": "/c/v.json", "heldout_unlabelled": "/c/u.json",
            "train": "/c/train.json"}
    base = {"data": data, "start": "/start.nemo", "start_stage": {"output": "/start.nemo", "sha256": "s"},
            "policy": "/policy.nemo", "pretrain": {"sha256": "p"},
            "pseudo_labels": {"manifest": "/c/pseudo.json", "sha256": "l"}}
    reward = {"best_checkpoint": "/rm/best", "sha256": "r"}
    settings = {**SETTINGS, "rl_steps": 5, "run_seed": 43}
    after = {**settings, "rl_after_self_training": True}
    assert "rl_after_self_training" not in rl_keys(settings) and rl_keys(after)["rl_after_self_training"] is True
    stages = Stages(tmp_path, fresh=False)
    runs = rl_runs(stages, after, base, reward, suffix="-st")
    (st_recipe, st), (learned_recipe, learned), (oracle_recipe, oracle) = calls
    assert (st_recipe, learned_recipe, oracle_recipe) == ("train_ctc", "rl_finetune", "rl_finetune")
    assert st["model.path"] == "/start.nemo" and st["data.train_manifest"] == "/c/pseudo.json"
    assert learned["policy.path"] == str(tmp_path / "self_training-st" / "checkpoints" / "last.nemo")
    assert oracle["policy.path"] == "/start.nemo"
    result = runs["rl_learned_reward-st"]
    assert result["cost_stages"] == ["self_training-st"]
    assert run_seconds(stages, "rl_learned_reward-st", result) == pytest.approx(
        stages.timings["rl_learned_reward-st"] + stages.timings["self_training-st"])
    # trained_runs' self_training has the same key: re-used from the variant's stage, not trained again.
    trained_runs(Stages(tmp_path, fresh=False), settings, base, reward)
    assert [recipe for recipe, _ in calls[3:]] == ["rl_finetune", "rl_finetune", "train_ctc"]  # plain runs, continued
    assert calls[-1][1]["model.path"] == "/policy.nemo"  # supervised_continued: the only CTC run trained now
    # The report's own learned-reward run with the variant's settings (STRONG_START's choice) is the
    # variant's run: re-used from its folder, not trained again, though rl_learned_reward/ holds another key.
    calls.clear()
    same = Stages(tmp_path, fresh=False)
    again = rl_runs(same, after, base, reward, oracle=False)
    assert calls == [] and same.sources == {"rl_learned_reward": "rl_learned_reward-st",
                                            "self_training": "self_training-st"}
    assert again["rl_learned_reward"]["last_checkpoint"] == result["last_checkpoint"]
    assert again["rl_learned_reward"]["cost_stages"] == ["self_training"]
    # Its logs are read where it ran (scripts/quality.py's val curves, the demo's plot), not from the
    # report's own folder, which holds the plain run's.
    assert same.folder("rl_learned_reward") == tmp_path / "rl_learned_reward-st"
    for folder, wer in (("rl_learned_reward-st", 0.1), ("rl_learned_reward", 0.9)):
        (tmp_path / folder / "metrics.jsonl").write_text(json.dumps({"step": 5, "val/wer": wer}) + "\n")
    assert load_quality().rl_logs(same, ("rl_learned_reward", "self_training")) == {
        "rl_learned_reward": [{"step": 5, "val/wer": 0.1}]}
    # A variant that would train under that sibling's name with other settings would delete the run this
    # invocation returned as rl_learned_reward: refused, nothing trained, the folder kept.
    with pytest.raises(ConfigError, match="stage rl_learned_reward-st: .* the run stage rl_learned_reward returned"):
        rl_runs(same, {**after, "rl_kl_coef": 0.2}, base, reward, suffix="-st", oracle=False)
    assert calls == [] and (tmp_path / "rl_learned_reward-st" / "metrics.jsonl").exists()
    # A variant that changes rl_minutes self-trains in its own folder; the report's stage is left alone.
    calls.clear()
    rl_runs(Stages(tmp_path, fresh=False), {**after, "rl_minutes": 2.0}, base, reward, suffix="-st2", oracle=False)
    assert [recipe for recipe, _ in calls] == ["train_ctc", "rl_finetune"]
    assert calls[0][1]["output_dir"] == str(tmp_path / "self_training-st2")
    assert calls[1][1]["policy.path"] == str(tmp_path / "self_training-st2" / "checkpoints" / "last.nemo")
    # One fresh invocation trains self-training once, and its checkpoint stays where the RL run started.
    calls.clear()
    fresh = tmp_path / "fresh"
    trained_runs(Stages(fresh, fresh=True), after, base, reward)
    assert [recipe for recipe, _ in calls].count("train_ctc") == 2  # self-training and supervised_continued
    assert (fresh / "self_training" / "checkpoints" / "last.nemo").exists()
    with pytest.raises(ConfigError, match="rl_after_self_training: true or false"):
        check_settings({**settings, "rl_after_self_training": "yes"})


def test_a_refresh_variant_fine_tunes_the_reward_model_on_the_round_1_policy_s_pairs_then_runs_rl_again(
        tmp_path, monkeypatch):
    """rl_reward_refresh: round 1 is the plain learned-reward run; the round-1 policy's scored pairs of the
    labelled training and validation voices are added to the reward model's pairs; the reward model is
    fine-tuned on them from its checkpoint (one epoch, no CTC-only epochs); round 2 starts from the round-1
    policy, scored by the refreshed model, with run_seed + 500. Refused with an ensemble."""
    import rlnf.demo
    from rlnf.demo import SETTINGS, Stages, check_settings, rl_keys, rl_runs
    from rlnf.errors import ConfigError

    calls = fake_recipes(monkeypatch)
    monkeypatch.setattr(rlnf.demo, "reward_listening", lambda checkpoint, pairs, folder: {"audio_gain": 0.3})
    drawn = []

    def scored_pairs(policy, manifest, out, limit, settings, seed):
        drawn.append((policy, manifest, seed))
        Path(out).write_text(json.dumps({"audio_filepath": f"/{seed}.wav", "text": "new", "score": 0.5}) + "\n")
        return 1

    monkeypatch.setattr(rlnf.demo, "_scored_pairs", scored_pairs)
    old_pairs = {}
    for split in ("train", "val"):
        old_pairs[split] = tmp_path / f"old_{split}.json"
        old_pairs[split].write_text(json.dumps({"audio_filepath": "/old.wav", "text": "old", "score": 1.0}) + "\n")
    base = {"data": {"heldout_train": "/c/t.json", "heldout_val": "/c/v.json", "heldout_unlabelled": "/c/u.json",
                     "train": "/c/train.json", "val": "/c/val.json"},
            "start": "/adapted.nemo", "start_stage": {"output": "/adapted.nemo", "sha256": "a"},
            "pairs": {"train": str(old_pairs["train"]), "val": str(old_pairs["val"]), "sha256": "p"},
            "heldout_pairs": {"val": "/p/h.json"}}
    reward = {"best_checkpoint": "/rm/best", "sha256": "r"}
    plain = {**SETTINGS, "rl_steps": 5, "run_seed": 43}
    assert "rl_reward_refresh" not in rl_keys(plain)
    settings = {**plain, "rl_reward_refresh": True}
    folder = tmp_path / "run"
    runs = rl_runs(Stages(folder, fresh=False), settings, base, reward, suffix="-refresh", oracle=False)
    first, tune, second = calls
    assert first[0] == "rl_finetune" and first[1]["policy.path"] == "/adapted.nemo"
    assert first[1]["rewards"] == "[{name: learned, path: '/rm/best'}]" and first[1]["trainer.seed"] == "43"
    round1 = f"{folder}/rl_learned_reward-refresh-round1/checkpoints/last.nemo"
    assert drawn == [(round1, "/c/train.json", 4), (round1, "/c/val.json", 5)]
    assert tune[0] == "train_reward_model" and tune[1]["model.init_from"] == "/rm/best"
    assert tune[1]["trainer.epochs"] == "1" and tune[1]["trainer.ctc_pretrain_epochs"] == "0"
    for split in ("train", "val"):
        merged = [json.loads(line)["text"] for line in Path(tune[1][f"data.{split}_manifest"]).read_text().splitlines()]
        assert merged == ["old", "new"]
    refreshed = f"{folder}/reward_model-listening-refresh-refreshed/checkpoints/best.nemo"
    assert second[0] == "rl_finetune" and second[1]["policy.path"] == round1
    assert second[1]["rewards"] == f"[{{name: learned, path: '{refreshed}'}}]" and second[1]["trainer.seed"] == "543"
    assert runs["rl_learned_reward-refresh"]["last_checkpoint"] == f"{folder}/rl_learned_reward-refresh/checkpoints/last.nemo"
    assert runs["rl_learned_reward-refresh"]["cost_stages"] == [
        "rl_learned_reward-refresh-round1", "refresh_pairs-refresh", "reward_model-listening-refresh-refreshed"]
    assert (folder / "reward_heldout-listening-refresh-refreshed" / "stage.json").exists()
    calls.clear()
    rl_runs(Stages(folder, fresh=False), settings, base, reward, suffix="-refresh", oracle=False)
    assert calls == []  # every stage cached
    # The report's plain learned-reward run is that round 1 (the same key), not the last round (the refresh in
    # its key): re-used, nothing trained.
    stages = Stages(folder, fresh=False)
    assert rl_runs(stages, plain, base, reward, oracle=False)["rl_learned_reward"]["last_checkpoint"] == round1
    assert calls == [] and stages.sources == {"rl_learned_reward": "rl_learned_reward-refresh-round1"}
    for bad, message in (({"rl_reward_refresh": 1}, "true or false"),
                         ({"rl_reward_refresh": True, "rl_reward_ensemble": 2}, "needs rl_reward_ensemble 1"),
                         ({"rl_reward_refresh": True, "rl_reward_refresh_rounds": 0}, "a whole number >= 1"),
                         ({"rl_reward_refresh": True, "rl_reward_refresh_rounds": 2.0}, "a whole number >= 1"),
                         ({"rl_reward_refresh_rounds": 2}, "needs rl_reward_refresh true")):
        with pytest.raises(ConfigError, match=message):
            check_settings({**SETTINGS, **bad})

    # Two refreshes (another variant, same folder): round 1, the first refresh and round 2 are the stages
    # above, re-used under the new names (Stages.run's same_as); then the second refresh, on round 2's
    # policy, with the merged pairs of the first and new draws, from the first refreshed model; round 3
    # from round 2's policy with run_seed + 1000.
    calls.clear()
    drawn.clear()
    twice = {**settings, "rl_reward_refresh_rounds": 2}
    assert rl_keys(twice)["rl_reward_refresh_rounds"] == 2 and "rl_reward_refresh_rounds" not in rl_keys(settings)
    runs = rl_runs(Stages(folder, fresh=False), twice, base, reward, suffix="-twice", oracle=False)
    tune, third = calls
    round2 = f"{folder}/rl_learned_reward-refresh/checkpoints/last.nemo"
    assert drawn == [(round2, "/c/train.json", 6), (round2, "/c/val.json", 7)]
    assert tune[0] == "train_reward_model" and tune[1]["model.init_from"] == refreshed
    for split in ("train", "val"):
        merged = [json.loads(line)["text"] for line in Path(tune[1][f"data.{split}_manifest"]).read_text().splitlines()]
        assert merged == ["old", "new", "new"]
    again = f"{folder}/reward_model-listening-twice-refreshed2/checkpoints/best.nemo"
    assert third[0] == "rl_finetune" and third[1]["policy.path"] == round2
    assert third[1]["rewards"] == f"[{{name: learned, path: '{again}'}}]" and third[1]["trainer.seed"] == "1043"
    final = runs["rl_learned_reward-twice"]
    assert final["last_checkpoint"] == f"{folder}/rl_learned_reward-twice/checkpoints/last.nemo"
    assert final["cost_stages"] == ["rl_learned_reward-twice-round1", "refresh_pairs-twice",
                                    "reward_model-listening-twice-refreshed", "rl_learned_reward-twice-round2",
                                    "refresh_pairs-twice-2", "reward_model-listening-twice-refreshed2"]
    assert not (folder / "rl_learned_reward-twice-round2").exists()  # the one-refresh run's, re-used
    stages = Stages(folder, fresh=False)
    calls.clear()
    assert rl_runs(stages, twice, base, reward, suffix="-twice", oracle=False)["rl_learned_reward-twice"] == final
    assert calls == [] and all(stage in stages.timings for stage in final["cost_stages"])


def test_a_stage_is_re_used_from_a_sibling_of_the_same_key_only_where_same_as_allows(tmp_path):
    """Stages.run's same_as: a missing stage takes the cached result of a sibling stage matching the glob
    and the key (the sibling nearest by name first), with that stage's recorded seconds; without same_as,
    or with another key, or fresh, the body runs."""
    from rlnf.demo import Stages
    from rlnf.errors import ConfigError

    ran = []

    def body(tag):
        def run(folder):
            ran.append((folder.name, tag))
            return {"folder": folder.name}
        return run

    stages = Stages(tmp_path, fresh=False)
    stages.run("rl_a", {"x": 1}, body("a"))
    stages.run("rl_ab-1", {"x": 1}, body("ab"))  # no same_as: runs although its key is rl_a's
    stages.run("other", {"x": 2}, body("o"))
    assert ran == [("rl_a", "a"), ("rl_ab-1", "ab"), ("other", "o")]
    found = Stages(tmp_path, fresh=False)
    assert found.run("rl_ab-2", {"x": 1}, body("new"), same_as="rl_*") == {"folder": "rl_ab-1"}  # nearest name
    assert found.run("rl_c", {"x": 1}, body("new"), same_as="rl_*") == {"folder": "rl_a"}
    assert found.run("rl_d", {"x": 2}, body("new"), same_as="rl_*") == {"folder": "rl_d"}  # "other" is no rl_
    assert found.run("rl_e", {"x": 3}, body("new"), same_as="rl_*") == {"folder": "rl_e"}  # no key matches
    assert set(found.timings) == {"rl_ab-2", "rl_c", "rl_d", "rl_e"}
    record = json.loads((tmp_path / "rl_a" / "stage.json").read_text())
    assert found.timings["rl_c"] == record["seconds"] and not (tmp_path / "rl_c").exists()
    assert found.sources == {"rl_ab-2": "rl_ab-1", "rl_c": "rl_a"}
    # Each run counted once: the re-used ones at their sources' seconds, once even when a source is looked up too.
    total = sum(found.timings[name] for name in ("rl_ab-2", "rl_c", "rl_d", "rl_e"))
    assert found.seconds() == pytest.approx(total)
    assert found.run("rl_a", {"x": 1}, body("new"), same_as="rl_*") == {"folder": "rl_a"}
    assert found.seconds() == pytest.approx(total) and found.folder("rl_c") == tmp_path / "rl_a"
    # A stage that would train, under another key, in a folder whose run this invocation returned is refused
    # (rl_a's run was returned to rl_c and to rl_a itself), and the folder is left as it was.
    for name in ("rl_a", "rl_ab-1"):
        with pytest.raises(ConfigError, match=f"stage {name}: its folder .* holds the run stage rl_"):
            found.run(name, {"x": 9}, body("clash"))
    assert json.loads((tmp_path / "rl_a" / "stage.json").read_text()) == record
    assert (tmp_path / "rl_ab-1" / "stage.json").exists() and ("rl_a", "clash") not in ran
    assert Stages(tmp_path, fresh=True).run("rl_f", {"x": 1}, body("fresh"), same_as="rl_*") == {"folder": "rl_f"}
    assert ran[-3:] == [("rl_d", "new"), ("rl_e", "new"), ("rl_f", "fresh")]


def test_the_strong_start_s_extra_text_is_none_of_the_corpus_s_and_the_demo_s_start_is_unchanged(tmp_path):
    """pretrain_corpus: the next sentences of the corpus's seeded order (none of its train, validation or
    test sentences), each by voices_per_sentence voices; the corpus's training rows added with absolute
    paths. The demo's settings add nothing, and STRONG_START changes what makes the start (and where its
    held-out runs start)."""
    from tests.conftest import require_tool

    require_tool("flite")
    from rlnf.demo import SETTINGS, START_SETTINGS, STRONG_START, Stages, pretrain_corpus
    from rlnf.synth import load_sentences

    train = one_row_manifest(tmp_path / "corpus" / "train.json")
    data = {"train": str(train), "sha256": "c"}
    assert pretrain_corpus(Stages(tmp_path, fresh=False), dict(SETTINGS), data) == {}
    settings = {**SETTINGS, "sentences": 12, "voices": ["flite:kal16", "flite:awb"], "voices_per_sentence": 2,
                "pretrain_extra_sentences": 3, "pretrain_extra_voices": ["flite:slt"]}
    made = pretrain_corpus(Stages(tmp_path, fresh=False), settings, data)
    rows = [json.loads(line) for line in Path(made["manifest"]).read_text().splitlines()]
    assert made["utterances"] == len(rows) == 3 * 2 + 1
    extra = [row for row in rows if row["text"] != "x"]
    corpus_sentences = set(load_sentences(12, settings["seed"]))
    assert {row["text"] for row in extra} == set(load_sentences(15, settings["seed"])[12:])
    assert not {row["text"] for row in extra} & corpus_sentences
    for sentence in {row["text"] for row in extra}:  # two different voices each
        assert len({row["speaker"] for row in extra if row["text"] == sentence}) == 2
    assert all(Path(row["audio_filepath"]).is_absolute() and Path(row["audio_filepath"]).exists() for row in extra)
    assert rows[-1]["audio_filepath"] == str(train.parent / "wav" / "a.wav")
    assert set(START_SETTINGS) <= set(SETTINGS)
    assert {k for k in STRONG_START if STRONG_START[k] != SETTINGS[k]} >= {"policy_size", "pretrain_extra_sentences"}
    # Its learned-reward run, chosen on validation (docs/results.md): listening-asr after self-training.
    assert STRONG_START["reward_model"] == "listening-asr" and STRONG_START["rl_after_self_training"] is True


def test_a_pseudo_label_variant_trains_the_learned_run_on_the_start_s_transcripts_with_a_ctc_term(tmp_path,
                                                                                                   monkeypatch):
    from rlnf.demo import SETTINGS, Stages, rl_runs

    calls = fake_recipes(monkeypatch)
    base = {"data": {"heldout_train": "/c/t.json", "heldout_val": "/c/v.json", "heldout_unlabelled": "/c/u.json"},
            "start": "/adapted.nemo", "start_stage": {"output": "/adapted.nemo", "sha256": "a"},
            "pseudo_labels": {"manifest": "/p/pseudo.json", "kept": 3, "sha256": "l"}}
    reward = {"best_checkpoint": "/rm/best", "sha256": "r"}
    settings = {**SETTINGS, "rl_steps": 5, "rl_pseudo_label_coef": 0.2}
    rl_runs(Stages(tmp_path, fresh=False), settings, base, reward, suffix="-pl")
    learned, oracle = (keys for _, keys in calls)
    assert learned["data.train_manifest"] == "/p/pseudo.json" and learned["algorithm.supervised_coef"] == "0.2"
    assert learned["rewards"] == "[{name: learned, path: '/rm/best'}]"
    assert oracle["data.train_manifest"] == "/c/t.json" and "algorithm.supervised_coef" not in oracle
    calls.clear()
    rl_runs(Stages(tmp_path / "plain", fresh=False), {**settings, "rl_pseudo_label_coef": 0.0}, base, reward,
            oracle=False)
    assert calls[0][1]["data.train_manifest"] == "/c/u.json" and "algorithm.supervised_coef" not in calls[0][1]
    # The oracle does not train on pseudo-labels: its stage is the one without the setting, not rerun.
    calls.clear()
    rl_runs(Stages(tmp_path, fresh=False), {**settings, "rl_pseudo_label_coef": 0.0}, base, reward, suffix="-pl")
    assert [keys["rewards"] for _, keys in calls] == ["[{name: learned, path: '/rm/best'}]"]


def test_issue_targets_and_the_markdown_table_against_hand_values():
    quality = load_quality()
    runs = (*RUNS, "suta", "batchnorm_adapted", "rl_learned_reward-ens3", *SUPERVISED)
    per_seed = [seed_result(42, 0.60, 0.50, 0.76, 0.70, 0.1, 0.6), seed_result(43, 0.66, 0.50, 0.76, 0.72, 0.2, 0.7)]
    extra = {"suta": (0.68, 0.70), "batchnorm_adapted": (0.72, 0.72), "rl_learned_reward-ens3": (0.6, 0.6),
             "ctc_finetune_heldout": (0.40, 0.40), "ctc_finetune_heldout+more": (0.40, 0.40),
             "ctc_finetune_heldout+rl_cer": (0.37, 0.39)}
    for index, seed in enumerate(per_seed):
        for name, wers in extra.items():
            seed["wer"][name], seed["cer"][name] = wers[index], wers[index] / 2
        seed["other_text_wer"] = {**{name: 0.8 for name in seed["wer"]}, "rl_learned_reward": 0.79}
        seed["other_text_cer"] = dict(seed["other_text_wer"])
    targets = quality.issue_targets(per_seed, runs)
    assert targets["baselines"] == ["suta", "self_training", "batchnorm_adapted"]
    assert targets["learned_beats_every_baseline_every_seed"] is True  # 0.60 < 0.68 and 0.66 < 0.70
    assert targets["best_baseline"] == "suta"  # mean 0.69 against self-training's 0.71
    assert targets["margin_below_best_baseline"] == pytest.approx((0.63 - 0.69) / 0.69)
    assert targets["other_text_learned_beats_every_baseline_every_seed"] is True
    assert targets["rl_cer_beats_more_by_5_percent_every_seed"] is False  # -7.5 % and -2.5 %
    per_seed[1]["other_text_wer"]["suta"] = 0.78  # below the learned run on one seed
    assert quality.issue_targets(per_seed, runs)["other_text_learned_beats_every_baseline_every_seed"] is False
    table = quality.markdown_table(quality.summarise(per_seed, runs)).splitlines()
    assert table[0].startswith("| run | test WER |") and len(table) == 2 + len(runs)
    ens3 = next(line for line in table if line.startswith("| rl_learned_reward-ens3 |"))
    assert "| 0.600 | −25.0, −25.0 % | −25.0 ± 0.0 % |" in ens3  # named with its hyphen; minus signs typeset


# The stage keys of the demo's default RL runs as they were before the learned run gained its own
# settings (ensemble, pseudo-labels): a change here reruns every cached benchmark's RL stages.
DEFAULT_RL_KEYS_150 = {"rl_algorithm": "grpo", "rl_steps": 150, "rl_lr": 1e-4, "rl_num_samples": 8,
                       "rl_batch_size": 8, "rl_kl_coef": 0.05, "run_seed": 42}


def test_default_rl_stage_keys_are_unchanged_and_the_oracle_ignores_the_learned_run_s_settings():
    from rlnf.demo import SETTINGS, _fingerprint, rl_keys

    settings = {**SETTINGS, "rl_steps": 150}
    assert rl_keys(settings) == rl_keys(settings, learned=False) == DEFAULT_RL_KEYS_150
    assert _fingerprint(rl_keys(settings)) == "8841504ec2d93c50"  # the key at 955190f
    learned_only = {"rl_reward_ensemble": 3, "rl_reward_std_coef": 1.0, "rl_pseudo_label_coef": 0.3,
                    "rl_consensus_weight": 0.5}
    assert rl_keys({**settings, **learned_only}, learned=False) == DEFAULT_RL_KEYS_150
    assert rl_keys({**settings, **learned_only}) == {**DEFAULT_RL_KEYS_150, **learned_only}


@pytest.mark.parametrize("overrides, message", [
    ({"rl_reward_ensemble": 3.0}, "rl_reward_ensemble: a whole number >= 1"),
    ({"rl_reward_ensemble": 0}, "rl_reward_ensemble: a whole number >= 1"),
    ({"rl_reward_std_coef": 1.0}, "rl_reward_std_coef needs rl_reward_ensemble >= 2"),
    ({"rl_reward_ensemble": 2, "rl_reward_std_coef": -1.0}, "rl_reward_std_coef: a finite number >= 0"),
    ({"rl_pseudo_label_coef": -0.1}, "rl_pseudo_label_coef: must be >= 0"),
    ({"pretrain_extra_voices": ["flite:slt"]}, "pretrain_extra_voices needs pretrain_extra_sentences > 0"),
    ({"pretrain_extra_sentences": 10, "pretrain_extra_voices": ["espeak:en+f4"]}, "lists the held-out voice"),
    ({"pretrain_extra_sentences": 5500}, "pretrain_extra_sentences: 5500 more than the corpus's 800"),
    ({"ctc_finetune_extra_sentences": 5500}, "ctc_finetune_extra_sentences: 5500 more than the corpus's 800"),
    ({"ctc_finetune_extra_sentences": -1}, "ctc_finetune_extra_sentences: a whole number >= 0"),
    ({"ctc_finetune_extra_sentences": 2.5}, "ctc_finetune_extra_sentences: a whole number >= 0"),
    ({"pretrain_extra_sentences": -1}, "pretrain_extra_sentences: a whole number >= 0"),
    ({"ctc_finetune_more_lr": 0}, "ctc_finetune_more_lr: a finite learning rate > 0"),
    ({"ctc_finetune_more_lr": -1e-4}, "ctc_finetune_more_lr: a finite learning rate > 0"),
    ({"ctc_finetune_more_lr": float("nan")}, "ctc_finetune_more_lr: a finite learning rate > 0"),
    ({"ctc_finetune_more_lr": "1e-4"}, "ctc_finetune_more_lr: a finite learning rate > 0"),
    ({"ctc_finetune_more_lr": True}, "ctc_finetune_more_lr: a finite learning rate > 0"),
    ({"ctc_finetune_more_lr": float("inf")}, "ctc_finetune_more_lr: a finite learning rate > 0"),
    ({"pretrain_decay_steps": -1}, "pretrain_decay_steps: a whole number >= 0"),
    ({"pretrain_decay_steps": 10.5}, "pretrain_decay_steps: a whole number >= 0"),
])
def test_demo_settings_the_stages_would_find_late_are_refused_first(overrides, message):
    from rlnf.demo import STRONG_START, scaled_settings
    from rlnf.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        scaled_settings(15.0, overrides)
    scaled_settings(15.0, STRONG_START)  # the strong start itself is valid
