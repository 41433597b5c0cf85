"""An in-memory :class:`~taskscheduler.server.store.interface.Store`, for unit tests.

It earns its place beside the real store: the unit tests of the API, dispatch, the
reporter and retention drive time with ``task.Clock``, which a real database's I/O does
not follow, and they run by the hundred in a fraction of a second. It keeps exactly the
contract of :class:`~taskscheduler.server.store.postgres.PostgresStore`: both pass
``tests/unit/test_store_contract.py`` and ``test_store_rules.py``, and every outcome rule
comes from :mod:`~taskscheduler.server.store.rules`, never re-derived here. Nothing
survives the process, and it is never unavailable. Every method finishes its work before
its first ``await`` would matter, so concurrent callers see each call as atomic, as they
would see a transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import datetime

from taskscheduler.protocol import TaskSpec
from taskscheduler.server.store.memory_claims import MemoryClaims
from taskscheduler.server.store.memory_fleet import MemoryFleet
from taskscheduler.server.store.memory_notifications import MemoryNotifications
from taskscheduler.server.store.memory_results import MemoryResults
from taskscheduler.server.store.memory_state import Assignment
from taskscheduler.server.store.records import AuditEvent, Task, TaskChange, TaskState
from taskscheduler.server.store.rules import change_details, revise, revision_of, utc, utc_spec


class MemoryStore(MemoryFleet, MemoryResults, MemoryClaims, MemoryNotifications):
    """The whole Store contract, in dictionaries: tasks and the audit log here, the other
    domains in :class:`MemoryFleet`, :class:`MemoryResults`, :class:`MemoryClaims` and
    :class:`MemoryNotifications`, over :class:`MemoryState`."""

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def create_task(
        self, spec: TaskSpec, created_at: datetime, audit: AuditEvent | None = None
    ) -> Task:
        if spec.task_id in self._tasks:
            raise ValueError(f"task {spec.task_id} already exists")
        task = Task(utc_spec(spec), utc(created_at))
        self._tasks[spec.task_id] = task
        self._assignments[spec.task_id] = {url: Assignment() for url in self._fleet}
        self._executions[spec.task_id] = {}
        self._revisions[spec.task_id] = [revision_of(task.spec, task.spec.anchor)]
        self._pauses[spec.task_id] = []
        self._rematch([spec.task_id])
        if audit is not None:
            self._append_audit(audit)
        return task

    async def get_task(self, task_id: uuid.UUID) -> Task | None:
        return self._tasks.get(task_id)

    async def list_tasks(
        self,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None = None,
        state: TaskState | None = None,
        command: str | None = None,
    ) -> list[Task]:
        tasks = sorted(self._tasks.values(), key=lambda t: (t.created_at, t.task_id), reverse=True)
        return [
            task
            for task in tasks
            if (after is None or (task.created_at, task.task_id) < (utc(after[0]), after[1]))
            and (state is None or task.state is state)
            and (command is None or command in task.spec.command)
        ][:limit]

    async def update_task(
        self, task_id: uuid.UUID, change: TaskChange, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        task = self._live(task_id)
        if task is None:
            return None
        new = revise(task.spec, change, at)
        if new is None:
            return task, False
        updated = replace(task, spec=new, updated_at=utc(at))
        self._tasks[task_id] = updated
        self._revisions[task_id].append(revision_of(new, at))
        for assignment in self._assignments[task_id].values():
            assignment.delivered = False
        self._rematch([task_id])
        self._append_audit(replace(audit, details=change_details(task.spec, new)))
        return updated, True

    async def pause_task(
        self, task_id: uuid.UUID, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        task = self._live(task_id)
        if task is None:
            return None
        if task.paused:
            return task, False
        paused = replace(task, paused_at=utc(at), updated_at=utc(at))
        self._tasks[task_id] = paused
        self._pauses[task_id].append((utc(at), None))
        for assignment in self._assignments[task_id].values():
            assignment.removal_pending = True
        self._append_audit(audit)
        return paused, True

    async def resume_task(
        self, task_id: uuid.UUID, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        task = self._live(task_id)
        if task is None:
            return None
        if not task.paused:
            return task, False
        resumed = replace(task, paused_at=None, updated_at=utc(at))
        self._tasks[task_id] = resumed
        pauses = self._pauses[task_id]
        pauses[-1] = (pauses[-1][0], utc(at))
        for assignment in self._assignments[task_id].values():
            assignment.removal_pending = False
            assignment.delivered = False
        self._append_audit(audit)
        return resumed, True

    async def delete_task(
        self, task_id: uuid.UUID, deleted_at: datetime, audit: AuditEvent
    ) -> Task | None:
        task = self._tasks.get(task_id)
        if task is None or task.deleted:
            return None
        deleted = replace(task, deleted_at=utc(deleted_at))
        self._tasks[task_id] = deleted
        for assignment in self._assignments[task_id].values():
            assignment.removal_pending = True
        self._append_audit(audit)
        return deleted

    async def audit_events(self, limit: int, before: int | None = None) -> list[AuditEvent]:
        events = [e for e in reversed(self._audit) if before is None or (e.event_id or 0) < before]
        return events[:limit]
