"""The runs under way on an agent: which tasks they hold, and each result to the spool.

Every result goes to the spool before anything else hears of it. A run counts as
*running* for its task until its process is over (what the task's overlap policy weighs,
see :mod:`taskscheduler.agent.admission`; adopted runs count too); its files stay until
its result is durable, then the runner lets go of them. Shutdown waits for every run to
settle so.

A run that failed is retried as its task says (:mod:`taskscheduler.agent.retries`): its
result says whether it is final, and a retry waiting for its delay counts as a run of
its task. (task, instant, attempt) names one run on this agent.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.metrics import AgentMetrics
from taskscheduler.agent.retries import Attempt, PendingRetries, retry_start
from taskscheduler.agent.spool import Spool
from taskscheduler.protocol import Output, ResultStatus, RunResult, TaskSpec, Trigger
from taskscheduler.protocol.options import RESERVED_ENV_PREFIX
from taskscheduler.schedule import format_instant, utc_now_from


class RunnerLike(Protocol):
    """What :class:`taskscheduler.agent.runner.ProcessRunner` provides."""

    @property
    def running(self) -> int: ...

    def run(
        self,
        command: str,
        time_limit: float,
        extra_env: Mapping[str, str] = ...,
        *,
        key: tuple[uuid.UUID, datetime] | None = ...,
        revision: int | None = ...,
        trigger: Trigger = ...,
        working_dir: str | None = ...,
        attempt: int = ...,
    ) -> Deferred[Any]: ...

    def terminate_all(self) -> Deferred[None]: ...

    def replace(self, key: tuple[uuid.UUID, datetime], attempt: int = ...) -> bool: ...

    def discard(self, key: tuple[uuid.UUID, datetime], attempt: int = ...) -> object: ...


def run_environment(spec: TaskSpec, scheduled_at: datetime) -> dict[str, str]:
    """What a run of ``spec`` adds to the agent's environment: the task's ``env``, under
    the variables that name the run (a task may not set ``TASKSCHEDULER_*`` ones)."""
    env = {
        name: value
        for name, value in spec.options.env.items()
        if not name.startswith(RESERVED_ENV_PREFIX)
    }
    env["TASKSCHEDULER_TASK_ID"] = str(spec.task_id)
    env["TASKSCHEDULER_SCHEDULED_AT"] = format_instant(scheduled_at)
    return env


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
    #: What a retry would run again (None: never retried, as a run adopted after a restart).
    attempt: Attempt | None = None
    number: int = 1  # the attempt's number


class RunsOwner(Protocol):
    """What the runs in flight ask of the runner that started them."""

    def terminate_all(self) -> Deferred[None]: ...

    def replace(self, key: tuple[uuid.UUID, datetime], attempt: int = ...) -> bool: ...

    def discard(self, key: tuple[uuid.UUID, datetime], attempt: int = ...) -> object: ...


class RunsInFlight:
    """Follows each run until its result is durable, by task."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        runner: RunsOwner,
        spool: Spool,
        agent_id: uuid.UUID,
        *,
        now: Callable[[], datetime] | None = None,
        start_retry: Callable[[Attempt], bool] = lambda attempt: False,
    ) -> None:
        """``now`` is the time runs are labelled on (the wall clock by default);
        ``start_retry`` starts a retry whose delay is over, or drops it (False)."""
        self._clock = clock
        self._runner = runner
        self._spool = spool
        self._agent_id = agent_id
        self._now = now or (lambda: utc_now_from(clock.seconds()))
        self._start_retry = start_retry
        #: Counts each run's end (the scheduler gives its own).
        self.metrics: AgentMetrics | None = None
        # The (instant, attempt) of the runs under way, by task: kept across a task's
        # replacement (a new revision), so that it does not overlap its previous
        # version's runs. An attempt made durable after its retry started ends only itself.
        self._running: dict[uuid.UUID, set[tuple[datetime, int]]] = {}
        #: Retries waiting for their delay: each counts as a run of its task.
        self.retries = PendingRetries(clock, self._retry_due)
        # Each run until its result is durable and its files gone: what shutdown awaits.
        self._unsettled: set[Deferred[None]] = set()

    def __len__(self) -> int:
        return sum(len(instants) for instants in self._running.values())

    def count(self, task_id: uuid.UUID) -> int:
        """How many runs of ``task_id`` are going (a retry waiting counts)."""
        return len(self._running.get(task_id, ())) + self.retries.count(task_id)

    def replace(self, task_id: uuid.UUID, scheduled_at: datetime) -> None:
        """End every run of ``task_id`` going, for its run of ``scheduled_at``: each is
        terminated as its time limit would be, and reports ``replaced``; a retry of the
        task waiting is dropped."""
        self.drop_retries(task_id)
        for earlier, attempt in sorted(self._running.get(task_id, ())):
            self.log.info(
                "task {task_id}: its run of {earlier} is replaced by the run of {scheduled_at}",
                task_id=str(task_id),
                earlier=format_instant(earlier),
                scheduled_at=format_instant(scheduled_at),
            )
            if not self._runner.replace((task_id, earlier), attempt):
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
        attempt: Attempt | None = None,
        number: int = 1,
    ) -> None:
        """Follow the run of ``scheduled_at`` whose outcome ``d`` gives: its task is
        running until ``d`` fires; its result is spooled (a failure of ``d`` means the
        command could not be started at all, ``started_at`` being when that was tried),
        naming the task's ``revision`` the run ran and its ``trigger``. A failed
        ``attempt`` is retried as its task says (None: not retried; ``number`` is then
        the attempt's number)."""
        number = number if attempt is None else attempt.number
        labels = _Labels(task_id, scheduled_at, revision, trigger, attempt, number)
        settled: Deferred[None] = Deferred()
        self._running.setdefault(task_id, set()).add((scheduled_at, number))
        self._unsettled.add(settled)
        # Both return the Deferred of the spool's write, which Twisted's stubs do not allow.
        d.addCallbacks(
            self._succeeded,  # type: ignore[arg-type]
            self._failed,  # type: ignore[arg-type]
            callbackArgs=(labels,),
            errbackArgs=(labels, started_at),
        )
        d.addErrback(self._bookkeeping_failed, task_id)
        d.addBoth(self._settled, labels, settled)

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

    def _ended(self, labels: _Labels) -> None:
        """The run's process is over: it no longer counts for its task's overlap."""
        runs = self._running.get(labels.task_id)
        if runs is not None:
            runs.discard((labels.scheduled_at, labels.number))
            if not runs:
                del self._running[labels.task_id]

    def _plan_retry(self, labels: _Labels, status: ResultStatus) -> bool:
        """Plan the retry of a run that ended with ``status``; whether there is one."""
        attempt = labels.attempt
        if attempt is None:
            return False
        now = self._now()
        start = retry_start(attempt, status, now)
        if start is None:
            return False
        self.log.info(
            "task {task_id}: attempt {attempt} of {scheduled_at} {status}; retrying in "
            "{delay:.0f}s",
            task_id=str(labels.task_id),
            attempt=attempt.number,
            scheduled_at=format_instant(labels.scheduled_at),
            status=status.value,
            delay=(start - now).total_seconds(),
        )
        self.retries.add(attempt.retry(), (start - now).total_seconds())
        return True

    def _retry_due(self, attempt: Attempt) -> None:
        self._start_retry(attempt)

    def drop_retries(self, task_id: uuid.UUID | None = None) -> None:
        """Drop the pending retries of ``task_id`` (of every task: None): the attempt
        before each stays the agent's result."""
        for attempt in self.retries.cancel(task_id):
            self.log.warn(
                "task {task_id}: attempt {attempt} of {scheduled_at} is dropped: the task "
                "left the agent or was replaced, or the agent is stopping",
                task_id=str(attempt.task_id),
                attempt=attempt.number,
                scheduled_at=format_instant(attempt.scheduled_at),
            )

    def _succeeded(self, outcome: RunOutcomeLike, labels: _Labels) -> Deferred[bool]:
        # Planned first: the retry counts as a run of the task before this one ends.
        retried = self._plan_retry(labels, outcome.status)
        self._ended(labels)
        if self.metrics is not None:
            duration = getattr(outcome, "duration", None)  # monotonic, when the runner saw it
            if duration is None:
                duration = (outcome.finished_at - outcome.started_at).total_seconds()
            self.metrics.run_ended(labels.task_id, outcome.status, duration)
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
                attempt=labels.number,
                final=not retried,
            )
        )

    def _failed(self, failure: Failure, labels: _Labels, started_at: datetime) -> Deferred[bool]:
        task_id = labels.task_id
        retried = self._plan_retry(labels, ResultStatus.FAILED)
        self._ended(labels)
        if self.metrics is not None:
            self.metrics.run_ended(task_id, ResultStatus.FAILED, None)
        # The runner fails only when it could not start the command at all (no shell,
        # no file descriptors left...): say so in the result rather than say nothing.
        self.log.failure(
            "task {task_id}: its run of {scheduled_at} could not be started",
            failure,
            task_id=str(task_id),
            scheduled_at=format_instant(labels.scheduled_at),
        )
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
                attempt=labels.number,
                final=not retried,
            )
        )

    def _bookkeeping_failed(self, failure: Failure, task_id: uuid.UUID) -> None:
        self.log.failure(
            "task {task_id}: could not record a run's result", failure, task_id=str(task_id)
        )

    def _settled(self, _: object, labels: _Labels, settled: Deferred[None]) -> None:
        """The result is durable (or could not be made so): the run's files have done
        their job."""
        task_id = labels.task_id
        self._ended(labels)
        try:
            self._runner.discard((task_id, labels.scheduled_at), labels.number)
        except Exception:
            self.log.failure(
                "could not remove the files of a run of task {task_id}", task_id=str(task_id)
            )
        self._unsettled.discard(settled)
        settled.callback(None)
