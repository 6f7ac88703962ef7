"""A built wheel carries everything the CLI needs, and works installed, away from the checkout."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the wheel is built from: the project files, copied so that the build writes no build/ or
# *.egg-info into the checkout.
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "rlnf", "recipes", "configs")


def expected_packages() -> set[str]:
    """Every package folder of rlnf/, and the two folders pyproject.toml maps into it."""
    packages = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "rlnf").rglob("__init__.py")}
    packages.add("rlnf.recipes")
    packages |= {".".join(("rlnf", *folder.relative_to(ROOT).parts))
                 for folder in [ROOT / "configs", *(ROOT / "configs").rglob("*")] if folder.is_dir()}
    return packages


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == expected_packages(), "update [tool.setuptools] packages in pyproject.toml"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """rlnf's wheel, built without network (the installed setuptools, no build isolation); ~2 s."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = out.glob("rlnf-*.whl")
    return path


def test_wheel_holds_code_recipes_configs_and_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"rlnf/{p.relative_to(ROOT / 'rlnf').as_posix()}" for p in (ROOT / "rlnf").rglob("*")
              if p.is_file() and p.suffix in (".py", ".txt") and "__pycache__" not in p.parts}
    wanted |= {f"rlnf/recipes/{p.name}" for p in (ROOT / "recipes").glob("*.py")}
    wanted |= {f"rlnf/configs/{p.relative_to(ROOT / 'configs').as_posix()}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert "rlnf/data/sentences.txt" in wanted and "rlnf/configs/rl/grpo.yaml" in wanted
    assert "rlnf/data/everyday_sentences.txt" in wanted
    assert wanted <= names, sorted(wanted - names)
    assert not any(name.startswith("recipes/") for name in names)  # no top-level 'recipes' package
    # pyproject.toml's SPDX license: setuptools puts the LICENSE file into the wheel's metadata.
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names), sorted(names)[-10:]


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment holding the wheel. It reuses this interpreter's packages (torch,
    NeMo) through a .pth file: `--system-site-packages` would reach the base interpreter's, which
    lack them. A .pth path line does not run the .pth files of that folder, so an editable rlnf
    installed there stays out of the way. The .pth is written after the install, so that pip never
    sees (or offers to uninstall) this environment's rlnf."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                             "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    ours = [path for path in dict.fromkeys(site.getsitepackages() + [sysconfig.get_path("purelib")]) if Path(path).is_dir()]
    (site_packages / "rlnf_test_parent_env.pth").write_text("\n".join(ours) + "\n")
    return venv


def run_installed(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{args}: {result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_installed_wheel_runs_from_outside_the_checkout(installed, tiny_nemo, corpus, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = run_installed(installed, elsewhere, "python", "-c",
                          "import json, rlnf, rlnf.resources as r; print(json.dumps([rlnf.__file__, "
                          "str(r.configs_dir()), str(r.recipes_dir()), str(r.sentences_file())]))")
    for path in json.loads(where.stdout):
        assert Path(path).is_relative_to(installed) and Path(path).exists(), path

    listing = run_installed(installed, elsewhere, "rlnf", "ls").stdout
    assert "rl_finetune" in listing and "rl/grpo" in listing and "reward/card" in listing
    assert "algorithm.kl_coef" in run_installed(installed, elsewhere, "rlnf", "config", "rl_finetune").stdout

    out = tmp_path / "run"
    run_installed(installed, elsewhere, "rlnf", "run", "rl_finetune", "--config", "rl/grpo", f"policy.path={tiny_nemo}",
                  f"data.train_manifest={corpus['train']}", f"output_dir={out}", "trainer.max_steps=1",
                  "trainer.batch_size=4", "algorithm.num_samples=4", "trainer.progress_bar=false")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1] and "grpo" in (out / "config.yaml").read_text()
    assert not any(elsewhere.iterdir())  # nothing written to the working directory
