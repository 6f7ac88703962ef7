#!/usr/bin/env bash
# The GPU check: what rlnf does on one CUDA GPU, in under 10 minutes (each stage has a time limit).
#   1. tests  the tests that use CUDA (pytest -m cuda): the policy's and the learned reward's bf16
#             forwards against fp32 on the CPU, and RL steps with the learned reward under bf16;
#   2. rl     a short RL run through the CLI on CUDA under bf16 with a learned reward trained on the
#             spot (rlnf data synth -> train_ctc -> train_reward_model -> rl_finetune): every loss in
#             metrics.jsonl finite and the mean reward moving;
#   3. bench  scripts/bench.py --device cuda --json: absolute step times and the RL / supervised ratios.
# A failed stage does not stop the next ones; the exit status is 1 if any failed. With no CUDA device
# it prints that it skipped and exits 0.
#
#   scripts/gpu_check.sh [OUT_DIR]     logs, run folders and bench.json go to OUT_DIR (default: a new temporary folder)
#
# Needs the environment rlnf runs in, with a CUDA build of torch (scripts/setup.sh's stack), and
# flite, espeak-ng and sox for the synthesised speech. PYTHON picks the interpreter (default
# .venv/bin/python, else python3); BENCH_ARGS adds arguments to bench.py. RLNF_GPU_CHECK_DEVICE=cpu
# runs stages 2 and 3 on the CPU in fp32 with fewer steps: it checks this script's plumbing, not the
# GPU (7 min on 2 busy cores with BENCH_ARGS="--sizes tiny --repeats 2", measured).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE="${RLNF_GPU_CHECK_DEVICE:-cuda}"

"$PYTHON" -c "import torch" 2>/dev/null || { echo "gpu_check: error: $PYTHON cannot import torch (set PYTHON)" >&2; exit 1; }
if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False for $PYTHON)"
  exit 0
