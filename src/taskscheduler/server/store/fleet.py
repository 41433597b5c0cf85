"""The fleet (the agent URLs every active task runs on) and the agents told to leave it:
the pure rules both stores apply, and the PostgreSQL component with its SQL.

A URL removed from the fleet loses its assignments and the live agent enrolled there is
due to leave (reason ``removed``); a revoked agent is due to leave too (``revoked``,
written by :mod:`~taskscheduler.server.store.agents`). The dispatcher tells each, signed,
until it confirms (:meth:`Fleet.pending_leaves`, :meth:`Fleet.mark_left`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from taskscheduler.protocol import RunResult
from taskscheduler.server.store.assignment import TARGETED_SQL, rematch_rows
from taskscheduler.server.store.audit import insert_audit
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import AgentRecord, AuditEvent, FleetMember, Leave
from taskscheduler.server.store.rules import utc

#: The principal AVAILABLE_SERVERS changes are audited as.
CONFIG_ACTOR = "AVAILABLE_SERVERS"

# -- rules (pure) ------------------------------------------------------------------------------


def barred_urls(agents: Iterable[AgentRecord]) -> set[str]:
    """URLs held by a revoked agent whose URL was not released: nobody there counts."""
    return {a.url for a in agents if a.revoked and a.url_released_at is None}


def expected_urls(assigned: Iterable[str], agents: Iterable[AgentRecord]) -> tuple[str, ...]:
    """The agents a new execution expects: those assigned the task (members whose agent
    matches its target), less revoked ones.

    An assigned URL where no agent has enrolled yet still counts (one is on its way) for
    a task with no target (:mod:`~taskscheduler.server.store.assignment`);
    :data:`EXPECTED_URLS_SQL` states the same rule for PostgreSQL.
    """
    barred = barred_urls(agents)
    return tuple(sorted({url for url in assigned if url not in barred}))


def holder_of(url: str, agents: Iterable[AgentRecord]) -> AgentRecord | None:
    """The agent that answers for ``url``: the live one, else the newest revoked one."""
    at_url = sorted(
        (a for a in agents if a.url == url), key=lambda a: (not a.revoked, a.enrolled_at)
    )
    return at_url[-1] if at_url else None


def missing_agents(
    expected: Sequence[str] | None, results: Iterable[RunResult], agents: Sequence[AgentRecord]
) -> list[tuple[str, uuid.UUID | None]]:
    """The expected agents (URL, and the id of the agent there, if any) with no result."""
    if expected is None:
        return []
    url_of = {a.agent_id: a.url for a in agents}
    reported = {url_of.get(r.agent_id) for r in results}
    missing = []
    for url in expected:
        if url in reported:
            continue
        holder = holder_of(url, agents)
        missing.append((url, None if holder is None else holder.agent_id))
    return missing


def fleet_audit(action: str, url: str, at: datetime, actor: str, peer: str = "") -> AuditEvent:
    return AuditEvent(at=at, actor=actor, action=action, target=url, peer=peer)


def now_utc() -> datetime:
    return datetime.now(UTC)


# -- PostgreSQL --------------------------------------------------------------------------------

#: The URLs a new execution of task ``v.task_id`` expects (:func:`expected_urls`), as an
#: expression over the task being recorded.
EXPECTED_URLS_SQL = """
ARRAY(SELECT a.agent_url FROM task_agents a
      WHERE a.task_id = v.task_id AND a.matched
        AND NOT EXISTS (SELECT 1 FROM agents g
                        WHERE g.url = a.agent_url AND g.revoked_at IS NOT NULL
                          AND g.url_released_at IS NULL)
      ORDER BY a.agent_url)
"""

_ADD_SQL = """
INSERT INTO task_agents (task_id, agent_url)
    SELECT t.task_id, %(url)s FROM tasks t WHERE t.deleted_at IS NULL
    ON CONFLICT DO NOTHING;
DELETE FROM agent_leaves WHERE agent_url = %(url)s AND reason = 'removed';
"""

_REMOVE_SQL = """
DELETE FROM task_agents WHERE agent_url = %(url)s;
INSERT INTO agent_leaves (agent_id, agent_url, reason, requested_at)
    SELECT agent_id, url, 'removed', %(at)s FROM agents
    WHERE url = %(url)s AND revoked_at IS NULL
    ON CONFLICT (agent_id) DO NOTHING;
