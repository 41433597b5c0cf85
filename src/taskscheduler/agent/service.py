"""The agent's parts wired together, brought up from its data folder and shut down in order.

Start-up reads what a previous life of the agent left in ``<data-dir>``: its identity,
its tasks (which resume with no one acting), the results it had not reported yet (sent
again) and the markers of runs it died during (reported as ``lost``). Shutdown stops
the loops, lets the runs under way finish (terminating them after a grace), spools
their results, then stops.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.api import MAX_BODY_BYTES, AgentAPI
from taskscheduler.agent.durable import BatchWriter, FolderInUse, FolderLock, RunInThread
from taskscheduler.agent.identity import CorruptIdentity, load_or_create_agent_id
from taskscheduler.agent.reporter import Reporter
from taskscheduler.agent.scheduler import RunnerLike, Scheduler
from taskscheduler.agent.spool import DEFAULT_SPOOL_MAX_BYTES, RunMarker, RunMarkers, Spool
from taskscheduler.agent.taskstore import TaskStore
from taskscheduler.protocol import ResultStatus, RunResult, TaskSpec
from taskscheduler.schedule import format_instant
from taskscheduler.web import make_site

#: Seconds the runs under way may go on at shutdown before they are terminated.
DEFAULT_SHUTDOWN_GRACE = 30.0


@dataclass(frozen=True)
class AgentConfig:
    data_dir: Path
    server_url: str
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE


class AgentService(Service):
    """``twistd taskscheduler-agent`` as one service."""

    log = Logger()

    def __init__(
        self,
        config: AgentConfig,
        clock: IReactorTime,
        runner_factory: Callable[[], RunnerLike],
        http: Any,  # the treq module, or a treq.testing.StubTreq in tests
        endpoint: IStreamServerEndpoint | None = None,
        on_fatal: Callable[[], None] = lambda: None,
        jitter: Callable[[], float] = random.random,
        run_in_thread: RunInThread | None = None,
    ) -> None:
        """``run_in_thread`` runs the spool's fsyncs; None runs them on the reactor thread."""
        self.config = config
        self._run_in_thread = run_in_thread
        self._clock = clock
        self._runner_factory = runner_factory
        self._http = http
        self._endpoint = endpoint
        self._on_fatal = on_fatal
        self._jitter = jitter
        self._port: IListeningPort | None = None
        self._lock = FolderLock(config.data_dir)
        self._specs: list[TaskSpec] = []
        self._listening: Deferred[Any] | None = None
        # Built at start-up, from what is on disk.
        self.api: AgentAPI | None = None
        self.scheduler: Scheduler | None = None
        self.reporter: Reporter | None = None
        self.spool: Spool | None = None

    def startService(self) -> None:
        super().startService()
        try:
            self._start()
        except Exception:
            self._fatal(Failure())

    def _fatal(self, failure: Failure) -> None:
        self._listening = None
        if failure.check(FolderInUse, CorruptIdentity, CannotListenError):
            # Operator errors: the message says it all, a traceback would bury it.
            self.log.error(
                "taskscheduler agent could not start: {error}", error=failure.getErrorMessage()
            )
        else:
            self.log.failure("taskscheduler agent could not start", failure)
        self._on_fatal()

    def _start(self) -> None:
        data_dir = self.config.data_dir
        self._lock.acquire()
        agent_id = load_or_create_agent_id(data_dir)
        writer = (
            None if self._run_in_thread is None else BatchWriter(self._clock, self._run_in_thread)
        )
        spool = Spool(data_dir / "spool", self.config.spool_max_bytes, writer)
        spool.load()
        markers = RunMarkers(data_dir / "running")
        for marker in markers.leftovers():
            if (marker.task_id, marker.scheduled_at) in spool:
                markers.clear(marker.task_id, marker.scheduled_at)
                continue
            self.log.warn(
                "task {task_id}: the run at {scheduled_at} was lost when the agent stopped",
                task_id=str(marker.task_id),
                scheduled_at=format_instant(marker.scheduled_at),
            )
            lost = RunResult(
                task_id=marker.task_id,
                agent_id=agent_id,
                scheduled_at=marker.scheduled_at,
                status=ResultStatus.LOST,
                started_at=marker.started_at,
            )
            # The marker goes once the lost result is durable, not before.
            spool.add(lost).addCallback(_clear_marker, markers, marker)
        task_store = TaskStore(data_dir / "tasks")
        specs = task_store.load()

        reporter = Reporter(
            spool, self._http, self._clock, self.config.server_url, jitter=self._jitter
        )
        spool.on_ready = reporter.wake
        scheduler = Scheduler(self._clock, self._runner_factory(), spool, markers, agent_id)

        def counters() -> dict[str, int]:
            return {
                "spooled": len(spool),
                "spooled_bytes": spool.bytes,
                "dropped": spool.dropped,
                "rejected": reporter.rejected,
            }

        self.api = AgentAPI(agent_id, scheduler, task_store, self._clock, counters)
        self.scheduler, self.reporter, self.spool = scheduler, reporter, spool
        self._specs = specs
        if self._endpoint is None:
            self._run()
            return
        # Listen before running anything: an agent that cannot serve stops at once,
        # having started no run.
        site = make_site(self.api.resource(), MAX_BODY_BYTES)
        self._listening = self._endpoint.listen(site)
        self._listening.addCallbacks(self._listened, self._fatal)

    def _listened(self, port: IListeningPort) -> None:
        self._listening = None
        self._port = port
        self.log.info("taskscheduler agent listening on {address}", address=str(port.getHost()))
        self._run()

    def _run(self) -> None:
        """Resume the stored tasks and report what is spooled."""
        assert self.scheduler is not None and self.reporter is not None
        assert self.spool is not None
        for spec in self._specs:
            self.scheduler.schedule(spec)
        self.reporter.start()
        self.log.info(
            "taskscheduler agent {agent_id} resumed {tasks} tasks; {spooled} results to report",
            agent_id=str(self.scheduler.agent_id),
            tasks=len(self._specs),
            spooled=len(self.spool),
        )
        self._specs = []

    async def _stop(self) -> None:
        if self._listening is not None:
            self._listening.cancel()
        if self._port is not None:
            port, self._port = self._port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        if self.scheduler is not None:
            self.scheduler.stop()
            await self.scheduler.drain(self.config.shutdown_grace)
        if self.reporter is not None:
            self.reporter.stop()
        self._lock.release()
        super().stopService()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def _clear_marker(spooled: bool, markers: RunMarkers, marker: RunMarker) -> None:
    markers.clear(marker.task_id, marker.scheduled_at)
