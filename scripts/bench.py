#!/usr/bin/env python
"""Benchmark: what an RL step costs next to a supervised CTC step, measured side by side.

    python scripts/bench.py [--json bench.json] [--repeats 10] [--sizes small,15x5] [--full] [--floor]
    python scripts/bench.py --startup MANIFEST | --startup-lines 1000000 [--json startup.json] [key=value ...]

Every ratio compares two things timed ALTERNATELY in the same process (median of --repeats steps
after a warm-up step), on the same batch: 8 utterances of ~3 s speech, K = 8 samples each.
Figures 2 and 3 are measured on the first size (both are ratios of the same network's work, and
the naive rollout of 15x5 alone would take 4 minutes here); --full measures them on every size.
--floor also times the reference policy's forward pass, giving the floor of figure 1:
(supervised step + reference forward) / supervised step, and an RL step whose reference log-probs
come from rlnf's per-utterance cache (what every epoch after the first costs; figure 1 itself runs
the reference forward every step, as a first epoch does).
  1. RL step (rollout + learned-reward scoring + advantages + update, KL on) / supervised CTC step
  2. rollout with one shared encoder pass / naive rollout re-encoding K copies of each clip
  3. learned-reward scoring with audio-embedding reuse and duplicates scored once / every pair alone
  4. peak memory of the RL step / the supervised step (CPU: peak RSS of separate processes, also
     net of the memory both hold before their first step; CUDA: max_memory_allocated)
  5. reward-model throughput (pairs/s) and RL throughput (utterances/s, audio-seconds/s)
  6. how the RL step grows with K: its time at K = 1, 4, 8, 16, 32 as a ratio to K = 1 (advantage
     'none' so that K = 1 is valid; otherwise figure 1's step), every size; --k-repeats rounds
  7. --adapters DIM (measured alone, every size): figure 1's RL step training only policy.adapters=DIM
     linear adapters (reference = the same module with them off) next to full fine-tuning: step time
     (alternating) and peak memory (two processes, as figure 4)
  8. (--startup, scripts/bench_startup.py) seconds from an RL run's setup to its first step on a
     large manifest, cold and warm (manifest cache empty / filled), and the peak RSS; key=value
     arguments are recipe overrides (e.g. data.validate=lazy)
On CUDA the policy runs under bf16 autocast. Policies are built from config (no download).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
SENTENCES = [
    "and the lord spake unto moses saying", "behold the days come saith the lord of hosts",
    "and he went up into the mountain to pray", "for the word of god is quick and powerful",
    "and they gathered them together into a place", "then said jesus unto his disciples",
    "and it came to pass in those days", "blessed are the poor in spirit for theirs is the kingdom",
]


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


# A FastConformer-CTC of the published "small" shape (d_model 176, 16 layers, 4 heads, dw_striding x8;
# about 8.4 M parameters with characters), built from config like the QuartzNet sizes.
FASTCONFORMER = {"fastconformer": {"width": 176, "layers": 16, "heads": 4}}


def bench_model(size: str):
    """The policy of a bench size: a QuartzNet of rlnf.models.MODEL_SIZES, or FASTCONFORMER's."""
    from rlnf.models import ENGLISH_LABELS, build_ctc_model, build_family_model

    if size in FASTCONFORMER:
        return build_family_model("fastconformer", labels=ENGLISH_LABELS, seed=0, **FASTCONFORMER[size])
    return build_ctc_model(ENGLISH_LABELS, size, seed=0)


