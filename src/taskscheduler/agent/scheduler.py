"""A LoopingCall per task, started on the task's anchored instants.

Execution ``k`` of a task is due at ``anchor + k * interval``. A task's loop waits
(``callLater``) until its next instant, then a ``LoopingCall`` (counting with
``withCount``) runs every instant labelled with that exact instant (never the clock's
reading). A wake-up that comes late (a busy reactor,
a suspended host) runs the latest instant due, once; instants that passed while the agent
was down or busy are not replayed (cron's rule).

A run still going at its task's next instant is not started twice: the instant is
recorded as ``skipped``, with the reason. So is an instant the agent cannot start on
time (see :func:`starting_deadline_for`: an overloaded agent sheds load instead of
piling runs up) and one past the cap on runs in flight.
Every result goes to the spool before anything else hears of it; the runner keeps a
record of each run under way, so that a restarted agent re-attaches to it
(:meth:`Scheduler.adopt`) and never starts its task again while it is still going.

**Steps of the wall clock.** Twisted's timers follow the wall clock: a step forward makes
every timer overdue at once, a step back puts every timer to sleep for as long as the
step. The scheduler compares the wall clock with the monotonic one (a reactor timer
every quarter second sees forward steps before the timers they made overdue; a thread,
which a backward step cannot put to sleep, sees backward ones) and on a step of a second
or more:

- moves every other timer of the reactor back onto monotonic pace (time limits, kill
  graces, back-offs, request timeouts each meant "so many seconds from now");
- re-plans every task loop on the *label timeline*: the wall clock plus a lead. An
  execution index already used is never used again, so results stay unique per
  ``(task, agent, instant)``:

  - **backward** by ``d``: the lead grows by ``d``. Loops keep their pace and go on with
    the next instants in order, labelled ``d`` ahead of the agent's (new) wall clock: no
    stall, and no instant run twice.
  - **forward** by ``d``: the lead shrinks by ``d``, first (a step back then forward
    again loses and repeats nothing); what is left of ``d`` is skipped: loops wait for
    the first instant after the new time, and the instants in between are not run, as
    if the agent had been suspended (logged; no burst of catch-up runs).

**Restarts.** The last instant each task fired is recorded as its run starts
(:class:`~taskscheduler.agent.lastruns.LastRuns`, off the reactor thread); the results
spooled, and the runs a dead agent left (adopted), name the instants that record may
miss. A
restarted agent never plans an instant at or before the last one its task fired, and
when that instant is ahead of the wall clock (it stepped back, before or while the agent
was down) the labels resume from it: the lead is that gap, and loops keep their pace
from there. No instant runs twice on one agent, however the clock moved across the
restart. Run durations are measured on the monotonic clock; time limits are reactor
timers, kept on monotonic pace as above (a forward step may end one up to a quarter
second early).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.lastruns import LastRuns
from taskscheduler.agent.spool import Spool
from taskscheduler.protocol import Output, ResultStatus, RunResult, TaskSpec
from taskscheduler.schedule import format_instant, instant, next_execution, utc_now_from

#: A change of at least this many seconds between the wall clock and the monotonic clock
#: is a step (NTP slews smaller offsets away gradually, and steps larger ones).
STEP_THRESHOLD = 1.0
#: How often the reactor compares the clocks: the most a timer may fire early when the
#: wall clock steps forward.
SENTINEL_INTERVAL = 0.25
#: How often the watchdog thread compares them.
WATCHDOG_INTERVAL = 0.5
#: An instant that comes more than this many seconds late (or more than its interval)
#: is recorded ``skipped`` instead of run: an overloaded agent sheds load.
DEFAULT_STARTING_DEADLINE: float | None = None  # automatic: see starting_deadline_for
#: At most this many runs in flight on one agent; instants past it are ``skipped``.
DEFAULT_MAX_RUNNING = 1000
#: At most this many instants of one task missed in one wake-up are recorded ``skipped``
#: (a host suspended for a day would otherwise spool a day of them).
MAX_SKIPS_RECORDED = 100


def starting_deadline_for(interval: float, configured: float | None = None) -> float:
    """Seconds late past which an instant of a task run every ``interval`` seconds is
    skipped rather than started (never more than one interval).

    By default a quarter of the interval, at most 5 s or 1% of the interval if that is
    longer: 0.25 s for a task run every second, 5 s for one every minute, 36 s hourly,
    14.4 min daily. Late starts are the symptom of an overloaded agent (its children
    take the CPU its event loop needs): shedding the late ones keeps it able to report
    and to answer, instead of piling runs up.
    """
    if configured is not None:
        return min(configured, interval)
    return min(interval / 4, max(5.0, interval / 100))


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
        self,
        command: str,
        time_limit: float,
        extra_env: Mapping[str, str] = ...,
        *,
        key: tuple[uuid.UUID, datetime] | None = ...,
    ) -> Deferred[Any]: ...

    def terminate_all(self) -> Deferred[None]: ...

    def discard(self, key: tuple[uuid.UUID, datetime]) -> object: ...


class _LabelTime:
    """The reactor's time read on the scheduler's label timeline (wall clock plus lead).

    Each task's LoopingCall counts its intervals on this clock, so the instants it wakes
    on are the instants its runs are labelled with.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def seconds(self) -> float:
        return self._scheduler._clock.seconds() + self._scheduler.lead

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> IDelayedCall:
        return self._scheduler._clock.callLater(delay, f, *args, **kw)

    def getDelayedCalls(self) -> Sequence[IDelayedCall]:
        return self._scheduler._clock.getDelayedCalls()


