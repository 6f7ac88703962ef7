#!/usr/bin/env python
"""Seeded learning-quality benchmark: the demo's comparison over several seeds, as mean +- std.

    python scripts/quality.py                       # 3 seeds, in the demo's folder (demo_output/)
    python scripts/quality.py --seeds 5 --json quality.json --png quality.png
    python scripts/quality.py --presets grpo,rloo,reinforce,ppo,mwer   # compare RL presets too

It re-uses the demo's folder: the corpus, the starting policy, the scored pairs and the pseudo-labels
(stages it finds missing run first, exactly as `rlnf demo` runs them). Seed i (trainer.seed 42 + i;
the first one is the demo's own runs, re-used when cached) retrains the reward model and reruns RL
with the learned reward (no transcripts), RL with 1 - CER (the oracle), continued supervised
training and self-training (the held-out runs' start's greedy transcripts of the same untranscribed audio
the learned-reward run sees, as labels). Every run has the demo's wall-clock budget, so run it on an
otherwise idle machine, or give --rl-steps (the RL runs then stop after that many steps, whatever
the machine's load; the supervised baselines keep their minutes). The test sets are read by the final
evaluation of each seed only: nothing is chosen on them.

Two test sets, every run on both: the held-out voice's test sentences (in-domain: the Bible text of
pretraining, pairs and RL) and the other-text set (the held-out voice reading rlnf/data/everyday_sentences.txt,
stage other_text_corpus, used for nothing else).

"targets" (``issue_targets``): the learned-reward run against every unsupervised baseline (suta,
self_training, batchnorm_adapted) per seed on both test sets, its mean test WER's relative margin below the
best of them, and whether RL with 1 - CER beat the continued CTC fine-tune by 5 % on every seed;
"variant_targets": the same for each --variant's learned-reward run, by run name. --markdown
writes the runs' table as the docs' results page shows it.

Reported per run: the relative change of test WER and CER against the pretrained policy (negative when
they fall) on each test set, per seed and mean +- std over seeds (JSON: runs[name]["wer_change_per_seed"],
["other_text_wer_change_per_seed"], ...); "seconds": the mean over seeds of the run's stage wall-clock
seconds (training or adaptation, as it ran; "seconds_per_seed" each); the oracle-gap fraction (WER_pre - WER_run) / (WER_pre - WER_cer);
for the reward model, the within-clip Spearman on the held-out voice's own policy hypotheses and its
audio gain (the same with every clip's transcripts scored against another clip's audio); and, for the
learned-reward run, the largest rise of its validation WER while its validation reward rose.

With the demo's adapt_batchnorm (the default), the held-out voice's runs (both RL runs and
self-training) start from the starting policy with its BatchNorm statistics re-estimated on that
voice's untranscribed audio; that model is the row "batchnorm_adapted" (the same for every seed), and
the oracle-gap fraction is also given from it (what RL itself added).

SUTA rows (``--no-suta`` leaves them out): "suta" is single-utterance test-time adaptation
(``rlnf adapt suta``, its default settings, chosen on the held-out voice's validation set) of the
held-out runs' start on the test sentences, the same for every seed; "rl_learned_reward+suta" applies
it to each seed's learned-reward RL model (``--no-suta-after-rl`` leaves it out). Each is a cached stage;
its "seconds" is the SUTA pass over the in-domain test set alone (one more pass, its own stage
NAME-other_text, transcribes the other-text set).

Supervised baselines (``--no-supervised-baselines`` leaves them out), per seed, on the held-out voice's
training transcripts (the oracle's data): "ctc_finetune_heldout", train_ctc from the RL runs' start to
convergence (early stopping on the validation WER: settings ctc_finetune_val_every, ctc_finetune_patience,
ctc_finetune_max_minutes, ctc_finetune_max_steps), evaluated at its best checkpoint; from there, for the
RL runs' budget, "ctc_finetune_heldout+more" (train_ctc continued) and "ctc_finetune_heldout+rl_cer" (RL
with 1 - CER): rl_cer_beats_more_every_seed and rl_cer_vs_more_gap_mean/std/per_seed (relative test WER
gap, negative when RL is lower). See ``supervised_baselines``. --supervised-extra-sentences N gives them (not
the oracle) more transcripts than the 560 clips they fit almost perfectly: that voice also reading N more
sentences of the shipped text (stage heldout_extra_corpus, shared by the seeds; rows
ctc_finetune_heldout-extraN, -extraN+more and -extraN+rl_cer). The setting ctc_finetune_more_lr X continues
at that rate rather than supervised_lr (the row ...+more-lrX), so that it can run at a rate chosen on validation.

--start strong runs the same comparison from a stronger starting policy (rlnf.demo.STRONG_START: a 5M-parameter
QuartzNet with SpecAugment, pretrained for an hour on the corpus's training voices plus 5,000 more sentences and 5
more voices, stage pretrain_corpus, then 1,500 steps of cosine decay, stage pretrain_decay; its held-out runs start
from the policy itself, so no batchnorm_adapted row, and its learned-reward run is RL after self-training scored
by the reward model listening-asr, whose ears are the start's encoder), in its own folder (demo_output_strong):
the corpus, the held-out voice and both test sets are the demo's. The JSON's "start" names the start and
"start_train_voices_wer" (stage start_train_voices) is the pretrained policy's WER on its training voices' test
sentences, for either start.

--presets adds, per seed, the two RL runs (learned reward, 1 - CER) of every other preset named,
against the same reward model: runs "rl_learned_reward-PRESET" and "rl_cer_reward-PRESET".

--variant NAME=JSON (repeatable) adds, per seed, one learned-reward RL run "rl_learned_reward-NAME" with
the demo's settings overridden by JSON (keys of rlnf.demo.SETTINGS, e.g. {"rl_kl_coef": 0.2}); its
"reward_model" ("listening", the demo's, "card" or "listening-asr") names the reward model that scores
it, trained per seed like the demo's. --other-reward-model is the variant named after the demo's other reward model.
Choose among variants on their final validation WER (the held-out voice's validation set), never on
the test columns.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rlnf.demo import (ADAPTED, REWARD_MODELS, RL_SETTINGS, STRONG_START, SUTA_ROW,  # neither torch nor NeMo
                       check_reward_model, check_settings)
from rlnf.errors import ConfigError

BASE_SEED = 42  # the demo's run_seed
SUTA = SUTA_ROW  # the demo's own row
SUTA_AFTER_RL = "rl_learned_reward+suta"
CTC_CONVERGED = "ctc_finetune_heldout"  # supervised CTC on the held-out voice's transcripts, to convergence
CTC_MORE = "ctc_finetune_heldout+more"  # ... continued for the RL runs' budget
CTC_RL = "ctc_finetune_heldout+rl_cer"  # ... RL with 1 - CER for the same budget instead
SUPERVISED_BASELINES = (CTC_CONVERGED, CTC_MORE, CTC_RL)  # their names with the oracle's transcripts alone
STARTS = {"demo": "demo_output", "strong": "demo_output_strong"}  # --start: its default folder


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value; NaN when a value is NaN, e.g. an undefined fraction)."""
    if any(math.isnan(value) for value in values):
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def finite_or_null(value: Any) -> Any:
    """NaN and infinities as null, so the JSON is valid for every reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [finite_or_null(item) for item in value]
    return value


def largest_wer_rise_while_reward_rose(rows: list[dict[str, Any]]) -> float:
    """Over consecutive validations of one run: the largest increase of val/wer between two
    validations where val/reward increased (0 when WER never rose with the reward)."""
    points = [(row["val/wer"], row["val/reward"]) for row in rows if "val/wer" in row and "val/reward" in row]
    rises = [wer - previous_wer for (previous_wer, previous_reward), (wer, reward) in zip(points, points[1:])
             if reward > previous_reward and wer > previous_wer]
    return max(rises, default=0.0)


def parse_variants(items: list[str], settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``NAME=JSON`` items as {name: {"settings": overrides, "reward_model": one of REWARD_MODELS}} (the
    reward model defaults to the demo's, ``settings["reward_model"]``);
    raises ValueError naming the item for a bad name, bad JSON or a key the demo has no setting for."""
    variants: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.replace("_", "").replace(".", "").isalnum() or name in variants:
            raise ValueError(f"--variant {item!r}: give NAME=JSON with a new name of letters, digits, '_' or '.'")
        try:
            overrides = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--variant {name}: bad JSON ({exc})") from None
        if not isinstance(overrides, dict):
            raise ValueError(f"--variant {name}: JSON must be an object of settings")
        reward_model = overrides.pop("reward_model", settings["reward_model"])
        try:
            check_reward_model(reward_model)
        except ConfigError as exc:
            raise ValueError(f"--variant {name}: {exc}") from None
        unknown = sorted(set(overrides) - set(settings))
        if unknown:
            raise ValueError(f"--variant {name}: unknown setting(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(settings))}")
        shared = sorted(set(overrides) - set(RL_SETTINGS))
        if shared:
            raise ValueError(f"--variant {name}: {', '.join(shared)} shape(s) what every run shares (corpus, starting "
                             f"policy, pairs, reward model); give it with --settings. A variant may change "
                             f"{', '.join(RL_SETTINGS)} and reward_model")
        try:  # the same checks as --settings, before any stage runs
            check_settings({**settings, **overrides})
        except ConfigError as exc:
            raise ValueError(f"--variant {name}: {exc}") from None
        variants[name] = {"settings": overrides, "reward_model": reward_model}
    return variants


