"""The docs stay true (config reference, metric names, commands, a strict docs build); speech synthesis is deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_docs_config_reference_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_docs.py"), "--check"])
    assert result.returncode == 0, "docs/configuration.md is stale: run python scripts/update_docs.py"


def test_docs_document_every_logged_metric_and_the_readme_the_two_commands():
    from tests.test_rl_finetune_cli import REQUIRED_METRICS, VAL_METRICS

    monitoring = (ROOT / "docs" / "monitoring.md").read_text()
    for name in REQUIRED_METRICS + VAL_METRICS + ["rollout/unique_ratio", "train/skipped_steps", "kl/per_frame"]:
        assert f"`{name}`" in monitoring or name.replace("cer/mean", "<name>/mean") in monitoring, name
    readme = (ROOT / "README.md").read_text()
    assert "scripts/demo.sh" in readme and "scripts/test.sh" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci


def test_readme_is_short():
    """The README is the front page; the manual lives in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250): move detail to a page in docs/"


def mkdocs_build(config: Path, site_dir: Path) -> subprocess.CompletedProcess:
    import importlib.util

    assert importlib.util.find_spec("mkdocs"), "mkdocs is missing: pip install -c constraints.txt -e '.[dev]'"
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site_dir)], capture_output=True, text=True, timeout=300)


def test_docs_build_in_strict_mode(tmp_path):
    """mkdocs.yml is strict: a broken link or anchor, or a page left out of the nav, fails the build."""
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, "mkdocs build --strict failed:\n" + result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()