"""


async def _lock_fleet(cursor: Cursor) -> None:
    # SHARE ROW EXCLUSIVE waits for create_task (SHARE) transactions in flight, so a task
    # created concurrently is either seen here or sees the new fleet.
    await cursor.execute("LOCK TABLE fleet IN SHARE ROW EXCLUSIVE MODE")


async def _add(cursor: Cursor, url: str, at: datetime) -> FleetMember | None:
    await cursor.execute(
        "INSERT INTO fleet (agent_url, added_at) VALUES (%s, %s) ON CONFLICT DO NOTHING"
        " RETURNING added_at",
        (url, at),
    )
    row = cursor.fetchone()
    if row is None:
        return None
    await cursor.execute(_ADD_SQL, {"url": url})
    await rematch_rows(cursor, f"a.agent_url = %(url)s AND {TARGETED_SQL}", {"url": url})
    return FleetMember(url, utc(row[0]))


async def _remove(cursor: Cursor, url: str, at: datetime) -> FleetMember | None:
    await cursor.execute("DELETE FROM fleet WHERE agent_url = %s RETURNING added_at", (url,))
    row = cursor.fetchone()
    if row is None:
        return None
    await cursor.execute(_REMOVE_SQL, {"url": url, "at": at})
    return FleetMember(url, utc(row[0]))


class Fleet:
    """The fleet's members and the agents due to leave it."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def set_fleet(
        self, agent_urls: Sequence[str], at: datetime | None = None, actor: str = ""
    ) -> tuple[list[str], list[str]]:
        urls = list(dict.fromkeys(agent_urls))
        when = at or now_utc()

        async def operation(cursor: Cursor) -> tuple[list[str], list[str]]:
            await _lock_fleet(cursor)
            await cursor.execute("SELECT agent_url FROM fleet")
            current = {row[0] for row in cursor.fetchall()}
            removed = sorted(current - set(urls))
            added = [url for url in urls if url not in current]
            for url in removed:
                await _remove(cursor, url, when)
                if actor:
                    await insert_audit(cursor, fleet_audit("fleet.removed", url, when, actor))
            for url in added:
                await _add(cursor, url, when)
                if actor:
                    await insert_audit(cursor, fleet_audit("fleet.added", url, when, actor))
            # Idempotent repair: every member has every live task.
            await cursor.execute(
                """
                INSERT INTO task_agents (task_id, agent_url)
                    SELECT t.task_id, f.agent_url FROM tasks t CROSS JOIN fleet f
                    WHERE t.deleted_at IS NULL
                    ON CONFLICT DO NOTHING
                """
            )
            # And each targeted task's members are those that match it now.
            await rematch_rows(cursor, TARGETED_SQL, {})
            return added, removed

        return await self._db.run(operation)

    async def list_fleet(self) -> list[FleetMember]:
        async def operation(cursor: Cursor) -> list[FleetMember]:
            await cursor.execute(
                "SELECT agent_url, added_at FROM fleet ORDER BY added_at, agent_url"
            )
            return [FleetMember(url, utc(added_at)) for url, added_at in cursor.fetchall()]

        return await self._db.run(operation, transaction=False)

    async def is_fleet_member(self, url: str) -> bool:
        async def operation(cursor: Cursor) -> bool:
            await cursor.execute("SELECT EXISTS (SELECT 1 FROM fleet WHERE agent_url = %s)", (url,))
            return bool(cursor.fetchone()[0])

        return await self._db.run(operation, transaction=False)

    async def add_fleet_member(
        self, url: str, added_at: datetime, audit: AuditEvent
    ) -> tuple[FleetMember, bool]:
        async def operation(cursor: Cursor) -> tuple[FleetMember, bool]:
            await _lock_fleet(cursor)
            member = await _add(cursor, url, added_at)
            if member is not None:
                await insert_audit(cursor, audit)
                return member, True
            await cursor.execute("SELECT added_at FROM fleet WHERE agent_url = %s", (url,))
            return FleetMember(url, utc(cursor.fetchone()[0])), False

        return await self._db.run(operation)

    async def remove_fleet_member(self, url: str, audit: AuditEvent) -> FleetMember | None:
        async def operation(cursor: Cursor) -> FleetMember | None:
            await _lock_fleet(cursor)
            member = await _remove(cursor, url, audit.at)
            if member is not None:
                await insert_audit(cursor, audit)
            return member

        return await self._db.run(operation)

    async def pending_leaves(self, limit: int) -> list[Leave]:
        async def operation(cursor: Cursor) -> list[Leave]:
            await cursor.execute(
                "SELECT agent_id, agent_url, reason FROM agent_leaves"
                " ORDER BY requested_at, agent_id LIMIT %s",
                (limit,),
            )
            return [Leave(uuid.UUID(str(a)), url, reason) for a, url, reason in cursor.fetchall()]

        return await self._db.run(operation, transaction=False)

    async def mark_left(self, agent_id: uuid.UUID, reason: str) -> None:
        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                "DELETE FROM agent_leaves WHERE agent_id = %s::uuid AND reason = %s",
                (str(agent_id), reason),
            )

        await self._db.run(operation, transaction=False)
