"""``GET /metrics``: the server's Prometheus metrics (:mod:`taskscheduler.server.metrics`),
as text, not JSON: it is not in the OpenAPI document.

In the access table at the operator level; :meth:`MetricsRoutes.open_metrics` opens it
to anyone when the server listens on loopback only or ``--metrics-public`` is given.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

from taskscheduler.metrics import metrics_page
from taskscheduler.protocol import RunResult
from taskscheduler.server.api.base import Routes, routes
from taskscheduler.server.metrics import ServerMetrics
from taskscheduler.server.store.records import RecordOutcome
from taskscheduler.server.store.rules import completion_cutoff
from taskscheduler.web.gate import AuthGate


class MetricsRoutes(Routes):
    """The metrics page, and what the other routes tell the metrics."""

    _metrics: ServerMetrics
    _gate: AuthGate | None
    _metrics_open: bool

    @routes.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        return metrics_page(request, self._metrics.registry)

    def open_metrics(self) -> None:
        """Let anyone read ``/metrics`` (loopback listener, or ``--metrics-public``)."""
        self._metrics_open = True
        if self._gate is not None:
            self._gate.open_route("metrics")

    def _count_recorded(
        self, results: Sequence[RunResult], outcomes: Sequence[RecordOutcome], now: datetime
    ) -> None:
        """Count what became of each result; a stored one that came after its execution's
        reporting deadline is counted late, off the request's path (the deadline needs
        the task's time limit, looked up only for results older than the grace)."""
        old: list[RunResult] = []
        for result, outcome in zip(results, outcomes, strict=True):
            self._metrics.result_recorded(outcome.value)
            if outcome is RecordOutcome.STORED and now - result.scheduled_at > self._report_grace:
                old.append(result)
        if old:
            counting = Deferred.fromCoroutine(self._count_late(old, now))
            counting.addErrback(lambda f: self.log.failure("could not count late results", f))

    async def _count_late(self, results: list[RunResult], now: datetime) -> None:
        limits: dict[uuid.UUID, timedelta | None] = {}
        for result in results:
            if result.task_id not in limits:
                task = await self._store.get_task(result.task_id)
                limits[result.task_id] = None if task is None else task.spec.time_limit
            limit = limits[result.task_id]
            if limit is None:
                continue
            if result.scheduled_at < completion_cutoff(now, limit, self._report_grace):
                self._metrics.result_late()
