"""Webhooks in PostgreSQL (migration 14): the de-duplication state of each (task, agent)
and every notification with its delivery, so that neither is lost with the server.

A batch of results moves their states in one transaction that locks the states' rows,
judges them with :func:`taskscheduler.server.notify.rules.judge` and inserts the
notifications they raise: two servers seeing results of one task at once cannot both
send its alert.

Among replicas (migration 15), a pending notification is sent by the replica that
claimed it (``claimed_by`` until ``claimed_until``, by the database's clock): the one
that stored it, which renews the claim while it sends, or one that claims it with
``FOR UPDATE SKIP LOCKED`` once that claim lapsed (:meth:`Notifications.claim_notifications`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from taskscheduler.protocol import ResultStatus
from taskscheduler.protocol.notify import NotifyEvent
from taskscheduler.server.notify.rules import (
    DeliveryStatus,
    Key,
    Notification,
    NotifyState,
    Observed,
    judge,
)
from taskscheduler.server.store.leases import Claimant
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.rules import utc, utc_or_none

_COLUMNS = """notification_id, task_id, agent_id, scheduled_at, event, result_status,
exit_code, url, created_at, status, attempts, response_code, error, updated_at"""


def _notification(row: Any) -> Notification:
    (nid, task_id, agent_id, at, event, result_status, exit_code, url, created_at) = row[:9]
    status, attempts, response_code, error, updated_at = row[9:]
    return Notification(
        notification_id=nid,
        task_id=uuid.UUID(str(task_id)),
        agent_id=uuid.UUID(str(agent_id)),
        scheduled_at=utc(at),
        event=NotifyEvent(event),
        result_status=ResultStatus(result_status),
        exit_code=exit_code,
        url=url,
        created_at=utc(created_at),
        status=DeliveryStatus(status),
        attempts=attempts,
        response_code=response_code,
        error=error,
        updated_at=utc_or_none(updated_at),
    )


class Notifications:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def observe_results(
        self, observed: Sequence[Observed], at: datetime, claim: Claimant | None = None
    ) -> list[Notification]:
        if not observed:
            return []
        keys = sorted({(str(o.task_id), str(o.agent_key)) for o in observed})
        arrays = {"tasks": [t for t, _ in keys], "keys": [k for _, k in keys]}

        async def operation(cursor: Cursor) -> list[Notification]:
            # Neutral rows first, so that the lock below orders two servers even for a
            # first result (their epoch instant is older than any result); sorted keys:
            # concurrent batches lock in the same order.
            await cursor.execute(
                """
                INSERT INTO notify_state (task_id, agent_key, failing, last_at)
                SELECT t, k, false, 'epoch'
                FROM unnest(%(tasks)s::uuid[], %(keys)s::uuid[]) AS v (t, k)
                ON CONFLICT DO NOTHING;
                SELECT s.task_id, s.agent_key, s.failing, s.last_at FROM notify_state s
                JOIN unnest(%(tasks)s::uuid[], %(keys)s::uuid[]) AS v (t, k)
                  ON s.task_id = v.t AND s.agent_key = v.k
                ORDER BY s.task_id, s.agent_key
                FOR UPDATE OF s
                """,
                arrays,
            )
            states: dict[Key, NotifyState | None] = {
                (uuid.UUID(str(t)), uuid.UUID(str(k))): NotifyState(failing, utc(last))
                for t, k, failing, last in cursor.fetchall()
            }
            changed, events = judge(states, observed)
            if changed:
                await cursor.execute(
                    """
                    UPDATE notify_state s SET failing = v.f, last_at = v.at
                    FROM unnest(%s::uuid[], %s::uuid[], %s::boolean[], %s::timestamptz[])
                         AS v (t, k, f, at)
                    WHERE s.task_id = v.t AND s.agent_key = v.k
                    """,
                    (
                        [str(t) for t, _ in changed],
                        [str(k) for _, k in changed],
                        [state.failing for state in changed.values()],
                        [state.last_at for state in changed.values()],
                    ),
                )
            if not events:
                return []
            await cursor.execute(
                f"""
                INSERT INTO notifications (task_id, agent_id, scheduled_at, event,
                    result_status, exit_code, url, created_at, status, attempts,
                    claimed_by, claimed_until)
                SELECT v.task_id, v.agent_id, v.scheduled_at, v.event, v.result_status,
                       v.exit_code, v.url, %(created)s, 'pending', 0, %(me)s,
                       now() + %(ttl)s * interval '1 second'
                FROM unnest(%(task)s::uuid[], %(agent)s::uuid[], %(at)s::timestamptz[],
                            %(event)s::text[], %(result)s::text[], %(exit_code)s::integer[],
                            %(url)s::text[]) WITH ORDINALITY
                     AS v (task_id, agent_id, scheduled_at, event, result_status,
                           exit_code, url, n)
                ORDER BY v.n
                RETURNING {_COLUMNS}
                """,
                {
                    "task": [str(o.task_id) for o, _ in events],
                    "agent": [str(o.agent_id) for o, _ in events],
                    "at": [o.scheduled_at for o, _ in events],
                    "event": [event.value for _, event in events],
                    "result": [o.status.value for o, _ in events],
                    "exit_code": [o.exit_code for o, _ in events],
                    "url": [o.config.url for o, _ in events],
                    "created": at,
                    "me": None if claim is None else claim.replica_id,
                    "ttl": None if claim is None else claim.ttl,
                },
            )
            return sorted(
                (_notification(row) for row in cursor.fetchall()),
                key=lambda n: n.notification_id,
            )

        return await self._db.run(operation)

    async def update_notification(
        self,
        notification_id: int,
        status: DeliveryStatus,
        attempts: int,
        response_code: int | None,
        error: str | None,
        at: datetime,
    ) -> None:
        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                """
                UPDATE notifications SET status = %s, attempts = %s, response_code = %s,
                    error = %s, updated_at = %s
                WHERE notification_id = %s
                """,
                (status.value, attempts, response_code, error, at, notification_id),
            )

        await self._db.run(operation, transaction=False)

    async def list_notifications(
        self, task_id: uuid.UUID, limit: int, before: int | None = None
    ) -> list[Notification]:
        async def operation(cursor: Cursor) -> list[Notification]:
            await cursor.execute(
                f"""
                SELECT {_COLUMNS} FROM notifications
                WHERE task_id = %(task)s::uuid
                  AND (%(before)s::bigint IS NULL OR notification_id < %(before)s)
                ORDER BY notification_id DESC LIMIT %(limit)s
                """,
                {"task": str(task_id), "before": before, "limit": limit},
            )
            return [_notification(row) for row in cursor.fetchall()]

        return await self._db.run(operation, transaction=False)

    async def pending_notifications(self, limit: int) -> list[Notification]:
        async def operation(cursor: Cursor) -> list[Notification]:
            await cursor.execute(
                f"""
                SELECT {_COLUMNS} FROM notifications WHERE status = 'pending'
                ORDER BY notification_id LIMIT %s
                """,
                (limit,),
            )
            return [_notification(row) for row in cursor.fetchall()]

        return await self._db.run(operation, transaction=False)

    async def claim_notifications(
        self,
        claim: Claimant,
        renew: Sequence[int],
        limit: int,
        at: datetime,
        release: Sequence[int] = (),
    ) -> list[Notification]:
        """Renew the claims on ``renew`` (pending, claimed by ``claim``), give up those on
        ``release`` (a replica stopping), and claim up to
        ``limit`` pending notifications nobody has claimed or whose claim lapsed: those
        are returned, for ``claim``'s replica to send. ``at`` is for the memory store; the
        database's clock judges here."""

        async def operation(cursor: Cursor) -> list[Notification]:
            await cursor.execute(
                f"""
                UPDATE notifications
                SET claimed_until = now() + %(ttl)s * interval '1 second'
                WHERE notification_id = ANY(%(renew)s::bigint[]) AND claimed_by = %(me)s
                  AND status = 'pending';
                UPDATE notifications SET claimed_until = now()
                WHERE notification_id = ANY(%(release)s::bigint[]) AND claimed_by = %(me)s;
                WITH free AS (
                    SELECT notification_id FROM notifications
                    WHERE status = 'pending'
                      AND (claimed_until IS NULL OR claimed_until <= now())
                    ORDER BY notification_id LIMIT %(limit)s
                    FOR UPDATE SKIP LOCKED
                )
                UPDATE notifications n SET claimed_by = %(me)s,
                    claimed_until = now() + %(ttl)s * interval '1 second'
                FROM free WHERE n.notification_id = free.notification_id
                RETURNING {", ".join("n." + c.strip() for c in _COLUMNS.split(","))}
                """,
                {
                    "me": claim.replica_id,
                    "ttl": claim.ttl,
                    "renew": list(renew),
                    "release": list(release),
                    "limit": limit,
                },
            )
            rows = cursor.fetchall()
            return sorted((_notification(row) for row in rows), key=lambda n: n.notification_id)

        return await self._db.run(operation)