def heldout_figures(per_seed: list[dict[str, Any]], key: str) -> dict[str, float]:
    """A reward model's listening figures on the held-out voice (per_seed[i][key]), mean +- std."""
    gain = mean_std([seed[key]["audio_gain"] for seed in per_seed])
    spearman = mean_std([seed[key]["group_spearman"] for seed in per_seed])
    return {"audio_gain_mean": gain[0], "audio_gain_std": gain[1],
            "heldout_group_spearman_mean": spearman[0], "heldout_group_spearman_std": spearman[1]}


def summarise(per_seed: list[dict[str, Any]], run_names: tuple[str, ...]) -> dict[str, Any]:
    """The benchmark's figures from each seed's results.

    per_seed[i]: {"seed", "wer": {run: WER}, "cer": {run: CER}, "reward_heldout": {"group_spearman",
    "audio_gain"}, "reward_val": {...}, "wer_rise": float, "final_val_wer": float}; "pretrained" is
    one of the runs. Optional: "other_text_wer" / "other_text_cer" (the same on the other-text test
    set: runs[name]["other_text_wer_change_per_seed"] ...), "seconds": {run: the stage's seconds}
    (runs[name]["seconds_per_seed"] and their mean "seconds"). Changes are relative: (x_run - x_pre) / x_pre."""
    runs: dict[str, Any] = {}
    for name in run_names:
        entry: dict[str, Any] = {}
        for test_set, prefix in (("", ""), ("other_text_", "other_text_")):
            if f"{test_set}wer" not in per_seed[0]:
                continue
            for metric in ("wer", "cer"):
                key = f"{test_set}{metric}"
                changes = [relative(seed[key][name], seed[key]["pretrained"]) for seed in per_seed]
                mean, std = mean_std(changes)
                entry.update({f"{prefix}{metric}_change_mean": mean, f"{prefix}{metric}_change_std": std,
                              f"{prefix}{metric}_change_per_seed": changes,
                              f"{prefix}{metric}_mean": statistics.fmean(seed[key][name] for seed in per_seed)})
        if name in per_seed[0].get("seconds", {}):  # the stage's own wall-clock seconds, per seed
            entry["seconds_per_seed"] = [seed["seconds"][name] for seed in per_seed]
            entry["seconds"] = statistics.fmean(entry["seconds_per_seed"])
        if name in per_seed[0].get("val_wer", {}):  # RL runs: their last validation, and the steps they made
            val = mean_std([seed["val_wer"][name] for seed in per_seed])
            entry.update({"final_val_wer_mean": val[0], "final_val_wer_std": val[1],
                          "steps_per_seed": [seed["steps"][name] for seed in per_seed]})
        runs[name] = entry
    def oracle_fractions(start: str) -> list[float]:
        return [(seed["wer"][start] - seed["wer"]["rl_learned_reward"]) / (seed["wer"][start] - seed["wer"]["rl_cer_reward"])
                if seed["wer"][start] != seed["wer"]["rl_cer_reward"] else float("nan") for seed in per_seed]

    fractions = oracle_fractions("pretrained")
    fraction_mean, fraction_std = mean_std(fractions)
    adapted = {}
    if ADAPTED in run_names:  # the RL runs started from the BatchNorm-adapted policy: what RL itself added
        from_mean, from_std = mean_std(oracle_fractions(ADAPTED))
        adapted = {"oracle_fraction_from_adapted_mean": from_mean, "oracle_fraction_from_adapted_std": from_std,
                   "learned_beats_adapted_every_seed": all(
                       seed["wer"]["rl_learned_reward"] < seed["wer"][ADAPTED] for seed in per_seed)}
    if SUTA in run_names:
        adapted["learned_beats_suta_every_seed"] = all(
            seed["wer"]["rl_learned_reward"] < seed["wer"][SUTA] for seed in per_seed)
    if supervised_pair(run_names):  # does sequence-level RL add to converged supervised fine-tuning?
        adapted.update(rl_after_supervised(per_seed, run_names))
    final_val = mean_std([seed["final_val_wer"] for seed in per_seed])
    # The reference of every change: the pretrained policy's figures, and its pretraining's seconds.
    pretrained = {key: statistics.fmean(seed[key]["pretrained"] for seed in per_seed)
                  for key in ("wer", "cer", "other_text_wer", "other_text_cer") if key in per_seed[0]}
    if "pretrained" in per_seed[0].get("seconds", {}):
        pretrained["seconds"] = per_seed[0]["seconds"]["pretrained"]
    return {
        "seeds": len(per_seed),
        "seed_values": [seed["seed"] for seed in per_seed],
        "pretrained": pretrained,
        "runs": runs,
        "oracle_fraction_mean": fraction_mean,
        "oracle_fraction_std": fraction_std,
        "oracle_fraction_per_seed": fractions,
        **adapted,
        "learned_beats_self_training_every_seed": all(
            seed["wer"]["rl_learned_reward"] < seed["wer"]["self_training"] for seed in per_seed),
        "reward_model": {"name": per_seed[0].get("reward_model", "card"), **heldout_figures(per_seed, "reward_heldout"),
                         "val_group_spearman_mean": statistics.fmean(
                             seed["reward_val"].get("val/group_spearman", float("nan")) for seed in per_seed)},
        # The other reward model, when variants used it: "reward_model_card" or "reward_model_listening".
        **{f"reward_model_{model}": heldout_figures(per_seed, f"reward_heldout_{model}")
           for model in REWARD_MODELS if f"reward_heldout_{model}" in per_seed[0]},
        "learned_validation": {"largest_wer_rise_while_reward_rose": [seed["wer_rise"] for seed in per_seed],
                               "final_val_wer_mean": final_val[0], "final_val_wer_std": final_val[1]},
    }


