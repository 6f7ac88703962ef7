"""Safe file handling: atomic writes, and checks of the paths a user gives.

Atomic writes go to a temporary file in the same folder, then rename over the target: a reader
(or a run resumed after SIGKILL) sees either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

from rlnf.errors import ConfigError


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


TEMPORARY_MARK = ".tmp"  # in every temporary name written here: ".{stem}.{random}.tmp{suffix}"


def default_file_mode(folder: bool = False) -> int:
    """0666 (0777 for a folder) less the process's umask: the mode ``open()`` or ``mkdir`` gives
    (mkstemp and mkdtemp give 0600 and 0700, which a teammate in the same group cannot read)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``
    with the umask's mode, as a file written in place would have."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last: some writers (NeMo save_to) care about ".nemo".
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f"{TEMPORARY_MARK}{target.suffix}",
                               dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp_path, default_file_mode())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def file_problem(path: str | os.PathLike, kind: str = "file") -> str | None:
    """Why ``path`` cannot be read as a regular file, or None when it can: 'not found', 'is a
    directory', 'is not a regular file (a FIFO, socket or device)', 'is a symlink loop'.
    ``kind='folder'`` asks for a directory instead."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "is a broken symlink" if path.is_symlink() else "not found"
    except OSError as exc:  # ELOOP, EACCES, ENAMETOOLONG, ...
        return "is a symlink loop" if exc.errno == errno.ELOOP else f"cannot be accessed ({exc.strerror})"
    if kind == "folder":
        return None if stat.S_ISDIR(mode) else "is not a folder"
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file (a FIFO, socket or device)"
    return None


def nemo_file_problem(path_or_name: str | os.PathLike) -> str | None:
    """Why a local .nemo checkpoint cannot be read (``file_problem``), or None when it can, or when
    ``path_or_name`` is no local path (no .nemo suffix and nothing there: a pretrained model's name).
    A folder gets a .nemo to give instead: a run folder's checkpoints/best.nemo or last.nemo, or a
    .nemo file inside it."""
    path = Path(path_or_name).expanduser()
    if not (path.suffix == ".nemo" or path.exists() or path.is_symlink()):
        return None
    problem = file_problem(path)
    if problem and path.is_dir():
        shown = Path(path_or_name)
        candidates = [shown / "checkpoints" / name for name in ("best.nemo", "last.nemo")] + [
            shown / name for name in ("best.nemo", "last.nemo")]
        found = [candidate for candidate in candidates if candidate.expanduser().is_file()] or sorted(
            shown / nemo.name for nemo in path.glob("*.nemo") if nemo.is_file())
        return "is a directory; give a .nemo file" + (f" such as {found[0]}" if found else "")
    return problem


def check_output_file(option: str, output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike]) -> Path:
    """Refuse an output path that names a folder or one of the command's ``inputs`` ({name: path}),
    before any work is done: writing it would destroy that input."""
    path = Path(output).expanduser()
    if path.is_dir():
        raise ConfigError(f"{option} {output} is a directory; give a file name")
    for name, given in inputs.items():
        if given and path.resolve() == Path(given).expanduser().resolve():
            raise ConfigError(f"{option} {output} is the {name}: writing it would destroy the input; choose "
                              "another file")
    return path
