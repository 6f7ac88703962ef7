"""The `rlnf evaluate`, `rlnf score` and `rlnf adapt-batchnorm` commands, callable from Python too."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rlnf.io import atomic_write_text, check_output_file


def evaluate(model: str, manifest: str, reward: str | None = None, output: str | None = None,
             batch_size: int = 16, device: str = "auto", text_key: str = "text") -> dict[str, Any]:
    """Greedy transcripts of ``manifest`` by ``model``; corpus WER/CER against its references and the
    mean reward of ``reward`` (a checkpoint folder) when given. Writes OUT.json and OUT.transcripts.jsonl."""
    from rlnf.config import DataConfig
    from rlnf.data.loader import AudioDataset
    from rlnf.evaluation import evaluate_policy
    from rlnf.policy import CTCPolicy
    from rlnf.recipe_utils import load_utterances
    from rlnf.rewards import RewardSet, WeightedReward
    from rlnf.training import resolve_device

    if output:  # refused now, not after every clip is transcribed
        for path in (Path(output), Path(output).with_suffix(".transcripts.jsonl")):
            check_output_file("--output", path, {"manifest": manifest, "model": model})
    torch_device = resolve_device(device, "--device")
    # The recipes' own reading: references lower-cased and whitespace-normalised (data.lowercase's
    # default), so this WER equals the val/wer a recipe logs for the same model and manifest.
    utterances, _ = load_utterances(DataConfig(train_manifest=manifest, text_key=text_key), manifest, False)
    policy = CTCPolicy.load(model, torch_device)
    rewards = None
    if reward:
        from rlnf.rewards.learned import LearnedReward

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

    return score_manifest(reward, manifest, text_keys=list(text_keys), output=output, batch_size=batch_size,
                          device=device)


def adapt_batchnorm(model: str, manifest: str, output: str, batch_size: int = 16, device: str = "auto") -> dict[str, Any]:
    """Test-time BatchNorm adaptation (``CTCPolicy.adapt_batchnorm``): ``model``'s encoder BatchNorm
    statistics re-estimated on the audio of ``manifest`` (no transcripts needed), written to ``output``
    (a .nemo; every weight unchanged). A starting point for RL or self-training on that audio."""
    from rlnf.config import DataConfig
    from rlnf.data.loader import AudioDataset, eval_batches
    from rlnf.errors import CheckpointError, DataError
    from rlnf.policy import CTCPolicy
    from rlnf.recipe_utils import load_utterances
    from rlnf.training import resolve_device

    out = check_output_file("--output", output, {"model": model, "manifest": manifest})
    torch_device = resolve_device(device, "--device")
    utterances, _ = load_utterances(DataConfig(train_manifest=manifest), manifest, False)
    policy = CTCPolicy.load(model, torch_device)
    try:
        counted = policy.adapt_batchnorm(eval_batches(AudioDataset(utterances, policy.sample_rate), batch_size))
    except CheckpointError as exc:
        raise CheckpointError(f"--model {model}: {exc}") from None
    except DataError as exc:
        raise DataError(f"--manifest {manifest}: {exc}") from None
    policy.save(out)
    return {"model": model, "manifest": manifest, "output": str(out), **counted}
