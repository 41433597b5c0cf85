"""The runs under way on an agent: which tasks they hold, and each result to the spool.

Every result goes to the spool before anything else hears of it. A run counts as
*running* for its task until its process is over (what the task's overlap policy weighs,
see :mod:`taskscheduler.agent.admission`; adopted runs count too); its files stay until
its result is durable, then the runner lets go of them. Shutdown waits for every run to
settle so.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.spool import Spool
from taskscheduler.protocol import Output, ResultStatus, RunResult, Trigger
from taskscheduler.schedule import format_instant, utc_now_from


class RunOutcomeLike(Protocol):
    """What :class:`taskscheduler.agent.outcome.RunOutcome` provides."""

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


@dataclass(frozen=True)
class _Labels:
    """What a run's result is labelled with, besides how it ended."""

    task_id: uuid.UUID
    scheduled_at: datetime
    revision: int | None
    trigger: Trigger


class RunsOwner(Protocol):
    """What the runs in flight ask of the runner that started them."""

    def terminate_all(self) -> Deferred[None]: ...

    def replace(self, key: tuple[uuid.UUID, datetime]) -> bool: ...

    def discard(self, key: tuple[uuid.UUID, datetime]) -> object: ...


class RunsInFlight:
    """Follows each run until its result is durable, by task."""

    log = Logger()

    def __init__(
        self, clock: IReactorTime, runner: RunsOwner, spool: Spool, agent_id: uuid.UUID
    ) -> None:
        self._clock = clock
        self._runner = runner
        self._spool = spool
        self._agent_id = agent_id
        # The instants of the runs under way, by task: kept across a task's replacement
        # (a new revision), so that it does not overlap its previous version's runs.
        # (task, instant) names one run on this agent.
        self._running: dict[uuid.UUID, set[datetime]] = {}
        # Each run until its result is durable and its files gone: what shutdown awaits.
        self._unsettled: set[Deferred[None]] = set()

    def __len__(self) -> int:
        return sum(len(instants) for instants in self._running.values())

    def count(self, task_id: uuid.UUID) -> int:
        """How many runs of ``task_id`` are going."""
        return len(self._running.get(task_id, ()))

    def replace(self, task_id: uuid.UUID, scheduled_at: datetime) -> None:
        """End every run of ``task_id`` going, for its run of ``scheduled_at``: each is
        terminated as its time limit would be, and reports ``replaced``."""
        for earlier in sorted(self._running.get(task_id, ())):
            self.log.info(
                "task {task_id}: its run of {earlier} is replaced by the run of {scheduled_at}",
                task_id=str(task_id),
                earlier=format_instant(earlier),
                scheduled_at=format_instant(scheduled_at),
            )
            if not self._runner.replace((task_id, earlier)):
                self.log.warn(
                    "task {task_id}: its run of {earlier} could not be found to replace it",
                    task_id=str(task_id),
                    earlier=format_instant(earlier),
                )

    def track(
        self,
        task_id: uuid.UUID,
        scheduled_at: datetime,
        started_at: datetime,
        d: Deferred[Any],
        revision: int | None = None,
        trigger: Trigger = Trigger.SCHEDULE,
    ) -> None:
        """Follow the run of ``scheduled_at`` whose outcome ``d`` gives: its task is
        running until ``d`` fires; its result is spooled (a failure of ``d`` means the
        command could not be started at all, ``started_at`` being when that was tried),
        naming the task's ``revision`` the run ran and its ``trigger``."""
        labels = _Labels(task_id, scheduled_at, revision, trigger)
        settled: Deferred[None] = Deferred()
        self._running.setdefault(task_id, set()).add(scheduled_at)
        self._unsettled.add(settled)
        # Both return the Deferred of the spool's write, which Twisted's stubs do not allow.
        d.addCallbacks(
            self._succeeded,  # type: ignore[arg-type]
            self._failed,  # type: ignore[arg-type]
            callbackArgs=(labels,),
            errbackArgs=(labels, started_at),
        )
        d.addErrback(self._bookkeeping_failed, task_id)
        d.addBoth(self._settled, task_id, scheduled_at, settled)

    async def drain(self, grace: float) -> None:
        """Wait for the runs under way, terminating those still going after ``grace`` s."""
        if not self._unsettled:
            return
        if self._running:
            self.log.info(
                "waiting up to {grace}s for {count} runs to finish", grace=grace, count=len(self)
            )
        everything = DeferredList(list(self._unsettled), consumeErrors=True)
        timer = self._clock.callLater(grace, self._terminate)
        await everything
        if timer.active():
            timer.cancel()

    def _terminate(self) -> None:
        self.log.warn("terminating {count} runs that outlived the shutdown grace", count=len(self))
        self._runner.terminate_all().addErrback(
            lambda f: self.log.failure("could not terminate runs", f)
        )

    def _ended(self, task_id: uuid.UUID, scheduled_at: datetime) -> None:
        """The run's process is over: it no longer counts for its task's overlap."""
        instants = self._running.get(task_id)
        if instants is not None:
            instants.discard(scheduled_at)
            if not instants:
                del self._running[task_id]

    def _succeeded(self, outcome: RunOutcomeLike, labels: _Labels) -> Deferred[bool]:
        self._ended(labels.task_id, labels.scheduled_at)
        return self._spool.add(
            RunResult(
                task_id=labels.task_id,
                agent_id=self._agent_id,
                scheduled_at=labels.scheduled_at,
                status=outcome.status,
                exit_code=outcome.exit_code,
                signal=outcome.signal,
                started_at=outcome.started_at,
                finished_at=outcome.finished_at,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
                reason=getattr(outcome, "reason", None),
                revision=labels.revision,
                trigger=labels.trigger,
            )
        )

    def _failed(self, failure: Failure, labels: _Labels, started_at: datetime) -> Deferred[bool]:
        task_id = labels.task_id
        self._ended(task_id, labels.scheduled_at)
        # The runner fails only when it could not start the command at all (no shell,
        # no file descriptors left...): say so in the result rather than say nothing.
        self.log.failure("task {task_id}: could not run the command", failure, task_id=str(task_id))
        message = f"taskscheduler agent could not run the command: {failure.getErrorMessage()}"
        return self._spool.add(
            RunResult(
                task_id=task_id,
                agent_id=self._agent_id,
                scheduled_at=labels.scheduled_at,
                status=ResultStatus.FAILED,
                started_at=started_at,
                finished_at=utc_now_from(self._clock.seconds()),
                stderr=Output.of(message.encode("utf-8")),
                revision=labels.revision,
                trigger=labels.trigger,
            )
        )

    def _bookkeeping_failed(self, failure: Failure, task_id: uuid.UUID) -> None:
        self.log.failure(
            "task {task_id}: could not record a run's result", failure, task_id=str(task_id)
        )

    def _settled(
        self, _: object, task_id: uuid.UUID, scheduled_at: datetime, settled: Deferred[None]
    ) -> None:
        """The result is durable (or could not be made so): the run's files have done
        their job."""
        self._ended(task_id, scheduled_at)
        try:
            self._runner.discard((task_id, scheduled_at))
        except Exception:
            self.log.failure(
                "could not remove the files of a run of task {task_id}", task_id=str(task_id)
            )
        self._unsettled.discard(settled)
        settled.callback(None)
