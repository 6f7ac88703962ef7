"""What RL on a hybrid's CTC head does to its RNNT head, on the demo's data (docs/model-families.md).

    python scripts/hybrid_check.py --demo-output demo_output --output hybrid_output \\
        [--seeds 42 43 44] [--runs cer learned] [--rl-steps 150] [--ctc-steps 1500] [--hybrid-steps 40] [--json OUT.json]

Reads the corpus and the reward model of a finished `rlnf demo` (``DEMO/corpus/stage.json``, and
``DEMO/reward_model-listening/stage.json`` or ``DEMO/reward_model/stage.json``: the model the demo's
report names) and writes nothing there.

1. pretrain  a hybrid RNNT-CTC BPE model (``rlnf.models.family_config("hybrid", ...)``: FastConformer x8,
             ``--layers`` layers of d_model ``--width``, a ``--vocab-size`` SentencePiece tokenizer of the
             training transcripts: characters would not fit x8's 12.5 frames a second, English speaks ~17-22)
             trained from scratch on the demo's labelled training voices: ``--ctc-steps`` steps of the CTC
             loss alone, then ``--hybrid-steps`` steps of both of NeMo's hybrid losses as its
             ``training_step`` combines them, (1 - w) * RNNT + w * CTC, w = ``aux_ctc.ctc_loss_weight``
             (0.3). The CTC-only phase is there because NeMo's RNNT loss on the CPU is Python loops over
             the lattice (see ``pretrain``). A plain torch loop over the model's own modules (``forward``
             for the encoder, ``decoder``, ``joint``, ``loss``, ``ctc_decoder``, ``ctc_loss``): ``rlnf run
             train_ctc`` trains CTC only. Saved as ``OUT/pretrain/hybrid.nemo``.
2. rl        ``rlnf run rl_finetune`` with ``policy.decoder=ctc`` and the demo's RL settings
             (``rlnf.demo.rl_overrides``: GRPO, K=8, batch 8, lr 1e-4, KL 0.05, ``--rl-steps`` steps) on the
             held-out voice, per seed: ``cer`` (the oracle 1 - CER, on its transcribed training audio) and
             ``learned`` (the demo's reward model, on the same audio without transcripts).
3. evaluate  on the held-out voice's TEST manifest, the starting model and every run: corpus greedy WER
             and CER of the CTC head and of the RNNT head (NeMo's ``transcribe`` after
             ``change_decoding_strategy(decoder_type="ctc" | "rnnt")``), and whether the RNNT decoder and
             joint are bit-identical to the start.
4. report    a table and ``--json`` (default ``OUT/report.json``): per run type, mean and std over seeds of
             each head's WER before and after RL (the same starting model for every seed, so "before" has
             std 0), the per-seed figures, the settings and the wall time of each stage.

On a shared CPU set ``OMP_NUM_THREADS=1``: with two torch threads fighting other jobs for two cores a
pretraining step took 8 s instead of 0.4 s (the RL runs inherit the setting).

Every stage is cached in its folder under ``--output`` as the demo's are (``rlnf.demo.Stages``): a second
invocation re-uses finished stages whose parameters match. Seeds: the pretraining ``--seed`` (weights,
batch order, dither) and each RL run's ``trainer.seed``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

RUN_TYPES = {"cer": "rl_cer_reward", "learned": "rl_learned_reward"}
HEADS = ("ctc", "rnnt")


def demo_inputs(demo_output: Path) -> tuple[dict[str, str], str | None]:
    """The demo's manifests (train, heldout_train, heldout_unlabelled, heldout_val, heldout_test, ...) and the
    checkpoint of the reward model its RL used (its report's ``settings.reward_model``, else today's default;
    None when the demo has not trained it)."""
    from rlnf.demo import SETTINGS, reward_stage

    data = json.loads((demo_output / "corpus" / "stage.json").read_text())["result"]
    report = demo_output / "report.json"
    model = json.loads(report.read_text())["settings"].get("reward_model", "card") if report.exists() \
        else SETTINGS["reward_model"]  # a report without the key predates the setting: the card model
    reward = demo_output / reward_stage(model) / "stage.json"
    checkpoint = json.loads(reward.read_text())["result"]["best_checkpoint"] if reward.exists() else None
    return data, checkpoint


def train_tokenizer(folder: Path, texts: list[str], vocab_size: int) -> str:
    """A unigram SentencePiece tokenizer of ``texts`` in the folder layout NeMo's ``tokenizer: {dir, type:
    bpe}`` reads (tokenizer.model, vocab.txt); returns the folder."""
    import sentencepiece

    from rlnf.reward_model.checkpoint import train_sentencepiece

    model_file = train_sentencepiece(texts, folder / "tokenizer", vocab_size=vocab_size)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    (folder / "vocab.txt").write_text("".join(pieces.id_to_piece(i) + "\n" for i in range(pieces.get_piece_size())))
    return str(folder)


def build_hybrid(tokenizer_dir: str, width: int, layers: int, seed: int):
    """``family_config("hybrid")``'s BPE model (FastConformer x8) with ``layers`` layers of d_model ``width``
    (4 attention heads when they divide it, else 2)."""
    from rlnf.models import build_family_model

    return build_family_model("hybrid", tokenizer_dir=tokenizer_dir, seed=seed, width=width, layers=layers,
                              heads=4 if width % 4 == 0 else 2)


def hybrid_loss(model, audio, audio_len, targets, target_len, rnnt: bool = True):
    """NeMo's hybrid training loss: (1 - w) * RNNT + w * CTC with w = ``model.ctc_loss_weight``; the CTC
    loss alone when ``rnnt`` is false. audio [B, S], targets [B, U] token ids; each loss is NeMo's
    (mean over the batch). Returns (loss, rnnt_loss or None, ctc_loss)."""
    encoded, encoded_len = model.forward(input_signal=audio, input_signal_length=audio_len)  # [B, D, T]
    ctc_log_probs = model.ctc_decoder(encoder_output=encoded)  # [B, T, V + 1]
    ctc_loss = model.ctc_loss(log_probs=ctc_log_probs, targets=targets, input_lengths=encoded_len,
                              target_lengths=target_len)
    if not rnnt:
        return ctc_loss, None, ctc_loss
    decoder_output, target_len, _ = model.decoder(targets=targets, target_length=target_len)
    joint = model.joint(encoder_outputs=encoded, decoder_outputs=decoder_output)  # [B, T, U + 1, V + 1]
    rnnt_loss = model.loss(log_probs=joint, targets=targets, input_lengths=encoded_len, target_lengths=target_len)
    weight = model.ctc_loss_weight
    return (1 - weight) * rnnt_loss + weight * ctc_loss, rnnt_loss, ctc_loss


def pretrain(folder: Path, manifest: str, ctc_steps: int, hybrid_steps: int, width: int, layers: int,
             vocab_size: int, batch_size: int, lr: float, seed: int, limit: int | None = None) -> dict[str, Any]:
    """A SentencePiece tokenizer of ``manifest``'s transcripts, then ``build_hybrid``'s model trained for
    ``ctc_steps`` steps of the CTC loss alone and ``hybrid_steps`` steps of ``hybrid_loss`` (AdamW, linear
    warm-up over the first 10 % of all steps, then cosine decay to 0.1 lr; gradients clipped at 1);
    saved as ``hybrid.nemo``. The CTC-only steps exist because NeMo 3.0.0's RNNT loss on the CPU
    (``warprnnt_numba`` falls back to ``cpu_rnnt.CPURNNT``, Python loops over the lattice) costs about
    half a millisecond per (frame, token) cell: the encoder learns first from the cheap loss."""
    import torch

    from rlnf.config import DataConfig
    from rlnf.data.loader import AudioDataset, bucketed_batches, collate
    from rlnf.data.manifest import durations_of
    from rlnf.policy import labels_to_padded
    from rlnf.recipe_utils import load_utterances

    utterances, _ = load_utterances(DataConfig(train_manifest=manifest), manifest, "pretraining needs transcripts")
    if limit:
        utterances = utterances[:limit]
    tokenizer_dir = train_tokenizer(folder / "tokenizer", [u.text for u in utterances], vocab_size)
    model = build_hybrid(tokenizer_dir, width, layers, seed)
    dataset = AudioDataset(utterances, model.cfg.sample_rate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=1e-3)
    steps = ctc_steps + hybrid_steps
    warmup = max(1, steps // 10)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    step, epoch, started, log = 0, 0, time.perf_counter(), []
    while step < steps:
        for rows in bucketed_batches(durations_of(utterances), batch_size, seed=seed, epoch=epoch):
            batch = collate([dataset[i] for i in rows])
            targets, target_len = labels_to_padded([model.tokenizer.text_to_ids(u.text) for u in batch.utterances])
            loss, rnnt_loss, ctc_loss = hybrid_loss(model, batch.audio, batch.audio_len, targets, target_len,
                                                    rnnt=step >= ctc_steps)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            if step % 25 == 0 or step == steps or (step > ctc_steps and step % 5 == 0):
                row = {"step": step, "loss": float(loss), "ctc_loss": float(ctc_loss),
                       "rnnt_loss": None if rnnt_loss is None else float(rnnt_loss),
                       "seconds": round(time.perf_counter() - started, 1)}
                log.append(row)
                print(f"[hybrid_check] pretrain {json.dumps(row)}", flush=True)
            if step == steps:
                break
        epoch += 1
    model.eval()
    path = folder / "hybrid.nemo"
    model.save_to(str(path))
    parameters = sum(p.numel() for p in model.parameters())
    return {"checkpoint": str(path), "ctc_steps": ctc_steps, "hybrid_steps": hybrid_steps, "epochs_started": epoch + 1,
            "parameters": parameters, "vocab_size": model.tokenizer.vocab_size, "log": log}


def evaluate_heads(checkpoint: str, manifest: str, limit: int | None = None) -> dict[str, dict[str, float]]:
    """Corpus greedy WER and CER of the hybrid's CTC head and RNNT head on ``manifest`` (references
    normalised as the recipes read them), with NeMo's own ``transcribe``."""
    from nemo.collections.asr.models import ASRModel

    from rlnf.config import DataConfig
    from rlnf.metrics import corpus_error_rate, normalize_text
    from rlnf.recipe_utils import load_utterances

    utterances, _ = load_utterances(DataConfig(train_manifest=manifest), manifest, "evaluation needs transcripts")
    if limit:
        utterances = utterances[:limit]
    references = [u.text for u in utterances]
    model = ASRModel.restore_from(checkpoint, map_location="cpu")
    model.eval()
    result = {}
    for head in HEADS:
        model.change_decoding_strategy(decoder_type=head, verbose=False)
        hypotheses = model.transcribe([u.audio_filepath for u in utterances], batch_size=16, verbose=False)
        if isinstance(hypotheses, tuple):  # (best, n-best) from older transducer decoders
            hypotheses = hypotheses[0]
        texts = [normalize_text(getattr(h, "text", h), lowercase=True) for h in hypotheses]
        result[head] = {"wer": corpus_error_rate(references, texts, "word"),
                        "cer": corpus_error_rate(references, texts, "char"), "n": len(texts)}
    return result