UNSUPERVISED_BASELINES = (SUTA, "self_training", ADAPTED)  # what a user without transcripts runs instead


def issue_targets(per_seed: list[dict[str, Any]], run_names: tuple[str, ...], learned: str = "rl_learned_reward"
                  ) -> dict[str, Any]:
    """Issue 24's targets, as measured: ``learned`` against every unsupervised baseline present (SUTA,
    self-training, BatchNorm adaptation) per seed on each test set, and its mean in-domain WER's relative
    margin below the best baseline's mean (negative when below: the target is <= -0.05); RL with 1 - CER
    after converged CTC fine-tuning against more of it, per seed (target: every gap <= -0.05)."""
    baselines = [name for name in UNSUPERVISED_BASELINES if name in run_names]
    figures: dict[str, Any] = {"learned_run": learned, "baselines": baselines}
    for test_set in ("", "other_text_"):
        key = f"{test_set}wer"
        if key not in per_seed[0] or not baselines:
            continue
        figures[f"{test_set}learned_beats_every_baseline_every_seed"] = all(
            seed[key][learned] < seed[key][name] for seed in per_seed for name in baselines)
        means = {name: statistics.fmean(seed[key][name] for seed in per_seed) for name in (learned, *baselines)}
        best = min(baselines, key=means.get)
        figures[f"{test_set}best_baseline"] = best
        figures[f"{test_set}margin_below_best_baseline"] = relative(means[learned], means[best])
    if pair := supervised_pair(run_names):
        with_rl, more = pair
        gaps = [relative(seed["wer"][with_rl], seed["wer"][more]) for seed in per_seed]
        figures["rl_cer_beats_more_by_5_percent_every_seed"] = all(gap <= -0.05 for gap in gaps)
    return figures


