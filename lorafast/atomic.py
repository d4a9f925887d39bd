"""Atomic file and folder writes: a reader (or a process killed mid-write) sees the old version or the new
one, never a part of either.

Everything is written under a temporary name in the destination's own folder (so the final rename stays on
one file system), flushed to disk with ``fsync`` and then renamed into place with ``os.replace``.
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
    """Yield a temporary file path beside ``path``; once the block has written it, it replaces ``path``.

    If the block raises, the temporary file is removed and ``path`` is left as it was.
    """
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
    """Yield an empty temporary folder beside ``path``; once the block has filled it, it replaces ``path``.

    ``path`` appears only complete: a folder already there is moved aside and deleted after the swap.
    If the block raises, the temporary folder is deleted and ``path`` is left as it was.
    """
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
