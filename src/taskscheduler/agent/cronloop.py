"""One cron task's loop: a ``callLater`` chain on the label timeline.

A cron task's instants are not evenly spaced (and daylight saving moves them in UTC), so
instead of a ``LoopingCall`` each wake-up plans the next one: it fires the latest instant
due, labelled with that exact instant, and waits for the first instant after it. The
rules are those of :class:`taskscheduler.agent.taskloop.TaskLoop`: instants missed by a
late wake-up are not replayed but each recorded ``skipped`` (the newest
``MAX_SKIPS_RECORDED``), a step of the wall clock re-plans, and the last instant run is
never run again, even by a new version of the task.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime

from twisted.internet.interfaces import IDelayedCall

from taskscheduler.agent.taskloop import MAX_SKIPS_RECORDED, InstantLoop, LabelTime, LoopOwner
from taskscheduler.protocol import TaskSpec
from taskscheduler.schedule import CronTimes


class CronLoop(InstantLoop):
    """One cron task's chain of timers, each set for the task's next instant."""

    __slots__ = ("_call", "_planned", "_schedule")

    def __init__(
        self,
        spec: TaskSpec,
        owner: LoopOwner,
        time: LabelTime,
        after: datetime | None = None,
    ) -> None:
        schedule = spec.schedule
        if not isinstance(schedule, CronTimes):
            raise TypeError(f"task {spec.task_id} has no cron expression")
        super().__init__(spec, owner, time, after)
        self._schedule = schedule
        self._call: IDelayedCall | None = None
        self._planned: datetime | None = None  # the instant the timer is set for

    def replan(self) -> None:
        """Set the timer for the first instant strictly after now, and after every one run."""
        self._cancel()
        now = self._time.now()
        since = now if self.last_run is None else max(now, self.last_run)
        at = self._schedule.next_after(since)
        if self._planned is not None and at > self._planned and self._planned <= now:
            self.log.warn(
                "task {task_id}: the clock jumped ahead over its instant {planned}; "
                "instants passed over are not run",
                task_id=str(self.spec.task_id),
                planned=self._planned.isoformat(),
            )
        self._plan(at, now)

    def _plan(self, at: datetime, now: datetime) -> None:
        self._planned = at
        self._call = self._time.callLater(max(0.0, (at - now).total_seconds()), self._tick)

    def _tick(self) -> None:
        self._call = None
        self._fire_due(self._next_due)

    def _next_due(self) -> datetime | None:
        """The instant to fire now, the next one planned (None: the clock stepped)."""
        if self._owner.check_clock():
            return None  # the wall clock stepped: every loop, this one too, was re-planned
        planned = self._planned
        assert planned is not None
        now = self._time.now()
        scheduled_at, missed, following = self._due(planned, now)
        if missed:
            self._skip_missed(missed, len(missed), now)
        self._plan(following, now)
        return scheduled_at

    def _due(self, planned: datetime, now: datetime) -> tuple[datetime, list[datetime], datetime]:
        """The latest instant due at ``now`` (``planned`` at the earliest), the newest
        instants it passed over (at most MAX_SKIPS_RECORDED), and the instant after it."""
        start = planned
        # A long sleep (a suspended host): look only at its end, if an instant is there,
        # rather than walk through every instant of it.
        window = (MAX_SKIPS_RECORDED + 1) * self._schedule.typical_interval()
        if now - planned > 2 * window:
            probe = self._schedule.next_after(now - window)
            if probe <= now:
                start = probe
        passed: deque[datetime] = deque(maxlen=MAX_SKIPS_RECORDED + 1)
        passed.append(start)
        for following in self._schedule.instants_after(start):
            if following > now:
                break
            passed.append(following)
        latest = passed.pop()
        missed = list(passed)
        if start != planned:
            missed.insert(0, planned)  # the instant it woke for, at least, is accounted
            missed = missed[-MAX_SKIPS_RECORDED:]
        return latest, missed, following

    def _cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