def markdown_table(summary: dict[str, Any]) -> str:
    """The runs of ``summary`` as the docs' results table (Markdown, minus signs typeset): test WER mean,
    change per seed and mean +- std on each test set, final validation WER (RL runs), seconds."""
    def number(value: float, spec: str) -> str:
        return format(value, spec).replace("-", "\u2212")

    def change(run: dict[str, Any], prefix: str = "") -> str:
        if f"{prefix}wer_change_mean" not in run:
            return ""
        return (f"{number(100 * run[f'{prefix}wer_change_mean'], '+.1f')} ± "
                f"{number(100 * run[f'{prefix}wer_change_std'], '.1f')} %")

    lines = ["| run | test WER | change per seed | change, mean ± std | other-text change, mean ± std | "
             "final val WER | seconds |", "|---|---|---|---|---|---|---|"]
    for name, run in summary["runs"].items():
        per_seed = ", ".join(number(100 * value, "+.1f") for value in run["wer_change_per_seed"]) + " %"
        val = (f"{run['final_val_wer_mean']:.3f} ± {run['final_val_wer_std']:.3f}"
               if run.get("final_val_wer_mean") is not None else "")
        seconds = f"{run['seconds']:.0f}" if run.get("seconds") is not None else ""
        lines.append(f"| {name} | {run['wer_mean']:.3f} | {per_seed} | {change(run)} | {change(run, 'other_text_')} | "
                     f"{val} | {seconds} |")
    return "\n".join(lines) + "\n"


def relative(value: float, reference: float) -> float:
    """(value - reference) / reference: negative when ``value`` is lower (NaN for a reference of 0)."""
    return (value - reference) / reference if reference else float("nan")


def supervised_names(settings: dict[str, Any]) -> tuple[str, str, str]:
    """The supervised baselines' rows (CTC_CONVERGED, CTC_MORE, CTC_RL), in stages of those names: with
    ``ctc_finetune_extra_sentences`` N > 0 (more transcripts than the oracle's), named
    ctc_finetune_heldout-extraN, -extraN+more and -extraN+rl_cer; with ``ctc_finetune_more_lr`` X set, the
    continuation is ...+more-lrX."""
    extra, more_lr = settings["ctc_finetune_extra_sentences"], settings["ctc_finetune_more_lr"]
    stem = f"{CTC_CONVERGED}-extra{extra}" if extra else CTC_CONVERGED
    more = f"{stem}+more" + (f"-lr{more_lr:g}" if more_lr is not None else "")
    return stem, more, f"{stem}+rl_cer"


def supervised_evaluation(settings: dict[str, Any]) -> str:
    """The supervised baselines' evaluation stage: one per naming (``supervised_names``), so that each
    naming's cached evaluation stays: evaluate_supervised, then what the rows' names add to the defaults'."""
    converged, more, _ = supervised_names(settings)
    return "evaluate_supervised" + converged.removeprefix(CTC_CONVERGED) + more.removeprefix(converged + "+more")


def supervised_pair(run_names: tuple[str, ...]) -> tuple[str, str] | None:
    """(the RL run, the continuation) of the supervised baselines among ``run_names`` (any naming of
    ``supervised_names``; one naming at a time, as ``main`` builds them), or None."""
    with_rl = next((name for name in run_names if name.startswith(CTC_CONVERGED) and name.endswith("+rl_cer")), None)
    stem = with_rl and with_rl.removesuffix("+rl_cer")
    more = stem and next((name for name in run_names if name == f"{stem}+more" or name.startswith(f"{stem}+more-lr")),
                         None)
    return (with_rl, more) if more else None


def rl_after_supervised(per_seed: list[dict[str, Any]], run_names: tuple[str, ...]) -> dict[str, Any]:
    """The supervised baselines' RL run against their continuation (``supervised_pair``), the same extra
    budget from the same converged model: per seed the relative gap of test WER (WER_rl - WER_more) /
    WER_more (negative when RL is better), mean +- std, on each test set, and whether RL is below on every
    seed."""
    with_rl, more = supervised_pair(run_names)
    figures: dict[str, Any] = {"rl_cer_vs_more_runs": [with_rl, more]}
    for test_set in ("", "other_text_"):
        if f"{test_set}wer" not in per_seed[0]:
            continue
        gaps = [relative(seed[f"{test_set}wer"][with_rl], seed[f"{test_set}wer"][more]) for seed in per_seed]
        mean, std = mean_std(gaps)
        figures.update({f"{test_set}rl_cer_vs_more_gap_per_seed": gaps, f"{test_set}rl_cer_vs_more_gap_mean": mean,
                        f"{test_set}rl_cer_vs_more_gap_std": std,
                        f"{test_set}rl_cer_beats_more_every_seed": all(gap < 0 for gap in gaps)})
    return figures


def ctc_finetune_overrides(settings: dict[str, Any], folder: Path, policy: str, train_manifest: str,
                           val_manifest: str, minutes: float | None, max_steps: int | None,
                           patience: int | None, lr: float) -> list[str]:
    """``train_ctc`` overrides of the supervised baselines on the held-out voice's transcripts: from
    ``policy``, ``lr`` constant, batch 16, seeded by ``run_seed``, validating on
    ``val_manifest`` every ``ctc_finetune_val_every`` steps. ``patience``: early stopping
    (trainer.early_stop_patience), a checkpoint at every validation so checkpoints/best.nemo is the best
    validation WER; None: a continuation that saves at the end only."""
    every = settings["ctc_finetune_val_every"]
    return [f"output_dir={folder}", f"model.path={policy}", f"data.train_manifest={train_manifest}",
            f"data.val_manifest={val_manifest}", f"trainer.max_steps={max_steps or 100000}",
            f"trainer.max_minutes={'null' if minutes is None else minutes}",
            f"trainer.lr={lr}", "trainer.lr_schedule=constant",
            "trainer.warmup_steps=0", "trainer.batch_size=16",
            f"trainer.val_every={every}", f"trainer.save_every={every if patience else 0}", "trainer.log_every=10",
            "trainer.best_metric=val/wer", f"trainer.early_stop_patience={patience or 'null'}",
            f"trainer.seed={settings['run_seed']}"]


