"""One task's loop: which of its anchored instants to fire, and when.

Execution ``k`` of a task is due at ``anchor + k * interval``. A task's loop waits
(``callLater``) until its next instant, then a ``LoopingCall`` (counting with
``withCount``) fires every instant labelled with that exact instant (never the clock's
reading). A wake-up that comes late (a busy reactor, a suspended host) fires the latest
instant due, once; the instants it passed over are not replayed (cron's rule) but each
recorded ``skipped`` (the newest :data:`MAX_SKIPS_RECORDED` of them).

Loops count on the *label timeline* (:class:`LabelTime`): the wall clock plus a lead, which
the scheduler moves when the wall clock steps (see :mod:`taskscheduler.agent.scheduler`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.protocol import TaskSpec
from taskscheduler.schedule import format_instant, instant, next_execution, utc_now_from

#: At most this many instants of one task missed in one wake-up are recorded ``skipped``
#: (a host suspended for a day would otherwise spool a day of them).
MAX_SKIPS_RECORDED = 100


class LabelTime:
    """The reactor's time on the label timeline: the wall clock plus ``lead`` seconds.

    Each task's LoopingCall counts its intervals on this clock, so the instants it wakes
    on are the instants its runs are labelled with.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        #: Seconds by which run labels are ahead of the wall clock (after a backward step).
        self.lead = 0.0

    def seconds(self) -> float:
        return self._clock.seconds() + self.lead

    def now(self) -> datetime:
        return utc_now_from(self.seconds())

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall:
        return self._clock.callLater(delay, f, *args, **kw)

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return self._clock.getDelayedCalls()


class LoopOwner(Protocol):
    """What a loop asks of the scheduler that runs it."""

    def check_clock(self) -> float:
        """The step of the wall clock seen now (0.0 if none); on one, every loop is
        re-planned."""
        ...

    def fired(self, task_id: uuid.UUID, scheduled_at: datetime) -> None:
        """``scheduled_at`` is fired now (run or skipped): never again."""
        ...

    def fire(self, spec: TaskSpec, scheduled_at: datetime) -> None:
        """Run (or refuse, and record skipped) the instant ``scheduled_at`` now."""
        ...

    def record_skip(
        self, spec: TaskSpec, scheduled_at: datetime, reason: str, quiet: bool = False
    ) -> None:
        """Record ``scheduled_at`` as ``skipped``, with the reason."""
        ...


class InstantLoop:
    """What a task's loop of either kind (:class:`TaskLoop`, every N;
    :class:`~taskscheduler.agent.cronloop.CronLoop`) does with its wake-ups: fire the
    instant due (recorded as fired before it runs: never again), account for the ones it
    passed over, re-plan when it fails. Never raises: its timers would stop for good.

    Loops have slots: 10,000 waiting tasks each hold one. (``__dict__`` too, made only
    when something else is set on a loop, e.g. a test's own ``log``.)"""

    __slots__ = ("__dict__", "_owner", "_time", "last_run", "spec")
    log = Logger()

    def __init__(
        self, spec: TaskSpec, owner: LoopOwner, time: LabelTime, after: datetime | None
    ) -> None:
        self.spec = spec
        self._owner = owner
        self._time = time
        #: The last instant run: never run again, even by a new version of the task.
        self.last_run: datetime | None = after

    def start(self) -> None:
        self.replan()

    def stop(self) -> None:
        self._cancel()

    def replan(self) -> None:
        raise NotImplementedError

    def _cancel(self) -> None:
        raise NotImplementedError

    def _fire_due(self, due: Callable[..., datetime | None], *args: Any) -> None:
        """Fire the instant ``due(*args)`` names (None: none now), labelled with it."""
        try:
            scheduled_at = due(*args)
            if scheduled_at is None:
                return
            self.last_run = scheduled_at
            self._owner.fired(self.spec.task_id, scheduled_at)
        except Exception:
            self.log.failure(
                "task {task_id}: its loop failed; re-planning", task_id=str(self.spec.task_id)
            )
            self._replan_safely()
            return
        try:
            self._owner.fire(self.spec, scheduled_at)
        except Exception:
            self.log.failure(
                "task {task_id}: could not start its run of {scheduled_at}",
                task_id=str(self.spec.task_id),
                scheduled_at=format_instant(scheduled_at),
            )

    def _replan_safely(self) -> None:
        try:
            self.replan()
        except Exception:
            self.log.failure("task {task_id}: its loop stopped", task_id=str(self.spec.task_id))

    def _skip_missed(self, missed: Sequence[datetime], passed: int, now: datetime) -> None:
        """``passed`` instants went by while the agent was busy (or its host suspended):
        not replayed, the newest of them (``missed``, at most MAX_SKIPS_RECORDED) each
        recorded ``skipped``, so that every instant is accounted for."""
        self.log.warn(
            "task {task_id}: {missed} instants passed while the agent was busy; "
            "they are not replayed",
            task_id=str(self.spec.task_id),
            missed=passed,
        )
        for scheduled_at in missed:
            late = (now - scheduled_at).total_seconds()
            self._owner.record_skip(
                self.spec,
                scheduled_at,
                f"the agent was overloaded: it came to the instant {late:.1f}s late",
                quiet=True,
            )


