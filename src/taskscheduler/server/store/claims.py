"""Claims of the instants of run-on-one tasks in PostgreSQL: at most one agent holds each
(task, instant), by the ``claims`` table's primary key.

Who is granted a claim is decided by :func:`~taskscheduler.server.store.rules.claim_verdict`
(the preferred agent by rendezvous hashing, the grace after which any agent of the task
may take it); this module reads what it needs and writes the claim, first writer wins.
An execution of a claimed instant expects its holder alone (:data:`EXPECTED_SQL`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from taskscheduler.server.store.fleet import EXPECTED_URLS_SQL
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import Claim, ClaimAnswer, ClaimStatus
from taskscheduler.server.store.rules import (
    Pause,
    Revision,
    claim_verdict,
    scheduled_verdict,
    utc,
    utc_or_none,
)
from taskscheduler.server.store.tasks import TASK_COLUMNS, task_from_row

#: The URLs a new execution of ``v.task_id`` at ``v.scheduled_at`` expects
#: (:func:`rules.claimed_expected`): the holder of its claim, else every agent of the task.
EXPECTED_SQL = f"""
COALESCE((SELECT ARRAY[c.agent_url] FROM claims c
          WHERE c.task_id = v.task_id AND c.scheduled_at = v.scheduled_at),
         {EXPECTED_URLS_SQL})
"""

#: The task's agents (:func:`fleet.expected_urls`) and which of them are online.
_AGENTS_SQL = f"""
SELECT x.urls, ARRAY(SELECT g.url FROM agents g
                     WHERE g.url = ANY(x.urls) AND g.revoked_at IS NULL
                       AND g.last_seen_at >= %(online_since)s)
FROM (SELECT %(task_id)s::uuid AS task_id) v
CROSS JOIN LATERAL (SELECT {EXPECTED_URLS_SQL} AS urls) x
"""

#: The task's grids and pauses, as :func:`rules.scheduled_verdict` needs them.
_JUDGING_SQL = """
SELECT 'r', revision, effective_at, anchor, interval_seconds
FROM task_revisions WHERE task_id = %(task_id)s::uuid
UNION ALL
SELECT 'p', NULL, paused_at, resumed_at, NULL FROM task_pauses WHERE task_id = %(task_id)s::uuid
"""

_HOLDER_SQL = "SELECT agent_id FROM claims WHERE task_id = %s::uuid AND scheduled_at = %s"

_INSERT_SQL = """
INSERT INTO claims (task_id, scheduled_at, agent_id, agent_url, claimed_at)
VALUES (%(task_id)s::uuid, %(at)s, %(agent_id)s::uuid, %(url)s, %(now)s)
ON CONFLICT DO NOTHING
RETURNING agent_id
"""


async def task_agents(
    cursor: Cursor, task_id: uuid.UUID, online_since: datetime
) -> tuple[list[str], set[str]]:
    """The URLs of the task's agents, and those of them online since ``online_since``."""
    await cursor.execute(_AGENTS_SQL, {"task_id": str(task_id), "online_since": online_since})
    urls, online = cursor.fetchone()
    return list(urls), set(online)


async def insert_claim(
    cursor: Cursor,
    task_id: uuid.UUID,
    at: datetime,
    agent_id: uuid.UUID | None,
    url: str,
    now: datetime,
) -> uuid.UUID | None:
    """Write the claim unless one is held; the holder's id either way (None: a run-now's
    claim, made for whichever agent is at ``url``)."""
    params = {
        "task_id": str(task_id),
        "at": at,
        "agent_id": None if agent_id is None else str(agent_id),
        "url": url,
        "now": now,
    }
    await cursor.execute(_INSERT_SQL, params)
    row = cursor.fetchone()
    if row is None:  # another agent wrote it first
        await cursor.execute(_HOLDER_SQL, (str(task_id), at))
        row = cursor.fetchone()
    return None if row[0] is None else uuid.UUID(str(row[0]))


class Claims:
    """Grants each instant of a run-on-one task to one agent."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def claim_instant(
        self, claim: Claim, now: datetime, grace: timedelta, online_since: datetime
    ) -> ClaimAnswer:
        at = utc(claim.scheduled_at)

        async def operation(cursor: Cursor) -> ClaimAnswer:
            task_id = str(claim.task_id)
            await cursor.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks t WHERE t.task_id = %s", (task_id,)
            )
            row = cursor.fetchone()
            task = None if row is None else task_from_row(row)
            verdict = None
            if task is not None:
                await cursor.execute(_JUDGING_SQL, {"task_id": task_id})
                verdict, _ = scheduled_verdict(
                    *_grids(cursor.fetchall()), task.deleted_at, at, claim.revision
                )
            assigned, online = await task_agents(cursor, claim.task_id, online_since)
            await cursor.execute(_HOLDER_SQL, (task_id, at))
            held = cursor.fetchone()
            answer = claim_verdict(
                task,
                verdict,
                claim,
                assigned=assigned,
                online=online,
                # (a run-now's claim names no agent: its instant is off the grid)
                holder=None if held is None or held[0] is None else uuid.UUID(str(held[0])),
                now=now,
                grace=grace,
            )
            if answer.status is not ClaimStatus.GRANTED or held is not None:
                return answer
            # The primary key lets one writer in; a concurrent claim that lost is HELD.
            holder = await insert_claim(
                cursor, claim.task_id, at, claim.agent_id, claim.agent_url, now
            )
            status = ClaimStatus.GRANTED if holder == claim.agent_id else ClaimStatus.HELD
            return ClaimAnswer(status, holder=holder)

        # Each statement on its own: the insert alone decides, atomically, who holds it.
        return await self._db.run(operation, transaction=False)


def _grids(rows: Sequence[Sequence[Any]]) -> tuple[list[Revision], list[Pause]]:
    """The task's revisions and pauses, from :data:`_JUDGING_SQL`'s rows."""
    revisions: list[Revision] = []
    pauses: list[Pause] = []
    for kind, revision, first, second, interval in rows:
        if kind == "r":
            revisions.append(
                Revision(revision, utc(first), utc(second), timedelta(seconds=interval))
            )
        else:
            pauses.append((utc(first), utc_or_none(second)))
    return revisions, pauses
