"""Small file-system helpers: directory fsync (the snapshot writer, the write-ahead log)
and atomic file replacement (the SDK's publisher state, rollback memory and checkpoints)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable


def fsync_path(path: Path) -> None:
    """fsync a file or a directory by its path (opened read-only; Linux flushes what any
    descriptor of it wrote)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a new or renamed file) durable: fsync the directory itself."""
    fsync_path(path)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new file, whole.

    ``durable`` adds fsyncs (file, then directory) so that a machine crash keeps it
    too; without them the rename still survives a crash of the process.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "state.json"
        >>> atomic_write(p, b"{}"); p.read_bytes()
        b'{}'
    """
    atomic_write_with(path, lambda f: f.write(data), durable)


def atomic_write_with(path: Path, write: Callable[[BinaryIO], Any], durable: bool = True) -> None:
    """:func:`atomic_write` of whatever ``write(file)`` writes (e.g. ``torch.save``)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir_if_possible(path.parent)


def fsync_dir_if_possible(d: Path) -> None:
    """:func:`fsync_dir` where the platform allows it; errors are ignored."""
    # The rename is durable only once the directory entry is; not every platform can.
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
