"""The agent's label timeline: steps of the wall clock and restarts, no instant run twice."""

from __future__ import annotations

import shutil
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from taskscheduler.agent.lastruns import LastRuns
from taskscheduler.agent.outcome import REATTACHED, RecoveredRun, RunOutcome
from taskscheduler.agent.scheduler import Scheduler
from taskscheduler.agent.spool import Spool
from taskscheduler.agent.taskstore import TaskStore
from taskscheduler.protocol import Output, ResultStatus, TaskSpec
from taskscheduler.schedule import format_instant
from tests.unit.agent_fakes import (
    ANCHOR,
    ANCHOR_SECONDS,
    Agent,
    FakeRunner,
    FakeServer,
    FakeThread,
    spec,
)


def scheduled(agent: Agent) -> list[str]:
    return [run.extra_env["TASKSCHEDULER_SCHEDULED_AT"] for run in agent.runner.runs]


def at(seconds: float) -> str:
    return format_instant(ANCHOR + timedelta(seconds=seconds))


# -- steps of the wall clock ---------------------------------------------------------------


class SteppingClocks:
    """The reactor's clock (the wall clock) and a monotonic clock, for one scheduler.

    ``tick`` lets time pass on both, a quarter second at a time as a reactor would;
    ``step`` moves the wall clock alone, as NTP or an operator would.
    """

    def __init__(self, tmp_path: Path, at: float) -> None:
        self.clock = Clock()
        self.clock.advance(ANCHOR_SECONDS + at)
        self.mono = 1000.0
        self.runner = FakeRunner(self.clock)
        self.folder = tmp_path
        self.agent_id = uuid.uuid4()
        self.scheduler = self._scheduler(set())

    def _scheduler(self, tasks: set[uuid.UUID]) -> Scheduler:
        spool = Spool(self.folder / "spool")
        spool.load()
        last_runs = LastRuns(self.folder / "lastrun")
        last_runs.load(tasks)
        return Scheduler(
            self.clock,
            self.runner,
            spool,
            self.agent_id,
            monotonic=lambda: self.mono,
            watchdog=False,
            last_runs=last_runs,
        )

    def restart(self, *tasks: TaskSpec, acknowledged: bool = True) -> None:
        """The agent stops and a new one starts over the same data folder (same boot).

        If ``acknowledged``, the server had taken every result: the spool is empty.
        """
        self.scheduler.stop()
        for path in (self.folder / "spool").glob("*.json") if acknowledged else []:
            path.unlink()
        self.scheduler = self._scheduler({task.task_id for task in tasks})
        for task in tasks:
            self.scheduler.schedule(task)

    def tick(self, seconds: float, step: float = 0.25) -> None:
        end = self.mono + seconds
        while self.mono < end - 1e-9:
            delta = min(step, end - self.mono)
            self.mono += delta
            self.clock.advance(delta)
            for run in self.runner.runs:
                if not run.done:
                    self.runner.finish(run)

    def step(self, seconds: float) -> None:
        self.clock.rightNow += seconds

    def watchdog_sees_it(self) -> None:
        """What the watchdog thread does on a step: the reactor checks the clocks."""
        self.scheduler.check_clock()

    def scheduled(self) -> list[str]:
        return [run.extra_env["TASKSCHEDULER_SCHEDULED_AT"] for run in self.runner.runs]


def test_a_forward_step_skips_ahead_without_a_burst_of_catch_up_runs(tmp_path: Path) -> None:
    c = SteppingClocks(tmp_path, 5)
    c.scheduler.schedule(spec())
    c.tick(27)  # up to 32 s: runs at 10, 20, 30
    limit_fired: list[float] = []
    c.clock.callLater(5, lambda: limit_fired.append(c.mono))  # a run's time limit, say
    set_at = c.mono
    c.step(3600)
    c.tick(30)
    assert c.scheduled() == [at(10), at(20), at(30), at(3640), at(3650), at(3660)]
    assert c.scheduler.lead == 0
    # Other timers keep their monotonic meaning: five seconds is five seconds.
    assert limit_fired and 4.75 <= limit_fired[0] - set_at <= 5.25


def test_a_backward_step_neither_stalls_nor_repeats_an_instant(tmp_path: Path) -> None:
    c = SteppingClocks(tmp_path, 5)
    c.scheduler.schedule(spec())
    c.tick(27)  # up to 32 s: runs at 10, 20, 30
    limit_fired: list[float] = []
    c.clock.callLater(5, lambda: limit_fired.append(c.mono))
    set_at = c.mono
    c.step(-3600)
    c.tick(0.5)
    c.watchdog_sees_it()
    c.tick(30)
    # The next instants in order, on their monotonic pace, labelled ahead of the wall.
    assert c.scheduled() == [at(10), at(20), at(30), at(40), at(50), at(60)]
    assert c.scheduler.lead == 3600
    assert limit_fired and 4.75 <= limit_fired[0] - set_at <= 5.5
    # The clock comes back: the lead is spent first, nothing is skipped or run twice.
    c.step(3600)
    c.tick(20)
    assert c.scheduled() == [at(10 * k) for k in range(1, 9)]
    assert c.scheduler.lead == 0