def fixture(folder: Path, size: str, device_name: str):
    """Speech (flite when available, else noise), a policy .nemo and a reward checkpoint in ``folder``
    (re-used when already there: the memory probes share the parent's)."""
    import shutil

    import numpy as np
    import soundfile

    from rlnf.reward_model.checkpoint import save_reward_folder, train_sentencepiece
    from rlnf.reward_model.modeling import RewardConfig, RewardModel
    from rlnf.reward_model.processor import RewardProcessor
    from rlnf.synth import Voice, load_sentences, synthesize

    manifest, nemo, reward = folder / "bench.json", folder / f"{size}.nemo", folder / "reward"
    if manifest.exists() and nemo.exists() and reward.exists():
        return manifest, nemo, reward
    rows = []
    for index, text in enumerate(SENTENCES):
        path = folder / f"utt{index}.wav"
        if shutil.which("flite"):
            synthesize(text, Voice("flite", ["kal16", "awb", "slt", "rms"][index % 4]), path)
        else:
            soundfile.write(str(path), np.random.default_rng(index).normal(0, 0.1, 48000).astype(np.float32), 16000)
        rows.append({"audio_filepath": str(path), "text": text})
    manifest = folder / "bench.json"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    nemo = folder / f"{size}.nemo"
    bench_model(size).save_to(str(nemo))
    tokenizer = train_sentencepiece(load_sentences(2000), folder / "spm", vocab_size=512)
    config = RewardConfig(vocab_size=512)
    processor = RewardProcessor(config, tokenizer)
    config.eos_token_id = processor.eos_id
    reward = save_reward_folder(RewardModel(config).eval(), processor, folder / "reward")
    return manifest, nemo, reward


COMMON = ["trainer.batch_size=8", "trainer.progress_bar=false", "data.shuffle=false", "trainer.lr=1e-5"]
K_VALUES = (1, 4, 8, 16, 32)


def build_rl_recipe(folder: Path, manifest: Path, nemo: Path, reward: Path, device_name: str, *extra: str):
    """Figure 1's RL recipe (rloo, K = 8, learned reward, KL on with the reference run every step),
    set up, with ``extra`` overrides."""
    from rlnf.config import RLFinetuneConfig, load_config
    from rlnf.launcher import load_recipe

    rl = load_recipe("rl_finetune").RLFinetuneRecipe(load_config(RLFinetuneConfig, None, COMMON + [
        f"data.train_manifest={manifest}", f"trainer.device={device_name}", f"policy.path={nemo}",
        f"output_dir={folder}", "algorithm.name=rloo", "algorithm.num_samples=8", "algorithm.kl_coef=0.01",
        "algorithm.reference_cache_mb=0", f"rewards=[{{name: learned, path: '{reward}', device: {device_name}}}]",
        *extra]))
    rl.setup()
    return rl


def build_recipes(folder: Path, manifest: Path, nemo: Path, reward: Path, device_name: str, *rl_extra: str):
    from rlnf.config import CTCTrainConfig, load_config
    from rlnf.launcher import load_recipe

    rl = build_rl_recipe(folder / "rl", manifest, nemo, reward, device_name, *rl_extra)
    sl = load_recipe("train_ctc").CTCTrainRecipe(load_config(CTCTrainConfig, None, COMMON + [
        f"data.train_manifest={manifest}", f"trainer.device={device_name}", f"model.path={nemo}",
        f"output_dir={folder / 'sl'}"]))
    sl.setup()
    batch = next(iter(rl.stream))
    return rl, sl, batch


def measure_k_sweep(size: str, device_name: str, repeats: int, folder: Path) -> dict:
    """RL step seconds at every K of K_VALUES, timed in alternation on the same batch, and each as a
    ratio to K = 1."""
    from rlnf.training import resolve_device

    device = resolve_device(device_name)
    manifest, nemo, reward = fixture(folder, size, device_name)
    with tempfile.TemporaryDirectory(dir=folder) as runs:
        recipes = [build_rl_recipe(Path(runs) / f"k{k}", manifest, nemo, reward, device_name,
                                   f"algorithm.num_samples={k}", "algorithm.advantage=none") for k in K_VALUES]
        batch = next(iter(recipes[0].stream)).to(device)
        times = alternate(*[lambda recipe=recipe: recipe.train_step([batch]) for recipe in recipes], device=device,
                          repeats=repeats)
    return {"k_step_s": dict(zip(map(str, K_VALUES), times)),
            "k_over_k1_step_time": {str(k): t / times[0] for k, t in zip(K_VALUES, times)},
            "k32_over_k8_step_time": times[K_VALUES.index(32)] / times[K_VALUES.index(8)]}


@contextlib.contextmanager
def prepared(size: str, device_name: str, folder: Path | None = None, rl_extra: tuple[str, ...] = ()):
    """(device, RL recipe with overrides ``rl_extra``, supervised recipe, batch on the device) over a
    fixture in ``folder`` (a temporary one when None); each call sets up fresh run folders."""
    from rlnf.training import resolve_device

    device = resolve_device(device_name)
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        manifest, nemo, reward = fixture(folder, size, device_name)
        runs = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=folder)))
        rl, sl, batch = build_recipes(runs, manifest, nemo, reward, device_name, *rl_extra)
        yield device, rl, sl, batch.to(device)