def test_docs_build_fails_on_a_broken_link_and_an_orphan_page(tmp_path):
    """The strict settings catch what they are there for (a copy of the docs, each fault alone)."""
    import shutil

    for fault in ("broken_link", "broken_anchor", "orphan_page"):
        copy = tmp_path / fault
        shutil.copytree(ROOT / "docs", copy / "docs")
        shutil.copy2(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
        index = copy / "docs" / "index.md"
        if fault == "broken_link":
            index.write_text(index.read_text() + "\nSee [nowhere](no-such-page.md).\n")
        elif fault == "broken_anchor":
            index.write_text(index.read_text() + "\nSee [a section](quickstart.md#no-such-section).\n")
        else:
            (copy / "docs" / "orphan.md").write_text("# Orphan\n")
        result = mkdocs_build(copy / "mkdocs.yml", copy / "site")
        assert result.returncode != 0, f"{fault}: the strict build passed:\n{result.stdout}{result.stderr}"


def test_corpus_is_deterministic(tmp_path):
    from tests.conftest import require_tool

    require_tool("flite", "espeak-ng", "sox")
    from rlnf.synth import synthesize_corpus

    kwargs = dict(num_sentences=4, voices=["flite:slt", "espeak:en+f3:speed=150:pitch=60"], heldout_voice="flite:awb",
                  noise_snr=20.0, seed=3, progress=False, split=(0.5, 0.25))
    first = synthesize_corpus(tmp_path / "a", **kwargs)
    second = synthesize_corpus(tmp_path / "b", **kwargs)
    sums_a = json.loads((tmp_path / "a" / "corpus.json").read_text())["sha256"]
    sums_b = json.loads((tmp_path / "b" / "corpus.json").read_text())["sha256"]
    assert sums_a == sums_b and len(sums_a) == 12
    other = synthesize_corpus(tmp_path / "c", **{**kwargs, "seed": 4})
    assert json.loads((tmp_path / "c" / "corpus.json").read_text())["sha256"] != sums_a
    rows = [json.loads(line) for line in Path(first["heldout_test"]).read_text().splitlines()]
    assert {r["speaker"] for r in rows} == {"flite:awb"} and all(r["text"] for r in rows)
    train = [json.loads(line) for line in Path(first["train"]).read_text().splitlines()]
    test_sentences = {r["sentence_id"] for r in rows}
    assert not test_sentences & {r["sentence_id"] for r in train}  # split by sentence
    import soundfile

    info = soundfile.info(str(Path(first["train"]).parent / train[0]["audio_filepath"]))
    assert info.samplerate == 16000 and info.channels == 1
    # Cached: a second call with the same parameters does not synthesise again.
    assert synthesize_corpus(tmp_path / "a", **kwargs) == first


def test_nemo_archive_escaping_its_folder_is_refused(tmp_path):
    import io
    import tarfile

    from rlnf.checkpoint import check_nemo_archive
    from rlnf.errors import CheckpointError

    for name, kind in (("../evil.txt", tarfile.REGTYPE), ("/etc/evil", tarfile.REGTYPE), ("link", tarfile.SYMTYPE)):
        path = tmp_path / f"bad_{kind!r}_{len(name)}.nemo"
        with tarfile.open(path, "w:gz") as archive:
            member = tarfile.TarInfo(name)
            member.type = kind
            if kind == tarfile.SYMTYPE:
                member.linkname = "/etc/passwd"
                archive.addfile(member)
            else:
                data = b"x"
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
        with pytest.raises(CheckpointError, match="refusing archive member"):
            check_nemo_archive(path)
    good = tmp_path / "good.nemo"
    with tarfile.open(good, "w:gz") as archive:
        member = tarfile.TarInfo("./model_config.yaml")
        member.size = 1
        archive.addfile(member, io.BytesIO(b"x"))
    check_nemo_archive(good)


def test_demo_report_plot_is_written_from_the_runs_metrics(tmp_path):
    """report.png: training reward and validation WER against steps, one curve per run."""
    import json

    from rlnf.demo import _plot

    runs = {}
    for offset, name in enumerate(("rl_learned_reward", "rl_cer_reward", "supervised_continued")):
        folder = tmp_path / name
        folder.mkdir()
        rows = []
        for step in range(1, 41):
            row = {"step": step} if name == "supervised_continued" else {"step": step, "reward/mean": 0.5 + step / 100}
            if step % 20 == 0:
                row["val/wer"] = 0.8 - 0.01 * offset - step / 1000
            rows.append(row)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs[name] = folder
    out = tmp_path / "report.png"
    _plot({"pretrained_val_wer": 0.8, "heldout_voice": "espeak:en+f4"}, runs, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_everyday_sentences_are_new_text_the_policy_can_spell():
    """The other-text test set: at least 160 distinct sentences of 5-15 words in the English policy's
    vocabulary, already normalised, and none of them among the Bible sentences."""
    from rlnf.metrics import normalize_text
    from rlnf.models import ENGLISH_LABELS
    from rlnf.resources import everyday_sentences_file, sentences_file
    from rlnf.synth import read_sentences

    everyday, bible = read_sentences(everyday_sentences_file()), read_sentences(sentences_file())
    assert len(everyday) >= 160 and len(set(everyday)) == len(everyday)
    for sentence in everyday:
        assert set(sentence) <= set(ENGLISH_LABELS), sentence
        assert normalize_text(sentence, lowercase=True) == sentence and 5 <= len(sentence.split()) <= 15, sentence
    assert not set(everyday) & set(bible)


def test_other_text_corpus_is_deterministic_and_keyed_by_the_heldout_voice_only(tmp_path, monkeypatch):
    from tests.conftest import require_tool

    require_tool("espeak-ng", "sox")
    import rlnf.resources
    from rlnf.demo import OTHER_TEXT, SETTINGS, Stages, other_text_corpus

    source = tmp_path / "three.txt"
    source.write_text("# a comment\nthe bus leaves at ten\n\ncould you call me back later\nit is raining again today\n")
    monkeypatch.setattr(rlnf.resources, "everyday_sentences_file", lambda: source)
    first = other_text_corpus(Stages(tmp_path / "a", fresh=False), SETTINGS)
    second = other_text_corpus(Stages(tmp_path / "b", fresh=False), SETTINGS)
    rows = [json.loads(line) for line in Path(first[OTHER_TEXT]).read_text().splitlines()]
    assert [row["text"] for row in rows] == ["the bus leaves at ten", "could you call me back later",
                                              "it is raining again today"]
    assert {row["speaker"] for row in rows} == {SETTINGS["heldout_voice"]} and first["sentences"] == 3
    sums = [json.loads(Path(result[OTHER_TEXT]).with_suffix(".index.json").read_text())["sha256"]
            for result in (first, second)]
    assert sums[0] == sums[1] and len(sums[0]) == 3 and first["sha256"] == second["sha256"]
    assert Path(second[OTHER_TEXT]).read_text() == Path(first[OTHER_TEXT]).read_text()  # relative paths
    # Its key is the held-out voice and the sentences: other corpus settings leave it cached.
    stages = Stages(tmp_path / "a", fresh=False)
    assert other_text_corpus(stages, {**SETTINGS, "sentences": 10, "voices": ["flite:kal16"], "seed": 5}) == first
    assert stages.timings["other_text_corpus"] > 0  # the recorded time of the run it re-used
    other = other_text_corpus(Stages(tmp_path / "a", fresh=False), {**SETTINGS, "heldout_voice": "espeak:en+m3"})
    assert other["sha256"] != first["sha256"]
