"""One ``LoopingCall`` per task, started on the task's anchored instants.

Execution ``k`` of a task is due at ``anchor + k * interval``. A task's loop waits
(``callLater``) until its first instant strictly after now, then runs a
``LoopingCall.withCount`` every interval; the count says exactly which execution each
call is, so ``scheduled_at`` is always the exact instant, never the clock's reading.
Instants that passed while the agent was down are not replayed (cron's rule).

A run still going at its task's next instant is not started twice: the instant is
recorded as ``skipped``. Every result goes to the spool before anything else hears of
it; a marker file records each run under way, so that a run the agent died during is
reported as ``lost`` on the next start-up.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.spool import RunMarkers, Spool
from taskscheduler.protocol import Output, ResultStatus, RunResult, TaskSpec
from taskscheduler.schedule import format_instant, instant, next_execution, utc_now_from


class RunOutcomeLike(Protocol):
    """What :class:`taskscheduler.agent.runner.RunOutcome` provides."""

    @property
    def status(self) -> ResultStatus: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def signal(self) -> int | None: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def finished_at(self) -> datetime: ...
    @property
    def stdout(self) -> Output: ...
    @property
    def stderr(self) -> Output: ...


class RunnerLike(Protocol):
    """What :class:`taskscheduler.agent.runner.ProcessRunner` provides."""

    @property
    def running(self) -> int: ...

    def run(
        self, command: str, time_limit: float, extra_env: Mapping[str, str] = ...
    ) -> Deferred[Any]: ...

    def terminate_all(self) -> Deferred[None]: ...


class _TaskLoop:
    """The timer of one task: a wait for the first instant, then a LoopingCall."""

    log = Logger()

    def __init__(
        self, spec: TaskSpec, clock: IReactorTime, fire: Callable[[TaskSpec, int], None]
    ) -> None:
        self.spec = spec
        self._clock = clock
        self._fire = fire
        self._first: IDelayedCall | None = None
        self._loop: LoopingCall | None = None
        self._k = 0  # the execution the next call of the loop is (minus its count)
        self._origin: float | None = None

    def start(self) -> None:
        now = utc_now_from(self._clock.seconds())
        k, at = next_execution(self.spec.anchor, self.spec.frequency.interval, now)
        self._k = k
        self._first = self._clock.callLater((at - now).total_seconds(), self._begin)

    def _begin(self) -> None:
        self._first = None
        # The wait may end late (a busy reactor, a suspended host): start from the latest
        # instant that is due, and pin the loop's time origin to that exact instant, so
        # that every later call is due on an instant too rather than inheriting the delay.
        interval = self.spec.frequency.interval
        now = utc_now_from(self._clock.seconds())
        due = max(self._k, next_execution(self.spec.anchor, interval, now)[0] - 1)
        if due > self._k:
            self._missed(due - self._k)
        self._k = due - 1  # the LoopingCall's first call counts 1
        self._origin = instant(self.spec.anchor, interval, due).timestamp()
        loop = LoopingCall.withCount(self._tick)
        loop.clock = self._clock
        self._loop = loop
        loop.start(self.spec.frequency.seconds, now=True).addErrback(self._loop_died)

    def _missed(self, count: int) -> None:
        self.log.warn(
            "task {task_id}: {missed} instants passed while the agent was busy; "
            "they are not replayed",
            task_id=str(self.spec.task_id),
            missed=count,
        )

    def _tick(self, count: int) -> None:
        # Never raise: a LoopingCall whose function fails stops for good.
        try:
            if self._origin is not None and self._loop is not None:
                self._loop.starttime, self._origin = self._origin, None
            if count > 1:
                self._missed(count - 1)
            self._k += count
            self._fire(self.spec, self._k)
        except Exception:
            self.log.failure(
                "task {task_id}: could not start a run", task_id=str(self.spec.task_id)
            )

    def _loop_died(self, failure: Failure) -> None:
        self.log.failure(
            "task {task_id}: its loop stopped", failure, task_id=str(self.spec.task_id)
        )

    def stop(self) -> None:
        if self._first is not None and self._first.active():
            self._first.cancel()
        self._first = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


class Scheduler:
    """Runs every task on its instants and spools every run's result."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        runner: RunnerLike,
        spool: Spool,
        markers: RunMarkers,
        agent_id: uuid.UUID,
    ) -> None:
        self._clock = clock
        self._runner = runner
        self._spool = spool
        self._markers = markers
        self.agent_id = agent_id
        self._loops: dict[uuid.UUID, _TaskLoop] = {}
        # Runs under way, by task: kept across a task's replacement, so that a replaced
        # task does not start while its previous version still runs.
        self._running: set[uuid.UUID] = set()
        # Each run until its result is durable and its marker gone: what shutdown awaits.
        self._unsettled: set[Deferred[None]] = set()
        self._stopped = False

    @property
    def tasks(self) -> dict[uuid.UUID, TaskSpec]:
        return {task_id: loop.spec for task_id, loop in self._loops.items()}

    @property
    def running(self) -> int:
        return len(self._running)

    def schedule(self, spec: TaskSpec) -> None:
        """Run ``spec`` from its next instant on, replacing any earlier version of it."""
        old = self._loops.pop(spec.task_id, None)
        if old is not None:
            old.stop()
        if self._stopped:
            return
        loop = _TaskLoop(spec, self._clock, self._fire)
        self._loops[spec.task_id] = loop
        loop.start()

    def stop(self) -> None:
        """Start no more runs; the runs under way go on."""
        self._stopped = True
        for loop in self._loops.values():
            loop.stop()

    async def drain(self, grace: float) -> None:
        """Wait for the runs under way, terminating those still going after ``grace`` s."""
        if not self._unsettled:
            return
        if self._running:
            self.log.info(
                "waiting up to {grace}s for {count} runs to finish", grace=grace, count=self.running
            )
        everything = DeferredList(list(self._unsettled), consumeErrors=True)
        timer = self._clock.callLater(grace, self._terminate)
        await everything
        if timer.active():
            timer.cancel()

    def _terminate(self) -> None:
        self.log.warn(
            "terminating {count} runs that outlived the shutdown grace", count=self.running
        )
        self._runner.terminate_all().addErrback(
            lambda f: self.log.failure("could not terminate runs", f)
        )

    # -- one instant -------------------------------------------------------------------

    def _fire(self, spec: TaskSpec, k: int) -> None:
        scheduled_at = instant(spec.anchor, spec.frequency.interval, k)
        if spec.task_id in self._running:
            self.log.warn(
                "task {task_id}: skipped {scheduled_at}, the previous run is still going",
                task_id=str(spec.task_id),
                scheduled_at=format_instant(scheduled_at),
            )
            self._spool.add(
                RunResult(spec.task_id, self.agent_id, scheduled_at, ResultStatus.SKIPPED)
            )
            return
        started_at = utc_now_from(self._clock.seconds())
        self._markers.mark(spec.task_id, scheduled_at, started_at)
        try:
            d = self._runner.run(
                spec.command,
                spec.time_limit.total_seconds(),
                {
                    "TASKSCHEDULER_TASK_ID": str(spec.task_id),
                    "TASKSCHEDULER_SCHEDULED_AT": format_instant(scheduled_at),
                },
            )
        except Exception:
            d = fail()
        settled: Deferred[None] = Deferred()
        self._running.add(spec.task_id)
        self._unsettled.add(settled)
        # Both return the Deferred of the spool's write, which Twisted's stubs do not allow.
        d.addCallbacks(
            self._succeeded,  # type: ignore[arg-type]
            self._failed,  # type: ignore[arg-type]
            callbackArgs=(spec, scheduled_at),
            errbackArgs=(spec, scheduled_at, started_at),
        )
        d.addErrback(self._bookkeeping_failed, spec)
        d.addBoth(self._settled, spec.task_id, scheduled_at, settled)

    def _ended(self, task_id: uuid.UUID) -> None:
        """The run's process is over: the task may run again at its next instant."""
        self._running.discard(task_id)

    def _succeeded(
        self, outcome: RunOutcomeLike, spec: TaskSpec, scheduled_at: datetime
    ) -> Deferred[bool]:
        self._ended(spec.task_id)
        return self._spool.add(
            RunResult(
                task_id=spec.task_id,
                agent_id=self.agent_id,
                scheduled_at=scheduled_at,
                status=outcome.status,
                exit_code=outcome.exit_code,
                signal=outcome.signal,
                started_at=outcome.started_at,
                finished_at=outcome.finished_at,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
            )
        )

    def _failed(
        self, failure: Failure, spec: TaskSpec, scheduled_at: datetime, started_at: datetime
    ) -> Deferred[bool]:
        self._ended(spec.task_id)
        # The runner fails only when it could not start the command at all (no shell,
        # no file descriptors left...): say so in the result rather than say nothing.
        self.log.failure(
            "task {task_id}: could not run the command", failure, task_id=str(spec.task_id)
        )
        message = f"taskscheduler agent could not run the command: {failure.getErrorMessage()}"
        return self._spool.add(
            RunResult(
                task_id=spec.task_id,
                agent_id=self.agent_id,
                scheduled_at=scheduled_at,
                status=ResultStatus.FAILED,
                started_at=started_at,
                finished_at=utc_now_from(self._clock.seconds()),
                stderr=Output.of(message.encode("utf-8")),
            )
        )

    def _bookkeeping_failed(self, failure: Failure, spec: TaskSpec) -> None:
        self.log.failure(
            "task {task_id}: could not record a run's result", failure, task_id=str(spec.task_id)
        )

    def _settled(
        self, _: object, task_id: uuid.UUID, scheduled_at: datetime, settled: Deferred[None]
    ) -> None:
        """The result is durable (or could not be made so): the marker has done its job."""
        self._ended(task_id)
        try:
            self._markers.clear(task_id, scheduled_at)
        except OSError:
            self.log.failure(
                "could not remove the run marker of task {task_id}", task_id=str(task_id)
            )
        self._unsettled.discard(settled)
        settled.callback(None)