def test_without_the_watchdog_a_backward_step_would_stall_the_loop(tmp_path: Path) -> None:
    # What the watchdog thread is for: the reactor's timers sleep through a step back.
    c = SteppingClocks(tmp_path, 5)
    c.scheduler.schedule(spec())
    c.tick(27)
    c.step(-3600)
    c.tick(60)
    assert c.scheduled() == [at(10), at(20), at(30)]
    c.watchdog_sees_it()  # a minute late: the instants of that minute are not caught up
    c.tick(10)
    assert c.scheduled()[3:] == [at(100)]


def test_a_task_replaced_after_a_backward_step_does_not_reuse_an_instant(
    tmp_path: Path,
) -> None:
    c = SteppingClocks(tmp_path, 5)
    task = spec()
    c.scheduler.schedule(task)
    c.tick(27)
    c.step(-3600)
    c.watchdog_sees_it()
    c.scheduler.schedule(spec("echo new", task_id=task.task_id))
    c.tick(10)
    assert c.scheduled() == [at(10), at(20), at(30), at(40)]
    assert c.runner.runs[-1].command == "echo new"


def test_small_differences_between_the_clocks_are_not_steps(tmp_path: Path) -> None:
    c = SteppingClocks(tmp_path, 5)
    c.scheduler.schedule(spec())
    c.tick(6)
    c.step(0.4)
    c.tick(10)
    c.step(-0.4)
    c.tick(10)
    assert c.scheduled() == [at(10), at(20), at(30)]
    assert c.scheduler.lead == 0


def test_a_step_seen_after_the_scheduler_stopped_starts_nothing(tmp_path: Path) -> None:
    c = SteppingClocks(tmp_path, 5)
    c.scheduler.schedule(spec())
    c.tick(6)
    c.scheduler.stop()
    c.step(-3600)
    c.watchdog_sees_it()  # a check the watchdog queued just before the stop
    c.tick(30)
    assert c.scheduled() == [at(10)]


def test_after_a_backward_step_off_the_interval_runs_keep_their_pace(tmp_path: Path) -> None:
    c = SteppingClocks(tmp_path, 5)
    c.scheduler.schedule(spec())
    c.tick(27)  # up to 32 s: runs at 10, 20, 30
    c.step(-3605)  # not a whole number of intervals
    c.tick(0.5)
    c.watchdog_sees_it()
    # Labels go on 32.5 s into the schedule: the next instants come 7.5, 17.5 and 27.5
    # monotonic seconds from now, ten seconds apart as before the step.
    seen = []
    for seconds in (7.25, 0.5, 9.5, 0.5, 9.5, 0.5):
        c.tick(seconds, step=0.25)
        seen.append(len(c.runner.runs))
    assert seen == [3, 4, 4, 5, 5, 6]
    assert c.scheduled() == [at(10), at(20), at(30), at(40), at(50), at(60)]


# -- restarts after steps of the wall clock ------------------------------------------------


def test_a_restart_while_labels_run_ahead_repeats_no_instant(tmp_path: Path) -> None:
    c = SteppingClocks(tmp_path, 5)
    task = spec()
    c.scheduler.schedule(task)
    c.tick(27)  # up to 32 s: runs at 10, 20, 30
    c.step(-3600)
    c.tick(0.5)
    c.watchdog_sees_it()
    c.tick(20)  # 40 and 50, labelled an hour ahead of the wall clock
    assert c.scheduled() == [at(10), at(20), at(30), at(40), at(50)]
    c.restart(task)  # the wall clock is still an hour behind the labels
    assert c.scheduler.lead == pytest.approx(3600 - 2.5), "labels resume from 50 s"
    c.tick(25)
    assert c.scheduled() == [at(10 * k) for k in range(1, 8)], "none twice, no stall"
    # The clock comes back: the lead is spent, and the rest skipped; still nothing twice.
    c.step(3600)
    c.tick(10)
    labels = c.scheduled()
    assert labels == sorted(set(labels))
    assert c.scheduler.lead == 0


def test_a_restart_without_a_step_neither_shifts_nor_skips_an_instant(tmp_path: Path) -> None:
    c = SteppingClocks(tmp_path, 5)
    task = spec()
    c.scheduler.schedule(task)
    c.tick(7)  # up to 12 s: the run at 10
    c.restart(task)
    assert c.scheduler.lead == 0
    c.tick(8)
    assert c.scheduled() == [at(10), at(20)]


