"""The tasks an agent runs, one file per task in ``<data-dir>/tasks/``.

A task is written durably before the agent acknowledges it, so that a restarted agent
resumes every task with no one acting.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from twisted.logger import Logger

from taskscheduler import protocol
from taskscheduler.agent.durable import atomic_write, ensure_directory, remove, remove_leftovers
from taskscheduler.protocol import InvalidMessage, TaskSpec
from taskscheduler.schedule import utc_now_from


class TaskStore:
    """Task specs on disk, keyed by task id."""

    log = Logger()

    def __init__(self, directory: Path) -> None:
        self.directory = directory

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

    def save(self, spec: TaskSpec) -> None:
        """Write ``spec`` durably, replacing any earlier version of the task."""
        data = json.dumps(protocol.task_spec_to_json(spec), ensure_ascii=False).encode("utf-8")
        atomic_write(self._path(spec.task_id), data)

    def delete(self, task_id: uuid.UUID) -> None:
        remove(self._path(task_id))
