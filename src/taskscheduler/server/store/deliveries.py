"""Which agent has acknowledged which task (at which revision), which deleted or paused
task it has yet to drop, and which run-now it has yet to be told of.

An assignment (a ``task_agents`` row) is made when a task is created or the fleet
changes (:mod:`~taskscheduler.server.store.tasks`); only those whose agent matches the
task's target count (:mod:`~taskscheduler.server.store.assignment`). This module tracks
its delivery and, once the task is deleted or paused or its agent stops matching, its
removal.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime

from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import ManualRun, Task
from taskscheduler.server.store.rules import utc
from taskscheduler.server.store.tasks import TASK_COLUMNS, task_from_row


def _ids(task_ids: Sequence[uuid.UUID]) -> list[str]:
    # Sorted: concurrent updates take row locks in the same order, so never deadlock.
    return sorted({str(t) for t in task_ids})


class Deliveries:
    """Assignments: delivered or not, removal pending or not."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def undelivered_tasks(self, agent_url: str, limit: int) -> list[Task]:
        async def operation(cursor: Cursor) -> list[Task]:
            await cursor.execute(
                f"""
                SELECT {TASK_COLUMNS}
                FROM task_agents a JOIN tasks t ON t.task_id = a.task_id
                WHERE a.agent_url = %s AND a.delivered_at IS NULL AND t.deleted_at IS NULL
                  AND t.paused_at IS NULL AND a.matched
                ORDER BY t.created_at, t.task_id
                LIMIT %s
                """,
                (agent_url, limit),
            )
            return [task_from_row(row) for row in cursor.fetchall()]

        return await self._db.run(operation, transaction=False)

    async def assigned_task_ids(self, agent_url: str) -> set[uuid.UUID]:
        async def operation(cursor: Cursor) -> set[uuid.UUID]:
            await cursor.execute(
                """
                SELECT a.task_id FROM task_agents a JOIN tasks t ON t.task_id = a.task_id
                WHERE a.agent_url = %s AND t.deleted_at IS NULL AND t.paused_at IS NULL
                  AND a.matched
                """,
                (agent_url,),
            )
            return {uuid.UUID(str(row[0])) for row in cursor.fetchall()}

        return await self._db.run(operation, transaction=False)

    async def mark_delivered(
        self,
        agent_url: str,
        task_ids: Sequence[uuid.UUID],
        agent_id: uuid.UUID,
        revisions: Sequence[int] | None = None,
    ) -> None:
        if not task_ids:
            return
        delivered = dict(
            zip(
                (str(t) for t in task_ids),
                revisions if revisions is not None else [None] * len(task_ids),
                strict=True,
            )
        )
        ids = sorted(delivered)

        async def operation(cursor: Cursor) -> None:
            # due_revision is the target row's own: a PATCH committing meanwhile is seen.
            await cursor.execute(
                """
                UPDATE task_agents a SET delivered_at = now(), agent_id = %s::uuid
                FROM unnest(%s::uuid[], %s::integer[]) AS v (task_id, revision)
                WHERE a.agent_url = %s AND a.task_id = v.task_id
                  AND (v.revision IS NULL OR v.revision >= a.due_revision)
                """,
                (str(agent_id), ids, [delivered[t] for t in ids], agent_url),
            )

        await self._db.run(operation, transaction=False)

    async def mark_undelivered(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        if not task_ids:
            return

        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                """
                UPDATE task_agents SET delivered_at = NULL
                WHERE agent_url = %s AND task_id = ANY(%s::uuid[])
                """,
                (agent_url, _ids(task_ids)),
            )

        await self._db.run(operation, transaction=False)

    async def assigned_among(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        if not task_ids:
            return set()

        async def operation(cursor: Cursor) -> set[uuid.UUID]:
            # A member that no longer matches may still report what it ran before it
            # dropped the task; one that never matched, and never took it, may not.
            await cursor.execute(
                "SELECT task_id FROM task_agents"
                " WHERE agent_url = %s AND task_id = ANY(%s::uuid[])"
                " AND (matched OR agent_id IS NOT NULL)",
                (agent_url, _ids(task_ids)),
            )
            return {uuid.UUID(str(row[0])) for row in cursor.fetchall()}

        return await self._db.run(operation, transaction=False)

    async def pending_removals(self, agent_url: str, limit: int) -> list[uuid.UUID]:
        async def operation(cursor: Cursor) -> list[uuid.UUID]:
            await cursor.execute(
                """
                SELECT a.task_id
                FROM task_agents a JOIN tasks t ON t.task_id = a.task_id
                WHERE a.agent_url = %s AND a.removal_pending
                ORDER BY coalesce(t.deleted_at, t.paused_at, t.created_at), a.task_id
                LIMIT %s
                """,
                (agent_url, limit),
            )
            return [uuid.UUID(str(row[0])) for row in cursor.fetchall()]

        return await self._db.run(operation, transaction=False)

    async def mark_removed(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        if not task_ids:
            return

        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                """
                UPDATE task_agents SET removal_pending = false
                WHERE agent_url = %s AND task_id = ANY(%s::uuid[])
                """,
                (agent_url, _ids(task_ids)),
            )

        await self._db.run(operation, transaction=False)

    async def request_removal(
        self, agent_url: str, task_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        if not task_ids:
            return set()

        async def operation(cursor: Cursor) -> set[uuid.UUID]:
            await cursor.execute(
                """
                UPDATE task_agents a SET removal_pending = true
                FROM tasks t
                WHERE t.task_id = a.task_id AND (t.deleted_at IS NOT NULL OR NOT a.matched)
                  AND a.agent_url = %s AND a.task_id = ANY(%s::uuid[])
                RETURNING a.task_id
                """,
                (agent_url, _ids(task_ids)),
            )
            return {uuid.UUID(str(row[0])) for row in cursor.fetchall()}

        return await self._db.run(operation, transaction=False)

    async def pending_manual_runs(
        self, agent_url: str, now: datetime, limit: int
    ) -> list[ManualRun]:
        async def operation(cursor: Cursor) -> list[ManualRun]:
            await cursor.execute(
                f"""
                SELECT m.scheduled_at, m.revision, m.deadline, {TASK_COLUMNS}
                FROM manual_runs m JOIN tasks t ON t.task_id = m.task_id
                WHERE m.agent_url = %s AND m.delivered_at IS NULL AND m.deadline > %s
                  AND t.deleted_at IS NULL
                ORDER BY m.scheduled_at, m.task_id
                LIMIT %s
                """,
                (agent_url, now, limit),
            )
            return [
                ManualRun(task_from_row(row[3:]).spec, utc(row[0]), row[1], utc(row[2]))
                for row in cursor.fetchall()
            ]

        return await self._db.run(operation, transaction=False)

    async def mark_manual_delivered(
        self, agent_url: str, runs: Sequence[tuple[uuid.UUID, datetime]]
    ) -> None:
        if not runs:
            return
        keys = sorted({(str(t), utc(at)) for t, at in runs})

        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                """
                UPDATE manual_runs m SET delivered_at = now()
                FROM unnest(%s::uuid[], %s::timestamptz[]) AS v (task_id, scheduled_at)
                WHERE m.agent_url = %s AND m.task_id = v.task_id
                  AND m.scheduled_at = v.scheduled_at
                """,
                ([k[0] for k in keys], [k[1] for k in keys], agent_url),
            )

        await self._db.run(operation, transaction=False)
