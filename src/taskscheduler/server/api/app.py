"""The server's REST API (Klein): one app composed of the route modules (tasks, results,
agents, audit, notifications, openapi, and the dashboard's static files), the table of
who may call each route, and the errors of its domain.

Routes only translate between HTTP and the domain; errors map to statuses in the table
(:mod:`taskscheduler.web.errors`), domain exceptions once, in :data:`SERVER_ERRORS`.

Access is decided before a route runs, by :class:`taskscheduler.web.gate.AuthGate` with
:data:`ServerAPI.ACCESS` (every route must be listed there, or it is refused) and
:class:`taskscheduler.server.access.ServerAccess`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.iweb import IRequest

from taskscheduler import protocol
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.agents import AgentRoutes
from taskscheduler.server.api.audit import AuditRoutes
from taskscheduler.server.api.base import routes
from taskscheduler.server.api.claims import DEFAULT_CLAIM_GRACE, ClaimRoutes
from taskscheduler.server.api.dashboard import DashboardRoutes
from taskscheduler.server.api.executions import ExecutionRoutes
from taskscheduler.server.api.fleet import DEFAULT_HEARTBEAT_INTERVAL, FleetRoutes
from taskscheduler.server.api.metrics import MetricsRoutes
from taskscheduler.server.api.notifications import NotificationRoutes
from taskscheduler.server.api.openapi import OpenAPIRoutes
from taskscheduler.server.api.results import ResultRoutes
from taskscheduler.server.api.tasks import TaskRoutes
from taskscheduler.server.metrics import ServerMetrics
from taskscheduler.server.ratelimit import RateLimiter
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import (
    AgentRecord,
    CommitInDoubt,
    StoreUnavailable,
    Task,
    UnknownTask,
)
from taskscheduler.web.errors import (
    DATABASE_COMMIT_IN_DOUBT,
    DATABASE_UNAVAILABLE,
    UNKNOWN_FIELD,
    UNKNOWN_TASK,
)
from taskscheduler.web.gate import Access, AuthGate
from taskscheduler.web.responses import DomainError, install_error_handlers, json_response

#: How long after an execution's time limit the server waits for missing agents
#: before calling the execution complete without them.
DEFAULT_REPORT_GRACE = timedelta(seconds=30)
#: Most bytes of each stream of a result stored (``--max-output-bytes``): the agents'
#: default ``--output-cap``. Past it the head and tail are kept, flagged truncated.
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024

#: The server's domain exceptions, as the error table answers them.
SERVER_ERRORS: dict[type[Exception], DomainError] = {
    UnknownTask: DomainError(UNKNOWN_TASK),
    protocol.UnknownFields: DomainError(UNKNOWN_FIELD),  # its message names the fields
    # Before StoreUnavailable, its base: the first match answers.
    CommitInDoubt: DomainError(DATABASE_COMMIT_IN_DOUBT, "commit in doubt: {error}"),
    StoreUnavailable: DomainError(DATABASE_UNAVAILABLE, "database unavailable: {error}"),
}


class ServerAPI(
    TaskRoutes,
    ExecutionRoutes,
    ResultRoutes,
    ClaimRoutes,
    AgentRoutes,
    FleetRoutes,
    AuditRoutes,
    NotificationRoutes,
    OpenAPIRoutes,
    MetricsRoutes,
    DashboardRoutes,
):
    """The HTTP API of ``twistd taskscheduler-server``."""

    #: Who may call each route (by endpoint name). A route missing here is refused.
    ACCESS: dict[str, Access] = {
        "create_task": Access.OPERATOR,
        "list_tasks": Access.OPERATOR,
        "get_task": Access.OPERATOR,
        "update_task": Access.OPERATOR,
        "pause_task": Access.OPERATOR,
        "resume_task": Access.OPERATOR,
        "run_task": Access.OPERATOR,
        "execution": Access.OPERATOR,
        "delete_task": Access.OPERATOR,
        "latest_output": Access.OPERATOR,
        "executions": Access.OPERATOR,
        "list_agents": Access.OPERATOR,
        "get_agent": Access.OPERATOR,
        "list_fleet": Access.OPERATOR,
        "add_fleet_member": Access.OPERATOR,
        "remove_fleet_member": Access.OPERATOR,
        "heartbeat": Access.AGENT,
        "revoke_agent": Access.OPERATOR,
        "release_agent_url": Access.OPERATOR,
        "audit": Access.OPERATOR,
        "notifications": Access.OPERATOR,
        "complete": Access.AGENT,
        "complete_batch": Access.AGENT,
        "claim_instant": Access.AGENT,
        "enrol": Access.JOIN,
        "health": Access.PUBLIC,
        "openapi": Access.PUBLIC,
        # Open to anyone on a loopback listener or with --metrics-public (open_metrics).
        "metrics": Access.OPERATOR,
        # The dashboard's page and static files: no data in them (the page reads the API
        # with the operator's token), like the OpenAPI document.
        "dashboard": Access.PUBLIC,
        "dashboard_asset": Access.PUBLIC,
    }

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        access: ServerAccess,
        on_task_created: Callable[[Task], None] = lambda task: None,
        report_grace: timedelta = DEFAULT_REPORT_GRACE,
        *,
        server_public_key: str = "",
        on_agent_enrolled: Callable[[AgentRecord], None] = lambda agent: None,
        on_task_deleted: Callable[[Task], None] = lambda task: None,
        create_limiter: RateLimiter | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        clock_allowance: timedelta = protocol.CLOCK_ALLOWANCE,
        on_task_changed: Callable[[Task], None] = lambda task: None,
        on_fleet_changed: Callable[[], None] = lambda: None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        on_agent_relabelled: Callable[[str], None] = lambda url: None,
        claim_grace: timedelta = DEFAULT_CLAIM_GRACE,
        metrics: ServerMetrics | None = None,
        on_results_stored: Callable[[list[protocol.RunResult]], None] = lambda results: None,
        on_agent_revoked: Callable[[AgentRecord], None] = lambda agent: None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._access = access
        self._on_task_created = on_task_created
        self._report_grace = report_grace
        self._server_public_key = server_public_key
        self._on_agent_enrolled = on_agent_enrolled
        self._on_task_deleted = on_task_deleted
        #: PATCH, pause, resume or run-now: deliver what changed to the agents.
        self._on_task_changed = on_task_changed
        self._max_output_bytes = max_output_bytes
        self._clock_allowance = clock_allowance
        self._on_fleet_changed = on_fleet_changed
        self._on_agent_relabelled = on_agent_relabelled
        self._heartbeat_interval = heartbeat_interval
        self._claim_grace = claim_grace
        self._metrics = metrics or ServerMetrics()
        self._gate = None
        self._metrics_open = False
        self._on_results_stored = on_results_stored
        self._on_agent_revoked = on_agent_revoked
        self._in_fleet_seen = {}
        self._assignments: set[tuple[str, uuid.UUID]] = set()
        # Per operator token: one client's burst must not hold back everyone's tasks.
        self._create_limiter = create_limiter or RateLimiter(clock)

    def resource(self) -> Any:
        access = self._access
        self._gate = AuthGate(
            self.app.resource(),
            self.app.url_map,
            self.ACCESS,
            access.authorize,
            access.check_headers,
            self._metrics.http.observe,
        )
        if self._metrics_open:
            self._gate.open_route("metrics")
        return self._gate

    @routes.route("/api/v1/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        # Touch the database so that a load balancer sees an outage as one.
        await self._store.get_task(uuid.UUID(int=0))
        return json_response(request, {"status": "ok"})


install_error_handlers(routes, ServerAPI.log, SERVER_ERRORS)