class _TaskLoop:
    """One task's LoopingCall, started on the task's next instant of the label timeline."""

    log = Logger()

    def __init__(
        self,
        spec: TaskSpec,
        scheduler: Scheduler,
        after: datetime | None = None,
    ) -> None:
        self.spec = spec
        self._scheduler = scheduler
        self._clock = scheduler._clock
        self._time = _LabelTime(scheduler)
        self._start_call: IDelayedCall | None = None  # waits for the loop's first instant
        self._loop: LoopingCall | None = None
        self._first: datetime | None = None  # the instant the loop's intervals count from
        self._next = 0  # the execution the loop waits for (0: none planned yet)
        #: The last instant run: never run again, even by a new version of the task.
        self.last_run: datetime | None = after

    @property
    def pending(self) -> IDelayedCall | None:
        """The timer this loop waits on, if any."""
        for call in (self._start_call, self._loop.call if self._loop is not None else None):
            if call is not None and call.active():
                return call
        return None

    def start(self) -> None:
        self.replan()

    def replan(self) -> None:
        """Start the loop on the first instant strictly after now, and after every one run."""
        self._cancel()
        interval = self.spec.frequency.interval
        now = self._scheduler.label_now()
        since = now if self.last_run is None else max(now, self.last_run)
        k, at = next_execution(self.spec.anchor, interval, since)
        if self._next and k > self._next:
            self.log.warn(
                "task {task_id}: the clock jumped ahead over {missed} instants; they are not run",
                task_id=str(self.spec.task_id),
                missed=k - self._next,
            )
        self._next = k
        self._start_call = self._clock.callLater((at - now).total_seconds(), self._begin, at)

    def _begin(self, first: datetime) -> None:
        self._start_call = None
        self._first = first
        loop = LoopingCall.withCount(self._tick)
        loop.clock = self._time  # type: ignore[assignment]  # seconds and callLater suffice
        self._loop = loop
        loop.start(self.spec.frequency.seconds, now=True).addErrback(self._loop_died)

    def _tick(self, count: int) -> None:
        # Never raise: a LoopingCall whose function fails stops for good.
        loop = self._loop
        try:
            if self._first is not None and loop is not None:
                # Count intervals from the exact instant, not from the moment (a little
                # later) the loop started: a late first wake-up shifts nothing after it.
                loop.starttime = self._first.timestamp()
                self._first = None
            if self._scheduler.check_clock():
                return  # the wall clock stepped: every loop, this one too, was re-planned
            # ``count`` > 1 when the wake-up came late (a busy reactor, a suspended host):
            # run the latest instant that is due, once, labelled with that exact instant.
            # (The first wake-up's count is always 1: check it against the label clock.)
            now = self._scheduler.label_now()
            due = next_execution(self.spec.anchor, self.spec.frequency.interval, now)[0] - 1
            k = max(self._next + count - 1, due)
            if k > self._next:
                self._missed(self._next, k, now)
            self.last_run = instant(self.spec.anchor, self.spec.frequency.interval, k)
            self._scheduler.fired(self.spec.task_id, self.last_run)
            self._next = k + 1
        except Exception:
            self.log.failure(
                "task {task_id}: its loop failed; re-planning", task_id=str(self.spec.task_id)
            )
            self._replan_safely()
            return
        try:
            self._fire(k)
        except Exception:
            self.log.failure(
                "task {task_id}: could not start a run", task_id=str(self.spec.task_id)
            )

    def _loop_died(self, failure: Failure) -> None:
        self.log.failure(
            "task {task_id}: its loop stopped; re-planning", failure, task_id=str(self.spec.task_id)
        )
        self._replan_safely()

    def _fire(self, k: int) -> None:
        self._scheduler._fire(self.spec, k)

    def _replan_safely(self) -> None:
        try:
            self.replan()
        except Exception:
            self.log.failure("task {task_id}: its loop stopped", task_id=str(self.spec.task_id))

    def _missed(self, first: int, end: int, now: datetime) -> None:
        """Instants ``first`` to ``end - 1`` passed while the agent was busy (or its host
        suspended): not replayed, each recorded ``skipped`` (the newest
        MAX_SKIPS_RECORDED of them), so that every instant is accounted for."""
        self.log.warn(
            "task {task_id}: {missed} instants passed while the agent was busy; "
            "they are not replayed",
            task_id=str(self.spec.task_id),
            missed=end - first,
        )
        interval = self.spec.frequency.interval
        for k in range(max(first, end - MAX_SKIPS_RECORDED), end):
            scheduled_at = instant(self.spec.anchor, interval, k)
            late = (now - scheduled_at).total_seconds()
            self._scheduler.record_skip(
                self.spec,
                scheduled_at,
                f"the agent was overloaded: it came to the instant {late:.1f}s late",
                quiet=True,
            )

    def _cancel(self) -> None:
        if self._start_call is not None and self._start_call.active():
            self._start_call.cancel()
        self._start_call = None
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def stop(self) -> None:
        self._cancel()


