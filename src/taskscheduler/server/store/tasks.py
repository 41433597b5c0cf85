"""Tasks in PostgreSQL: their SQL and row mapper (the fleet is :mod:`.fleet`'s); listing,
changing (revisions), pausing and resuming them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import psycopg2.errors

from taskscheduler.cron import parse_cron
from taskscheduler.protocol import TaskSpec
from taskscheduler.protocol.options import options_from_json, options_to_json
from taskscheduler.schedule import parse_frequency
from taskscheduler.server.store.assignment import rematch_rows, share_agents
from taskscheduler.server.store.audit import insert_audit
from taskscheduler.server.store.create_batch import (
    INSERT_TASKS_SQL,
    CreateBatches,
    PendingCreate,
    batch_parameters,
)
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import AuditEvent, Task, TaskChange, TaskState
from taskscheduler.server.store.rules import change_details, revise, utc, utc_or_none, utc_spec

_USEC = timedelta(microseconds=1)
#: The ``task_agents a`` rows of one task (:func:`rematch_rows`).
_OF_TASK = "a.task_id = %s::uuid"

#: The columns :func:`task_from_row` reads, from ``tasks t``.
TASK_COLUMNS = (
    "t.task_id, t.command, t.frequency, t.anchor, t.time_limit_us, t.created_at, t.deleted_at,"
    " t.revision, t.paused_at, t.updated_at, t.options, t.cron, t.timezone"
)

#: What each state of :class:`TaskState` is, in SQL over ``tasks t``.
_STATE_SQL = {
    TaskState.ACTIVE: "t.deleted_at IS NULL AND t.paused_at IS NULL",
    TaskState.PAUSED: "t.deleted_at IS NULL AND t.paused_at IS NOT NULL",
    TaskState.DELETED: "t.deleted_at IS NOT NULL",
}


def task_from_row(row: Sequence[Any]) -> Task:
    (
        task_id,
        command,
        frequency,
        anchor,
        time_limit_us,
        created_at,
        deleted_at,
        revision,
        paused_at,
        updated_at,
        options,
        cron,
        timezone,
    ) = row
    spec = TaskSpec(
        task_id=uuid.UUID(str(task_id)),
        command=command,
        frequency=None if frequency is None else parse_frequency(frequency),
        cron=None if cron is None else parse_cron(cron, timezone),
        anchor=utc(anchor),
        time_limit=timedelta(microseconds=time_limit_us),
        revision=revision,
        options=options_from_json(options),
    )
    return Task(
        spec,
        utc(created_at),
        utc_or_none(deleted_at),
        utc_or_none(paused_at),
        utc_or_none(updated_at),
    )


def schedule_columns(spec: TaskSpec) -> dict[str, Any]:
    """The columns that hold a task's schedule: frequency and interval, or cron and zone."""
    frequency, cron = spec.frequency, spec.cron
    return {
        "frequency": None if frequency is None else str(frequency),
        "interval": None if frequency is None else frequency.seconds,
        "cron": None if cron is None else cron.expression,
        "timezone": None if cron is None else cron.timezone,
    }


