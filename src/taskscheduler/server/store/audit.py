"""The append-only audit log in PostgreSQL: its SQL and row mapper.

Other components write their event with :func:`insert_audit` inside their own
transaction, so the change and its audit line commit together or not at all.
"""

from __future__ import annotations

import json

from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import AuditEvent
from taskscheduler.server.store.rules import utc


async def insert_audit(cursor: Cursor, event: AuditEvent) -> None:
    """Append ``event`` in the transaction of ``cursor``."""
    await cursor.execute(
        """
        INSERT INTO audit_events (at, actor, action, target, peer, details)
        VALUES (%s, %s, %s, %s, %s, %s::jsonb)
        """,
        (event.at, event.actor, event.action, event.target, event.peer, json.dumps(event.details)),
    )


class Audit:
    """Reads the audit log."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def audit_events(self, limit: int, before: int | None = None) -> list[AuditEvent]:
        async def operation(cursor: Cursor) -> list[AuditEvent]:
            await cursor.execute(
                """
                SELECT event_id, at, actor, action, target, peer, details FROM audit_events
                WHERE %(before)s::bigint IS NULL OR event_id < %(before)s
                ORDER BY event_id DESC LIMIT %(limit)s
                """,
                {"before": before, "limit": limit},
            )
            return [
                AuditEvent(
                    at=utc(at),
                    actor=actor,
                    action=action,
                    target=target,
                    peer=peer,
                    details=details,
                    event_id=event_id,
                )
                for event_id, at, actor, action, target, peer, details in cursor.fetchall()
            ]

        return await self._db.run(operation, transaction=False)