class _Watchdog(threading.Thread):
    """Compares the clocks off the reactor, which a backward step leaves asleep.

    The reactor's timers follow the wall clock: after a step back of an hour, it sleeps
    an hour. This thread sleeps on the monotonic clock and, when it sees a step, wakes
    the reactor to deal with it.
    """

    def __init__(
        self,
        call_from_thread: Callable[[Callable[[], object]], None],
        check: Callable[[], object],
        wall: Callable[[], float],
        monotonic: Callable[[], float],
        interval: float = WATCHDOG_INTERVAL,
    ) -> None:
        super().__init__(name="taskscheduler-clock-watchdog", daemon=True)
        self._call_from_thread = call_from_thread
        self._check = check
        self._wall = wall
        self._monotonic = monotonic
        self._interval = interval
        self._stopping = threading.Event()
        self._offset = wall() - monotonic()

    def poll(self) -> bool:
        """Compare the clocks once; True (and the reactor told) if the wall clock stepped."""
        offset = self._wall() - self._monotonic()
        stepped = abs(offset - self._offset) >= STEP_THRESHOLD
        self._offset = offset
        if stepped:
            self._call_from_thread(self._check)
        return stepped

    def run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self.poll()
            except Exception:  # the reactor is gone: nothing left to watch for
                return

    def stop(self) -> None:
        self._stopping.set()


