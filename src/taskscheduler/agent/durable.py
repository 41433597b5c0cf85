"""Small helpers for files that must survive a crash: write aside, fsync, rename.

A reader never sees a half-written file: it sees the old one, the new one, or none.
Leftover ``*.tmp`` files are what a crash mid-write leaves; :func:`remove_leftovers`
clears them at start-up.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def ensure_directory(path: Path) -> None:
    """Create ``path`` (and parents), private to the agent's user."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def fsync_directory(path: Path) -> None:
    """Make a rename or unlink in ``path`` itself durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tmp(path: Path, data: bytes, sync: bool) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def atomic_write(path: Path, data: bytes, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` atomically; durably too unless ``sync`` is False.

    Without ``sync`` the file still survives the agent's process dying (the page cache
    outlives it), just not a power loss.
    """
    tmp = _write_tmp(path, data, sync)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_directory(path.parent)


def atomic_create(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``data`` durably unless it exists; True if this call created it.

    ``link(2)`` fails if the target exists, so two processes racing cannot both win.
    """
    tmp = _write_tmp(path, data, sync=True)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return True


def remove(path: Path, sync: bool = True) -> None:
    """Delete ``path`` if it is there, durably unless ``sync`` is False."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    if sync:
        fsync_directory(path.parent)


def remove_leftovers(directory: Path) -> None:
    """Delete the temporary files an interrupted write left in ``directory``."""
    for leftover in directory.glob(f".*{TMP_SUFFIX}"):
        leftover.unlink(missing_ok=True)


class FolderInUse(Exception):
    """Another process holds the lock of this folder."""


class FolderLock:
    """An exclusive ``flock`` on ``<folder>/lock``, held for the life of the process.

    Two agents over one data folder would run every instant twice and fight over the
    spool; the second one must refuse to start. The kernel drops the lock when the
    process dies, however it dies.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / "lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        ensure_directory(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderInUse(
                f"{self.path.parent} is in use by another process (it holds {self.path})"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