def timed(function, device) -> float:
    synchronize(device)
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def alternate(*functions, device, repeats: int, warmup: int = 1) -> list[float]:
    """Median seconds of each callable, timed in turn round after round (warm-up rounds not counted)."""
    for _ in range(warmup):
        for function in functions:
            function()
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for function, store in zip(functions, times):
            store.append(timed(function, device))
    return [statistics.median(store) for store in times]


def rollouts(policy, batch, num_samples: int, autocast):
    """(shared, naive) rollout callables: sample K hypotheses per utterance, from one encoder pass
    or from the encoder run on K copies of every clip."""
    import torch

    generator = torch.Generator(device=policy.device).manual_seed(0)

    def shared():
        with torch.no_grad(), autocast():
            log_probs, encoded_len = policy.forward(batch.audio, batch.audio_len)
        return policy.sample(log_probs.float(), encoded_len, num_samples, generator)

    def naive():
        audio = batch.audio.repeat_interleave(num_samples, dim=0)
        lengths = batch.audio_len.repeat_interleave(num_samples)
        with torch.no_grad(), autocast():
            log_probs, encoded_len = policy.forward(audio, lengths)
        return policy.sample(log_probs.float(), encoded_len, 1, generator)

    return shared, naive


def measure_size(size: str, device_name: str, repeats: int, folder: Path, rollout_and_reward: bool,
                 floor: bool) -> dict:
    import torch

    with prepared(size, device_name, folder) as (device, rl, sl, batch):
        audio_seconds = float(batch.audio_len.sum()) / 16000
        parameters = sum(p.numel() for p in rl.policy.model.parameters())
        result = {"size": size, "parameters": parameters, "device": str(device), "batch": len(batch), "K": 8,
                  "audio_seconds_per_batch": round(audio_seconds, 2)}

        from rlnf.reference import ReferenceCache

        cache = ReferenceCache(2**30)

        def rl_step(cached: bool):
            rl.reference_cache = cache if cached else None
            rl.train_step([batch])

        steps = [lambda: rl_step(False), lambda: sl.train_step(batch)]
        if floor:  # the reference policy's forward alone: what an RL step must add at least
            def reference_forward():
                with torch.no_grad(), rl._autocast():
                    rl.reference.forward(batch.audio, batch.audio_len)
            steps += [reference_forward, lambda: rl_step(True)]  # the warm-up round fills the cache
        times = alternate(*steps, device=device, repeats=repeats)
        rl_time, sl_time = times[0], times[1]
        result.update({"rl_step_s": rl_time, "sl_step_s": sl_time, "rl_over_sl_step_time": rl_time / sl_time,
                       "rl_utterances_per_s": len(batch) / rl_time, "rl_audio_seconds_per_s": audio_seconds / rl_time})
        if floor:
            result.update({"reference_forward_s": times[2], "rl_over_sl_floor": (sl_time + times[2]) / sl_time,
                           "rl_cached_step_s": times[3], "rl_over_sl_step_time_ref_cached": times[3] / sl_time})
        if not rollout_and_reward:
            return result

        shared, naive = rollouts(rl.policy, batch, 8, rl._autocast)
        rl.policy.set_mode("rollout")
        shared_time, naive_time = alternate(shared, naive, device=device, repeats=repeats)
        # Learned-reward scoring of the B*K sampled hypotheses: reuse + dedup vs every pair alone.
        samples = shared().texts
        scorer = rl.rewards.rewards[0].reward.scorer
        reuse_time, per_pair_time = alternate(
            lambda: scorer.score_groups(batch.audio, batch.audio_len, 16000, samples),
            lambda: scorer.score_pairs_separately(batch.audio, batch.audio_len, 16000, samples),
            device=device, repeats=repeats)
        result.update({
            "rollout_shared_s": shared_time, "rollout_naive_s": naive_time,
            "rollout_speedup_shared_vs_naive": naive_time / shared_time,
            "reward_reuse_s": reuse_time, "reward_per_pair_s": per_pair_time,
            "reward_speedup_reuse_vs_per_pair": per_pair_time / reuse_time,
            "distinct_hypotheses": sum(len(set(group)) for group in samples),
            "reward_pairs_per_s": len(batch) * 8 / reuse_time,
        })
        return result