class Scheduler:
    """Runs every task on its instants and spools every run's result."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        runner: RunnerLike,
        spool: Spool,
        agent_id: uuid.UUID,
        *,
        monotonic: Callable[[], float] | None = None,
        watchdog: bool | None = None,
        starting_deadline: float | None = DEFAULT_STARTING_DEADLINE,
        max_running: int = DEFAULT_MAX_RUNNING,
        last_runs: LastRuns | None = None,
    ) -> None:
        """``clock`` is the reactor, whose time is the wall clock.

        ``monotonic`` is the clock that steps do not move: by default the system's when
        ``clock`` is a real reactor, else ``clock`` itself (no steps to see). ``watchdog``
        starts the thread that sees backward steps (by default with a real reactor).
        ``last_runs`` holds the instants a previous life of the agent fired (by default
        none, and nothing recorded).
        """
        self._clock = clock
        self._runner = runner
        self._spool = spool
        self.agent_id = agent_id
        #: Seconds late past which an instant is skipped rather than started.
        self.starting_deadline = starting_deadline
        #: Runs in flight past which an instant is skipped rather than started.
        self.max_running = max_running
        #: Instants skipped since start (overlap, overload, the cap on runs in flight).
        self.skipped = 0
        real_reactor = IReactorThreads.providedBy(clock)
        if monotonic is None:
            monotonic = time.monotonic if real_reactor else clock.seconds
        self._monotonic = monotonic
        self._watch_steps = monotonic != clock.seconds
        self._use_watchdog = real_reactor if watchdog is None else watchdog
        self._offset = clock.seconds() - monotonic()  # wall minus monotonic, last seen
        #: Seconds by which run labels are ahead of the wall clock (after a backward step).
        self.lead = 0.0
        self._last_runs = LastRuns() if last_runs is None else last_runs
        self._resumed = False
        self._sentinel: IDelayedCall | None = None
        self._watchdog: _Watchdog | None = None
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
        self._resume()
        self._watch()
        loop = _TaskLoop(spec, self, after=self._last_runs.last(spec.task_id))
        self._loops[spec.task_id] = loop
        loop.start()

    def unschedule(self, task_id: uuid.UUID) -> bool:
        """Run ``task_id`` no more (a run under way goes on, and its result is spooled).
        False if the task was not scheduled."""
        loop = self._loops.pop(task_id, None)
        if loop is None:
            return False
        loop.stop()
        return True

    def stop(self) -> None:
        """Start no more runs; the runs under way go on."""
        self._stopped = True
        for loop in self._loops.values():
            loop.stop()
        if self._sentinel is not None and self._sentinel.active():
            self._sentinel.cancel()
        self._sentinel = None
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    # -- the clocks --------------------------------------------------------------------

    def _resume(self) -> None:
        """Take up the label timeline where a previous life of the agent left it (once,
        before the first loop is planned, after the runs it left are adopted)."""
        if self._resumed:
            return
        self._resumed = True
        # A result still spooled is of an instant fired that the record may lack: it is
        # written asynchronously (so may an adopted run be: see ``adopt``).
        for task_id, scheduled_at in self._spool.result_keys():
            self._last_runs.note(task_id, scheduled_at)
        self._last_runs.record_noted()  # the spool and the runs' records go, in time
        latest = self._last_runs.latest()
        if latest is None:
            return
        ahead = latest.timestamp() - self._clock.seconds()
        if ahead <= 0:
            return
        self.lead = ahead
        self.log.warn(
            "runs were labelled up to {latest}, {lead:.1f}s ahead of the wall clock (it "
            "stepped back): labels resume from there, {lead:.1f}s ahead of it",
            latest=format_instant(latest),
            lead=ahead,
        )

    def fired(self, task_id: uuid.UUID, scheduled_at: datetime) -> None:
        """``scheduled_at`` of ``task_id`` is fired now (run or skipped): never again."""
        self._last_runs.record(task_id, scheduled_at)

    def label_now(self) -> datetime:
        """Now on the timeline runs are labelled with: the wall clock, plus any lead."""
        return utc_now_from(self._clock.seconds() + self.lead)

    def check_clock(self) -> float:
        """Compare the wall clock with the monotonic one; the step seen (0.0 if none).

        On a step every timer of the reactor is moved back onto monotonic pace, and
        every task loop is re-planned (see the module's docstring).
        """
        offset = self._clock.seconds() - self._monotonic()
        step = offset - self._offset
        self._offset = offset
        if abs(step) < STEP_THRESHOLD or self._stopped:
            return 0.0
        self._stepped(step)
        return step

    def _stepped(self, step: float) -> None:
        lead = self.lead
        self.lead = max(0.0, lead - step)
        self.log.warn(
            "the wall clock stepped {direction} by {seconds:.1f}s; run labels are now "
            "{lead:.1f}s ahead of it{skipped}",
            direction="forward" if step > 0 else "backward",
            seconds=abs(step),
            lead=self.lead,
            skipped=(
                f"; {step - lead:.1f}s of instants are skipped, not caught up"
                if step - lead >= STEP_THRESHOLD
                else ""
            ),
        )
        loops = list(self._loops.values())
        ours = {id(call) for call in (loop.pending for loop in loops) if call is not None}
        for call in self._clock.getDelayedCalls():
            # Time limits, kill graces, back-offs, request timeouts: each meant "so many
            # seconds from now", which the step has just changed by ``step``.
            if id(call) not in ours and call.active():
                call.delay(step)
        for loop in loops:
            loop.replan()

    def _watch(self) -> None:
        """Start watching for steps of the wall clock (once, with the first task)."""
        if not self._watch_steps or self._sentinel is not None:
            return
        # A forward step is seen on the reactor, by this timer or a task's own, before
        # the timers it made overdue all fire at once; a backward step, which leaves
        # every timer asleep, by the watchdog thread.
        self._sentinel = self._clock.callLater(SENTINEL_INTERVAL, self._sentinel_tick)
        if self._use_watchdog:
            reactor: Any = self._clock
            self._watchdog = _Watchdog(
                reactor.callFromThread, self.check_clock, self._clock.seconds, self._monotonic
            )
            self._watchdog.start()

    def _sentinel_tick(self) -> None:
        self._sentinel = None
        try:
            self.check_clock()
        except Exception:
            self.log.failure("could not check the clocks")
        if not self._stopped:
            self._sentinel = self._clock.callLater(SENTINEL_INTERVAL, self._sentinel_tick)

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
        reason = self._refusal(spec, scheduled_at)
        if reason is not None:
            self.record_skip(spec, scheduled_at, reason)
            return
        started_at = utc_now_from(self._clock.seconds())
        try:
            d = self._runner.run(
                spec.command,
                spec.time_limit.total_seconds(),
                {
                    "TASKSCHEDULER_TASK_ID": str(spec.task_id),
                    "TASKSCHEDULER_SCHEDULED_AT": format_instant(scheduled_at),
                },
                key=(spec.task_id, scheduled_at),
            )
        except Exception:
            d = fail()
        self._track(spec.task_id, scheduled_at, started_at, d)

    def record_skip(
        self, spec: TaskSpec, scheduled_at: datetime, reason: str, quiet: bool = False
    ) -> None:
        """Record the instant ``scheduled_at`` as ``skipped``, with the reason."""
        if not quiet:
            self.log.warn(
                "task {task_id}: skipped {scheduled_at}: {reason}",
                task_id=str(spec.task_id),
                scheduled_at=format_instant(scheduled_at),
                reason=reason,
            )
        self.skipped += 1
        self._spool.add(
            RunResult(
                spec.task_id, self.agent_id, scheduled_at, ResultStatus.SKIPPED, reason=reason
            )
        )

    def _refusal(self, spec: TaskSpec, scheduled_at: datetime) -> str | None:
        """Why the run of ``scheduled_at`` must not start now, or None if it may."""
        if spec.task_id in self._running:
            return "the previous run was still going"
        if self._runner.running >= self.max_running:
            return (
                f"{self._runner.running} runs were already going on this agent "
                f"(--max-running {self.max_running})"
            )
        late = (self.label_now() - scheduled_at).total_seconds()
        if late > starting_deadline_for(spec.frequency.seconds, self.starting_deadline):
            # Shed load rather than pile it up: a run started this late is no longer the
            # run of its instant, and starting it would make the next ones later still.
            return f"the agent was overloaded: the instant came {late:.1f}s late"
        return None

    def adopt(
        self,
        task_id: uuid.UUID,
        scheduled_at: datetime,
        started_at: datetime | None,
        outcome: Deferred[Any],
    ) -> None:
        """Follow a run a previous life of the agent started (see ``ProcessRunner.recover``).

        Until it ends, its task is not started again: skip-on-overlap holds across
        restarts; and its instant is never run again.
        """
        self._last_runs.note(task_id, scheduled_at)
        self._track(
            task_id, scheduled_at, started_at or utc_now_from(self._clock.seconds()), outcome
        )

    def _track(
        self, task_id: uuid.UUID, scheduled_at: datetime, started_at: datetime, d: Deferred[Any]
    ) -> None:
        settled: Deferred[None] = Deferred()
        self._running.add(task_id)
        self._unsettled.add(settled)
        # Both return the Deferred of the spool's write, which Twisted's stubs do not allow.
        d.addCallbacks(
            self._succeeded,  # type: ignore[arg-type]
            self._failed,  # type: ignore[arg-type]
            callbackArgs=(task_id, scheduled_at),
            errbackArgs=(task_id, scheduled_at, started_at),
        )
        d.addErrback(self._bookkeeping_failed, task_id)
        d.addBoth(self._settled, task_id, scheduled_at, settled)

    def _ended(self, task_id: uuid.UUID) -> None:
        """The run's process is over: the task may run again at its next instant."""
        self._running.discard(task_id)

    def _succeeded(
        self, outcome: RunOutcomeLike, task_id: uuid.UUID, scheduled_at: datetime
    ) -> Deferred[bool]:
        self._ended(task_id)
        return self._spool.add(
            RunResult(
                task_id=task_id,
                agent_id=self.agent_id,
                scheduled_at=scheduled_at,
                status=outcome.status,
                exit_code=outcome.exit_code,
                signal=outcome.signal,
                started_at=outcome.started_at,
                finished_at=outcome.finished_at,
                stdout=outcome.stdout,
                stderr=outcome.stderr,
                reason=getattr(outcome, "reason", None),
            )
        )

    def _failed(
        self, failure: Failure, task_id: uuid.UUID, scheduled_at: datetime, started_at: datetime
    ) -> Deferred[bool]:
        self._ended(task_id)
        # The runner fails only when it could not start the command at all (no shell,
        # no file descriptors left...): say so in the result rather than say nothing.
        self.log.failure("task {task_id}: could not run the command", failure, task_id=str(task_id))
        message = f"taskscheduler agent could not run the command: {failure.getErrorMessage()}"
        return self._spool.add(
            RunResult(
                task_id=task_id,
                agent_id=self.agent_id,
                scheduled_at=scheduled_at,
                status=ResultStatus.FAILED,
                started_at=started_at,
                finished_at=utc_now_from(self._clock.seconds()),
                stderr=Output.of(message.encode("utf-8")),
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
        self._ended(task_id)
        try:
            self._runner.discard((task_id, scheduled_at))
        except Exception:
            self.log.failure(
                "could not remove the files of a run of task {task_id}", task_id=str(task_id)
            )
        self._unsettled.discard(settled)
        settled.callback(None)
