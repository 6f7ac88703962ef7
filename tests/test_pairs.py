"""`rlnf data pairs`: a policy's greedy and sampled hypotheses of labelled clips plus negatives, each
scored 1 - CER against the clip's transcript; errors name the file and line; no partial output."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from rlnf.cli import main


def levenshtein(a: str, b: str) -> int:
    """Edit distance by the textbook dynamic programme (independent of rapidfuzz)."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def expected_score(text: str, reference: str) -> float:
    text, reference = " ".join(text.lower().split()), " ".join(reference.lower().split())
    if not reference:
        return 1.0 if not text else 0.0
    return round(max(0.0, 1.0 - levenshtein(reference, text) / len(reference)), 4)


def run_pairs(model: str, manifest: str, output: Path, *extra: str) -> int:
    return main(["data", "pairs", "--model", model, "--manifest", manifest, "--output", str(output),
                 "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory, pretrained_tiny_nemo, corpus):
    """One `rlnf data pairs` run: 5 clips, temperatures 0.5 and 2.0, 3 samples each, seed 7."""
    import io
    from contextlib import redirect_stdout

    out = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    printed = io.StringIO()
    with redirect_stdout(printed):
        code = run_pairs(pretrained_tiny_nemo, corpus["train"], out, "--limit", "5", "--temperatures", "0.5,2.0",
                         "--samples-per-temperature", "3", "--seed", "7")
    assert code == 0
    return out, json.loads(printed.getvalue())


def test_pairs_hold_greedy_samples_negatives_and_reference_each_scored(pairs_run, pretrained_tiny_nemo, corpus):
    import torch

    from rlnf.data.audio import load_audio
    from rlnf.policy import CTCPolicy

    out, summary = pairs_run
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    folder = Path(corpus["train"]).parent  # the manifest's relative paths are relative to its folder
    labelled = {str(folder / row["audio_filepath"]): row["text"]
                for row in map(json.loads, Path(corpus["train"]).read_text().splitlines())}
    by_clip = defaultdict(list)
    for row in rows:
        assert set(row) == {"audio_filepath", "text", "score", "reference", "kind"}
        by_clip[row["audio_filepath"]].append(row)
    assert len(by_clip) == 5
    policy = CTCPolicy.load(pretrained_tiny_nemo, "cpu")
    policy.set_mode("eval")
    sampled_somewhere = False
    for clip, clip_rows in by_clip.items():
        reference = labelled[clip]
        texts = [row["text"] for row in clip_rows]
        assert len(texts) == len(set(texts))  # each distinct text once
        assert all(row["reference"] == reference for row in clip_rows)
        for row in clip_rows:  # every score recomputed here
            assert row["score"] == pytest.approx(expected_score(row["text"], reference), abs=1e-4), row
        # first the greedy transcript (of this clip alone), then the samples: 1 + 2 x 3 at most
        audio = torch.from_numpy(load_audio(clip, policy.sample_rate))[None]
        with torch.inference_mode():
            greedy = policy.transcribe(audio, torch.tensor([audio.shape[1]]))[0]
        assert clip_rows[0]["kind"] == "policy" and clip_rows[0]["text"] == greedy
        policy_rows = [row for row in clip_rows if row["kind"] == "policy"]
        assert 1 <= len(policy_rows) <= 7
        sampled_somewhere |= len(policy_rows) > 1
        kinds = [row["kind"] for row in clip_rows]
        assert kinds == sorted(kinds, key=["policy", "corrupt_0.1", "corrupt_0.3", "empty", "other_clip",
                                           "reference"].index)
        # each negative and the reference once at most (a text said before is not repeated), and the
        # empty transcript and the reference always there, whoever said them first
        assert all(kinds.count(kind) <= 1 for kind in set(kinds) - {"policy"})
        assert ("" in texts) and (reference in texts)
        others = [row["text"] for row in clip_rows if row["kind"] == "other_clip"]
        assert all(text in {r["reference"] for r in rows} and text != reference for text in others)
    assert sampled_somewhere  # temperature 2.0 draws hypotheses other than the greedy one

    kinds = defaultdict(int)
    for row in rows:
        kinds[row["kind"]] += 1
    assert summary["clips"] == 5 and summary["pairs"] == len(rows) and summary["kinds"] == dict(kinds)
    assert summary["mean_score"] == pytest.approx(sum(row["score"] for row in rows) / len(rows), abs=1e-4)
    assert summary["output"] == str(out) and summary["seconds"] >= 0


def test_pairs_are_reproducible_and_the_output_is_never_overwritten_silently(pairs_run, pretrained_tiny_nemo, corpus,
                                                                           capsys):
    out, _ = pairs_run
    before = out.read_bytes()
    assert run_pairs(pretrained_tiny_nemo, corpus["train"], out, "--limit", "5") == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == before
    again = out.with_name("again.jsonl")
    assert run_pairs(pretrained_tiny_nemo, corpus["train"], again, "--limit", "5", "--temperatures", "0.5,2.0",
                     "--samples-per-temperature", "3", "--seed", "7") == 0
    assert again.read_bytes() == before
    assert run_pairs(pretrained_tiny_nemo, corpus["train"], again, "--limit", "2", "--seed", "7", "--force",
                     "--samples-per-temperature", "0") == 0
    rows = [json.loads(line) for line in again.read_text().splitlines()]
    assert len({row["audio_filepath"] for row in rows}) == 2
    assert sum(row["kind"] == "policy" for row in rows) == 2  # the greedy transcripts alone


def test_bad_manifest_lines_and_audio_are_named_and_nothing_is_written(tmp_path, pretrained_tiny_nemo, corpus, capsys):
    good = Path(corpus["train"]).read_text().splitlines()
    clip = json.loads(good[0])["audio_filepath"]
    clip = clip if Path(clip).is_absolute() else str(Path(corpus["train"]).parent / clip)
    good[0] = json.dumps({**json.loads(good[0]), "audio_filepath": clip})
    cases = {
        "malformed JSON": [good[0], "{not json"],
        "missing key 'text'": [good[0], json.dumps({"audio_filepath": clip})],
        str(tmp_path / "gone.wav"): [good[0], json.dumps({"audio_filepath": str(tmp_path / "gone.wav"), "text": "a"})],
    }
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF....WAVEfmt not really")
    cases[str(tmp_path / "corrupt.wav")] = [good[0], json.dumps({"audio_filepath": str(tmp_path / "corrupt.wav"),
                                                                 "text": "a"})]
    for expected, lines in cases.items():
        manifest = tmp_path / "bad.json"
        manifest.write_text("\n".join(lines) + "\n")
        out = tmp_path / "out" / "pairs.jsonl"
        assert run_pairs(pretrained_tiny_nemo, str(manifest), out) == 2
        err = capsys.readouterr().err
        assert f"{manifest}:2:" in err and expected in err, err
        assert not out.parent.exists() or list(out.parent.iterdir()) == []  # no partial or temporary file


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit"),
    (["--temperatures", "0.6,abc"], "--temperatures"),
    (["--temperatures", "0,1"], "--temperatures"),
    (["--error-rates", "1.5"], "--error-rates"),
    (["--device", "tpu"], "--device"),
])
def test_bad_options_are_named(args, message, tmp_path, capsys):
    manifest = tmp_path / "m.json"
    manifest.write_text("")
    try:
        code = run_pairs("model.nemo", str(manifest), tmp_path / "p.jsonl", *args)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "p.jsonl").exists()


