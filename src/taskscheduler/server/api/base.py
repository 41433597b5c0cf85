"""What every route module of the server's API shares: the one Klein app they register
on, the collaborators a :class:`taskscheduler.server.api.app.ServerAPI` holds, and the
audit event a route records."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from taskscheduler.protocol import RunResult
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.access import Principal, ServerAccess
from taskscheduler.server.metrics import ServerMetrics
from taskscheduler.server.ratelimit import RateLimiter
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AgentRecord, AuditEvent, Task
from taskscheduler.server.store.rules import is_complete
from taskscheduler.web.requests import peer_address
from taskscheduler.web.responses import App

#: The one app every route module registers on: one URL map, which the access gate reads.
routes = App()


class Routes:
    """The state the route modules' classes share; :class:`ServerAPI` sets it."""

    app = routes
    log = Logger()

    _store: Store
    _clock: IReactorTime
    _access: ServerAccess
    _on_task_created: Callable[[Task], None]
    _on_task_deleted: Callable[[Task], None]
    _on_task_changed: Callable[[Task], None]
    _on_agent_enrolled: Callable[[AgentRecord], None]
    _on_fleet_changed: Callable[[], None]
    #: After the revocation committed (this server's agent cache is dropped already).
    _on_agent_revoked: Callable[[AgentRecord], None]
    #: An agent's labels changed: the tasks of its URL may have changed.
    _on_agent_relabelled: Callable[[str], None]
    _report_grace: timedelta
    _server_public_key: str
    _max_output_bytes: int
    _clock_allowance: timedelta
    _assignments: set[tuple[str, uuid.UUID]]
    _create_limiter: RateLimiter
    _heartbeat_interval: float
    _metrics: ServerMetrics
    #: Results just stored (webhooks: :class:`taskscheduler.server.notify.notifier.Notifier`).
    _on_results_stored: Callable[[list[RunResult]], None]

    def _now(self) -> datetime:
        return utc_now_from(self._clock.seconds())

    def _complete(
        self, task: Task, scheduled_at: datetime, reported: int, expected: int, now: datetime
    ) -> bool:
        """Whether an execution of ``task`` is complete at ``now`` (:func:`is_complete`,
        with the task's time limit and this server's report grace)."""
        return is_complete(
            scheduled_at,
            reported,
            expected,
            now=now,
            time_limit=task.spec.time_limit,
            report_grace=self._report_grace,
        )

    def _audit(
        self, request: IRequest, principal: Principal, action: str, target: str, **details: Any
    ) -> AuditEvent:
        return AuditEvent(
            at=self._now(),
            actor=principal.actor,
            action=action,
            target=target,
            peer=peer_address(request),
            details=details,
        )
