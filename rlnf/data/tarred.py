"""NeMo tarred audio datasets: a manifest whose ``audio_filepath`` values are members of tar shards.

``data.tarred_audio_filepaths`` names the shards in NeMo's syntax (``audio_{0..7}.tar``, or NeMo's
``audio__OP_0..7_CL_.tar``), expanded by NeMo's own ``expand_sharded_filepaths``. Each manifest
line's ``shard_id`` picks its shard, the shard_id-th path of that expansion (NeMo's
``convert_to_tarred_audio_dataset.py`` writes shard N as ``audio_N.tar``), and its
``audio_filepath`` is the member's name in that shard.

A member is then known by one path string, ``<shard>.tar/<member>`` (lhotse's spelling for a file
inside a tar), so a tarred manifest becomes the same ``UtteranceTable`` as a plain one, and the same
batching, bucketing, process sharding and resume position apply unchanged.

Members are read by random access: each process lists a shard's members once (Python's ``tarfile``,
headers only: name, data offset, size) the first time it needs that shard, then reads a member as
one byte range. Compressed tars (``.tar.gz``) cannot be read this way and are refused.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

from rlnf.errors import DataError

_MARK = ".tar/"  # <shard>.tar/<member>


def expand_shards(spec: str) -> list[str]:
    """The absolute tar paths of ``data.tarred_audio_filepaths`` (NeMo's brace syntax), each checked."""
    from nemo.collections.asr.data.audio_to_text import expand_sharded_filepaths

    from rlnf.io import file_problem

    shards = []
    for path in expand_sharded_filepaths(spec, shard_strategy="replicate", world_size=1, global_rank=0):
        shard = Path(path).expanduser()
        problem = file_problem(shard)
        if problem:
            raise DataError(f"data.tarred_audio_filepaths={spec!r}: tar file {problem}: {shard}")
        if not shard.name.endswith(".tar"):
            raise DataError(f"data.tarred_audio_filepaths={spec!r}: {shard} is not an uncompressed .tar file "
                            "(members are read by random access, which a compressed archive does not allow)")
        shards.append(str(shard.resolve()))
    return shards


def member_key(row: dict[str, Any], audio: str, shards: list[str]) -> str:
    """The path ``<shard>.tar/<member>`` of one tarred-manifest row; DataError (without location)
    when its ``shard_id`` names no shard."""
    shard_id = row.get("shard_id")
    if shard_id is None:
        raise DataError("missing key 'shard_id' (each line of a tarred manifest names the shard holding its "
                        "audio)")
    if isinstance(shard_id, bool) or not isinstance(shard_id, int) or not 0 <= shard_id < len(shards):
        raise DataError(f"'shard_id' {shard_id!r} names no tar file: data.tarred_audio_filepaths expands to "
                        f"{len(shards)} (shard_id 0 to {len(shards) - 1})")
    if row.get("offset"):
        raise DataError("'offset' is set: segments of a clip are not supported in tarred manifests")
    return f"{shards[shard_id]}/{audio}"


def split_member(path: str) -> tuple[str, str] | None:
    """(shard, member) when ``path`` names a member of an existing tar file, else None (a plain file)."""
    start = path.find(_MARK)
    while start >= 0:
        shard = path[:start + len(_MARK) - 1]
        if os.path.isfile(shard):
            return shard, path[start + len(_MARK):]
        start = path.find(_MARK, start + 1)
    return None


_indexes: dict[tuple[str, int, int], dict[str, tuple[int, int]]] = {}
_index_locks: dict[tuple[str, int, int], threading.Lock] = {}


def _member_index(shard: str) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of the regular files in ``shard``, read once per process
    (and again when the file's size or modification time changes). Threads asking for the same shard
    wait for one reading of it."""
    import tarfile

    info = os.stat(shard)
    key = (shard, info.st_size, info.st_mtime_ns)
    with _index_locks.setdefault(key, threading.Lock()):
        if key not in _indexes:
            try:
                with tarfile.open(shard, "r:") as tar:
                    _indexes[key] = {member.name: (member.offset_data, member.size)
                                     for member in tar.getmembers() if member.isreg()}
            except (tarfile.TarError, OSError) as exc:
                raise DataError(f"cannot read tar file {shard}: {exc}") from None
        return _indexes[key]


def member_names(shard: str) -> list[str]:
    """The names of the regular files in the tar file ``shard`` (read once per process, as for loading)."""
    return list(_member_index(shard))


def clip_source(path: str) -> str | io.BytesIO:
    """What soundfile should open for ``path``: the path itself, or a tar member's bytes in memory.

    Raises:
        DataError naming the tar file and the member when the member is missing or cut off.
    """
    located = split_member(path)
    if located is None:
        return path
    shard, member = located
    found = _member_index(shard).get(member)
    if found is None:
        raise DataError(f"member {member!r} not found in tar file {shard}")
    offset, size = found
    with open(shard, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) < size:
        raise DataError(f"member {member!r} of tar file {shard} is cut off ({len(data)} of {size} bytes)")
    return io.BytesIO(data)
