"""Small helpers for files that must survive a crash: write aside, fsync, rename.

A reader never sees a half-written file: it sees the old one, the new one, or none.
Leftover ``*.tmp`` files are what a crash mid-write leaves; :func:`remove_leftovers`
clears them at start-up.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

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


def write_durably(files: Sequence[tuple[Path, bytes]], removals: Sequence[Path] = ()) -> None:
    """Write every file atomically and durably, then remove ``removals``: one fsync per
    file, one per folder.

    The writes are all or nothing: if any fails, no file of the batch is put in place
    (and nothing is removed).
    """
    written: list[tuple[Path, Path]] = []
    try:
        for path, data in files:
            written.append((_write_tmp(path, data, sync=True), path))
        for tmp, path in written:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    folders = {path.parent for path, _ in files}
    for path in removals:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        folders.add(path.parent)
    for folder in sorted(folders):
        fsync_directory(folder)


#: Runs a blocking function somewhere (a thread pool, or right here in tests).
RunInThread = Callable[[Callable[[], None]], "Deferred[None]"]


def run_here(function: Callable[[], None]) -> Deferred[None]:
    return maybeDeferred(function)


@dataclass(frozen=True)
class _Change:
    path: Path
    data: bytes | None  # None: remove the file
    sync: bool
    done: Deferred[None]


def _apply(changes: Sequence[_Change], failures: dict[Path, BaseException]) -> None:
    """Apply ``changes`` (one per path), recording in ``failures`` those that failed.

    The unsynced ones go first, one by one (a failure costs only its own change); the
    synced ones together, all or nothing (:func:`write_durably`).
    """
    synced = []
    for change in changes:
        if change.sync:
            synced.append(change)
            continue
        try:
            if change.data is None:
                remove(change.path, sync=False)
            else:
                atomic_write(change.path, change.data, sync=False)
        except OSError as e:
            failures[change.path] = e
    if not synced:
        return
    try:
        write_durably(
            [(c.path, c.data) for c in synced if c.data is not None],
            [c.path for c in synced if c.data is None],
        )
    except Exception as e:
        for change in synced:
            failures[change.path] = e


class BatchWriter:
    """Durable writes and removals in batches, off the reactor thread.

    An fsync costs about a millisecond; a thousand results due in one second would
    otherwise hold the reactor, and every run due meanwhile, for a second. Changes asked
    for in one reactor turn go to the thread together, one batch at a time, in the order
    asked: a file written twice, or written then removed, ends as the later change left
    it (within a batch only that change is applied, and every caller of the path hears
    its outcome). Each caller's Deferred fires once its change is done.
    """

    def __init__(self, clock: IReactorTime, run_in_thread: RunInThread = run_here) -> None:
        self._clock = clock
        self._run_in_thread = run_in_thread
        self._queue: list[_Change] = []
        self._scheduled: IDelayedCall | None = None
        self._flushing = False

    def write(self, path: Path, data: bytes, sync: bool = True) -> Deferred[None]:
        """Replace ``path`` with ``data``; durably unless ``sync`` is False (then it
        survives the agent's death, not a power loss)."""
        return self._ask(path, data, sync)

    def remove(self, path: Path, sync: bool = True) -> Deferred[None]:
        """Delete ``path`` if it is there; durably unless ``sync`` is False."""
        return self._ask(path, None, sync)

    def _ask(self, path: Path, data: bytes | None, sync: bool) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self._queue.append(_Change(path, data, sync, done))
        self._schedule()
        return done

    def _schedule(self) -> None:
        if not self._flushing and self._scheduled is None:
            self._scheduled = self._clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        batch, self._queue = self._queue, []
        if not batch:
            return
        self._flushing = True
        # The last change of each path is the one that counts.
        last = {change.path: change for change in batch}
        changes = list(last.values())
        failures: dict[Path, BaseException] = {}
        self._run_in_thread(lambda: _apply(changes, failures)).addBoth(
            self._flushed, batch, failures
        )

    def _flushed(
        self, outcome: object, batch: list[_Change], failures: dict[Path, BaseException]
    ) -> None:
        self._flushing = False
        for change in batch:
            error = failures.get(change.path)
            if isinstance(outcome, Failure):
                change.done.errback(outcome)
            elif error is not None:
                change.done.errback(Failure(error))
            else:
                change.done.callback(None)
        if self._queue:
            self._schedule()


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
