"""Deterministic offline speech: Debian's flite and espeak-ng, written as 16 kHz mono wav + NeMo manifests.

Voices are ``engine:name[:speed=N][:pitch=N]``, e.g. ``flite:kal16``, ``espeak:en+m3:speed=150``.
flite writes 16 kHz directly; espeak-ng writes 22,050 Hz and is resampled with ``sox -D`` (no
dither, so files are identical on every run). Optional white noise at a chosen SNR is seeded per file.

Corpus layout (``synthesize_corpus``), split by *sentence* so test sentences are never trained on:

    DIR/wav/<engine>_<voice>/<sentence id>.wav
    DIR/{train,val,test}.json                 the training voices
    DIR/heldout_{train,val,test}.json         the held-out voice (if any)
    DIR/corpus.json                           parameters and file checksums (cache key)

``synthesize_sentences`` speaks a list of sentences with one voice (the demo's other-text test set:
``rlnf/data/everyday_sentences.txt`` read by the held-out voice):

    DIR/wav/<engine>_<voice>/<NAME>_<index>.wav
    DIR/<NAME>.json                           the manifest, in the file's order
    DIR/<NAME>.index.json                     parameters and file checksums
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rlnf.errors import RlnfError
from rlnf.io import file_sha256
from rlnf.resources import sentences_file

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Voice:
    engine: str
    name: str
    speed: int | None = None
    pitch: int | None = None

    @classmethod
    def parse(cls, spec: str) -> "Voice":
        parts = spec.strip().split(":")
        if len(parts) < 2 or parts[0] not in ("flite", "espeak"):
            raise RlnfError(f"voice {spec!r} is not engine:name with engine flite or espeak")
        options = dict(part.split("=", 1) for part in parts[2:])
        return cls(parts[0], parts[1], int(options["speed"]) if "speed" in options else None,
                   int(options["pitch"]) if "pitch" in options else None)

    @property
    def tag(self) -> str:
        extra = "".join(f":{k}={v}" for k, v in (("speed", self.speed), ("pitch", self.pitch)) if v is not None)
        return f"{self.engine}:{self.name}{extra}"

    @property
    def folder(self) -> str:
        return self.tag.replace(":", "_").replace("+", "-").replace("=", "")


def require_tools(voices: Sequence[Voice]) -> None:
    needed = {"flite"} if any(v.engine == "flite" for v in voices) else set()
    if any(v.engine == "espeak" for v in voices):
        needed |= {"espeak-ng", "sox"}
    missing = sorted(tool for tool in needed if shutil.which(tool) is None)
    if missing:
        raise RlnfError(f"speech synthesis needs {', '.join(missing)}: install with "
                        f"`apt-get install {' '.join(missing)}` (scripts/demo.sh does this when run as root)")


def add_noise(audio: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """White Gaussian noise at ``snr_db`` relative to the signal's mean power (seeded)."""
    power = float(np.mean(audio.astype(np.float64) ** 2)) or 1e-10
    noise = np.random.default_rng(seed).standard_normal(len(audio)) * np.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(audio + noise, -1.0, 1.0).astype(np.float32)


def synthesize(text: str, voice: Voice, path: str | Path, noise_snr: float | None = None, seed: int = 0) -> None:
    """Speak ``text`` with ``voice`` into a 16 kHz mono 16-bit wav at ``path``."""
    import soundfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        if voice.engine == "flite":
            command = ["flite", "-voice", voice.name, "-t", text, "-o", str(raw)]
        else:
            command = ["espeak-ng", "-v", voice.name, "-w", str(raw)]
            command += ["-s", str(voice.speed)] if voice.speed else []
            command += ["-p", str(voice.pitch)] if voice.pitch is not None else []
            command += [text]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not raw.exists():
            raise RlnfError(f"{command[0]} failed for voice {voice.tag}: {result.stderr.strip()}")
        resampled = Path(tmp) / "16k.wav"
        if soundfile.info(str(raw)).samplerate != SAMPLE_RATE:
            subprocess.run(["sox", "-D", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(resampled)],
                           check=True, capture_output=True)
            raw = resampled
        audio, _ = soundfile.read(str(raw), dtype="float32")
        if audio.ndim > 1:
            audio = audio.mean(axis=1)
        if noise_snr is not None:
            audio = add_noise(audio, noise_snr, seed)
        soundfile.write(str(path), audio, SAMPLE_RATE, subtype="PCM_16")


