"""Atomic file and folder writes: a reader (or a process killed mid-write) sees the old or new version, never part.

Written under a temporary name in the destination's folder (one file system), ``fsync``-ed, then ``os.replace``-d.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_sibling(path: Path) -> Path:
    """A hidden, unused name beside ``path``: ``.<stem>.tmp-<pid>-<random><suffix>`` (writers that go by the
    suffix, such as matplotlib's ``savefig``, still see it)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # folders cannot be opened on some systems; their entries are then flushed with the files
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces it after the block (removed if the block raises)."""
    path = Path(path)
    temporary = temporary_sibling(path)
    try:
        yield temporary
        fsync_path(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_path(path.parent)


def write_atomically(path: str | Path, data: bytes | str) -> None:
    """Replace ``path`` by ``data`` (str is written as UTF-8) in one step."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty folder beside ``path`` that replaces it, complete, after the block (an old one is moved aside
    and deleted after the swap); if the block raises it is deleted and ``path`` left as it was."""
    path = Path(path)
    temporary = temporary_sibling(path)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        for file in temporary.rglob("*"):
            fsync_path(file)
        fsync_path(temporary)
        previous = temporary_sibling(path) if path.exists() else None
        if previous is not None:
            os.replace(path, previous)
        os.replace(temporary, path)
        if previous is not None:
            shutil.rmtree(previous)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    fsync_path(path.parent)
