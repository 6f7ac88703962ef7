"""scripts/quality.py: the figures from per-seed results (hand values) and a tiny run end to end."""

from __future__ import annotations

import json

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
    quality = load_quality()
    settings = {"rl_kl_coef": 0.05, "rl_lr": 1e-4, "reward_model": "listening"}
    variants = quality.parse_variants(['kl02={"rl_kl_coef": 0.2}',
                                       'card={"reward_model": "card", "rl_lr": 2e-4}'], settings)
    assert variants == {"kl02": {"settings": {"rl_kl_coef": 0.2}, "reward_model": "listening"},  # the demo's
                        "card": {"settings": {"rl_lr": 2e-4}, "reward_model": "card"}}
    settings = {**settings, "adapt_batchnorm": True}
    for item, words in [('a={"rl_kl": 1}', "unknown setting(s) rl_kl"), ("a={bad", "a: bad JSON"),
                        ('a={"adapt_batchnorm": false}', "adapt_batchnorm shape(s) what every run shares"),
                        ("a=[1]", "object"), ('a={"reward_model": "x"}', "one of listening, card"),
                        ("no_json", "NAME=JSON"), ('a b={}', "NAME=JSON")]:
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
                "rl_batch_size": 4}
    out, figures = tmp_path / "demo", tmp_path / "quality.json"
    quality = load_quality()
    assert quality.main(["--output", str(out), "--seeds", "2", "--json", str(figures), "--presets", "rloo",
                         "--rl-steps", "3", "--other-reward-model", "--settings", json.dumps(settings)]) == 0
    summary = json.loads(figures.read_text())
    assert summary["seeds"] == 2 and summary["seconds"] > 0 and summary["stage_seconds"] >= summary["seconds"] * 0.5
    for name in (*RUNS, "rl_learned_reward-rloo", "rl_cer_reward-rloo", "rl_learned_reward-card"):
        run = summary["runs"][name]
        assert {"wer_change_mean", "wer_change_std", "wer_change_per_seed"} <= set(run)
        assert len(run["wer_change_per_seed"]) == 2
        if name.startswith("rl_"):  # step-boxed by --rl-steps, whatever the machine's load
            assert run["steps_per_seed"] == [3, 3]
    for name in ("suta", "rl_learned_reward+suta"):  # SUTA on the test sentences: cached stages with their time
        assert len(summary["runs"][name]["wer_change_per_seed"]) == 2 and summary["runs"][name]["seconds"] > 0
    assert summary["runs"]["suta"]["wer_change_per_seed"][0] == summary["runs"]["suta"]["wer_change_per_seed"][1]
    assert "learned_beats_suta_every_seed" in summary
    assert {"audio_gain_mean", "heldout_group_spearman_mean"} <= set(summary["reward_model"])
    assert summary["reward_model"]["name"] == "listening"  # the demo's; the other one scored the variant
    assert {"audio_gain_mean", "heldout_group_spearman_mean"} <= set(summary["reward_model_card"])
    assert (out / "reward_model-listening" / "checkpoints").is_dir() and (out / "reward_model" / "checkpoints").is_dir()
    assert "oracle_fraction_mean" in summary
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


def test_suta_stages_transcribe_the_test_set_and_are_cached(pretrained_tiny_nemo, corpus, tmp_path, monkeypatch):
    """The two SUTA rows as cached stages, on a tiny model (not the benchmark): figures equal to the
    WER of the transcripts they wrote; a second call re-uses both; a new learned-reward model reruns
    only its own row."""
    import rlnf.commands
    from rlnf.demo import Stages
    from rlnf.metrics import corpus_error_rate, normalize_text

    quality = load_quality()
    base = {"data": {"heldout_test": corpus["heldout_test"], "sha256": "corpus"}, "start": pretrained_tiny_nemo,
            "start_stage": {"output": pretrained_tiny_nemo, "sha256": "adapted"}}
    learned = {"last_checkpoint": pretrained_tiny_nemo, "sha256": "rl"}
    shared, seeded = Stages(tmp_path, fresh=False), Stages(tmp_path / "seed_43", fresh=False)
    results = quality.suta_runs(shared, seeded, base, learned, "cpu", {"steps": 1})
    assert set(results) == {"suta", "rl_learned_reward+suta"}
    for name, result in results.items():
        rows = [json.loads(line) for line in open(result["output_manifest"])]
        assert result["wer"] == pytest.approx(corpus_error_rate(
            [normalize_text(row["text"], lowercase=True) for row in rows], [row["pred_text"] for row in rows], "word"))
        assert result["seconds"] > 0 and set(result["greedy"]) == {"wer", "cer"}
    assert (tmp_path / "suta" / "hyps.json").exists() and (tmp_path / "seed_43" / "rl_learned_reward+suta").is_dir()

    def fail(*args, **kwargs):
        raise AssertionError("a cached SUTA stage ran again")

    monkeypatch.setattr(rlnf.commands, "adapt_suta", fail)
    again = quality.suta_runs(Stages(tmp_path, fresh=False), Stages(tmp_path / "seed_43", fresh=False), base,
                              learned, "cpu", {"steps": 1})
    assert again == {name: {**result, "seconds": pytest.approx(result["seconds"])} for name, result in results.items()}
    with pytest.raises(AssertionError, match="ran again"):  # a new RL model: its row reruns
        quality.suta_runs(Stages(tmp_path, fresh=False), Stages(tmp_path / "seed_43", fresh=False), base,
                          {**learned, "sha256": "rl2"}, "cpu", {"steps": 1})
