"""The server's Prometheus metrics (``GET /metrics``; names and meanings in the README's
"Metrics").

Counted where things happen, cheaply: an HTTP request (by route name and status), a
database operation (by the store method that ran it: a name from the code, so a bounded
set), a result recorded (by outcome, and whether it came after its execution's reporting
deadline), an agent's heartbeat (one series per agent). The pool's state is read when the
page is scraped; the executions left incomplete are counted once a minute
(:class:`IncompleteWatch`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NamedTuple

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from taskscheduler.metrics import HTTPMetrics, new_registry
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.store.interface import Store

#: Database operations: a millisecond for a probe, up to the operation deadline.
QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


#: How often, and over what past, the executions left incomplete are counted.
INCOMPLETE_INTERVAL = 60.0
INCOMPLETE_WINDOW = timedelta(hours=1)


class PoolState(NamedTuple):
    """The database pool now: connections it may hold, in use, idle, and callers waiting."""

    size: int
    in_use: int
    idle: int
    waiting: int


def operation_name(operation: Callable[..., Any]) -> str:
    """``TaskQueries.get_task`` for the nested ``operation`` of that method: the label of
    a database operation, from the code (never from data)."""
    name = getattr(operation, "__qualname__", None) or type(operation).__name__
    for nested in (".operation", ".<lambda>"):
        name = name.replace(".<locals>", "").removesuffix(nested)
    return name


class QueryMetrics:
    """``taskscheduler_server_db_query_duration_seconds{operation}``."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._children: dict[str, Any] = {}

    def observe(self, operation: Callable[..., Any], seconds: float) -> None:
        qualname = getattr(operation, "__qualname__", "")
        child = self._children.get(qualname)
        if child is None:
            child = self._children[qualname] = self._histogram.labels(operation_name(operation))
        child.observe(seconds)


class ServerMetrics:
    """One server's metrics, in a registry of its own (``registry``)."""

    def __init__(self) -> None:
        self.registry = new_registry()
        self.http = HTTPMetrics(self.registry, "server")
        self.queries = QueryMetrics(
            Histogram(
                "taskscheduler_server_db_query_duration_seconds",
                "Time of each database operation (its transaction, connection wait "
                "included), by the store method that ran it.",
                ["operation"],
                buckets=QUERY_BUCKETS,
                registry=self.registry,
            )
        )
        self._results = Counter(
            "taskscheduler_server_results",
            "Results agents reported, by what became of them (stored, duplicate, conflict, "
            "unknown_task, deleted, misaligned, superseded, task_paused).",
            ["outcome"],
            registry=self.registry,
        )
        self._outcomes: dict[str, Any] = {}
        self._late = Counter(
            "taskscheduler_server_results_late",
            "Results stored after their execution's reporting deadline (scheduled instant "
            "+ time limit + --report-grace): the execution had been called complete, "
            "incomplete, without them.",
            registry=self.registry,
        )
        self._heartbeats = Gauge(
            "taskscheduler_server_agent_last_heartbeat_timestamp_seconds",
            "When each agent's last heartbeat reached this server (POSIX seconds).",
            ["agent_id"],
            registry=self.registry,
        )
        self.incomplete = Gauge(
            "taskscheduler_server_executions_incomplete",
            "Executions of the last hour past their reporting deadline with fewer agents "
            "reported than they expected (refreshed every minute by IncompleteWatch).",
            registry=self.registry,
        )
        self._pool = _PoolCollector()
        self.registry.register(self._pool)

    def result_recorded(self, outcome: str) -> None:
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self._results.labels(outcome)
        child.inc()

    def result_late(self) -> None:
        self._late.inc()

    def heartbeat(self, agent_id: uuid.UUID, at: float) -> None:
        self._heartbeats.labels(str(agent_id)).set(at)

    def forget_agent(self, agent_id: uuid.UUID) -> None:
        """A revoked agent's heartbeat series goes (else it would look offline forever)."""
        with contextlib.suppress(KeyError):
            self._heartbeats.remove(str(agent_id))

    def watch_pool(self, state: Callable[[], PoolState | None]) -> None:
        """Report ``state()`` at each scrape (None: no pool yet)."""
        self._pool.read = state


class IncompleteWatch(Service):
    """Counts, every ``interval`` seconds, the executions of the last ``window`` left
    incomplete (:meth:`Store.count_incomplete_executions`) into ``metrics.incomplete``.
    Off the request path; a failed count keeps the last value and is logged."""

    log = Logger()

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        metrics: ServerMetrics,
        report_grace: timedelta,
        interval: float = INCOMPLETE_INTERVAL,
        window: timedelta = INCOMPLETE_WINDOW,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._grace = report_grace
        self._interval = interval
        self._window = window
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._count)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._metrics.incomplete.set(0)  # another replica counts them now (issue 14)
        super().stopService()

    def _count(self) -> Deferred[None]:
        # Never fails: a LoopingCall whose call fails stops for good.
        return Deferred.fromCoroutine(self._count_safely())

    async def _count_safely(self) -> None:
        now = utc_now_from(self._clock.seconds())
        try:
            count = await self._store.count_incomplete_executions(
                now - self._window, now, self._grace
            )
        except Exception:
            self.log.failure("could not count the incomplete executions for /metrics")
            return
        self._metrics.incomplete.set(count)


class _PoolCollector(Collector):
    def __init__(self) -> None:
        self.read: Callable[[], PoolState | None] = lambda: None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        state = self.read() or PoolState(0, 0, 0, 0)
        for name, help_text, value in [
            ("size", "Connections the database pool may hold.", state.size),
            ("in_use", "Pool connections running an operation now.", state.in_use),
            ("idle", "Open pool connections waiting for an operation.", state.idle),
            ("waiting", "Operations waiting for a pool connection.", state.waiting),
        ]:
            yield GaugeMetricFamily(f"taskscheduler_server_db_pool_{name}", help_text, value=value)
