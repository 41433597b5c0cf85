"""The agent's Prometheus metrics (``GET /metrics``; names and meanings in the README's
"Metrics").

Cheap on the run path: a run's end adds one to a plain number kept per (task, status)
(:class:`_RunCounts`, turned into series only when scraped: a labelled child per task
cost each of 10,000 waiting tasks a dozen objects and locks) and makes one histogram
observation; a start is one observation. What the spool and
the reporter already count (spooled, dropped, reported, refused) is read when the page is
scraped, never counted twice.

Runs are labelled by ``task_id`` and ``status`` (at most seven statuses): one series per
task and status this agent has seen, dropped when the task leaves the agent. Durations
and lateness are not labelled by task (a histogram per task would be ~20 series each);
the agent itself is the series (Prometheus's ``instance`` label, and
``taskscheduler_agent_info`` for its id).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client import Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from taskscheduler.metrics import HTTPMetrics, new_registry
from taskscheduler.protocol import ResultStatus

#: Start lateness, from 0.5 ms (a start on time, on an idle agent) to a minute.
LATENESS_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
#: Run durations, from 10 ms to a day (the longest time limit).
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)
#: From a run's end to the server's acknowledgement: milliseconds when all is well,
#: minutes while the server is away.
REPORT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class AgentMetrics:
    """One agent's metrics, in a registry of its own (``registry``)."""

    def __init__(self) -> None:
        self.registry = new_registry()
        self._runs = _RunCounts()
        self.registry.register(self._runs)
        self._duration = Histogram(
            "taskscheduler_agent_run_duration_seconds",
            "How long runs took, from their start to their end (runs that started).",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self._lateness = Histogram(
            "taskscheduler_agent_start_lateness_seconds",
            "From a scheduled instant to the start of its run's process (first attempts of "
            "scheduled runs; manual runs and retries are not on the schedule).",
            buckets=LATENESS_BUCKETS,
            registry=self.registry,
        )
        self._report_latency = Histogram(
            "taskscheduler_agent_report_latency_seconds",
            "From a run's end to the server's acknowledgement of its result.",
            buckets=REPORT_BUCKETS,
            registry=self.registry,
        )
        self._info = Gauge(
            "taskscheduler_agent_info",
            "Always 1: this agent's id and version, to join on.",
            ["agent_id", "version"],
            registry=self.registry,
        )
        self.http = HTTPMetrics(self.registry, "agent")
        self._state = _StateCollector()
        self.registry.register(self._state)

    # -- the run path ------------------------------------------------------------------

    def run_ended(self, task_id: uuid.UUID, status: ResultStatus, duration: float | None) -> None:
        """A result of ``task_id`` with ``status`` is recorded (``duration``: of a run
        that started; None for one that did not, or a skipped instant)."""
        self._runs.count(task_id, status)
        if duration is not None:
            self._duration.observe(duration)

    def started(self, lateness: float) -> None:
        """A scheduled run's process started ``lateness`` seconds after its instant."""
        self._lateness.observe(max(0.0, lateness))

    def reported(self, latency: float) -> None:
        """The server acknowledged a result ``latency`` seconds after its run ended."""
        self._report_latency.observe(max(0.0, latency))

    def forget_task(self, task_id: uuid.UUID) -> None:
        """``task_id`` left the agent: its series go (a run still under way brings its
        own back when it ends)."""
        self._runs.forget(task_id)

    # -- read at scrape time -----------------------------------------------------------

    def watch(self, agent_id: uuid.UUID, version: str, state: Callable[[], AgentState]) -> None:
        """Report ``state()`` (the spool's and the reporter's counts) at each scrape."""
        self._info.labels(str(agent_id), version).set(1)
        self._state.read = state


class AgentState:
    """What the agent's parts count already, read at scrape time."""

    __slots__ = (
        "dropped",
        "in_flight",
        "rejected",
        "reported",
        "server",
        "server_failovers",
        "spooled",
        "spooled_bytes",
        "tasks",
    )

    def __init__(
        self,
        *,
        spooled: int = 0,
        spooled_bytes: int = 0,
        dropped: int = 0,
        reported: int = 0,
        rejected: int = 0,
        in_flight: int = 0,
        tasks: int = 0,
        server: str = "",
        server_failovers: int = 0,
    ) -> None:
        self.spooled = spooled
        self.spooled_bytes = spooled_bytes
        self.dropped = dropped
        self.reported = reported
        self.rejected = rejected
        self.in_flight = in_flight
        self.tasks = tasks
        #: The replica of ``--server`` the agent talks to now, and its switches so far.
        self.server = server
        self.server_failovers = server_failovers


class _StateCollector(Collector):
    """The spool's and the reporter's counts, as series, when scraped."""

    def __init__(self) -> None:
        self.read: Callable[[], AgentState] = AgentState

    def describe(self) -> list[Any]:
        return []  # not known before a scrape; nothing to check names against

    def collect(self) -> Any:
        state = self.read()
        yield GaugeMetricFamily(
            "taskscheduler_agent_results_spooled",
            "Results waiting in the spool for the server's acknowledgement.",
            value=state.spooled,
        )
        yield GaugeMetricFamily(
            "taskscheduler_agent_results_spooled_bytes",
            "Bytes of the results waiting in the spool.",
            value=state.spooled_bytes,
        )
        yield CounterMetricFamily(
            "taskscheduler_agent_results_dropped",
            "Results thrown away (the spool full, the disk failing), over the agent's life "
            "(kept across restarts).",
            value=state.dropped,
        )
        yield CounterMetricFamily(
            "taskscheduler_agent_results_reported",
            "Results the server acknowledged (stored, or a duplicate of one stored).",
            value=state.reported,
        )
        yield CounterMetricFamily(
            "taskscheduler_agent_results_rejected",
            "Results the server refused for good (dropped from the spool).",
            value=state.rejected,
        )
        yield GaugeMetricFamily(
            "taskscheduler_agent_runs_in_flight", "Runs under way.", value=state.in_flight
        )
        yield GaugeMetricFamily(
            "taskscheduler_agent_tasks", "Tasks this agent runs.", value=state.tasks
        )
        if state.server:
            server = GaugeMetricFamily(
                "taskscheduler_agent_server",
                "The replica of --server the agent talks to now (always 1).",
                labels=["url"],
            )
            server.add_metric([state.server], 1)
            yield server
        yield CounterMetricFamily(
            "taskscheduler_agent_server_failovers",
            "Switches from one replica of --server to the next, since the agent started.",
            value=state.server_failovers,
        )


class _RunCounts(Collector):
    """``taskscheduler_agent_runs_total`` by task and status: per (task, status) its count
    and when it was first counted (``_created``), made into series at scrape time."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._by_task: dict[uuid.UUID, dict[ResultStatus, list[float]]] = {}

    def count(self, task_id: uuid.UUID, status: ResultStatus) -> None:
        statuses = self._by_task.get(task_id)
        if statuses is None:
            statuses = self._by_task[task_id] = {}
        counted = statuses.get(status)
        if counted is None:
            statuses[status] = [1.0, self._wall_clock()]
        else:
            counted[0] += 1

    def forget(self, task_id: uuid.UUID) -> None:
        self._by_task.pop(task_id, None)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        family = CounterMetricFamily(
            "taskscheduler_agent_runs",
            "Results this agent recorded, by task and status (succeeded, failed, timed_out, "
            "lost, replaced, skipped).",
            labels=["task_id", "status"],
        )
        for task_id, statuses in self._by_task.items():
            task = str(task_id)
            for status, (value, created) in statuses.items():
                family.add_metric([task, status.value], value, created=created)
        yield family
