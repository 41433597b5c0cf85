"""The last instant of each task the agent fired, one small file per task in
``<data-dir>/lastrun/``.

After a backward step of the wall clock the scheduler labels runs ahead of the wall
clock (its *lead*, see :mod:`taskscheduler.agent.scheduler`). The lead lives in memory;
these instants are what a restarted agent derives it from, so that it never plans an
instant it already ran (run twice, the server would refuse the second result with 409).

Each instant is recorded as it fires (before its run starts), written off the reactor
thread by the spool's :class:`~taskscheduler.agent.durable.BatchWriter`, without an
fsync: a file that survives the agent's death, not a power loss. The writer applies
changes in the order asked, so an instant is on disk before its result is durable, and
so before it can be reported and leave the spool. Until then the runner's record of the
run (which the restarted agent adopts) or the spool names the instant: whenever the
agent dies, one of the three names every instant it fired.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime
from pathlib import Path

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.durable import (
    BatchWriter,
    atomic_write,
    ensure_directory,
    remove,
    remove_leftovers,
)
from taskscheduler.schedule import format_instant, parse_instant

#: The manual runs of one task remembered: the server delivers one again only until its
#: starting deadline, so only the last few can come again.
MANUAL_KEPT = 100
_MANUAL_SUFFIX = ".manual"


class LastRuns:
    """The last instant fired per task: in memory, and on disk when given a folder."""

    log = Logger()

    def __init__(self, directory: Path | None = None, writer: BatchWriter | None = None) -> None:
        self.directory = directory
        #: Writes off the reactor thread; None writes at once, on this thread.
        self._writer = writer
        self._last: dict[uuid.UUID, datetime] = {}
        self._recorded: dict[uuid.UUID, datetime] = {}  # what the files say (or will)
        self._manual: dict[uuid.UUID, list[datetime]] = {}  # oldest first
        # Manual runs whose acceptance is being written, and the deliveries that wait.
        self._accepting: dict[tuple[uuid.UUID, datetime], list[Deferred[None]]] = {}

    def load(self, keep: Collection[uuid.UUID]) -> None:
        """Read what a previous life recorded for the tasks in ``keep``; delete the rest
        (tasks deleted since: nothing of theirs will run again)."""
        if self.directory is None:
            return
        ensure_directory(self.directory)
        remove_leftovers(self.directory)
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith("."):
                continue
            manual = path.name.endswith(_MANUAL_SUFFIX)
            try:
                task_id = uuid.UUID(path.name.removesuffix(_MANUAL_SUFFIX))
                text = path.read_text(encoding="ascii")
                if manual:
                    instants = [parse_instant(line) for line in text.split()]
                else:
                    at = parse_instant(text.strip())
            except (OSError, ValueError) as e:
                self.log.error(
                    "ignoring unreadable last-run file {path}: {error}",
                    path=str(path),
                    error=str(e),
                )
                continue
            if task_id not in keep:
                remove(path, sync=False)
            elif manual:
                self._manual[task_id] = sorted(instants)[-MANUAL_KEPT:]
            else:
                self.note(task_id, at)
                self._recorded[task_id] = at

    def note(self, task_id: uuid.UUID, at: datetime) -> None:
        """``at`` was fired (or may have been): remember it, in memory only."""
        last = self._last.get(task_id)
        if last is None or at > last:
            self._last[task_id] = at

    def record(self, task_id: uuid.UUID, at: datetime) -> None:
        """``at`` is fired now: remember it, and write it out. Never raises."""
        self.note(task_id, at)
        if self.directory is None:
            return
        last = self._recorded[task_id] = self._last[task_id]
        path = self.directory / str(task_id)
        data = format_instant(last).encode("ascii")
        if self._writer is not None:
            self._writer.write(path, data, sync=False).addErrback(self._not_written, task_id)
            return
        try:
            atomic_write(path, data, sync=False)
        except OSError:
            self._not_written(Failure(), task_id)

    def record_noted(self) -> None:
        """Write out what was only noted (what the spool and the runs a previous life
        left say), so that it outlives them."""
        for task_id, at in list(self._last.items()):
            if self._recorded.get(task_id) != at:
                self.record(task_id, at)

    def _not_written(self, failure: Failure, task_id: uuid.UUID) -> None:
        self.log.failure(
            "could not record the last run of task {task_id}: a restart may run it again",
            failure,
            task_id=str(task_id),
        )

    def is_manual(self, task_id: uuid.UUID, at: datetime) -> bool:
        """Whether the manual run of ``task_id`` labelled ``at`` was accepted."""
        return at in self._manual.get(task_id, ())

    async def accept_manual_once(self, task_id: uuid.UUID, at: datetime) -> bool:
        """Accept the manual run ``at`` of ``task_id`` (:meth:`accept_manual`) unless it
        was accepted before: False then, and it must not run again. A delivery of the same
        run while its acceptance is being written waits for that write (if it fails, this
        one tries again); OSError if the acceptance cannot be written."""
        key = (task_id, at)
        while key in self._accepting:
            waiter: Deferred[None] = Deferred()
            self._accepting[key].append(waiter)
            await waiter
        if self.is_manual(task_id, at):
            return False
        self._accepting[key] = []
        try:
            await self.accept_manual(task_id, at)
        finally:
            for waiter in self._accepting.pop(key):
                waiter.callback(None)
        return True

    def accept_manual(self, task_id: uuid.UUID, at: datetime) -> Deferred[None]:
        """Remember the manual run ``at`` of ``task_id``; fires once it is written (no
        fsync: it outlives the agent, not the host), or fails, then forgotten (OSError)."""
        kept = self._manual.setdefault(task_id, [])
        kept.append(at)
        kept.sort()
        del kept[:-MANUAL_KEPT]
        if self.directory is None:
            return succeed(None)
        path = self.directory / f"{task_id}{_MANUAL_SUFFIX}"
        data = "".join(format_instant(i) + "\n" for i in kept).encode("ascii")
        if self._writer is not None:
            written = self._writer.write(path, data, sync=False)
        else:
            try:
                atomic_write(path, data, sync=False)
            except OSError:
                written = fail()
            else:
                written = succeed(None)
        return written.addErrback(self._manual_not_written, task_id, at)

    def _manual_not_written(self, failure: Failure, task_id: uuid.UUID, at: datetime) -> Failure:
        kept = self._manual.get(task_id, [])
        if at in kept:
            kept.remove(at)
        return failure

    def last(self, task_id: uuid.UUID) -> datetime | None:
        """The last instant of ``task_id`` fired, if any."""
        return self._last.get(task_id)

    def latest(self) -> datetime | None:
        """The latest instant fired, of any task."""
        return max(self._last.values(), default=None)