class RssSampler:
    """Peak resident set size while a block runs, sampled from /proc/self/statm every 2 ms (Linux).

    ru_maxrss is a lifetime high-water mark that set-up (model loading) may already have set; this
    measures what the steps themselves reach."""

    def __init__(self) -> None:
        import threading

        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.before = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.current())

    def __enter__(self) -> "RssSampler":
        self.before = self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def memory_probe(kind: str, size: str, device_name: str, folder: Path, adapters: int = 0) -> None:
    """Child process: report peak memory of RL steps ('rl', or 'rl_adapters' training only adapters of
    size ``adapters``) or supervised steps ('sl'), printed as JSON."""
    import gc

    import torch

    rl_extra = (f"policy.adapters={adapters}",) if kind == "rl_adapters" else ()
    with prepared(size, device_name, folder, rl_extra) as (device, rl, sl, batch):
        step = (lambda: sl.train_step(batch)) if kind == "sl" else (lambda: rl.train_step([batch]))
        step()  # warm-up: optimizer state and allocator caches exist before measuring
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with RssSampler() as sampler:
            for _ in range(2):
                step()
        result = {"peak_rss": sampler.peak, "rss_before": sampler.before,
                  "lifetime_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if device.type == "cuda":
            result.update({"cuda_peak": torch.cuda.max_memory_allocated(), "cuda_before": before})
        print("MEMORY " + json.dumps(result))


def probe_memory(kinds: tuple[str, str], size: str, device_name: str, folder: Path,
                 adapters: int = 0) -> tuple[float, float, dict]:
    """Peak memory of two kinds of step (``memory_probe``), in two processes run side by side (memory
    is per process; no timing is taken from them): the ratio first / second, the same net of the
    memory each held before its steps, and the raw probes."""
    out = {}
    # One thread each: two probes share the cores, and thread count changes no tensor's size.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {kind: subprocess.Popen([sys.executable, __file__, "--memory-probe", kind, "--sizes", size, "--device",
                                     device_name, "--fixture", str(folder), "--adapters", str(adapters)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for kind in kinds}
    for kind, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"memory probe {kind} failed:\n{stderr[-3000:]}")
        line = next(l for l in stdout.splitlines() if l.startswith("MEMORY "))
        out[kind] = json.loads(line[len("MEMORY "):])
    first, second = (out[kind] for kind in kinds)
    peak, before = ("cuda_peak", "cuda_before") if "cuda_peak" in first else ("peak_rss", "rss_before")
    ratio = first[peak] / second[peak]
    net = (first[peak] - first[before]) / max(1, second[peak] - second[before])
    return ratio, net, out


def measure_memory(size: str, device_name: str, folder: Path) -> dict:
    """Figure 4: peak memory of the RL step over the supervised step."""
    ratio, net, out = probe_memory(("rl", "sl"), size, device_name, folder)
    return {"rl_over_sl_peak_memory": ratio, "rl_over_sl_peak_memory_net": net, "raw": out}


def measure_adapters(size: str, device_name: str, repeats: int, folder: Path, adapters: int) -> dict:
    """Figure 7: the RL step training only adapters of size ``adapters`` next to full fine-tuning, on the
    same batch: step seconds (alternating) and peak memory (two processes)."""
    from rlnf.training import resolve_device

    device = resolve_device(device_name)
    manifest, nemo, reward = fixture(folder, size, device_name)
    with tempfile.TemporaryDirectory(dir=folder) as runs:
        full = build_rl_recipe(Path(runs) / "full", manifest, nemo, reward, device_name)
        adapted = build_rl_recipe(Path(runs) / "adapters", manifest, nemo, reward, device_name,
                                  f"policy.adapters={adapters}")
        batch = next(iter(full.stream)).to(device)
        trainable = sum(p.numel() for p in adapted.policy.model.parameters() if p.requires_grad)
        full_time, adapter_time = alternate(lambda: full.train_step([batch]), lambda: adapted.train_step([batch]),
                                            device=device, repeats=repeats)
    ratio, net, raw = probe_memory(("rl_adapters", "rl"), size, device_name, folder, adapters)
    return {"adapter_dim": adapters, "adapter_parameters": trainable, "full_rl_step_s": full_time,
            "adapter_rl_step_s": adapter_time, "adapters_over_full_step_time": adapter_time / full_time,
            "adapters_over_full_peak_memory": ratio, "adapters_over_full_peak_memory_net": net, "memory_raw": raw}