class Tasks:
    """Creates, reads and deletes tasks; assigns a new one to the fleet."""

    def __init__(self, db: Database) -> None:
        self._db = db
        self._batches = CreateBatches(db)

    async def create_task(
        self, spec: TaskSpec, created_at: datetime, audit: AuditEvent | None = None
    ) -> Task:
        task = Task(utc_spec(spec), utc(created_at))
        if spec.options.target.everywhere:
            # Every member runs it: nothing to match, so it joins a group commit.
            return await self._batches.create(task, audit)

        async def operation(cursor: Cursor) -> None:
            # The rows a batch writes (every member's included), then only the members
            # whose agent matches its target are kept running it, in the same transaction.
            await cursor.execute(INSERT_TASKS_SQL, batch_parameters([PendingCreate(task, audit)]))
            await rematch_rows(cursor, _OF_TASK, (str(spec.task_id),))

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

    async def list_tasks(
        self,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None = None,
        state: TaskState | None = None,
        command: str | None = None,
    ) -> list[Task]:
        conditions = ["true"]
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            conditions.append("(t.created_at, t.task_id) < (%(after_at)s, %(after_id)s::uuid)")
            params["after_at"], params["after_id"] = after[0], str(after[1])
        if state is not None:
            conditions.append(_STATE_SQL[state])
        if command is not None:
            # strpos, not LIKE: the operator's text is literal, wildcards and all.
            conditions.append("strpos(t.command, %(command)s) > 0")
            params["command"] = command

        async def operation(cursor: Cursor) -> list[Task]:
            await cursor.execute(
                f"""
                SELECT {TASK_COLUMNS} FROM tasks t
                WHERE {" AND ".join(conditions)}
                ORDER BY t.created_at DESC, t.task_id DESC
                LIMIT %(limit)s
                """,
                params,
            )
            return [task_from_row(row) for row in cursor.fetchall()]

        return await self._db.run(operation, transaction=False)

    async def _live_for_update(self, cursor: Cursor, task_id: uuid.UUID) -> Task | None:
        await cursor.execute(
            f"SELECT {TASK_COLUMNS} FROM tasks t"
            " WHERE t.task_id = %s::uuid AND t.deleted_at IS NULL FOR UPDATE",
            (str(task_id),),
        )
        row = cursor.fetchone()
        return None if row is None else task_from_row(row)

    async def update_task(
        self, task_id: uuid.UUID, change: TaskChange, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        async def operation(cursor: Cursor) -> tuple[Task, bool] | None:
            task = await self._live_for_update(cursor, task_id)
            if task is None:
                return None
            new = revise(task.spec, change, at)
            if new is None:
                return task, False
            retarget = new.options.target != task.spec.options.target
            if retarget:  # before its rows are written: see share_agents
                await share_agents(cursor, _OF_TASK, (str(task_id),))
            await cursor.execute(
                """
                UPDATE tasks SET command = %(command)s, frequency = %(frequency)s,
                                 interval_seconds = %(interval)s, anchor = %(anchor)s,
                                 time_limit_us = %(time_limit_us)s, revision = %(revision)s,
                                 updated_at = %(at)s, options = %(options)s::jsonb,
                                 cron = %(cron)s, timezone = %(timezone)s
                WHERE task_id = %(task_id)s::uuid;
                INSERT INTO task_revisions (task_id, revision, effective_at, anchor,
                                            interval_seconds, cron, timezone)
                    VALUES (%(task_id)s::uuid, %(revision)s, %(at)s, %(anchor)s, %(interval)s,
                            %(cron)s, %(timezone)s);
                UPDATE task_agents SET delivered_at = NULL, due_revision = %(revision)s
                WHERE task_id = %(task_id)s::uuid;
                """,
                {
                    "task_id": str(task_id),
                    "command": new.command,
                    **schedule_columns(new),
                    "anchor": new.anchor,
                    "time_limit_us": new.time_limit // _USEC,
                    "revision": new.revision,
                    "at": utc(at),
                    "options": json.dumps(options_to_json(new.options)),
                },
            )
            if retarget:
                # Members that match now get it; those that no longer do drop it.
                await rematch_rows(cursor, _OF_TASK, (str(task_id),))
            await insert_audit(cursor, replace(audit, details=change_details(task.spec, new)))
            return replace(task, spec=new, updated_at=utc(at)), True

        return await self._db.run(operation)

    async def pause_task(
        self, task_id: uuid.UUID, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        async def operation(cursor: Cursor) -> tuple[Task, bool] | None:
            task = await self._live_for_update(cursor, task_id)
            if task is None:
                return None
            if task.paused:
                return task, False
            await cursor.execute(
                """
                UPDATE tasks SET paused_at = %(at)s, updated_at = %(at)s
                WHERE task_id = %(task_id)s::uuid;
                INSERT INTO task_pauses (task_id, paused_at) VALUES (%(task_id)s::uuid, %(at)s);
                UPDATE task_agents SET removal_pending = true WHERE task_id = %(task_id)s::uuid;
                """,
                {"task_id": str(task_id), "at": utc(at)},
            )
            await insert_audit(cursor, audit)
            return replace(task, paused_at=utc(at), updated_at=utc(at)), True

        return await self._db.run(operation)

    async def resume_task(
        self, task_id: uuid.UUID, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        async def operation(cursor: Cursor) -> tuple[Task, bool] | None:
            task = await self._live_for_update(cursor, task_id)
            if task is None:
                return None
            if not task.paused:
                return task, False
            await cursor.execute(
                """
                UPDATE tasks SET paused_at = NULL, updated_at = %(at)s
                WHERE task_id = %(task_id)s::uuid;
                UPDATE task_pauses SET resumed_at = %(at)s
                WHERE task_id = %(task_id)s::uuid AND resumed_at IS NULL;
                UPDATE task_agents SET removal_pending = false, delivered_at = NULL
                WHERE task_id = %(task_id)s::uuid;
                """,
                {"task_id": str(task_id), "at": utc(at)},
            )
            await insert_audit(cursor, audit)
            return replace(task, paused_at=None, updated_at=utc(at)), True

        return await self._db.run(operation)
