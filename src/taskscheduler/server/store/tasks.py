"""Tasks in PostgreSQL: their SQL and row mapper (the fleet is :mod:`.fleet`'s)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import psycopg2.errors

from taskscheduler.protocol import TaskSpec
from taskscheduler.schedule import parse_frequency
from taskscheduler.server.store.audit import insert_audit
from taskscheduler.server.store.interface import AuditEvent, Task
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.rules import utc, utc_or_none, utc_spec

_USEC = timedelta(microseconds=1)

#: The columns :func:`task_from_row` reads, from ``tasks t``.
TASK_COLUMNS = (
    "t.task_id, t.command, t.frequency, t.anchor, t.time_limit_us, t.created_at, t.deleted_at"
)


def task_from_row(row: Sequence[Any]) -> Task:
    task_id, command, frequency, anchor, time_limit_us, created_at, deleted_at = row
    spec = TaskSpec(
        task_id=uuid.UUID(str(task_id)),
        command=command,
        frequency=parse_frequency(frequency),
        anchor=utc(anchor),
        time_limit=timedelta(microseconds=time_limit_us),
    )
    return Task(spec, utc(created_at), utc_or_none(deleted_at))


class Tasks:
    """Creates, reads and deletes tasks; assigns a new one to the fleet."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def create_task(
        self, spec: TaskSpec, created_at: datetime, audit: AuditEvent | None = None
    ) -> Task:
        task = Task(utc_spec(spec), utc(created_at))

        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                """
                LOCK TABLE fleet IN SHARE MODE;
                INSERT INTO tasks (task_id, command, frequency, interval_seconds, anchor,
                                   time_limit_us, created_at)
                    VALUES (%(task_id)s::uuid, %(command)s, %(frequency)s,
                            %(interval)s, %(anchor)s, %(time_limit_us)s, %(created_at)s);
                INSERT INTO task_agents (task_id, agent_url)
                    SELECT %(task_id)s::uuid, agent_url FROM fleet;
                """,
                {
                    "task_id": str(spec.task_id),
                    "command": spec.command,
                    "frequency": str(spec.frequency),
                    "interval": spec.frequency.seconds,
                    "anchor": task.spec.anchor,
                    "time_limit_us": spec.time_limit // _USEC,
                    "created_at": task.created_at,
                },
            )
            if audit is not None:
                await insert_audit(cursor, audit)

        try:
            await self._db.run(operation)
        except psycopg2.errors.UniqueViolation:
            raise ValueError(f"task {spec.task_id} already exists") from None
        return task

    async def get_task(self, task_id: uuid.UUID) -> Task | None:
        async def operation(cursor: Cursor) -> Task | None:
            await cursor.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks t WHERE t.task_id = %s::uuid",
                (str(task_id),),
            )
            row = cursor.fetchone()
            return None if row is None else task_from_row(row)

        return await self._db.run(operation, transaction=False)

    async def delete_task(
        self, task_id: uuid.UUID, deleted_at: datetime, audit: AuditEvent
    ) -> Task | None:
        async def operation(cursor: Cursor) -> Task | None:
            await cursor.execute(
                f"""
                UPDATE tasks t SET deleted_at = %(deleted_at)s
                WHERE t.task_id = %(task_id)s::uuid AND t.deleted_at IS NULL
                RETURNING {TASK_COLUMNS}
                """,
                {"task_id": str(task_id), "deleted_at": deleted_at},
            )
            row = cursor.fetchone()
            if row is None:
                return None
            await cursor.execute(
                "UPDATE task_agents SET removal_pending = true WHERE task_id = %s::uuid",
                (str(task_id),),
            )
            await insert_audit(cursor, audit)
            return task_from_row(row)

        return await self._db.run(operation)
