"""scripts/bench.py runs end to end (on the tiny model) and writes the documented JSON keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_script_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--sizes", "tiny", "--repeats", "2",
                             "--device", "cpu", "--floor", "--k-repeats", "1", "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in ("rl_over_sl_step_time_15x5", "rl_over_sl_step_time_small", "rollout_speedup_shared_vs_naive",
                "reward_speedup_reuse_vs_per_pair", "rl_over_sl_peak_memory", "reward_pairs_per_s",
                "rl_utterances_per_s", "device", "K", "k32_over_k8_step_time_15x5"):
        assert key in figures, key
    tiny = figures["per_size"]["tiny"]
    assert figures["K"] == 8 and tiny["rl_over_sl_step_time"] > 0
    assert tiny["rl_over_sl_floor"] > 1 and tiny["rl_over_sl_step_time_ref_cached"] > 0  # --floor figures
    assert "RL step / supervised step" in result.stdout
    assert set(tiny["k_over_k1_step_time"]) == {"1", "4", "8", "16", "32"} and tiny["k32_over_k8_step_time"] > 0
    assert "RL step at K = 32 / K = 1" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["rl_finetune", "train_ctc"])
def test_bench_startup_reports_cold_and_warm_seconds_and_peak_rss(tmp_path, recipe):
    out = tmp_path / "startup.json"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--startup-lines", "2000",
                             "--startup-clips", "20", "--startup-recipe", recipe, "--json", str(out)],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["lines"] == 2000 and figures["recipe"] == recipe
    for run in ("cold", "warm"):
        assert 0 < figures[run]["ready_s"] <= figures[run]["step1_s"]
        assert figures[run]["peak_rss_gb"] >= figures[run]["rss_before_gb"] > 0
    assert "to step 1" in result.stdout and "warm" in result.stdout
