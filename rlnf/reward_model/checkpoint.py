"""Self-contained reward checkpoint folders: config.json (architecture, feature settings, text-id
convention), model.safetensors and tokenizer.model. Written atomically (temp folder + rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from rlnf.io import TEMPORARY_MARK, default_file_mode


def save_reward_folder(model, processor, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=TEMPORARY_MARK, dir=folder.parent))
    try:
        os.chmod(staging, default_file_mode(folder=True))
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        if folder.exists():
            retired = folder.with_name(f".{folder.name}.old{TEMPORARY_MARK}")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(folder, retired)
            os.replace(staging, folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def train_sentencepiece(texts: list[str], model_prefix: str | Path, vocab_size: int) -> Path:
    """Train a unigram SentencePiece model on ``texts``; ids: unk 0, bos 1, eos 2 (``</s>``), no pad piece.

    ``hard_vocab_limit=False`` lets a small corpus produce fewer pieces than ``vocab_size``.
    """
    import sentencepiece

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([t for t in texts if t.strip()]), model_prefix=str(model_prefix),
        vocab_size=vocab_size, model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return model_prefix.with_suffix(".model")
