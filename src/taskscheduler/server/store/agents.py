"""Enrolled agents in PostgreSQL: their SQL and row mapper.

Who may enrol and whose URL may be released is decided by
:mod:`~taskscheduler.server.store.rules`; the unique indexes settle two enrolments racing.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import MappingProxyType
from typing import Any

import psycopg2.errors

from taskscheduler.protocol.labels import NO_LABELS
from taskscheduler.server.store.assignment import TARGETED_SQL, rematch_rows
from taskscheduler.server.store.audit import insert_audit
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import AgentConflict, AgentRecord, AuditEvent, Heartbeat
from taskscheduler.server.store.rules import (
    enrolment_conflict,
    release_conflict,
    utc,
    utc_or_none,
)

_AGENT_COLUMNS = (
    "agent_id, url, enrolled_at, revoked_at, url_released_at, last_seen_at,"
    " version, hostname, started_at, tasks, running, spooled, dropped_results, labels"
)


def _agent_from_row(row: Sequence[Any]) -> AgentRecord:
    agent_id, url, enrolled_at, revoked_at, url_released_at, last_seen_at = row[:6]
    version, hostname, started_at, tasks, running, spooled, dropped, labels = row[6:]
    heartbeat = None
    if last_seen_at is not None:
        heartbeat = Heartbeat(
            version or "",
            hostname or "",
            utc_or_none(started_at),
            tasks or 0,
            running or 0,
            spooled or 0,
            dropped or 0,
            labels_of(labels),
        )
    return AgentRecord(
        uuid.UUID(str(agent_id)),
        url,
        utc(enrolled_at),
        utc_or_none(revoked_at),
        utc_or_none(url_released_at),
        utc_or_none(last_seen_at),
        heartbeat,
        labels_of(labels),
    )


def labels_of(value: Any) -> Mapping[str, str]:
    """Labels as stored (``jsonb``, which psycopg2 reads into a dict)."""
    return MappingProxyType(dict(value or {}))


async def _rematch_url(cursor: Cursor, url: str) -> None:
    """The live agent at ``url`` changed (enrolled, revoked, relabelled): re-apply the
    targets of the tasks assigned there."""
    await rematch_rows(cursor, f"a.agent_url = %(url)s AND {TARGETED_SQL}", {"url": url})


class Agents:
    """Enrols, finds, revokes and releases agents."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def enrol_agent(
        self,
        agent_id: uuid.UUID,
        url: str,
        credential_hash: str,
        enrolled_at: datetime,
        audit: AuditEvent,
        labels: Mapping[str, str] = NO_LABELS,
    ) -> AgentRecord:
        async def operation(cursor: Cursor) -> None:
            await cursor.execute("SELECT 1 FROM agents WHERE agent_id = %s::uuid", (str(agent_id),))
            identity_known = cursor.fetchone() is not None
            await cursor.execute(
                "SELECT revoked_at IS NULL FROM agents WHERE url = %s AND url_released_at IS NULL",
                (url,),
            )
            holders = [live for (live,) in cursor.fetchall()]
            conflict = enrolment_conflict(
                agent_id, url, identity_known=identity_known, url_holders_live=holders
            )
            if conflict is not None:
                raise conflict
            await cursor.execute(
                """
                INSERT INTO agents (agent_id, url, credential_hash, enrolled_at, labels)
                VALUES (%s::uuid, %s, %s, %s, %s::jsonb)
                """,
                (str(agent_id), url, credential_hash, enrolled_at, json.dumps(dict(labels))),
            )
            await _rematch_url(cursor, url)
            await insert_audit(cursor, audit)

        try:
            await self._db.run(operation)
        except psycopg2.errors.UniqueViolation:
            # Two enrolments raced, or the credential is in use: the loser sees the row.
            raise AgentConflict("agent_exists", "this agent or URL was just enrolled") from None
        return AgentRecord(agent_id, url, utc(enrolled_at), labels=MappingProxyType(dict(labels)))

    async def agent_by_credential(self, credential_hash: str) -> AgentRecord | None:
        async def operation(cursor: Cursor) -> AgentRecord | None:
            await cursor.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE credential_hash = %s",
                (credential_hash,),
            )
            row = cursor.fetchone()
            return None if row is None else _agent_from_row(row)

        return await self._db.run(operation, transaction=False)

    async def agent_for_url(self, url: str) -> AgentRecord | None:
        async def operation(cursor: Cursor) -> AgentRecord | None:
            await cursor.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE url = %s AND revoked_at IS NULL",
                (url,),
            )
            row = cursor.fetchone()
            return None if row is None else _agent_from_row(row)

        return await self._db.run(operation, transaction=False)

    async def revoke_agent(
        self, agent_id: uuid.UUID, revoked_at: datetime, audit: AuditEvent
    ) -> AgentRecord | None:
        async def operation(cursor: Cursor) -> AgentRecord | None:
            await cursor.execute(
                f"""
                UPDATE agents SET revoked_at = %s
                WHERE agent_id = %s::uuid AND revoked_at IS NULL
                RETURNING {_AGENT_COLUMNS}
                """,
                (revoked_at, str(agent_id)),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            await cursor.execute(
                """
                INSERT INTO agent_leaves (agent_id, agent_url, reason, requested_at)
                VALUES (%(agent_id)s::uuid, %(url)s, 'revoked', %(at)s)
                ON CONFLICT (agent_id) DO UPDATE SET reason = 'revoked', requested_at = %(at)s
                """,
                {"agent_id": str(agent_id), "url": row[1], "at": revoked_at},
            )
            await _rematch_url(cursor, row[1])  # nobody there now: only untargeted tasks
            await insert_audit(cursor, audit)
            return _agent_from_row(row)

        return await self._db.run(operation)

    async def get_agent(self, agent_id: uuid.UUID) -> AgentRecord | None:
        async def operation(cursor: Cursor) -> AgentRecord | None:
            await cursor.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = %s::uuid", (str(agent_id),)
            )
            row = cursor.fetchone()
            return None if row is None else _agent_from_row(row)

        return await self._db.run(operation, transaction=False)

    async def record_heartbeat(
        self, agent_id: uuid.UUID, seen_at: datetime, heartbeat: Heartbeat
    ) -> bool:
        async def operation(cursor: Cursor) -> bool:
            # ``old`` is the row as it was before this update: did the labels change?
            await cursor.execute(
                """
                UPDATE agents a SET last_seen_at = %s, version = %s, hostname = %s,
                    started_at = %s, tasks = %s, running = %s, spooled = %s,
                    dropped_results = %s, labels = %s::jsonb
                FROM agents old
                WHERE a.agent_id = %s::uuid AND old.agent_id = a.agent_id
                RETURNING old.labels IS DISTINCT FROM a.labels
                """,
                (
                    seen_at,
                    heartbeat.version,
                    heartbeat.hostname,
                    heartbeat.started_at,
                    heartbeat.tasks,
                    heartbeat.running,
                    heartbeat.spooled,
                    heartbeat.dropped_results,
                    json.dumps(dict(heartbeat.labels)),
                    str(agent_id),
                ),
            )
            row = cursor.fetchone()
            if row is None or not row[0]:
                return False
            # Other labels: the targeted tasks it matches change, at once.
            await cursor.execute(
                "SELECT url FROM agents WHERE agent_id = %s::uuid AND revoked_at IS NULL",
                (str(agent_id),),
            )
            live = cursor.fetchone()
            if live is not None:
                await _rematch_url(cursor, live[0])
            return True

        return await self._db.run(operation)

    async def release_agent_url(
        self, agent_id: uuid.UUID, released_at: datetime, audit: AuditEvent
    ) -> AgentRecord | None:
        async def operation(cursor: Cursor) -> AgentRecord | None:
            await cursor.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = %s::uuid FOR UPDATE",
                (str(agent_id),),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            record = _agent_from_row(row)
            conflict = release_conflict(record)
            if conflict is not None:
                raise conflict
            if record.url_released_at is not None:
                return record
            await cursor.execute(
                f"""
                UPDATE agents SET url_released_at = %s WHERE agent_id = %s::uuid
                RETURNING {_AGENT_COLUMNS}
                """,
                (released_at, str(agent_id)),
            )
            released = _agent_from_row(cursor.fetchone())
            await insert_audit(cursor, audit)
            return released

        return await self._db.run(operation)

    async def list_agents(self) -> list[AgentRecord]:
        async def operation(cursor: Cursor) -> list[AgentRecord]:
            await cursor.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY enrolled_at, agent_id"
            )
            return [_agent_from_row(row) for row in cursor.fetchall()]

        return await self._db.run(operation, transaction=False)