def nemo_state_dict(path: str) -> dict[str, Any]:
    """The weights inside a .nemo archive (its ``model_weights.ckpt``), without building the model."""
    import io
    import tarfile

    import torch

    with tarfile.open(path) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith("model_weights.ckpt"))
        return torch.load(io.BytesIO(archive.extractfile(member).read()), map_location="cpu")


def rnnt_head_unchanged(start: str, after: str) -> bool:
    """Whether every RNNT decoder and joint tensor of ``after`` equals ``start``'s bit for bit."""
    import torch

    before, now = nemo_state_dict(start), nemo_state_dict(after)
    names = [name for name in before if name.startswith(("decoder.", "joint."))]
    return bool(names) and all(torch.equal(before[name], now[name]) for name in names)


def summarize(before: dict[str, dict], runs: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """Per run type: mean and std over seeds of each head's WER before and after (std 0 with one seed)."""
    def mean_std(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    summary = {}
    for run, seeds in runs.items():
        summary[run] = {"seeds": sorted(seeds), "rnnt_head_unchanged": all(s["rnnt_head_unchanged"] for s in seeds.values())}
        for head in HEADS:
            summary[run][head] = {"wer_before": mean_std([before[head]["wer"]] * len(seeds)),
                                  "wer_after": mean_std([s[head]["wer"] for s in seeds.values()]),
                                  "cer_before": mean_std([before[head]["cer"]] * len(seeds)),
                                  "cer_after": mean_std([s[head]["cer"] for s in seeds.values()])}
    return summary


def print_table(report: dict[str, Any]) -> None:
    before = report["before"]
    print(f"\nHeld-out voice test set ({before['ctc']['n']} utterances), greedy WER, mean ± std over seeds")
    print(f"{'run':<20} {'seeds':<10} {'CTC before':>11} {'CTC after':>16} {'RNNT before':>12} {'RNNT after':>16} "
          f"{'RNNT head frozen':>17}")
    for run, row in report["summary"].items():
        after = {head: f"{row[head]['wer_after']['mean']:.3f} ± {row[head]['wer_after']['std']:.3f}" for head in HEADS}
        print(f"{run:<20} {','.join(map(str, row['seeds'])):<10} {before['ctc']['wer']:>11.3f} {after['ctc']:>16} "
              f"{before['rnnt']['wer']:>12.3f} {after['rnnt']:>16} {str(row['rnnt_head_unchanged']):>17}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo-output", default="demo_output", help="a finished `rlnf demo` folder (read only)")
    parser.add_argument("--output", default="hybrid_output", help="where every stage is written and cached")
    parser.add_argument("--json", default=None, help="the report (default OUTPUT/report.json)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="RL trainer.seed values")
    parser.add_argument("--runs", nargs="+", default=["cer", "learned"], choices=sorted(RUN_TYPES))
    parser.add_argument("--rl-steps", type=int, default=150)
    parser.add_argument("--ctc-steps", type=int, default=1500, help="pretraining steps of the CTC loss alone")
    parser.add_argument("--hybrid-steps", type=int, default=40, help="then pretraining steps of RNNT + CTC")
    parser.add_argument("--width", type=int, default=96, help="encoder d_model, prediction and joint width")
    parser.add_argument("--layers", type=int, default=3, help="FastConformer layers")
    parser.add_argument("--vocab-size", type=int, default=128, help="SentencePiece pieces")
    parser.add_argument("--batch-size", type=int, default=16, help="pretraining batch size")
    parser.add_argument("--lr", type=float, default=2e-3, help="pretraining peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N utterances of each manifest")
    args = parser.parse_args(argv)

    from rlnf.demo import SETTINGS, Stages, _run_recipe, rl_keys, rl_overrides

    started = time.perf_counter()
    data, reward = demo_inputs(Path(args.demo_output).expanduser().resolve())
    if "learned" in args.runs and reward is None:
        parser.error(f"--runs learned needs the demo's reward model ({args.demo_output}/reward_model-listening, or "
                     "reward_model for a demo run with the card's model); use --runs cer")
    root = Path(args.output).expanduser().resolve()
    stages = Stages(root, fresh=False)
    limit = args.limit
    pretrain_keys = ("ctc_steps", "hybrid_steps", "width", "layers", "vocab_size", "batch_size", "lr", "seed")
    base = stages.run("pretrain", {"data": data["train"], "limit": limit, **{k: getattr(args, k) for k in pretrain_keys}},
                      lambda folder: pretrain(folder, data["train"], *(getattr(args, k) for k in pretrain_keys), limit))
    policy = base["checkpoint"]
    test = data["heldout_test"]
    before = stages.run("evaluate_pretrained", {"pretrain": base, "test": test, "limit": limit},
                        lambda folder: evaluate_heads(policy, test, limit))

    def limited(manifest: str, folder: Path) -> str:
        """The manifest, or its first ``limit`` rows in ``folder``."""
        if not limit:
            return manifest
        from rlnf.data.manifest import read_manifest, write_manifest

        rows = [dict(u.fields, audio_filepath=u.audio_filepath) for u in read_manifest(manifest)[0][:limit]]
        path = folder / Path(manifest).name
        write_manifest(path, rows)
        return str(path)

    runs: dict[str, dict[int, dict]] = {}
    for run_type in args.runs:  # every seed of one run type before the next: a cut-short run still has a table
        for seed in args.seeds:
            settings = {**SETTINGS, "rl_steps": args.rl_steps, "run_seed": seed}
            name = RUN_TYPES[run_type]
            train_manifest = data["heldout_train"] if run_type == "cer" else data["heldout_unlabelled"]
            rewards = "[{name: cer}]" if run_type == "cer" else f"[{{name: learned, path: '{reward}'}}]"

            def rl(folder: Path) -> dict[str, Any]:
                inputs = folder / "inputs"
                inputs.mkdir()
                return _run_recipe("rl_finetune", [
                    *rl_overrides(settings, policy, limited(data["heldout_val"], inputs), folder / "run",
                                  limited(train_manifest, inputs), rewards), "policy.decoder=ctc"])

            key = {"policy": base, "rewards": rewards, "limit": limit, **rl_keys(settings)}
            result = stages.run(f"seed_{seed}/{name}", key, rl)
            checkpoint = result["last_checkpoint"]
            evaluated = stages.run(f"seed_{seed}/{name}_evaluate", {"run": result, "test": test, "limit": limit},
                                   lambda folder: {**evaluate_heads(checkpoint, test, limit),
                                                   "rnnt_head_unchanged": rnnt_head_unchanged(policy, checkpoint)})
            runs.setdefault(name, {})[seed] = {**evaluated, "rl_seconds": round(stages.timings[f"seed_{seed}/{name}"], 1)}

    report = {"before": before, "summary": summarize(before, runs),
              "runs": {name: {str(seed): row for seed, row in seeds.items()} for name, seeds in runs.items()},
              "pretrain": {k: v for k, v in base.items() if k != "log"} | {"last_log": base["log"][-1:]},
              "settings": {"pretrain": {k: getattr(args, k) for k in pretrain_keys},
                           "rl": {k: v for k, v in rl_keys({**SETTINGS, "rl_steps": args.rl_steps, "run_seed": 0}).items()
                                  if k != "run_seed"} | {"policy.decoder": "ctc"},
                           "seeds": args.seeds, "limit": limit, "test_manifest": test, "reward_model": reward},
              "timings": {name: round(seconds, 1) for name, seconds in stages.timings.items()},
              "wall_seconds_this_invocation": round(time.perf_counter() - started, 1)}
    out = Path(args.json) if args.json else root / "report.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"report: {out}")
    return report


if __name__ == "__main__":
    main()