def test_output_that_is_the_manifest_is_refused(tmp_path, capsys):
    manifest = tmp_path / "m.json"
    manifest.write_text("{}\n")
    assert run_pairs("model.nemo", str(manifest), manifest, "--force") == 2
    assert "would destroy the input" in capsys.readouterr().err and manifest.read_text() == "{}\n"


def test_references_are_normalised_as_the_recipes_read_them(tmp_path, pretrained_tiny_nemo, corpus, capsys):
    """A cased, spaced manifest gives the same pairs as its lower-case twin: a lower-case policy's
    hypotheses are not penalised for case, and the reference rows are the normalised text."""
    folder = Path(corpus["train"]).parent  # audio paths made absolute: the twins live elsewhere
    rows = [json.loads(line) for line in Path(corpus["train"]).read_text().splitlines()[:2]]
    rows = [{**row, "audio_filepath": str(folder / row["audio_filepath"])} for row in rows]
    cased = tmp_path / "cased.json"
    cased.write_text("".join(json.dumps({**row, "text": "  " + row["text"].upper() + " "}) + "\n" for row in rows))
    plain = tmp_path / "plain.json"
    plain.write_text("".join(json.dumps(row) + "\n" for row in rows))
    for manifest in (cased, plain):
        assert run_pairs(pretrained_tiny_nemo, str(manifest), tmp_path / f"{manifest.stem}.jsonl",
                         "--samples-per-temperature", "1", "--seed", "3") == 0
    capsys.readouterr()
    from_cased = [json.loads(line) for line in (tmp_path / "cased.jsonl").read_text().splitlines()]
    from_plain = [json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines()]
    assert from_cased == from_plain
    assert all(row["reference"] == row["reference"].lower() for row in from_cased)


def test_a_folder_given_as_model_names_the_flag(tmp_path, corpus, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "best.nemo").write_bytes(b"")
    assert run_pairs(str(tmp_path / "run"), corpus["train"], tmp_path / "pairs.jsonl") != 0
    assert "--model" in capsys.readouterr().err

