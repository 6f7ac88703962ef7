"""The manifest cache: a validated manifest's utterance table, saved so the next run starts at once.

An entry is keyed by the manifest's resolved path, size and modification time (ns) and by every
option that changes what validation keeps (text key, duration limits, skip_bad, validate mode, the
tar shards of a tarred manifest): a changed manifest or option misses and rebuilds. Entries live in
``$RLNF_CACHE`` (default ``$XDG_CACHE_HOME/rlnf``, else ``~/.cache/rlnf``), never beside the user's
data, and are written atomically (temporary file + rename). An entry that cannot be read is ignored
with a warning and rebuilt. Audio files are not part of the key: a clip changed after caching is
caught when it is loaded (``AudioDataset`` checks every clip's header before decoding it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the table's columns or their meaning change
COLUMNS = ("path_index", "text_index", "durations", "lines", "offsets")


def cache_folder(setting: str | None) -> Path | None:
    """The folder of ``data.cache_dir``: 'auto' -> $RLNF_CACHE, $XDG_CACHE_HOME/rlnf or ~/.cache/rlnf;
    None -> no cache."""
    if setting is None:
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if os.environ.get("RLNF_CACHE"):
        return Path(os.environ["RLNF_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rlnf"


def cache_key(manifest: Path, options: dict[str, Any]) -> dict[str, Any]:
    """What an entry must match: the manifest file as it is now, and the validation options."""
    info = manifest.stat()
    return {"version": CACHE_VERSION, "manifest": str(manifest), "size": info.st_size,
            "mtime_ns": info.st_mtime_ns, **options}


def entry_path(folder: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return folder / "manifests" / f"{digest}.npz"


def load_entry(folder: Path, key: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """(columns, meta) of the entry for ``key``, or None when there is none or it is unreadable."""
    path = entry_path(folder, key)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as entry:
            meta = json.loads(entry["meta"].tobytes().decode("utf-8"))
            columns = {name: entry[name] for name in COLUMNS}
        if meta.get("key") != key:
            raise ValueError("its key does not match its name")
        lengths = {len(column) for column in columns.values()}
        if len(lengths) != 1:
            raise ValueError("its columns differ in length")
        return columns, meta
    except Exception as exc:  # noqa: BLE001 - a damaged entry of any kind is rebuilt, never fatal
        log.warning("ignoring the unreadable manifest cache entry %s (%s: %s); rebuilding it", path,
                    type(exc).__name__, exc)
        return None


def save_entry(folder: Path, key: dict[str, Any], columns: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write the entry atomically; a cache that cannot be written costs the next run time, not this one."""
    from rlnf.io import atomic_save

    payload = json.dumps({**meta, "key": key}, ensure_ascii=False).encode("utf-8")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to a path
            np.savez(handle, meta=np.frombuffer(payload, dtype=np.uint8), **columns)

    try:
        atomic_save(entry_path(folder, key), write)
    except OSError as exc:
        log.warning("cannot write the manifest cache in %s (%s); the next run validates again", folder, exc)