def load_sentences(count: int, seed: int = 0, source: str | Path | None = None) -> list[str]:
    """``count`` distinct sentences from ``source`` (default: the shipped public-domain list), in a seeded order."""
    source = source or sentences_file()
    lines = read_sentences(source)
    if count > len(lines):
        raise RlnfError(f"asked for {count} sentences but {source} has {len(lines)}")
    order = np.random.default_rng(seed).permutation(len(lines))[:count]
    return [lines[i] for i in order]


def voices_for_sentences(count: int, num_voices: int, per_sentence: int | None,
                         rng: np.random.Generator) -> list[list[int]]:
    """For each of ``count`` sentences, the sorted indices of the voices that speak it: all of them when
    ``per_sentence`` is None or at least ``num_voices`` (``rng`` untouched), else ``per_sentence`` of them
    drawn without replacement from ``rng``, one draw per sentence in order."""
    if per_sentence is None or per_sentence >= num_voices:
        return [list(range(num_voices)) for _ in range(count)]
    return [sorted(int(i) for i in rng.choice(num_voices, size=per_sentence, replace=False)) for _ in range(count)]


def synthesize_corpus(
    output: str | Path,
    num_sentences: int = 600,
    voices: Sequence[str] = ("flite:kal16", "flite:awb", "flite:slt"),
    heldout_voice: str | None = "flite:rms",
    seed: int = 0,
    noise_snr: float | None = None,
    split: tuple[float, float] = (0.8, 0.1),
    workers: int = 2,
    progress: bool = True,
    voices_per_sentence: int | None = None,
) -> dict[str, str]:
    """Build (or re-use, when its parameters match) a corpus; returns {manifest name: path}.

    ``voices_per_sentence``: each sentence is spoken by this many of the training voices (a seeded
    choice), so many voices cost no more synthesis than a few; None: by all of them. The held-out
    voice speaks every sentence.
    """
    from tqdm.auto import tqdm

    from rlnf.data.manifest import write_manifest
    from rlnf.io import atomic_write_text

    output = Path(output).expanduser().resolve()
    train_voices = [Voice.parse(v) for v in voices]
    heldout = Voice.parse(heldout_voice) if heldout_voice else None
    all_voices = train_voices + ([heldout] if heldout else [])
    params = {"num_sentences": num_sentences, "voices": [v.tag for v in train_voices],
              "heldout_voice": heldout.tag if heldout else None, "seed": seed, "noise_snr": noise_snr,
              "split": list(split), "sentences_sha256": file_sha256(sentences_file()),
              "voices_per_sentence": voices_per_sentence}
    index_path = output / "corpus.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        if index.get("params") == params and all((output / p).exists() for p in index["manifests"].values()):
            return {name: str(output / path) for name, path in index["manifests"].items()}
    require_tools(all_voices)

    sentences = load_sentences(num_sentences, seed)
    n_train = int(round(split[0] * num_sentences))
    n_val = int(round(split[1] * num_sentences))
    splits = {"train": range(0, n_train), "val": range(n_train, n_train + n_val),
              "test": range(n_train + n_val, num_sentences)}

    picks = voices_for_sentences(num_sentences, len(train_voices), voices_per_sentence,
                                 np.random.default_rng([seed, 7]))
    speakers: dict[int, list[Voice]] = {}
    for sentence_id, picked in enumerate(picks):
        speakers[sentence_id] = [train_voices[i] for i in picked] + ([heldout] if heldout else [])
    jobs = []
    for voice_index, voice in enumerate(all_voices):
        for sentence_id, text in enumerate(sentences):
            if voice in speakers[sentence_id]:
                relative = f"wav/{voice.folder}/{sentence_id:05d}.wav"
                jobs.append((voice, voice_index, sentence_id, text, relative))

    def run(job) -> None:
        voice, voice_index, sentence_id, text, relative = job
        target = output / relative
        if not target.exists():
            synthesize(text, voice, target, noise_snr, seed=seed * 1_000_003 + voice_index * 100_003 + sentence_id)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(tqdm(pool.map(run, jobs), total=len(jobs), desc="synthesising speech", disable=not progress))

    import soundfile

    manifests: dict[str, str] = {}
    for group, group_voices in (("", train_voices), ("heldout_", [heldout] if heldout else [])):
        if not group_voices:
            continue
        for split_name, ids in splits.items():
            rows = []
            for voice in group_voices:
                for sentence_id in ids:
                    if voice not in speakers[sentence_id]:
                        continue
                    relative = f"wav/{voice.folder}/{sentence_id:05d}.wav"
                    info = soundfile.info(str(output / relative))
                    rows.append({"audio_filepath": relative, "duration": round(info.frames / info.samplerate, 4),
                                 "text": sentences[sentence_id], "speaker": voice.tag, "sentence_id": sentence_id})
            name = f"{group}{split_name}"
            write_manifest(output / f"{name}.json", rows)
            manifests[name] = f"{name}.json"
    checksums = {relative: file_sha256(output / relative) for *_, relative in jobs}
    atomic_write_text(index_path, json.dumps({"params": params, "manifests": manifests, "sha256": checksums},
                                             indent=1))
    return {name: str(output / path) for name, path in manifests.items()}


