"""Bad input and faults, round 2 (issue 16): each case through the real command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from rlnf.cli import main

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m rlnf.cli ARGS` in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "rlnf.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def clip(tmp_path) -> Path:
    path = tmp_path / "clip.wav"
    soundfile.write(str(path), np.zeros(8000, dtype=np.float32) + 0.01, 16000)
    return path


# ------------------------------------------------------------------------------ the top-level handler
def test_an_unexpected_exception_is_one_line_naming_the_command_and_a_log(tmp_path):
    recipe = tmp_path / "broken_recipe.py"
    recipe.write_text("from dataclasses import dataclass\n\n"
                      "@dataclass\nclass Config:\n    output_dir: str = ''\n\n"
                      "CONFIG_CLASS = Config\n\n"
                      "def main(cfg):\n    return {}['missing']\n")
    out = tmp_path / "run"
    result = run_cli("run", str(recipe), f"output_dir={out}")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlnf run "), result.stderr
    assert "KeyError: 'missing'" in lines[0] and "broken_recipe.py:10" in lines[0]
    log_file = Path(lines[0].rsplit("full trace in ", 1)[1])
    assert log_file.parent == out.resolve() and "Traceback" in log_file.read_text()