def profile_rl_step(size: str, device_name: str) -> None:
    """Print the operators that dominate an RL step (self CPU time; CUDA time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with prepared(size, device_name) as (device, rl, _, batch):
        for _ in range(2):
            rl.train_step([batch])
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as profiler:
            for _ in range(5):
                rl.train_step([batch])
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(profiler.key_averages().table(sort_by=sort, row_limit=15))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sizes", default="small,15x5", help="comma-separated: QuartzNet sizes (tiny, small, medium, "
                                                                "5x5, 15x5) or fastconformer (d_model 176, 16 layers)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--profile", action="store_true",
                        help="instead of the table: torch.profiler's top operators of 5 RL steps (first size)")
    parser.add_argument("--memory-only", action="store_true", help="measure only the peak-memory ratio (last size)")
    parser.add_argument("--full", action="store_true", help="measure the rollout and reward figures on every size")
    parser.add_argument("--floor", action="store_true",
                        help="also time the reference forward: the floor of the RL / supervised ratio")
    parser.add_argument("--k-repeats", type=int, default=3,
                        help="rounds of the K sweep (figure 6; median); 0 skips it")
    parser.add_argument("--startup", metavar="MANIFEST", help="measure start-up to step 1 on this manifest")
    parser.add_argument("--startup-lines", type=int, help="measure start-up on a generated manifest of this many lines")
    parser.add_argument("--startup-clips", type=int, default=3200, help="distinct clips of the generated manifest")
    parser.add_argument("--startup-code", type=Path,
                        help="measure --startup with the rlnf of this checkout (e.g. an older one, for 'before' figures)")
    parser.add_argument("--startup-recipe", choices=("rl_finetune", "train_ctc"), default="rl_finetune",
                        help="the recipe whose start-up --startup measures (default rl_finetune)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for --startup (key=value)")
    parser.add_argument("--adapters", type=int, default=0,
                        help="measure only figure 7: RL with policy.adapters=DIM vs full fine-tuning, every size")
    parser.add_argument("--memory-probe", choices=["rl", "sl", "rl_adapters"], help=argparse.SUPPRESS)
    parser.add_argument("--fixture", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.startup or args.startup_lines:
        from bench_startup import ROOT, measure_startup

        figures = measure_startup(args.startup, args.startup_lines, args.startup_clips, args.overrides,
                                  args.startup_code or ROOT, args.startup_recipe)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rlnf.cli import quiet_nemo

    quiet_nemo()
    import logging

    logging.getLogger("rlnf").setLevel(logging.ERROR)
    if args.memory_probe:
        memory_probe(args.memory_probe, args.sizes, args.device, args.fixture, args.adapters)
        return
    import torch

    sizes = args.sizes.split(",")
    if args.profile:
        profile_rl_step(sizes[0], args.device)
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folders = {size: Path(tmp) / size for size in sizes}
        for folder in folders.values():
            folder.mkdir()
        if args.memory_only:
            memory = measure_memory(sizes[-1], args.device, folders[sizes[-1]])
            print(json.dumps({k: v for k, v in memory.items() if k != "raw"}, indent=2))
            print(json.dumps(memory["raw"], indent=2))
            return
        if args.adapters:
            adapters = {size: measure_adapters(size, args.device, args.repeats, folders[size], args.adapters)
                        for size in sizes}
            print(json.dumps(adapters, indent=2))
            if args.json:
                Path(args.json).write_text(json.dumps(adapters, indent=2))
            return
        results = {size: measure_size(size, args.device, args.repeats, folders[size],
                                      rollout_and_reward=args.full or index == 0, floor=args.floor)
                   for index, size in enumerate(sizes)}
        if args.k_repeats > 0:
            for size in sizes:
                results[size].update(measure_k_sweep(size, args.device, args.k_repeats, folders[size]))
        memory = measure_memory(sizes[-1], args.device, folders[sizes[-1]])
    device = results[sizes[0]]["device"]
    print(f"\nrlnf benchmark on {device} ({torch.get_num_threads()} threads), batch 8 x ~3 s, K = 8, "
          f"median of {args.repeats} alternating steps; {time.perf_counter() - started:.0f} s")
    header = f"{'figure':<52}" + "".join(f"{s:>12}" for s in sizes) + "   target"
    print(header + "\n" + "-" * len(header))
    rows = [("parameters", "parameters", "{:.0f}", ""),
            ("RL step / supervised step (time)", "rl_over_sl_step_time", "{:.2f}x", "<= 1.5x (15x5)"),
            ("  RL step seconds", "rl_step_s", "{:.3f}", ""), ("  supervised step seconds", "sl_step_s", "{:.3f}", ""),
            ("  reference forward seconds (--floor)", "reference_forward_s", "{:.3f}", ""),
            ("  floor: (supervised + reference forward) / sup.", "rl_over_sl_floor", "{:.2f}x", ""),
            ("RL step, reference cached / supervised (--floor)", "rl_over_sl_step_time_ref_cached", "{:.2f}x",
             "(epochs >= 2)"),
            ("naive rollout / shared-encoder rollout (time)", "rollout_speedup_shared_vs_naive", "{:.2f}x", ">= 6.4x"),
            ("per-pair reward / reuse+dedup reward (time)", "reward_speedup_reuse_vs_per_pair", "{:.2f}x", ">= 3x"),
            ("  distinct hypotheses of 64", "distinct_hypotheses", "{:.0f}", ""),
            ("reward-model throughput (pairs/s)", "reward_pairs_per_s", "{:.0f}", ""),
            ("RL throughput (utterances/s)", "rl_utterances_per_s", "{:.1f}", ""),
            ("RL throughput (audio-seconds/s)", "rl_audio_seconds_per_s", "{:.1f}", ""),
            ("RL step at K = 32 / K = 8 (time)", "k32_over_k8_step_time", "{:.2f}x", "<= 1.5x (15x5)")]
    for label, key, fmt, target in rows:
        if not any(key in results[s] for s in sizes):
            continue
        cells = "".join(f"{fmt.format(results[s][key]) if key in results[s] else '-':>12}" for s in sizes)
        print(f"{label:<52}{cells}   {target}")
    if any("k_over_k1_step_time" in results[s] for s in sizes):
        for k in map(str, K_VALUES):
            cells = "".join(f"{results[s]['k_over_k1_step_time'][k]:>11.2f}x" for s in sizes)
            print(f"{'  RL step at K = ' + k + ' / K = 1 (time)':<52}{cells}")
    print(f"{'RL step / supervised step (peak RSS, ' + sizes[-1] + ')':<52}{memory['rl_over_sl_peak_memory']:>12.2f}x"
          f"   <= 1.5x")
    print(f"{'  the same, net of the RSS held before the steps':<52}{memory['rl_over_sl_peak_memory_net']:>12.2f}x")
    figures = {
        "rl_over_sl_step_time_15x5": results.get("15x5", {}).get("rl_over_sl_step_time"),
        "rl_over_sl_step_time_small": results.get("small", {}).get("rl_over_sl_step_time"),
        "rl_over_sl_step_time_15x5_ref_cached": results.get("15x5", {}).get("rl_over_sl_step_time_ref_cached"),
        "k32_over_k8_step_time_15x5": results.get("15x5", {}).get("k32_over_k8_step_time"),
        "k32_over_k8_step_time_small": results.get("small", {}).get("k32_over_k8_step_time"),
        "rollout_speedup_shared_vs_naive": results[sizes[0]]["rollout_speedup_shared_vs_naive"],
        "reward_speedup_reuse_vs_per_pair": results[sizes[0]]["reward_speedup_reuse_vs_per_pair"],
        "rl_over_sl_peak_memory": memory["rl_over_sl_peak_memory"],
        "rl_over_sl_peak_memory_net": memory["rl_over_sl_peak_memory_net"],
        "reward_pairs_per_s": results[sizes[0]]["reward_pairs_per_s"],
        "figures_2_3_size": sizes[0] if not args.full else "all",
        "rl_utterances_per_s": results[sizes[-1]]["rl_utterances_per_s"],
        "device": device, "K": 8, "threads": torch.get_num_threads(), "per_size": results, "memory": memory,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