def read_sentences(source: str | Path) -> list[str]:
    """The sentences of a file: one a line, blank lines and lines starting with '#' left out."""
    return [line.strip() for line in Path(source).read_text(encoding="utf-8").splitlines()
            if line.strip() and not line.startswith("#")]


def synthesize_sentences(output: str | Path, sentences: Sequence[str], voice: str, name: str,
                         workers: int = 2, progress: bool = True) -> dict[str, str]:
    """Speak every sentence of ``sentences`` (in their order) with ``voice`` into ``output``: the
    manifest ``NAME.json`` (audio_filepath relative to ``output``, duration, text, speaker, sentence_id)
    and ``NAME.index.json`` (parameters and every file's checksum). Deterministic: the same sentences
    and voice give identical files (no noise, no random choice). Returns {"manifest", "index"} paths."""
    from tqdm.auto import tqdm

    import soundfile

    from rlnf.data.manifest import write_manifest
    from rlnf.io import atomic_write_text

    output = Path(output).expanduser().resolve()
    speaker = Voice.parse(voice)
    require_tools([speaker])
    relative = [f"wav/{speaker.folder}/{name}_{index:05d}.wav" for index in range(len(sentences))]

    def run(job) -> None:
        text, path = job
        synthesize(text, speaker, output / path)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(tqdm(pool.map(run, zip(sentences, relative)), total=len(sentences), desc=f"synthesising {name}",
                  disable=not progress))
    rows = []
    for index, (text, path) in enumerate(zip(sentences, relative)):
        info = soundfile.info(str(output / path))
        rows.append({"audio_filepath": path, "duration": round(info.frames / info.samplerate, 4), "text": text,
                     "speaker": speaker.tag, "sentence_id": index})
    manifest, index_path = output / f"{name}.json", output / f"{name}.index.json"
    write_manifest(manifest, rows)
    atomic_write_text(index_path, json.dumps({"params": {"voice": speaker.tag, "sentences": len(sentences)},
                                              "sha256": {path: file_sha256(output / path) for path in relative}},
                                             indent=1))
    return {"manifest": str(manifest), "index": str(index_path)}


def synthesize_corpus_cli(args) -> None:
    voices = [v for v in args.voices.split(",") if v]
    manifests = synthesize_corpus(args.output, num_sentences=args.sentences, voices=voices,
                                  heldout_voice=args.heldout_voice, seed=args.seed, noise_snr=args.noise_snr,
                                  voices_per_sentence=args.voices_per_sentence)
    for name, path in manifests.items():
        print(f"{name}: {path}")
