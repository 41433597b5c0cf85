"""The agent's scheduler: every task on its instants, on one label timeline.

Each task has a loop (:mod:`taskscheduler.agent.taskloop`) that fires its anchored
instants; this module decides what each fired instant becomes (a run, or ``skipped``
with the reason: :mod:`taskscheduler.agent.admission`), hands the runs to
:mod:`taskscheduler.agent.inflight`, and keeps the *label timeline* all loops count on:
the wall clock plus a lead.

**Steps of the wall clock** (seen by :mod:`taskscheduler.agent.clocksteps`, which also
keeps every other reactor timer on monotonic pace) re-plan every task loop on the label
timeline. An execution index already used is never used again, so results stay unique
per ``(task, agent, instant)``:

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
miss. A restarted agent never plans an instant at or before the last one its task fired,
and when that instant is ahead of the wall clock (it stepped back, before or while the
agent was down) the labels resume from it: the lead is that gap, and loops keep their
pace from there. No instant runs twice on one agent, however the clock moved across the
restart. Run durations are measured on the monotonic clock.

**Manual runs** (:meth:`Scheduler.run_now`, an operator's run-now) are labelled with the
server's instant, outside the task's grid: they obey the same admission rules, are
remembered so that a repeated delivery does not run them again, and never move the
task's loop or the label timeline. Every result names the revision of the task it ran
and what triggered it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskscheduler.agent.admission import (
    DEFAULT_MAX_RUNNING,
    DEFAULT_STARTING_DEADLINE,
    refusal,
    starting_deadline_for,
)
from taskscheduler.agent.claims import ClaimClient, Claims, needs_claim
from taskscheduler.agent.clocksteps import STEP_THRESHOLD, ClockSteps
from taskscheduler.agent.cronloop import CronLoop
from taskscheduler.agent.heap import HeapKeeper
from taskscheduler.agent.inflight import RunnerLike, RunsInFlight, run_environment
from taskscheduler.agent.lastruns import LastRuns
from taskscheduler.agent.metrics import AgentMetrics
from taskscheduler.agent.retries import Attempt, next_instant
from taskscheduler.agent.specs import SharedParts, SpecsView
from taskscheduler.agent.spool import Spool
from taskscheduler.agent.taskloop import LabelTime, TaskLoop
from taskscheduler.protocol import ResultStatus, RunResult, TaskSpec, Trigger
from taskscheduler.protocol.options import Overlap
from taskscheduler.schedule import format_instant, utc_now_from


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
        claim_client: ClaimClient | None = None,
        metrics: AgentMetrics | None = None,
        heap: HeapKeeper | None = None,
    ) -> None:
        """``clock`` is the reactor, whose time is the wall clock.

        ``monotonic`` and ``watchdog`` are :class:`~taskscheduler.agent.clocksteps.ClockSteps`'s.
        ``last_runs`` holds the instants a previous life of the agent fired (by default
        none, and nothing recorded). ``claim_client`` claims run-on-one instants from the
        server (:mod:`.claims`); without it they run as any other. ``metrics`` counts
        runs and their start lateness. ``heap`` hears of every change of the tasks
        (it freezes what waiting tasks hold: :mod:`.heap`).
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
        self._labels = LabelTime(clock)
        self._steps = ClockSteps(clock, self._stepped, monotonic=monotonic, watchdog=watchdog)
        self._last_runs = LastRuns() if last_runs is None else last_runs
        self._resumed = False
        self._loops: dict[uuid.UUID, TaskLoop | CronLoop] = {}
        self._metrics = metrics or AgentMetrics()
        self._runs = RunsInFlight(
            clock, runner, spool, agent_id, now=self._labels.now, start_retry=self._retry
        )
        self._runs.metrics = self._metrics
        self._stopped = False
        self._heap = heap
        self._shared = SharedParts()
        self._claims = None
        if claim_client is not None:
            self._claims = Claims(clock, claim_client, self._labels.now, self._deadline_of)

    @property
    def tasks(self) -> Mapping[uuid.UUID, TaskSpec]:
        """The tasks scheduled, by id: a live view, no copy (it is read for each task
        delivered and each health check; a copy of 10,000 made each delivery quadratic)."""
        return SpecsView(self._loops)

    @property
    def running(self) -> int:
        return len(self._runs)

    @property
    def lead(self) -> float:
        """Seconds by which run labels are ahead of the wall clock (after a backward step)."""
        return self._labels.lead

    def schedule(self, spec: TaskSpec) -> None:
        """Run ``spec`` from its next instant on, replacing any earlier version of it."""
        old = self._loops.pop(spec.task_id, None)
        if old is not None:
            old.stop()
        if self._stopped:
            return
        if self._heap is not None:
            self._heap.changed(removed=old is not None)
        self._resume()
        self._steps.watch()
        spec = self._shared.share(spec)
        kind = TaskLoop if spec.cron is None else CronLoop
        loop = kind(spec, self, self._labels, after=self._last_runs.last(spec.task_id))
        self._loops[spec.task_id] = loop
        loop.start()

    def unschedule(self, task_id: uuid.UUID) -> bool:
        """Run ``task_id`` no more (a run under way goes on, and its result is spooled).
        False if the task was not scheduled."""
        loop = self._loops.pop(task_id, None)
        self._runs.drop_retries(task_id)
        if loop is None:
            return False
        self._metrics.forget_task(task_id)
        loop.stop()
        if self._heap is not None and not self._stopped:
            self._heap.changed(removed=True)
        return True

    def stop(self) -> None:
        """Start no more runs; the runs under way go on."""
        self._stopped = True
        self._runs.drop_retries()  # a retry is not kept across a restart: see retries
        if self._claims is not None:
            self._claims.stop()
        for loop in self._loops.values():
            loop.stop()
        self._steps.stop()
        if self._heap is not None:
            self._heap.stop()

    async def drain(self, grace: float) -> None:
        """Wait for the runs under way, terminating those still going after ``grace`` s."""
        await self._runs.drain(grace)

    # -- the label timeline ------------------------------------------------------------

    def _resume(self) -> None:
        """Take up the label timeline where a previous life of the agent left it (once,
        before the first loop is planned, after the runs it left are adopted)."""
        if self._resumed:
            return
        self._resumed = True
        # A result still spooled is of an instant fired that the record may lack: it is
        # written asynchronously (so may an adopted run be: see ``adopt``). A manual
        # run's is no instant of the schedule.
        for task_id, scheduled_at, _ in self._spool.result_keys():
            if not self._last_runs.is_manual(task_id, scheduled_at):
                self._last_runs.note(task_id, scheduled_at)
        self._last_runs.record_noted()  # the spool and the runs' records go, in time
        latest = self._last_runs.latest()
        if latest is None:
            return
        ahead = latest.timestamp() - self._clock.seconds()
        if ahead <= 0:
            return
        self._labels.lead = ahead
        self.log.warn(
            "runs were labelled up to {latest}, {lead:.1f}s ahead of the wall clock (it "
            "stepped back): labels resume from there, {lead:.1f}s ahead of it",
            latest=format_instant(latest),
            lead=ahead,
        )

    def fired(self, task_id: uuid.UUID, scheduled_at: datetime) -> None:
        """``scheduled_at`` of ``task_id`` is fired now (run or skipped): never again."""
        self._last_runs.record(task_id, scheduled_at)

    def check_clock(self) -> float:
        """Compare the wall clock with the monotonic one; the step seen (0.0 if none).

        On a step every task loop is re-planned (see the module's docstring).
        """
        return self._steps.check()

    def _stepped(self, step: float) -> None:
        lead = self._labels.lead
        self._labels.lead = max(0.0, lead - step)
        self.log.warn(
            "the wall clock stepped {direction} by {seconds:.1f}s; run labels are now "
            "{lead:.1f}s ahead of it{skipped}",
            direction="forward" if step > 0 else "backward",
            seconds=abs(step),
            lead=self._labels.lead,
            skipped=(
                f"; {step - lead:.1f}s of instants are skipped, not caught up"
                if step - lead >= STEP_THRESHOLD
                else ""
            ),
        )
        # Each loop replaces its timers: ClockSteps moves only the timers still pending.
        for loop in list(self._loops.values()):
            loop.replan()

    # -- one instant -------------------------------------------------------------------

    async def run_now(self, spec: TaskSpec, scheduled_at: datetime) -> bool:
        """Run ``spec`` once now, as the manual run labelled ``scheduled_at`` (or record
        it skipped, with the reason). False if that run was accepted before: it is not
        run again. The acceptance is on disk before the run starts (OSError if it cannot
        be: nothing was started)."""
        if not await self._last_runs.accept_manual_once(spec.task_id, scheduled_at):
            return False
        # The newest version of the task, if it changed while the acceptance was written.
        loop = self._loops.get(spec.task_id)
        spec = spec if loop is None else loop.spec
        if self._stopped:
            # Shutdown waits only for the runs it saw under way: start none after it.
            self.record_skip(spec, scheduled_at, "the agent was stopping", trigger=Trigger.MANUAL)
        else:
            self.fire(spec, scheduled_at, Trigger.MANUAL)
        return True

    def fire(
        self,
        spec: TaskSpec,
        scheduled_at: datetime,
        trigger: Trigger = Trigger.SCHEDULE,
        *,
        claimed_late: float | None = None,
    ) -> None:
        """Start the run of ``scheduled_at`` now, or record it skipped with the reason.

        A task whose overlap policy is ``replace`` has its runs going ended first. A
        run-on-one instant is claimed from the server first (:mod:`.claims`); once
        granted it comes back here with ``claimed_late``: how late the agent asked."""
        if claimed_late is None and self._claims is not None and needs_claim(spec, trigger):
            self._claims.claim(
                spec, scheduled_at, lambda late: self._granted(spec, scheduled_at, late)
            )
            return
        now = self._labels.now()
        if claimed_late is not None:  # late as when it asked, not the server's round trip
            now = min(now, scheduled_at + timedelta(seconds=claimed_late))
        reason = refusal(
            spec,
            scheduled_at,
            now,
            task_runs=self._runs.count(spec.task_id),
            runs_in_flight=self._runner.running,
            max_running=self.max_running,
            starting_deadline=self.starting_deadline,
        )
        if reason is not None:
            self.record_skip(spec, scheduled_at, reason, trigger=trigger, claimed=True)
            return
        if spec.options.overlap is Overlap.REPLACE:
            self._runs.replace(spec.task_id, scheduled_at)
        self._start(Attempt(spec, scheduled_at, trigger))

    def _start(self, attempt: Attempt) -> None:
        """Start the run of ``attempt`` now (admitted)."""
        spec, scheduled_at = attempt.spec, attempt.scheduled_at
        started_at = utc_now_from(self._clock.seconds())
        try:
            d = self._runner.run(
                spec.command,
                spec.time_limit.total_seconds(),
                run_environment(spec, scheduled_at),
                key=(spec.task_id, scheduled_at),
                revision=spec.revision,
                trigger=attempt.trigger,
                working_dir=spec.options.working_dir,
                attempt=attempt.number,
            )
        except Exception:
            d = fail()
        else:  # its process is started: how late, on the timeline its instant is on
            if attempt.number == 1 and attempt.trigger is Trigger.SCHEDULE:
                self._metrics.started(self._labels.seconds() - scheduled_at.timestamp())
        self._runs.track(
            spec.task_id, scheduled_at, started_at, d, spec.revision, attempt.trigger, attempt
        )

    def _retry(self, attempt: Attempt) -> bool:
        """Start the retry ``attempt`` whose delay is over, or drop it (False, logged):
        see :mod:`taskscheduler.agent.retries`."""
        why = None
        if self._stopped:
            why = "the agent is stopping"
        elif self._labels.now() >= next_instant(attempt.spec, attempt.scheduled_at):
            why = "the task's next instant has come"
        elif self._runner.running >= self.max_running:
            why = f"the agent already has {self._runner.running} runs in flight"
        if why is not None:
            self.log.warn(
                "task {task_id}: attempt {attempt} of {scheduled_at} is dropped: {why}",
                task_id=str(attempt.task_id),
                attempt=attempt.number,
                scheduled_at=format_instant(attempt.scheduled_at),
                why=why,
            )
            return False
        self._start(attempt)
        return True

    def _deadline_of(self, spec: TaskSpec) -> float:
        return starting_deadline_for(spec.interval.total_seconds(), self.starting_deadline)

    def _granted(self, spec: TaskSpec, scheduled_at: datetime, late: float) -> None:
        """This agent holds the instant's claim: it runs it, or records why not."""
        if self._stopped:
            self.record_skip(spec, scheduled_at, "the agent was stopping", claimed=True)
        else:
            self.fire(spec, scheduled_at, claimed_late=late)

    def record_skip(
        self,
        spec: TaskSpec,
        scheduled_at: datetime,
        reason: str,
        quiet: bool = False,
        trigger: Trigger = Trigger.SCHEDULE,
        *,
        claimed: bool = False,
    ) -> None:
        """Record the instant ``scheduled_at`` as ``skipped``, with the reason.

        An instant of a run-on-one task this agent did not claim (one it came to too
        late) is not recorded: another agent may have run it."""
        if not claimed and self._claims is not None and needs_claim(spec, trigger):
            return
        if not quiet:
            self.log.warn(
                "task {task_id}: skipped {scheduled_at}: {reason}",
                task_id=str(spec.task_id),
                scheduled_at=format_instant(scheduled_at),
                reason=reason,
            )
        self.skipped += 1
        self._metrics.run_ended(spec.task_id, ResultStatus.SKIPPED, None)
        self._spool.add(
            RunResult(
                spec.task_id,
                self.agent_id,
                scheduled_at,
                ResultStatus.SKIPPED,
                reason=reason,
                revision=spec.revision,
                trigger=trigger,
            )
        )

    def adopt(
        self,
        task_id: uuid.UUID,
        scheduled_at: datetime,
        started_at: datetime | None,
        outcome: Deferred[Any],
        revision: int | None = None,
        trigger: Trigger | None = None,
        attempt: int = 1,
    ) -> None:
        """Follow a run a previous life of the agent started (see ``ProcessRunner.recover``).

        Until it ends, its task is not started again: skip-on-overlap holds across
        restarts; and its instant is never run again. ``revision`` and ``trigger`` are
        what its record says (None: not known; a manual run is then told by the
        acceptances remembered). ``attempt`` is its number; it is not retried.
        """
        if trigger is None:
            manual = self._last_runs.is_manual(task_id, scheduled_at)
            trigger = Trigger.MANUAL if manual else Trigger.SCHEDULE
        if trigger is Trigger.SCHEDULE:
            self._last_runs.note(task_id, scheduled_at)
        self._runs.track(
            task_id,
            scheduled_at,
            started_at or utc_now_from(self._clock.seconds()),
            outcome,
            revision,
            trigger,
            number=attempt,
        )