class TaskLoop(InstantLoop):
    """One task's LoopingCall, started on the task's next instant of the label timeline.

    For a task run every N (``spec.frequency``); a cron task has a
    :class:`taskscheduler.agent.cronloop.CronLoop` instead.
    """

    __slots__ = ("_first", "_frequency", "_loop", "_next", "_start_call")

    def __init__(
        self,
        spec: TaskSpec,
        owner: LoopOwner,
        time: LabelTime,
        after: datetime | None = None,
    ) -> None:
        if spec.frequency is None:
            raise TypeError(f"task {spec.task_id} has no frequency")
        super().__init__(spec, owner, time, after)
        self._frequency = spec.frequency
        self._start_call: IDelayedCall | None = None  # waits for the loop's first instant
        self._loop: LoopingCall | None = None
        self._first: datetime | None = None  # the instant the loop's intervals count from
        self._next = 0  # the execution the loop waits for (0: none planned yet)

    def replan(self) -> None:
        """Start the loop on the first instant strictly after now, and after every one run.

        The loop's earlier timers are cancelled: a step of the wall clock leaves them be.
        """
        self._cancel()
        interval = self._frequency.interval
        now = self._time.now()
        since = now if self.last_run is None else max(now, self.last_run)
        k, at = next_execution(self.spec.anchor, interval, since)
        if self._next and k > self._next:
            self.log.warn(
                "task {task_id}: the clock jumped ahead over {missed} instants; they are not run",
                task_id=str(self.spec.task_id),
                missed=k - self._next,
            )
        self._next = k
        self._start_call = self._time.callLater((at - now).total_seconds(), self._begin, at)

    def _begin(self, first: datetime) -> None:
        self._start_call = None
        self._first = first
        loop = LoopingCall.withCount(self._tick)
        loop.clock = self._time  # type: ignore[assignment]  # seconds and callLater suffice
        self._loop = loop
        loop.start(self._frequency.seconds, now=True).addErrback(self._loop_died)

    def _tick(self, count: int) -> None:
        self._fire_due(self._due, count)

    def _due(self, count: int) -> datetime | None:
        loop = self._loop
        if self._first is not None and loop is not None:
            # Count intervals from the exact instant, not from the moment (a little
            # later) the loop started: a late first wake-up shifts nothing after it.
            loop.starttime = self._first.timestamp()
            self._first = None
        if self._owner.check_clock():
            return None  # the wall clock stepped: every loop, this one too, was re-planned
        # ``count`` > 1 when the wake-up came late (a busy reactor, a suspended host):
        # run the latest instant that is due, once, labelled with that exact instant.
        # (The first wake-up's count is always 1: check it against the label clock.)
        now = self._time.now()
        due = next_execution(self.spec.anchor, self._frequency.interval, now)[0] - 1
        k = max(self._next + count - 1, due)
        if k > self._next:
            self._missed(self._next, k, now)
        self._next = k + 1
        return instant(self.spec.anchor, self._frequency.interval, k)

    def _loop_died(self, failure: Failure) -> None:
        self.log.failure(
            "task {task_id}: its loop stopped; re-planning", failure, task_id=str(self.spec.task_id)
        )
        self._replan_safely()

    def _missed(self, first: int, end: int, now: datetime) -> None:
        """Instants ``first`` to ``end - 1`` passed over (see :meth:`_skip_missed`)."""
        interval = self._frequency.interval
        newest = range(max(first, end - MAX_SKIPS_RECORDED), end)
        missed = [instant(self.spec.anchor, interval, k) for k in newest]
        self._skip_missed(missed, end - first, now)

    def _cancel(self) -> None:
        if self._start_call is not None and self._start_call.active():
            self._start_call.cancel()
        self._start_call = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
