"""The SQL :mod:`~taskscheduler.server.store.recording` and
:mod:`~taskscheduler.server.store.claims` share about claims of run-on-one instants: who
an execution of a claimed instant expects, the task's agents and which are online, and
writing a claim (the ``claims`` primary key lets one writer in)."""

from __future__ import annotations

import uuid
from datetime import datetime

from taskscheduler.server.store.fleet import EXPECTED_URLS_SQL
from taskscheduler.server.store.pool import Cursor

#: The URLs a new execution of ``v.task_id`` at ``v.scheduled_at`` expects
#: (:func:`claim_rules.claimed_expected`): the holder of its claim, else every agent of the task.
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

HOLDER_SQL = "SELECT agent_id FROM claims WHERE task_id = %s::uuid AND scheduled_at = %s"

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
        await cursor.execute(HOLDER_SQL, (str(task_id), at))
        row = cursor.fetchone()
    return None if row[0] is None else uuid.UUID(str(row[0]))
