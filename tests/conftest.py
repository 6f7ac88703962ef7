"""Shared fixtures: synthesised speech (flite / espeak-ng) and tiny NeMo CTC models built in-process.

No test needs a network. Speech tools come from apt (scripts/test.sh installs them); when they
are missing, tests that need speech are skipped locally but FAIL under CI (CI=true), so a
missing install step cannot hide behind skips.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def manifest_cache(tmp_path_factory):
    """Validated-manifest cache entries go to a temporary folder, never to the user's ~/.cache.
    The environment variable reaches the CLI runs that tests start as subprocesses too."""
    folder = tmp_path_factory.mktemp("rlnf-cache")
    previous = os.environ.get("RLNF_CACHE")
    os.environ["RLNF_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("RLNF_CACHE", None)
    else:
        os.environ["RLNF_CACHE"] = previous


def load_script(name: str):
    """scripts/<name>.py imported as a module (the scripts are not a package)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(f"{name}_script", root / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require_tool(*tools: str) -> None:
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        message = f"needs {', '.join(missing)} (apt-get install {' '.join(missing)})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, str]:
    """A small deterministic corpus: 16 sentences x 2 training voices + a held-out voice."""
    require_tool("flite", "espeak-ng", "sox")
    from rlnf.synth import synthesize_corpus

    folder = tmp_path_factory.mktemp("corpus")
    return synthesize_corpus(folder, num_sentences=16, voices=["flite:kal16", "espeak:en+m3"],
                             heldout_voice="flite:rms", progress=False, split=(0.75, 0.125))


@pytest.fixture(scope="session")
def nemo_quiet():
    from rlnf.cli import quiet_nemo

    quiet_nemo()


@pytest.fixture(scope="session")
def tiny_nemo(tmp_path_factory, nemo_quiet) -> str:
    """A tiny character QuartzNet (English letters) saved as .nemo."""
    from rlnf.models import ENGLISH_LABELS, build_ctc_model

    path = tmp_path_factory.mktemp("models") / "tiny.nemo"
    build_ctc_model(ENGLISH_LABELS, "tiny", seed=0).save_to(str(path))
    return str(path)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> str:
    """A SentencePiece tokenizer (64 pieces, trained in-process on the bundled sentences) in the folder
    layout NeMo's ``tokenizer: {dir, type: bpe}`` reads: tokenizer.model and vocab.txt."""
    import sentencepiece

    from rlnf.reward_model.checkpoint import train_sentencepiece
    from rlnf.synth import load_sentences

    folder = tmp_path_factory.mktemp("bpe_tokenizer")
    model_file = train_sentencepiece(load_sentences(1500), folder / "tokenizer", vocab_size=64)
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    (folder / "vocab.txt").write_text("".join(pieces.id_to_piece(i) + "\n" for i in range(pieces.get_piece_size())))
    return str(folder)


@pytest.fixture()
def tiny_policy(tiny_nemo):
    from rlnf.policy import CTCPolicy

    return CTCPolicy.load(tiny_nemo, "cpu")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pretrained_tiny_nemo(tmp_path_factory, tiny_nemo, corpus) -> str:
    """The tiny model after ~100 supervised CTC steps on the corpus: peaked (about 1 nat per frame)
    rather than uniform, like a real starting policy. Takes about 8 s."""
    import torch

    from rlnf.data.loader import AudioDataset, collate
    from rlnf.data.manifest import read_manifest
    from rlnf.policy import CTCPolicy, labels_to_padded

    torch.manual_seed(0)
    utterances, _ = read_manifest(corpus["train"])
    dataset = AudioDataset(utterances, 16000)
    policy = CTCPolicy.load(tiny_nemo)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=1e-2)
    policy.model.train()
    for step in range(100):
        batch = collate([dataset[(step * 8 + i) % len(dataset)] for i in range(8)])
        log_probs, encoded_len, _ = policy.model(input_signal=batch.audio, input_signal_length=batch.audio_len)
        labels, label_len = labels_to_padded([policy.encode_text(u.text) for u in batch.utterances])
        loss = torch.nn.functional.ctc_loss(log_probs.transpose(0, 1), labels, encoded_len, label_len,
                                            blank=policy.blank_id, zero_infinity=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("models") / "pretrained_tiny.nemo"
    policy.save(path)
    return str(path)


@pytest.fixture()
def warnings_of():
    """``warnings_of(logger_name)`` -> a list that collects that logger's WARNING messages while the
    test runs (NeMo's logging setup keeps such records from pytest's caplog)."""
    import logging

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    attached: list[tuple[logging.Logger, Collect]] = []

    def attach(name: str) -> list[str]:
        collect = Collect()
        logging.getLogger(name).addHandler(collect)
        attached.append((logging.getLogger(name), collect))
        return collect.messages

    yield attach
    for logger, collect in attached:
        logger.removeHandler(collect)