def supervised_baselines(stages, settings: dict[str, Any], base: dict[str, Any], shared=None
                         ) -> dict[str, dict[str, Any]]:
    """Three cached stages per seed, on the held-out voice's training transcripts (heldout_train, the
    oracle's data; with ``ctc_finetune_extra_sentences``, also that voice reading that many more sentences,
    ``rlnf.demo.heldout_extra_corpus``, a stage of ``shared``, the stages every seed shares (default:
    ``stages``), and the stages' names are ``supervised_names``'), validating on its validation set:

    CTC_CONVERGED  train_ctc from the RL runs' start (``base["start"]``) until the validation WER has not
                   improved for ``ctc_finetune_patience`` validations (every ``ctc_finetune_val_every``
                   steps), at most ``ctc_finetune_max_minutes`` (and ``ctc_finetune_max_steps`` when set);
                   evaluated at its best checkpoint (its "evaluated_checkpoint"), the converged model.
    CTC_RL         RL with the 1 - CER reward (the demo's RL settings, ``rlnf.demo.rl_overrides``) from
                   that checkpoint, on the same transcripts: ``rl_minutes``, or ``rl_steps`` steps.
    CTC_MORE       train_ctc continued from that checkpoint (at ``ctc_finetune_more_lr``, when set) for the
                   same extra budget: ``rl_minutes``; with ``rl_steps`` (a step budget RL and CTC cannot
                   share: an RL step samples and scores num_samples hypotheses per utterance) the
                   wall-clock seconds CTC_RL's stage took, so both get the same time on the same
                   machine (its model loading included: a little in the continuation's favour).
    Each is evaluated at its last checkpoint except CTC_CONVERGED."""
    from rlnf.demo import _run_recipe, content_key, heldout_extra_corpus, rl_keys, rl_overrides
    from rlnf.io import file_sha256

    data, seed = base["data"], settings["run_seed"]
    converged_name, more_name, rl_name = supervised_names(settings)
    extra = heldout_extra_corpus(shared or stages, settings, data) if settings["ctc_finetune_extra_sentences"] else {}
    train = extra.get("manifest", data["heldout_train"])
    limits = {"max_minutes": settings["ctc_finetune_max_minutes"], "max_steps": settings["ctc_finetune_max_steps"],
              "patience": settings["ctc_finetune_patience"], "val_every": settings["ctc_finetune_val_every"],
              "lr": settings["supervised_lr"], "seed": seed}

    def converge(folder: Path) -> dict[str, Any]:
        summary = _run_recipe("train_ctc", ctc_finetune_overrides(
            settings, folder, base["start"], train, data["heldout_val"],
            settings["ctc_finetune_max_minutes"], settings["ctc_finetune_max_steps"], settings["ctc_finetune_patience"],
            settings["supervised_lr"]))
        best = summary["best_checkpoint"] or summary["last_checkpoint"]
        # Its digest keys the two stages that start from it (see rlnf.demo.content_key).
        return {**summary, "evaluated_checkpoint": best, "sha256": file_sha256(best)}

    converged = stages.run(converged_name, {"policy": base["start_stage"], **content_key(data, "corpus"), **limits,
                                            **content_key(extra, "extra")}, converge)
    start = converged["evaluated_checkpoint"]
    keys = rl_keys(settings, learned=False)
    with_rl = stages.run(rl_name, {"policy": converged, **keys}, lambda folder: _run_recipe(
        "rl_finetune", rl_overrides(settings, start, data["heldout_val"], folder, train, "[{name: cer}]")))
    minutes = max(round(stages.timings[rl_name] / 60, 3), 0.001) if settings.get("rl_steps") else settings["rl_minutes"]
    more_lr = settings["supervised_lr"] if settings["ctc_finetune_more_lr"] is None else settings["ctc_finetune_more_lr"]
    more = stages.run(more_name, {"policy": converged, "minutes": minutes, "lr": more_lr,
                                  "val_every": settings["ctc_finetune_val_every"], "seed": seed},
                      lambda folder: _run_recipe("train_ctc", ctc_finetune_overrides(
                          settings, folder, start, train, data["heldout_val"], minutes, None, None, more_lr)))
    return {converged_name: converged, more_name: more, rl_name: with_rl}