fi
missing=()
for tool in flite espeak-ng sox; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
"$PYTHON" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('nemo') else 1)" || missing+=("nemo_toolkit[asr]")
if [ ${#missing[@]} -gt 0 ]; then
  echo "gpu_check: error: missing ${missing[*]} (scripts/setup.sh installs them; see docs/performance.md, GPU check)" >&2
  exit 1
fi

OUT="${1:-$(mktemp -d)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$DEVICE" = cuda ]; then
  PRECISION=bf16 CTC_STEPS=300 REWARD_EPOCHS=6 RL_STEPS=30 LIMIT=1
else  # the CPU dry run: the same commands with fewer steps, and no time limits to speak of
  PRECISION=fp32 CTC_STEPS=40 REWARD_EPOCHS=2 RL_STEPS=6 LIMIT=10
fi
"$PYTHON" -c "import torch; print('gpu_check: torch', torch.__version__, '|', torch.cuda.get_device_name(0) if '$DEVICE' == 'cuda' else 'cpu dry run', '| output in $OUT')"

started=$SECONDS
failed=()
stage() {  # stage NAME LIMIT_SECONDS FUNCTION: runs it with its output in OUT/NAME.log and on screen
  local name=$1 limit=$(($2 * LIMIT))
  echo "== gpu_check: $name (at $((SECONDS - started)) s; limit $limit s)"
  if ! timeout "$limit" bash -c "set -euo pipefail; $(declare -f "$3"); $3" 2>&1 | tee "$OUT/$name.log"; then
    echo "gpu_check: FAILED: $name (see $OUT/$name.log)"
    failed+=("$name")
  fi
}
export PYTHON DEVICE PRECISION CTC_STEPS REWARD_EPOCHS RL_STEPS OUT

tests_stage() {
  # CI=true: a missing speech tool fails the tests instead of skipping them (tests/conftest.py).
  CI=true "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda -rs tests
}

rl_stage() {
  local work="$OUT/rl_check" rlnf=("$PYTHON" -m rlnf.cli)
  "${rlnf[@]}" data synth --output "$work/corpus" --sentences 16 --voices flite:kal16,espeak:en+m3 \
    --heldout-voice flite:rms
  "${rlnf[@]}" run train_ctc --config ctc/small data.train_manifest="$work/corpus/train.json" \
    output_dir="$work/ctc" trainer.max_steps="$CTC_STEPS" trainer.warmup_steps=20 trainer.val_every=0 \
    trainer.save_every="$CTC_STEPS" trainer.device="$DEVICE" trainer.precision="$PRECISION" trainer.progress_bar=false
  # The scored pairs and reward-model settings of the tests' trained_reward fixture (Pearson > 0.8 there).
  "$PYTHON" -c "import sys; from pathlib import Path; from tests.test_reward_model import scored_manifest; \
scored_manifest(sys.argv[1], Path(sys.argv[2]))" "$work/corpus/train.json" "$work/scored.json"
  "${rlnf[@]}" run train_reward_model --config reward/card data.train_manifest="$work/scored.json" \
    output_dir="$work/reward" data.score_scale=100 data.val_split=0.2 model.vocab_size=256 trainer.epochs="$REWARD_EPOCHS" \
    trainer.lr=1e-3 trainer.batch_size=16 hard_negatives.enabled=false trainer.device="$DEVICE" \
    trainer.precision="$PRECISION" trainer.progress_bar=false
  "${rlnf[@]}" run rl_finetune --config rl/grpo policy.path="$work/ctc/checkpoints/last.nemo" \
    data.train_manifest="$work/corpus/train.json" output_dir="$work/rl" \
    "rewards=[{name: learned, path: '$work/reward/checkpoints/best', device: $DEVICE}]" \
    trainer.max_steps="$RL_STEPS" trainer.batch_size=8 algorithm.num_samples=8 trainer.lr=3e-4 trainer.warmup_steps=0 \
    trainer.val_every=0 trainer.save_every="$RL_STEPS" trainer.samples_every=0 trainer.device="$DEVICE" \
    trainer.precision="$PRECISION" trainer.progress_bar=false
  "$PYTHON" - "$work/rl" "$RL_STEPS" <<'PY'
import math
import statistics
import sys

from rlnf.metric_logging import read_metrics

rows, steps = read_metrics(sys.argv[1]), int(sys.argv[2])
rewards = [row["reward/mean"] for row in rows]
n = max(1, len(rows) // 4)
print(f"rl: {len(rows)} steps; reward/mean over the first {n}: {statistics.mean(rewards[:n]):.4f}, the last {n}: "
      f"{statistics.mean(rewards[-n:]):.4f} (range {min(rewards):.4f}..{max(rewards):.4f}); kl at the end "
      f"{rows[-1]['kl']:.3f}; median step {statistics.median(row['perf/step_time'] for row in rows):.3f} s")
bad = [(row["step"], key) for row in rows for key, value in row.items()
       if key.startswith("loss/") and (value is None or not math.isfinite(value))]
assert [row["step"] for row in rows] == list(range(1, steps + 1)), "a step is missing from metrics.jsonl"
assert not bad, f"non-finite losses (step, metric): {bad}"
assert rows[-1]["train/skipped_steps"] == 0, "steps were skipped for a non-finite loss or gradient"
assert max(rewards) - min(rewards) > 1e-3, "reward/mean did not move"
print("rl: passed")
PY
}

bench_stage() {
  # BENCH_ARGS is split into words on purpose (several arguments).
  # shellcheck disable=SC2086
  "$PYTHON" scripts/bench.py --device "$DEVICE" --json "$OUT/bench.json" ${BENCH_ARGS:-}
  "$PYTHON" -c "import json, sys; figures = json.load(open(sys.argv[1])); \
print('bench (absolute per size):', json.dumps({size: {k: v for k, v in row.items() if k.endswith(('_s', '_per_s'))} \
for size, row in figures['per_size'].items()}, indent=1)); \
print('bench (ratios):', json.dumps({k: v for k, v in figures.items() if k not in ('per_size', 'memory')}, indent=1))" \
    "$OUT/bench.json"
}

if [ "$DEVICE" = cuda ]; then stage tests 180 tests_stage; else echo "== gpu_check: tests: not run in the CPU dry run"; fi
stage rl 210 rl_stage
stage bench 210 bench_stage
echo "== gpu_check: done in $((SECONDS - started)) s; output in $OUT"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED stages: ${failed[*]}"
  exit 1
fi
echo "gpu_check: all stages passed"