def test_results_still_spooled_count_as_instants_run(tmp_path: Path) -> None:
    # An agent upgraded from a version that kept no last runs, with the server away.
    c = SteppingClocks(tmp_path, 5)
    task = spec()
    c.scheduler.schedule(task)
    c.tick(27)  # runs at 10, 20, 30, spooled
    c.step(-3600)
    c.watchdog_sees_it()
    c.tick(10)  # 40
    shutil.rmtree(tmp_path / "lastrun")
    c.restart(task, acknowledged=False)
    c.tick(15)
    assert c.scheduled() == [at(10 * k) for k in range(1, 6)]


def test_the_last_runs_of_tasks_no_longer_held_are_forgotten(tmp_path: Path) -> None:
    c = SteppingClocks(tmp_path, 5)
    kept, deleted = spec(), spec()
    c.scheduler.schedule(kept)
    c.scheduler.schedule(deleted)
    c.tick(7)
    assert sorted(p.name for p in (tmp_path / "lastrun").iterdir()) == sorted(
        [str(kept.task_id), str(deleted.task_id)]
    )
    c.restart(kept)
    assert [p.name for p in (tmp_path / "lastrun").iterdir()] == [str(kept.task_id)]


def data_clock(seconds_after_anchor: float) -> Clock:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + seconds_after_anchor)
    return clock


def test_a_clock_stepped_back_while_the_agent_was_down_repeats_no_instant(
    tmp_path: Path,
) -> None:
    server = FakeServer()
    first = Agent(tmp_path / "data", data_clock(5), server)
    task = spec()
    TaskStore(tmp_path / "data" / "tasks").save(task)
    first.service.scheduler.schedule(task)  # type: ignore[union-attr]
    for seconds in (10, 20, 30):
        first.advance_to(seconds)
        first.runner.finish(first.runner.runs[-1])
    first.settle()
    assert len(server.stored) == 3 and not list((tmp_path / "data" / "spool").glob("*.json"))
    first.crash()
    # Down a few seconds, during which the wall clock went back 10 s.
    second = Agent(tmp_path / "data", data_clock(22), server)
    second.advance_to(31)
    assert second.runner.runs == [], "30 ran already"
    second.advance_to(32)
    assert scheduled(second) == [at(40)], "on pace from the last instant run"
    second.runner.finish(second.runner.runs[0])
    second.settle()
    assert len(server.stored) == 4 and second.service.reporter.rejected == 0  # type: ignore[union-attr]


def test_an_instant_the_record_missed_when_the_agent_died_is_not_run_again(
    tmp_path: Path,
) -> None:
    server = FakeServer()
    thread = FakeThread()
    first = Agent(tmp_path / "data", data_clock(5), server, run_in_thread=thread)
    task = spec()
    TaskStore(tmp_path / "data" / "tasks").save(task)
    first.service.scheduler.schedule(task)  # type: ignore[union-attr]
    first.advance_to(10)
    assert len(first.runner.runs) == 1 and thread.jobs, "run started, its record not written"
    first.crash()  # the thread never gets to write it
    assert not (tmp_path / "data" / "lastrun" / str(task.task_id)).exists()
    # The wall clock went back 6 s: the restarted agent is at 4 s again, and its runner
    # finds the run of 10 s still going (its own record of the run).
    began = ANCHOR + timedelta(seconds=10)
    outcome: Deferred[Any] = Deferred()
    recovered = RecoveredRun(task.task_id, began, began, outcome, still_running=True)
    second = Agent(tmp_path / "data", data_clock(4), server, recovered=[recovered])
    second.advance_to(12)
    outcome.callback(
        RunOutcome(
            status=ResultStatus.SUCCEEDED,
            exit_code=0,
            signal=None,
            started_at=began,
            finished_at=began + timedelta(seconds=1),
            duration=1.0,
            stdout=Output.of(b"real\n"),
            stderr=Output(),
            reason=REATTACHED,
        )
    )
    second.advance_to(13.9)
    assert second.runner.runs == [], "10 is not run (nor skipped) again"
    [real] = server.stored.values()
    assert (format_instant(real.scheduled_at), real.stdout.data) == (at(10), b"real\n")
    assert second.service.reporter.rejected == 0  # type: ignore[union-attr]
    # Its result is reported and its record gone: what the second life learnt from the
    # record is on disk now. It dies before 20; the clock goes back one more second.
    second.crash()
    third = Agent(tmp_path / "data", data_clock(3), server)
    third.advance_to(12.9)
    assert third.runner.runs == []
    third.advance_to(13)
    assert scheduled(third) == [at(20)], "on pace from the instant the runner found"
