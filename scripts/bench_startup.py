"""Start-up benchmark (``scripts/bench.py --startup MANIFEST`` or ``--startup-lines N``): seconds from
the start of a run's setup (``rl_finetune``, or ``train_ctc`` with ``--startup-recipe``) to the end of
its first step, cold (empty manifest cache) and warm
(the cache the cold run wrote), and the peak RSS, each in a fresh process.

The policy's loading is timed and subtracted (it does not grow with the corpus), and so are the
imports (NeMo's ~15 s). Audio headers come from the page cache after the first run on a machine:
"cold" means "rlnf's cache empty", not "disk cold". A generated manifest repeats ``--startup-clips``
distinct clips (0.5-3 s of noise) over N lines, as the issue-15 measurement did.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generate_manifest(folder: Path, lines: int, clips: int) -> Path:
    """``lines`` manifest rows cycling over ``clips`` generated WAV files (with text and duration)."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
    rows = []
    for index in range(clips):
        seconds = 0.5 + 2.5 * rng.random()
        path = folder / "clips" / f"{index // 1000:03d}" / f"clip{index:06d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        soundfile.write(str(path), rng.normal(0, 0.05, int(16000 * seconds)).astype(np.float32), 16000)
        text = " ".join(words[j] for j in rng.integers(0, len(words), 6))
        row = {"audio_filepath": str(path.relative_to(folder)), "duration": round(seconds, 4), "text": text}
        rows.append(json.dumps(row) + "\n")
    manifest = folder / f"startup_{lines}.json"
    with open(manifest, "w", encoding="utf-8") as handle:
        for line in range(lines):
            handle.write(rows[line % clips])
    return manifest


# Each recipe's settings for the probe: its module's recipe class, its config class, the key of the
# starting model and its own keys (a small RL step; train_ctc fine-tunes the same model).
RECIPES = {
    "rl_finetune": ("RLFinetuneRecipe", "RLFinetuneConfig", "policy.path",
                    ["algorithm.name=rloo", "algorithm.num_samples=4", "rewards=[{name: cer}]"]),
    "train_ctc": ("CTCTrainRecipe", "CTCTrainConfig", "model.path", []),
}


def probe(manifest: Path, policy: Path, output_dir: Path, cache: Path, overrides: list[str],
          recipe_name: str = "rl_finetune") -> dict:
    """In this fresh process: a recipe's setup and first step, timed; the policy loading timed apart."""
    import logging

    from rlnf.cli import quiet_nemo

    quiet_nemo()
    logging.getLogger("rlnf").setLevel(logging.ERROR)
    import rlnf.config
    import rlnf.policy
    from rlnf.config import DataConfig, load_config
    from rlnf.launcher import load_recipe

    loading = []
    original_load = rlnf.policy.CTCPolicy.load.__func__

    def timed_load(cls, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original_load(cls, *args, **kwargs)
        finally:
            loading.append(time.perf_counter() - started)

    rlnf.policy.CTCPolicy.load = classmethod(timed_load)
    class_name, config_name, model_key, own_keys = RECIPES[recipe_name]
    recipe_class = getattr(load_recipe(recipe_name), class_name)
    # (--startup-code may point at a checkout from before the cache existed, for the "before" figures)
    has_cache = any(f.name == "cache_dir" for f in dataclasses.fields(DataConfig))
    cache_key = [f"data.cache_dir={cache}"] if has_cache else []
    cfg = load_config(getattr(rlnf.config, config_name), None, [
        f"data.train_manifest={manifest}", f"{model_key}={policy}", f"output_dir={output_dir}", "trainer.device=cpu",
        "trainer.max_steps=1", "trainer.batch_size=8", "trainer.progress_bar=false", "trainer.loggers=[]",
        *own_keys, *cache_key, *overrides])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    started = time.perf_counter()
    recipe = recipe_class(cfg)
    recipe.setup()
    ready = time.perf_counter() - started
    steps_done = []
    original_step = recipe.train_step

    def timed_step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        steps_done.append(time.perf_counter() - started)
        return result

    recipe.train_step = timed_step
    recipe.train()  # and the final checkpoint, which is not timed
    recipe.logger.close()
    return {"ready_s": ready - sum(loading), "step1_s": steps_done[0] - sum(loading), "model_loading_s": sum(loading),
            "rss_before_gb": rss_before, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run_probe(manifest: Path, policy: Path, folder: Path, cache: Path, overrides: list[str], code_root: Path,
              recipe: str) -> dict:
    out = folder / "probe.json"
    command = [sys.executable, __file__, "--probe", str(manifest), str(policy), str(folder / "run"), str(cache),
               str(out), str(code_root), recipe, *overrides]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"start-up probe failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def measure_startup(manifest: str | None, lines: int, clips: int, overrides: list[str], code_root: Path = ROOT,
                    recipe: str = "rl_finetune") -> dict:
    """Cold then warm probe; prints a table and returns the figures."""
    sys.path.insert(0, str(ROOT))
    from rlnf.models import ENGLISH_LABELS, build_ctc_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        path = Path(manifest) if manifest else generate_manifest(folder, lines, clips)
        generated = time.perf_counter() - started
        policy = folder / "small.nemo"
        build_ctc_model(ENGLISH_LABELS, "small", seed=0).save_to(str(policy))
        with open(path, "rb") as handle:
            count = sum(1 for line in handle if line.strip())
        cache = folder / "cache"
        figures = {"recipe": recipe, "manifest": str(path), "lines": count, "overrides": overrides}
        for label in ("cold", "warm"):
            (folder / label).mkdir()
            figures[label] = run_probe(path, policy, folder / label, cache, overrides, code_root, recipe)
    print(f"\n{recipe} start-up on {figures['lines']:,} manifest lines"
          + (f" ({clips} distinct clips, generated in {generated:.0f} s)" if not manifest else "")
          + (f", {' '.join(overrides)}" if overrides else ""))
    print(f"{'':<8}{'to ready (s)':>14}{'to step 1 (s)':>15}{'model load (s)':>16}{'RSS before':>12}{'peak RSS':>10}"
          f"{'growth':>9}")
    for label in ("cold", "warm"):
        f = figures[label]
        print(f"{label:<8}{f['ready_s']:>14.1f}{f['step1_s']:>15.1f}{f['model_loading_s']:>16.1f}"
              f"{f['rss_before_gb']:>10.2f}GB{f['peak_rss_gb']:>8.2f}GB{f['peak_rss_gb'] - f['rss_before_gb']:>7.2f}GB")
    print("(seconds exclude imports and the policy's loading; 'cold' = rlnf's manifest cache empty)")
    return figures


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--probe":
    manifest_arg, policy_arg, run_arg, cache_arg, out_arg, root_arg, recipe_arg, *extra = sys.argv[2:]
    sys.path.insert(0, root_arg)
    Path(out_arg).write_text(json.dumps(probe(Path(manifest_arg), Path(policy_arg), Path(run_arg), Path(cache_arg),
                                              extra, recipe_arg)))