def suta_runs(shared, stages, base: dict[str, Any], learned: dict[str, Any] | None, device: str,
              suta_settings: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Two cached stages of ``rlnf adapt suta`` on the held-out voice's test sentences
    (``rlnf.demo.suta_stage``, each also over the other-text set): SUTA from the held-out runs' start
    (``base["start"]``, in ``shared``: one for every seed, the demo's own row) and SUTA_AFTER_RL from the
    learned-reward run ``learned`` (a stage result, in this seed's ``stages``; None: SUTA alone).
    ``suta_settings`` overrides ``rlnf.config.suta.SUTAConfig``'s defaults. Returns {run: ``suta_stage``'s
    result}."""
    from rlnf.demo import suta_stage

    runs = {SUTA: suta_stage(shared, base, SUTA, base["start"], base["start_stage"], device, suta_settings)}
    if learned is not None:
        runs[SUTA_AFTER_RL] = suta_stage(stages, base, SUTA_AFTER_RL, learned["last_checkpoint"], learned, device,
                                         suta_settings)
    return runs


def rl_logs(stages, run_names: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """The RL runs' metrics.jsonl rows, each read where its stage's run is (``Stages.folder``: a run
    re-used from a sibling stage has its logs there, and its own folder may hold another key's run)."""
    from rlnf.metric_logging import read_metrics

    supervised_rl = (supervised_pair(run_names) or (None,))[0]
    return {name: read_metrics(stages.folder(name)) for name in run_names
            if (name.startswith("rl_") and name != SUTA_AFTER_RL) or name == supervised_rl}


def suta_rows(suta: bool, after_rl: bool) -> tuple[str, ...]:
    """The SUTA rows run: none (``--no-suta``), SUTA alone (``--no-suta-after-rl``) or both."""
    return ((SUTA, SUTA_AFTER_RL) if after_rl else (SUTA,)) if suta else ()


def start_train_voices(stages, base: dict[str, Any], device: str) -> dict[str, Any]:
    """Stage start_train_voices: the starting (pretrained) policy's greedy WER / CER on its training
    voices' test sentences (the corpus's "test": how strong the start is where it was trained)."""
    from rlnf.commands import evaluate

    return stages.run("start_train_voices", {"policy": base["pretrain"], "test": base["data"]["test"]},
                      lambda folder: evaluate(base["policy"], base["data"]["test"], output=str(folder / "pretrained.json"),
                                              device=device))


def print_table(summary: dict[str, Any]) -> None:
    print(f"\nstart: {summary.get('start', 'demo')} (pretrained WER on its training voices' test sentences "
          f"{summary.get('start_train_voices_wer', float('nan')):.3f})")
    print(f"{summary['seeds']} seeds {summary['seed_values']}; held-out voice test set; changes relative to the "
          "pretrained policy, mean +- std")
    width = max([40, *map(len, summary["runs"])])
    print(f"{'run':<{width}} {'WER':>7} {'WER change':>18} {'CER change':>18} {'other-text WER change':>22} "
          f"{'final val WER':>16} {'seconds':>8}  steps")
    for name, run in summary["runs"].items():
        val = f"{run['final_val_wer_mean']:.3f} +- {run['final_val_wer_std']:.3f}" if "final_val_wer_mean" in run else ""
        other = (f"{100 * run['other_text_wer_change_mean']:+8.1f} +- {100 * run['other_text_wer_change_std']:4.1f} %"
                 if "other_text_wer_change_mean" in run else "")
        seconds = f"{run['seconds']:8.0f}" if "seconds" in run else f"{'':>8}"
        print(f"{name:<{width}} {run['wer_mean']:7.3f} {100 * run['wer_change_mean']:+8.1f} +- {100 * run['wer_change_std']:4.1f} % "
              f"{100 * run['cer_change_mean']:+8.1f} +- {100 * run['cer_change_std']:4.1f} % {other:>22} {val:>16} "
              f"{seconds}  {run.get('steps_per_seed', '')}")
    reward = summary["reward_model"]
    print(f"oracle-gap fraction of rl_learned_reward: {summary['oracle_fraction_mean']:.2f} +- "
          f"{summary['oracle_fraction_std']:.2f}; beats self-training on every seed: "
          f"{summary['learned_beats_self_training_every_seed']}")
    if "learned_beats_suta_every_seed" in summary:
        print(f"rl_learned_reward beats {SUTA} on every seed: {summary['learned_beats_suta_every_seed']}")
    if "rl_cer_beats_more_every_seed" in summary:
        with_rl, more = summary["rl_cer_vs_more_runs"]
        print(f"{with_rl} against {more}: test WER {100 * summary['rl_cer_vs_more_gap_mean']:+.1f} +- "
              f"{100 * summary['rl_cer_vs_more_gap_std']:.1f} % (relative), below on every seed: "
              f"{summary['rl_cer_beats_more_every_seed']}")
    if "oracle_fraction_from_adapted_mean" in summary:
        print(f"from the {ADAPTED} start: oracle-gap fraction {summary['oracle_fraction_from_adapted_mean']:.2f} +- "
              f"{summary['oracle_fraction_from_adapted_std']:.2f}; beats {ADAPTED} on every seed: "
              f"{summary['learned_beats_adapted_every_seed']}")
    others = [(f"{model} reward model (variants)", summary.get(f"reward_model_{model}")) for model in REWARD_MODELS]
    for name, figures in ((f"{reward['name']} reward model (rl_learned_reward's)", reward), *others):
        if figures:
            print(f"{name} on the held-out voice's hypotheses: within-clip Spearman "
                  f"{figures['heldout_group_spearman_mean']:.3f} +- {figures['heldout_group_spearman_std']:.3f}, "
                  f"audio gain {figures['audio_gain_mean']:+.3f} +- {figures['audio_gain_std']:.3f}")
    validation = summary["learned_validation"]
    print(f"rl_learned_reward validation: largest WER rise while the reward rose per seed "
          f"{[round(x, 3) for x in validation['largest_wer_rise_while_reward_rose']]}; final val WER "
          f"{validation['final_val_wer_mean']:.3f} +- {validation['final_val_wer_std']:.3f} across seeds")


def plot(summary: dict[str, Any], curves: dict[int, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    names = list(summary["runs"])
    for x, name in enumerate(names):
        run = summary["runs"][name]
        left.bar(x, 100 * run["wer_change_mean"], yerr=100 * run["wer_change_std"], capsize=4, alpha=0.6)
        left.scatter([x] * len(run["wer_change_per_seed"]), [100 * c for c in run["wer_change_per_seed"]],
                     color="black", s=12, zorder=3)
    left.axhline(0, color="grey", linewidth=0.8)
    left.set_xticks(range(len(names)), names, rotation=20, fontsize="small")
    left.set(title=f"Test WER change over {summary['seeds']} seeds (mean +- std, dots: seeds)", ylabel="%")
    for seed, points in curves.items():
        if points:
            right.plot(*zip(*points), marker="o", label=f"seed {seed}")
    right.set(title="rl_learned_reward: validation WER", xlabel="step", ylabel="WER")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    right.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="the demo's folder (default: demo_output, or demo_output_strong with "
                                         "--start strong)")
    parser.add_argument("--start", choices=STARTS, default="demo",
                        help="the starting policy: the demo's (a 0.5M-parameter QuartzNet, 4.5 minutes of "
                             "pretraining) or 'strong' (rlnf.demo.STRONG_START: 5M parameters, SpecAugment, "
                             "more text and voices, an hour of pretraining then 1,500 steps of decay, no "
                             "BatchNorm adaptation, learned-reward RL after self-training scored by the "
                             "listening-asr reward model; the same corpus and test sets)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--markdown", help="write the runs' table (the docs' results table) to this Markdown file")
    parser.add_argument("--png", help="write the plot here (default: OUTPUT/quality/quality.png)")
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="the demo's budget (scales every run)")
    parser.add_argument("--settings", default="{}", help="JSON overrides of rlnf.demo.SETTINGS (e.g. smaller runs)")
    parser.add_argument("--rl-steps", type=int, help="RL runs stop after this many steps rather than the demo's "
                                                      "minutes: figures a busy machine cannot change")
    parser.add_argument("--other-reward-model", action="store_true",
                        help="also train, per seed, another reward model (the first of listening, card, "
                             "listening-asr that the run's own is not: card for the demo's listening, "
                             "listening for --start strong's listening-asr) and run RL with it: run "
                             "rl_learned_reward-MODEL")
    parser.add_argument("--presets", default="", help="also run RL with these presets, comma-separated (e.g. "
                                                      "rloo,reinforce,ppo,mwer); the demo's grpo always runs")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help='also run learned-reward RL with these demo settings (repeatable), e.g. '
                             'kl02=\'{"rl_kl_coef": 0.2}\'; add "reward_model": "card", "listening" or "listening-asr" to score '
                             'with that reward model (default: the demo\'s): run rl_learned_reward-NAME')
    parser.add_argument("--no-suta", dest="suta", action="store_false",
                        help=f"leave out the {SUTA} and {SUTA_AFTER_RL} rows (SUTA on the test sentences)")
    parser.add_argument("--no-suta-after-rl", dest="suta_after_rl", action="store_false",
                        help=f"leave out the {SUTA_AFTER_RL} row (SUTA of each seed's learned-reward model, "
                             f"a SUTA pass per seed) and keep {SUTA}")
    parser.add_argument("--no-supervised-baselines", dest="supervised_baselines", action="store_false",
                        help=f"leave out the {', '.join(SUPERVISED_BASELINES)} rows (supervised CTC fine-tuning on "
                             "the held-out voice's transcripts, then RL with 1 - CER or more of it)")
    parser.add_argument("--supervised-extra-sentences", type=int, metavar="N",
                        help="the supervised baselines (not the oracle) also train on the held-out voice reading N "
                             "more sentences (setting ctc_finetune_extra_sentences; at most 5200 with the demo's "
                             f"corpus): rows {CTC_CONVERGED}-extraN, -extraN+more, -extraN+rl_cer; for thousands, "
                             "raise ctc_finetune_val_every and ctc_finetune_max_minutes with --settings")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    if args.supervised_extra_sentences is not None and not args.supervised_baselines:
        parser.error("--supervised-extra-sentences gives the supervised baselines more transcripts: it has no use "
                     "with --no-supervised-baselines")

    import torch

    from rlnf.cli import quiet_nemo, setup_logging
    from rlnf.config import ALGORITHM_NAMES
    from rlnf.demo import (Stages, evaluate_runs, prepare, pretrain_seconds, rl_runs, run_names as demo_runs,
                           run_seconds, scaled_settings, train_reward, trained_runs)

    setup_logging()
    quiet_nemo()
    started = time.perf_counter()
    root = Path(args.output or STARTS[args.start]).expanduser().resolve()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        extra = {} if args.supervised_extra_sentences is None else {
            "ctc_finetune_extra_sentences": args.supervised_extra_sentences}
        settings = scaled_settings(args.budget_minutes, {**(STRONG_START if args.start == "strong" else {}),
                                                         **json.loads(args.settings), **extra})
    except (ValueError, ConfigError) as exc:
        parser.error(f"{'--supervised-extra-sentences or ' if extra else ''}--settings: {exc}")
    if args.rl_steps:
        settings["rl_steps"] = args.rl_steps
    presets = [name for name in args.presets.split(",") if name and name != settings["rl_algorithm"]]
    unknown = sorted(set(presets) - set(ALGORITHM_NAMES))
    if unknown:
        parser.error(f"--presets: unknown {', '.join(unknown)}; choose from {', '.join(ALGORITHM_NAMES)}")
    # --other-reward-model is the variant named after that model: the demo's settings, scored by it.
    other = next(model for model in REWARD_MODELS if model != settings["reward_model"])
    other_item = [f'{other}={{"reward_model": "{other}"}}'] if args.other_reward_model else []
    try:
        variants = parse_variants(other_item + args.variant, settings)
    except ValueError as exc:
        parser.error(f"{exc} (--other-reward-model is the variant named '{other}')" if other_item else str(exc))
    run_names = (*demo_runs(settings)[1:], *[f"{run}-{preset}" for preset in presets
                                  for run in ("rl_learned_reward", "rl_cer_reward")],
                 *[f"rl_learned_reward-{name}" for name in variants], *suta_rows(args.suta, args.suta_after_rl),
                 *(supervised_names(settings) if args.supervised_baselines else ()))
    shared = Stages(root, fresh=False)
    base = prepare(shared, settings)
    start_check = start_train_voices(shared, base, device)
    per_seed, curves, every_stages = [], {}, [shared]
    for index in range(args.seeds):
        seed = BASE_SEED + index
        folder = root if index == 0 else root / "quality" / f"seed_{seed}"  # seed 42: the demo's own runs
        stages = Stages(folder, fresh=False)
        every_stages.append(stages)
        seeded = {**settings, "run_seed": seed}
        print(f"[quality] seed {seed} ({index + 1}/{args.seeds}) in {folder}", flush=True)
        reward = train_reward(stages, seeded, base)
        runs = trained_runs(stages, seeded, base, reward)
        produced = dict(runs)  # every run's stage result, for its cost (run_seconds)
        results = evaluate_runs(stages, base, reward, runs, device)
        if presets:
            others = {}
            for preset in presets:
                others.update(rl_runs(stages, {**seeded, "rl_algorithm": preset}, base, reward, suffix=f"-{preset}"))
            produced.update(others)
            results.update(evaluate_runs(stages, base, reward, others, device, name="evaluate_presets", baselines=False))
        scorers = {settings["reward_model"]: reward}
        for model in sorted({variant["reward_model"] for variant in variants.values()} - set(scorers)):
            scorers[model] = train_reward(stages, seeded, base, model)
        for name, variant in variants.items():  # test WER/CER; each reward model is judged on held-out pairs
            scorer = scorers[variant["reward_model"]]
            tried = rl_runs(stages, {**seeded, **variant["settings"]}, base, scorer, suffix=f"-{name}", oracle=False,
                            model=variant["reward_model"])
            produced.update(tried)
            results.update(evaluate_runs(stages, base, reward, tried, device, name=f"evaluate_variant-{name}",
                                         baselines=False))
        if args.supervised_baselines:
            supervised = supervised_baselines(stages, seeded, base, shared)
            produced.update(supervised)
            results.update(evaluate_runs(stages, base, reward, supervised, device,
                                         name=supervised_evaluation(settings), baselines=False))
        # Every run's cost: its stages' wall-clock seconds as they ran (cached stages: as recorded then).
        seconds = {name: run_seconds(stages, name, produced.get(name)) if name in stages.timings
                   else shared.timings.get(name) for name in run_names}
        seconds["pretrained"] = pretrain_seconds(shared)
        if args.suta:
            tta = suta_runs(shared, stages, base, runs["rl_learned_reward"] if args.suta_after_rl else None, device)
            results.update(tta)
            seconds.update({name: result["seconds"] for name, result in tta.items()})
        rl_rows = rl_logs(stages, run_names)
        rows = rl_rows["rl_learned_reward"]
        curves[seed] = [(row["step"], row["val/wer"]) for row in rows if "val/wer" in row]
        per_seed.append({
            "steps": {name: max((row["step"] for row in rows_), default=0) for name, rows_ in rl_rows.items()},
            "val_wer": {name: next((row["val/wer"] for row in reversed(rows_) if "val/wer" in row), float("nan"))
                        for name, rows_ in rl_rows.items()},
            "seed": seed,
            "seconds": seconds,
            "wer": {name: results[name]["wer"] for name in ("pretrained", *run_names)},
            "cer": {name: results[name]["cer"] for name in ("pretrained", *run_names)},
            "other_text_wer": {name: results[name]["other_text"]["wer"] for name in ("pretrained", *run_names)},
            "other_text_cer": {name: results[name]["other_text"]["cer"] for name in ("pretrained", *run_names)},
            "reward_heldout": reward["heldout"],
            "reward_model": settings["reward_model"],
            **{f"reward_heldout_{model}": scorer["heldout"] for model, scorer in scorers.items()
               if model != settings["reward_model"]},
            "reward_val": {k: v for k, v in reward["final_metrics"].items() if k.startswith("val/")},
            "wer_rise": largest_wer_rise_while_reward_rose(rows),
            "final_val_wer": curves[seed][-1][1] if curves[seed] else float("nan"),
        })
    summary = summarise(per_seed, run_names)
    summary["targets"] = issue_targets(per_seed, run_names)
    # The same for each variant of the learned-reward run (another way to reach the first target).
    summary["variant_targets"] = {f"rl_learned_reward-{name}": issue_targets(per_seed, run_names, f"rl_learned_reward-{name}")
                                  for name in variants}
    summary.update({"start": args.start, "start_train_voices_wer": start_check["wer"],
                    "start_train_voices_cer": start_check["cer"], "per_seed": per_seed})
    summary["seconds"] = round(time.perf_counter() - started, 1)  # this invocation (cached stages are free)
    # Every stage's own time as it ran, cached or not: the cost of the whole benchmark from scratch.
    summary["stage_seconds"] = round(sum(each.seconds() for each in every_stages), 1)
    summary["device"] = device
    print_table(summary)
    for targets in (summary["targets"], *summary["variant_targets"].values()):
        if "margin_below_best_baseline" in targets:
            print(f"{targets['learned_run']} against {', '.join(targets['baselines'])}: below every one on every seed "
                  f"{targets['learned_beats_every_baseline_every_seed']} (other-text set "
                  f"{targets.get('other_text_learned_beats_every_baseline_every_seed')}); mean test WER "
                  f"{100 * targets['margin_below_best_baseline']:+.1f} % against the best, {targets['best_baseline']}")
    png = Path(args.png) if args.png else root / "quality" / "quality.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(summary, curves, png)
    print(f"plot: {png}; {summary['seconds'] / 60:.1f} min this time, {summary['stage_seconds'] / 60:.1f} min of "
          "stages in all")
    if args.json:
        Path(args.json).write_text(json.dumps(finite_or_null(summary), indent=2))
        print(f"figures: {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(summary))
        print(f"table: {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
