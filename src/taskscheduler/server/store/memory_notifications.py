"""Webhooks in :class:`~taskscheduler.server.store.memory.MemoryStore`: the state of each
(task, agent) and every notification, judged by
:func:`taskscheduler.server.notify.rules.judge` as PostgreSQL's are."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from taskscheduler.server.notify.rules import (
    DeliveryStatus,
    Key,
    Notification,
    NotifyState,
    Observed,
    judge,
)
from taskscheduler.server.store.leases import Claimant
from taskscheduler.server.store.memory_state import MemoryState
from taskscheduler.server.store.rules import utc


class MemoryNotifications(MemoryState):
    def __init__(self) -> None:
        super().__init__()
        self._notify_states: dict[Key, NotifyState | None] = {}
        self._notifications: dict[int, Notification] = {}
        #: Who claimed each pending notification, until when (``at`` of the calls).
        self.notification_claims: dict[int, tuple[str, datetime]] = {}

    async def observe_results(
        self, observed: Sequence[Observed], at: datetime, claim: Claimant | None = None
    ) -> list[Notification]:
        changed, events = judge(self._notify_states, observed)
        self._notify_states.update(changed)
        made = []
        for o, event in events:
            notification = Notification(
                notification_id=len(self._notifications) + 1,
                task_id=o.task_id,
                agent_id=o.agent_id,
                scheduled_at=utc(o.scheduled_at),
                event=event,
                result_status=o.status,
                exit_code=o.exit_code,
                url=o.config.url,
                created_at=utc(at),
            )
            self._notifications[notification.notification_id] = notification
            if claim is not None:
                self.notification_claims[notification.notification_id] = (
                    claim.replica_id,
                    at + timedelta(seconds=claim.ttl),
                )
            made.append(notification)
        return made

    async def update_notification(
        self,
        notification_id: int,
        status: DeliveryStatus,
        attempts: int,
        response_code: int | None,
        error: str | None,
        at: datetime,
    ) -> None:
        old = self._notifications.get(notification_id)
        if old is not None:
            self._notifications[notification_id] = replace(
                old,
                status=status,
                attempts=attempts,
                response_code=response_code,
                error=error,
                updated_at=utc(at),
            )

    async def list_notifications(
        self, task_id: uuid.UUID, limit: int, before: int | None = None
    ) -> list[Notification]:
        found = [
            n
            for nid, n in sorted(self._notifications.items(), reverse=True)
            if n.task_id == task_id and (before is None or nid < before)
        ]
        return found[:limit]

    async def pending_notifications(self, limit: int) -> list[Notification]:
        pending = [n for _, n in sorted(self._notifications.items())]
        return [n for n in pending if n.status is DeliveryStatus.PENDING][:limit]

    async def claim_notifications(
        self,
        claim: Claimant,
        renew: Sequence[int],
        limit: int,
        at: datetime,
        release: Sequence[int] = (),
    ) -> list[Notification]:
        until = at + timedelta(seconds=claim.ttl)
        pending = await self.pending_notifications(len(self._notifications))
        for n in pending:
            holder = self.notification_claims.get(n.notification_id)
            if holder is None or holder[0] != claim.replica_id:
                continue
            if n.notification_id in renew:
                self.notification_claims[n.notification_id] = (claim.replica_id, until)
            elif n.notification_id in release:
                self.notification_claims[n.notification_id] = (claim.replica_id, at)
        claimed: list[Notification] = []
        for n in pending:
            if len(claimed) >= limit:
                break
            holder = self.notification_claims.get(n.notification_id)
            if holder is None or holder[1] <= at:
                self.notification_claims[n.notification_id] = (claim.replica_id, until)
                claimed.append(n)
        return claimed
