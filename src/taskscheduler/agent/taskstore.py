"""The tasks an agent runs, one file per task in ``<data-dir>/tasks/``.

A task is written durably before the agent acknowledges it, so that a restarted agent
resumes every task with no one acting. Writes and removals (each an fsync or two) go
through a :class:`~taskscheduler.agent.durable.BatchWriter`, off the reactor thread, in
the order asked: a task saved then deleted ends deleted.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from taskscheduler import protocol
from taskscheduler.agent.durable import (
    BatchWriter,
    atomic_write,
    ensure_directory,
    remove,
    remove_leftovers,
)
from taskscheduler.protocol import InvalidMessage, TaskSpec
from taskscheduler.schedule import utc_now_from


class TaskStore:
    """Task specs on disk, keyed by task id."""

    log = Logger()

    def __init__(self, directory: Path, writer: BatchWriter | None = None) -> None:
        self.directory = directory
        #: Writes off the reactor thread; None writes at once, on this thread.
        self._writer = writer

    def _path(self, task_id: uuid.UUID) -> Path:
        return self.directory / f"{task_id}.json"

    def load(self) -> list[TaskSpec]:
        """Every stored task. An unreadable file is logged and left for a person."""
        ensure_directory(self.directory)
        remove_leftovers(self.directory)
        specs = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                body = json.loads(path.read_bytes())
                # Stored specs always carry their anchor, so received_at is never used.
                spec = protocol.parse_task_spec(body, utc_now_from(0))
                if path.name != f"{spec.task_id}.json":
                    raise InvalidMessage("the file name does not match its task_id")
            except (OSError, ValueError) as e:
                self.log.error(
                    "ignoring unreadable task file {path}: {error}", path=str(path), error=str(e)
                )
                continue
            specs.append(spec)
        return specs

    def save(self, spec: TaskSpec) -> Deferred[None]:
        """Write ``spec`` durably, replacing any earlier version of the task; fires once
        it is on disk (OSError if it cannot be)."""
        data = json.dumps(protocol.task_spec_to_json(spec), ensure_ascii=False).encode("utf-8")
        if self._writer is None:
            return maybeDeferred(atomic_write, self._path(spec.task_id), data)
        return self._writer.write(self._path(spec.task_id), data)

    def delete(self, task_id: uuid.UUID) -> Deferred[None]:
        """Remove the task's file durably (nothing to do if it is not there)."""
        if self._writer is None:
            return maybeDeferred(remove, self._path(task_id))
        return self._writer.remove(self._path(task_id))
