"""Retries of a failed run on the agent that ran it (the task's ``retries`` and
``retry_delay_seconds``).

A run that ends ``failed`` or ``timed_out`` is attempt ``n`` of its instant; while the
task has retries left (``n <= retries``) it is run again, as attempt ``n + 1`` labelled
with the same instant, ``retry_delay`` after it ended: a timer on the reactor, never a
wait. A retry never starts at or past the task's next instant (it would overlap the next
run, and the next instant is a new chance anyway): one that could not start before it is
not planned, and the attempt that failed is the last. The agent's starting deadline does
not apply to retries: the next instant bounds them. A retry runs the task as its first
attempt did (the same revision, labelled the same), even if the task changed meanwhile.

Each attempt is a result of its own, spooled and reported; an attempt the agent will
retry says so (``final`` false), so the server waits for the agent's final attempt. While
a retry waits, its task counts as running (skip-on-overlap holds).

A planned retry that can no longer start when its delay is over (the agent stopping, the
task removed from the agent, the agent at its cap of runs, the next instant reached after
a step of the clock) is dropped with a warning: the attempt before it stays the agent's
result, and the server completes the execution at its reporting deadline. Pending retries
are not kept across a restart of the agent (dropped likewise, so never run twice), and a
run adopted after a restart is not retried.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from taskscheduler.protocol import ResultStatus, TaskSpec, Trigger
from taskscheduler.schedule import format_instant

#: The statuses a retry follows.
RETRIED_STATUSES = frozenset({ResultStatus.FAILED, ResultStatus.TIMED_OUT})


@dataclass(frozen=True)
class Attempt:
    """One run of an instant of a task: what its retry runs again."""

    spec: TaskSpec
    scheduled_at: datetime
    trigger: Trigger = Trigger.SCHEDULE
    number: int = 1

    @property
    def task_id(self) -> uuid.UUID:
        return self.spec.task_id

    def retry(self) -> Attempt:
        return replace(self, number=self.number + 1)


def next_instant(spec: TaskSpec, scheduled_at: datetime) -> datetime:
    """The task's first instant strictly after ``scheduled_at`` (a run-now's too), on
    its grid or its cron times."""
    return spec.schedule.next_after(scheduled_at)


def retry_start(attempt: Attempt, status: ResultStatus, now: datetime) -> datetime | None:
    """When the retry of ``attempt``, ended with ``status`` at ``now`` (label time), is to
    start; None if there is none: it succeeded (or was skipped, lost, replaced), no retry
    is left, or it would not start before the task's next instant."""
    if status not in RETRIED_STATUSES or attempt.number > attempt.spec.options.retries:
        return None
    start = now + attempt.spec.options.retry_delay
    if start >= next_instant(attempt.spec, attempt.scheduled_at):
        return None
    return start


class PendingRetries:
    """The retries waiting for their delay, each a timer on the reactor; ``start`` is
    called with the attempt when its delay is over."""

    log = Logger()

    def __init__(self, clock: IReactorTime, start: Callable[[Attempt], None]) -> None:
        self._clock = clock
        self._start = start
        self._timers: dict[tuple[uuid.UUID, datetime], tuple[Attempt, IDelayedCall]] = {}

    def count(self, task_id: uuid.UUID) -> int:
        """How many retries of ``task_id`` wait."""
        return sum(1 for key in self._timers if key[0] == task_id)

    def __len__(self) -> int:
        return len(self._timers)

    def add(self, attempt: Attempt, delay: float) -> None:
        key = (attempt.task_id, attempt.scheduled_at)
        call = self._clock.callLater(max(0.0, delay), self._due, key)
        self._timers[key] = (attempt, call)

    def _due(self, key: tuple[uuid.UUID, datetime]) -> None:
        attempt, _ = self._timers.pop(key)
        try:
            self._start(attempt)
        except Exception:
            self.log.failure(
                "task {task_id}: could not start attempt {attempt} of {scheduled_at}",
                task_id=str(attempt.task_id),
                attempt=attempt.number,
                scheduled_at=format_instant(attempt.scheduled_at),
            )

    def cancel(self, task_id: uuid.UUID | None = None) -> list[Attempt]:
        """Drop the pending retries of ``task_id`` (of every task: None); those dropped."""
        dropped = []
        for key in [k for k in self._timers if task_id is None or k[0] == task_id]:
            attempt, call = self._timers.pop(key)
            if call.active():
                call.cancel()
            dropped.append(attempt)
        return dropped
