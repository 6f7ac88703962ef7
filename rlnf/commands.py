"""The `rlnf evaluate`, `rlnf score`, `rlnf adapt-batchnorm` and `rlnf adapt suta` commands, callable from
Python too."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from rlnf.config.suta import SUTA_DEFAULTS, SUTAConfig
from rlnf.errors import CheckpointError, ConfigError, DataError
from rlnf.io import atomic_write_text, check_output_file, nemo_file_problem


@contextlib.contextmanager
def named(flag: str, value: str, kinds: tuple[type[Exception], ...] = (CheckpointError, DataError)) -> Iterator[None]:
    """An error of ``kinds`` raised inside names the flag that gave the file: '--model M: ...'
    ('--manifest: ...' when the message names the file already). The one way these commands say
    which input is wrong."""
    try:
        yield
    except kinds as exc:
        if str(exc).startswith(flag):
            raise
        message = f"{flag}: {exc}" if str(value) in str(exc) else f"{flag} {value}: {exc}"
        raise type(exc)(message) from exc.__cause__


def check_model(flag: str, model: str) -> None:
    """Refuse, naming ``flag``, a local model path that is no readable .nemo file (a folder gets the
    .nemo inside it to give instead), before anything is loaded."""
    problem = nemo_file_problem(model)
    if problem:
        raise CheckpointError(f"{flag} {model}: {problem}")


def evaluate(model: str, manifest: str, reward: str | None = None, output: str | None = None,
             batch_size: int = 16, device: str = "auto", text_key: str = "text") -> dict[str, Any]:
    """Greedy transcripts of ``manifest`` by ``model``; corpus WER/CER against its references and the
    mean reward of ``reward`` (a checkpoint folder) when given. Writes OUT.json and OUT.transcripts.jsonl."""
    model, manifest, reward, output = (None if value is None else os.fspath(value)
                                       for value in (model, manifest, reward, output))  # Path objects too
    if output:  # refused now, not after every clip is transcribed
        for path in (Path(output), Path(output).with_suffix(".transcripts.jsonl")):
            check_output_file("--output", path, {"manifest": manifest, "model": model})
    check_model("--model", model)  # these before torch and NeMo load
    from rlnf.config import DataConfig
    from rlnf.data.loader import AudioDataset
    from rlnf.evaluation import evaluate_policy
    from rlnf.policy import CTCPolicy
    from rlnf.recipe_utils import load_utterances
    from rlnf.rewards import RewardSet, WeightedReward
    from rlnf.training import resolve_device

    torch_device = resolve_device(device, "--device")
    # The recipes' own reading: references lower-cased and whitespace-normalised (data.lowercase's
    # default), so this WER equals the val/wer a recipe logs for the same model and manifest.
    with named("--manifest", manifest):
        utterances, _ = load_utterances(DataConfig(train_manifest=manifest, text_key=text_key), manifest, False)
    with named("--model", model):
        policy = CTCPolicy.load(model, torch_device)
    rewards = None
    if reward:
        from rlnf.rewards.learned import LearnedReward

        with named("--reward", reward):
            rewards = RewardSet([WeightedReward("learned", 1.0, LearnedReward(reward, device=device))])
    result = evaluate_policy(policy, AudioDataset(utterances, policy.sample_rate), batch_size, torch_device, rewards)
    metrics = {"model": model, "manifest": manifest, **result.metrics, "n": len(result.rows)}
    if output:
        out = Path(output)
        transcripts = out.with_suffix(".transcripts.jsonl")
        atomic_write_text(transcripts, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in result.rows))
        metrics["transcripts"] = str(transcripts)
        atomic_write_text(out, json.dumps(metrics, indent=2))
    return metrics


def score(reward: str, manifest: str, text_keys: Sequence[str] = ("text",), output: str | None = None,
          batch_size: int = 64, device: str = "auto") -> dict[str, float]:
    """Score every (audio, text) pair of ``manifest`` with a reward checkpoint; returns mean score per key."""
    from rlnf.reward_model.scoring import score_manifest

    reward, manifest, output = (None if value is None else os.fspath(value) for value in (reward, manifest, output))

    return score_manifest(reward, manifest, text_keys=list(text_keys), output=output, batch_size=batch_size,
                          device=device)


def adapt_batchnorm(model: str, manifest: str, output: str, batch_size: int = 16, device: str = "auto") -> dict[str, Any]:
    """Test-time BatchNorm adaptation (``CTCPolicy.adapt_batchnorm``): ``model``'s encoder BatchNorm
    statistics re-estimated on the audio of ``manifest`` (no transcripts needed), written to ``output``
    (a .nemo; every weight unchanged). A starting point for RL or self-training on that audio."""
    model, manifest, output = os.fspath(model), os.fspath(manifest), os.fspath(output)
    out = check_output_file("--output", output, {"model": model, "manifest": manifest})
    check_model("--model", model)  # these before torch and NeMo load
    from rlnf.config import DataConfig
    from rlnf.data.loader import AudioDataset, eval_batches
    from rlnf.policy import CTCPolicy
    from rlnf.recipe_utils import load_utterances
    from rlnf.training import resolve_device

    torch_device = resolve_device(device, "--device")
    with named("--manifest", manifest):
        utterances, _ = load_utterances(DataConfig(train_manifest=manifest), manifest, False)
    with named("--model", model):
        policy = CTCPolicy.load(model, torch_device)
    batches = eval_batches(AudioDataset(utterances, policy.sample_rate), batch_size)
    # The model's side (no BatchNorm to adapt) or the audio's (none of it readable).
    with named("--model", model, (CheckpointError,)), named("--manifest", manifest, (DataError,)):
        counted = policy.adapt_batchnorm(batches)
    policy.save(out)
    return {"model": model, "manifest": manifest, "output": str(out), **counted}


def adapt_suta(model: str, manifest: str, output_manifest: str, steps: int = SUTA_DEFAULTS.steps,
               lr: float = SUTA_DEFAULTS.lr, temperature: float = SUTA_DEFAULTS.temperature,
               em_weight: float = SUTA_DEFAULTS.em_weight, params: str = SUTA_DEFAULTS.params,
               weight_decay: float = SUTA_DEFAULTS.weight_decay,
               exclude_blank_frames: bool = SUTA_DEFAULTS.exclude_blank_frames,
               mcc_reweight: bool = SUTA_DEFAULTS.mcc_reweight, batchnorm: str = SUTA_DEFAULTS.batchnorm,
               batch_size: int = 16, device: str = "auto", text_key: str = "text",
               force: bool = False) -> dict[str, Any]:
    """SUTA test-time adaptation (``rlnf.adaptation.suta_transcribe``): each utterance of ``manifest``
    transcribed greedily by ``model`` after ``steps`` steps of entropy + minimum-class-confusion
    minimisation on that utterance alone, the weights reset before the next. Writes ``output_manifest``:
    every input row with ``pred_text`` added, in the input's order. Returns a summary; when every row has
    a reference (``text_key``), the WER/CER of the adapted transcripts and of plain greedy decoding
    (as ``rlnf evaluate`` computes them, ``batch_size`` clips per pass) and the relative WER change."""
    check_model("--model", model)  # before torch and NeMo load
    import time

    from rlnf.adaptation import suta_transcribe
    from rlnf.config import DataConfig
    from rlnf.data.loader import AudioDataset
    from rlnf.evaluation import evaluate_policy, summarize
    from rlnf.policy import CTCPolicy
    from rlnf.recipe_utils import load_utterances
    from rlnf.training import resolve_device

    flags = {"steps": "--steps", "lr": "--lr", "temperature": "--temperature", "em_weight": "--em-weight",
             "params": "--params", "weight_decay": "--weight-decay", "batchnorm": "--batchnorm"}
    try:
        config = SUTAConfig(steps=steps, lr=lr, temperature=temperature, em_weight=em_weight, params=params,
                            weight_decay=weight_decay, exclude_blank_frames=exclude_blank_frames,
                            mcc_reweight=mcc_reweight, batchnorm=batchnorm)
    except ConfigError as exc:  # "steps=-1 must be >= 0" -> "--steps -1 must be >= 0"
        key, _, rest = str(exc).partition("=")
        raise ConfigError(f"{flags.get(key, key)} {rest}") from None
    out = check_output_file("--output-manifest", output_manifest, {"manifest": manifest, "model": model})
    if out.exists() and not force:
        raise ConfigError(f"--output-manifest {output_manifest} exists; pass --force to overwrite it, or choose "
                          "another file")
    torch_device = resolve_device(device, "--device")
    with named("--manifest", manifest):
        utterances, _ = load_utterances(DataConfig(train_manifest=manifest, text_key=text_key), manifest, False)
    with named("--model", model):
        policy = CTCPolicy.load(model, torch_device)
    dataset = AudioDataset(utterances, policy.sample_rate)
    summary: dict[str, Any] = {"model": model, "manifest": manifest, "output_manifest": str(out),
                               "n": len(utterances), "settings": vars(config).copy()}
    try:
        with named("--manifest", manifest, (DataError,)):  # a clip that cannot be read
            if all(utterance.text is not None for utterance in utterances):  # from the same, unadapted weights
                greedy = evaluate_policy(policy, dataset, batch_size, torch_device).metrics
                summary["greedy"] = {key: greedy[key] for key in ("wer", "cer")}
            started = time.perf_counter()
            result = suta_transcribe(policy, dataset, config, torch_device)
    except ConfigError as exc:  # --params names no parameter of this model
        raise ConfigError(f"--model {model}: {exc}".replace("params=", "--params ")) from None
    summary["seconds"] = round(time.perf_counter() - started, 3)
    if result.losses:
        summary["loss_before_adaptation"] = sum(losses[0] for losses in result.losses) / len(result.losses)
        summary["loss_after_adaptation"] = sum(losses[-1] for losses in result.losses) / len(result.losses)
    adapted = summarize(result.rows)
    if "greedy" in summary and "wer" in adapted:
        summary["suta"] = {key: adapted[key] for key in ("wer", "cer")}
        baseline = summary["greedy"]["wer"]
        summary["wer_change"] = (adapted["wer"] - baseline) / baseline if baseline > 0 else None
    lines = []
    for utterance, row in zip(utterances, result.rows, strict=True):
        lines.append(json.dumps({**utterance.fields, "pred_text": row["pred_text"]}, ensure_ascii=False) + "\n")
    atomic_write_text(out, "".join(lines))
    return summary


def scored_pairs(model: str, manifest: str, output: str, **options: Any) -> dict[str, Any]:
    """``rlnf data pairs``: ``rlnf.reward_model.pairs.write_scored_pairs`` with its errors naming
    ``--model`` and ``--manifest``. ``options``: that function's keyword arguments."""
    from rlnf.reward_model.pairs import write_scored_pairs

    model, manifest, output = (os.fspath(value) for value in (model, manifest, output))
    with named("--model", model, (CheckpointError,)), named("--manifest", manifest, (DataError,)):
        return write_scored_pairs(model, manifest, output, **options)
