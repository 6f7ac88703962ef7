"""scripts/gpu_check.sh: without CUDA it says it skipped and succeeds; its test stage selects tests.
scripts/gpu_bundle.sh refuses a package list it cannot use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_without_cuda_it_reports_the_skip_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    env.pop("RLNF_GPU_CHECK_DEVICE", None)
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu_check: skipped: no CUDA device" in result.stdout
    assert not (tmp_path / "out").exists()  # nothing ran


def test_the_cuda_marker_selects_the_cuda_tests():
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                             "tests"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    selected = [line for line in result.stdout.splitlines() if "::" in line]
    assert len(selected) >= 3 and all(line.startswith("tests/test_cuda.py::") for line in selected), result.stdout


def test_gpu_bundle_refuses_a_missing_or_empty_package_list_and_keeps_the_old_bundle(tmp_path):
    (tmp_path / "scripts").mkdir()  # a copy, so that its bundle folder is tmp_path/.gpu_bundle, not the repo's
    script = tmp_path / "scripts" / "gpu_bundle.sh"
    script.write_text((ROOT / "scripts" / "gpu_bundle.sh").read_text())
    (tmp_path / ".gpu_bundle").mkdir()
    (tmp_path / ".gpu_bundle" / "run.sh").write_text("kept")
    env = {**os.environ, "PYTHON": sys.executable}
    missing = subprocess.run(["bash", str(script), str(tmp_path / "nope.txt")], env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "usage: scripts/gpu_bundle.sh TARGET_PACKAGES" in missing.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    refused = subprocess.run(["bash", str(script), str(empty)], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and f"{empty} names no packages" in refused.stderr
    assert (tmp_path / ".gpu_bundle" / "run.sh").read_text() == "kept"
