"""Retries on the agent: a failed or timed-out run is run again on the same agent, as the
next attempt of the same instant, after the task's delay, never at or past its next
instant; every attempt is spooled; a pending retry keeps the task running."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from taskscheduler.agent.outcome import REATTACHED, RecoveredRun, RunOutcome
from taskscheduler.agent.retries import Attempt, retry_start
from taskscheduler.agent.runjournal import parse_run_id, run_id
from taskscheduler.agent.runner import ProcessRunner
from taskscheduler.agent.spool import Spool
from taskscheduler.cron import parse_cron
from taskscheduler.protocol import Output, ResultStatus, RunResult, TaskSpec, Trigger, parse_result
from taskscheduler.protocol.options import Overlap, TaskOptions
from taskscheduler.schedule import format_instant
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, Agent, FakeServer, FakeThread, spec
from tests.unit.fakes_process import GroupKiller
from tests.unit.test_runner import ENV, make_runner

FAILED = ResultStatus.FAILED


def retrying(retries: int, delay: float, every: str = "every 60 seconds") -> TaskSpec:
    options = TaskOptions(retries=retries, retry_delay=timedelta(seconds=delay))
    return replace(spec(every=every), options=options)


def start(tmp_path: Path, at: float) -> Agent:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + at)
    agent = Agent(tmp_path / "data", clock, FakeServer())
    agent.server.down = True  # results stay in the spool, for the test to read
    return agent


def spooled(agent: Agent) -> list[RunResult]:
    spool = agent.service.spool
    assert spool is not None
    return [parse_result(json.loads(spool.read(entry))) for entry in spool]


def attempts(agent: Agent) -> list[tuple[int, ResultStatus, bool]]:
    return [(r.attempt, r.status, r.final) for r in spooled(agent)]


def at(seconds: float) -> datetime:
    return ANCHOR + timedelta(seconds=seconds)


def test_a_failed_run_is_retried_after_the_delay_up_to_the_retries(tmp_path: Path) -> None:
    agent = start(tmp_path, 55)
    task = retrying(retries=2, delay=5)
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(60)
    first = agent.runner.runs[0]
    agent.advance_to(61)
    agent.runner.finish(first, exit_code=1, status=FAILED)
    agent.advance_to(65.9)
    assert len(agent.runner.runs) == 1, "the retry waits for its delay"
    agent.advance_to(66)
    second = agent.runner.runs[1]
    # The same instant, the same task revision and key: the next attempt.
    assert second.extra_env["TASKSCHEDULER_SCHEDULED_AT"] == format_instant(at(60))
    assert (second.key, second.attempt) == ((task.task_id, at(60)), 2)
    agent.runner.finish(second, exit_code=None, status=ResultStatus.TIMED_OUT)
    agent.advance_to(71)
    third = agent.runner.runs[2]
    assert third.attempt == 3
    agent.runner.finish(third, exit_code=2, status=FAILED)
    agent.advance_to(110)
    assert len(agent.runner.runs) == 3, "two retries, no more"
    assert attempts(agent) == [
        (1, FAILED, False),
        (2, ResultStatus.TIMED_OUT, False),
        (3, FAILED, True),
    ]
    assert {r.scheduled_at for r in spooled(agent)} == {at(60)}
    agent.advance_to(120)
    assert agent.runner.runs[3].attempt == 1, "the next instant runs as ever"


def test_a_success_ends_the_retries(tmp_path: Path) -> None:
    agent = start(tmp_path, 55)
    agent.service.scheduler.schedule(retrying(retries=3, delay=0))  # type: ignore[union-attr]
    agent.advance_to(60)
    agent.runner.finish(agent.runner.runs[0], exit_code=1, status=FAILED)
    agent.settle()
    agent.runner.finish(agent.runner.runs[1], b"ok\n")
    agent.advance_to(119)
    assert len(agent.runner.runs) == 2
    assert attempts(agent) == [(1, FAILED, False), (2, ResultStatus.SUCCEEDED, True)]


def test_a_retry_never_starts_at_or_past_the_next_instant(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    agent.service.scheduler.schedule(retrying(3, 5, "every 10 seconds"))  # type: ignore[union-attr]
    agent.advance_to(10)
    agent.advance_to(14)
    agent.runner.finish(agent.runner.runs[0], exit_code=1, status=FAILED)
    agent.advance_to(18.9)
    assert len(agent.runner.runs) == 1
    agent.advance_to(19)  # 14 + 5 < 20: retried
    assert agent.runner.runs[1].attempt == 2
    # It ends at once: 19 + 5 >= 20, not retried.
    agent.runner.finish(agent.runner.runs[1], exit_code=1, status=FAILED)
    agent.advance_to(20)
    assert [r.attempt for r in agent.runner.runs] == [1, 2, 1]
    assert attempts(agent) == [(1, FAILED, False), (2, FAILED, True)]


def test_skipped_lost_or_succeeded_runs_are_not_retried() -> None:
    attempt = Attempt(retrying(2, 5), at(60))
    for status in (ResultStatus.SUCCEEDED, ResultStatus.SKIPPED, ResultStatus.LOST):
        assert retry_start(attempt, status, at(61)) is None
    assert retry_start(attempt, FAILED, at(61)) == at(66)
    assert retry_start(attempt, ResultStatus.TIMED_OUT, at(61)) == at(66)
    assert retry_start(replace(attempt, number=3), FAILED, at(61)) is None
    assert retry_start(Attempt(spec(every="every 60 seconds"), at(60)), FAILED, at(61)) is None
    # The next instant bounds it, for a run-now off the grid too.
    assert retry_start(attempt, FAILED, at(114.999)) == at(119.999)
    assert retry_start(attempt, FAILED, at(115)) is None
    manual = Attempt(retrying(2, 5), at(100), Trigger.MANUAL)
    assert retry_start(manual, FAILED, at(114)) == at(119)
    assert retry_start(manual, FAILED, at(115)) is None


def test_a_pending_retry_keeps_the_task_running(tmp_path: Path) -> None:
    agent = start(tmp_path, 55)
    task = retrying(retries=1, delay=30)
    scheduler = agent.service.scheduler
    assert scheduler is not None
    scheduler.schedule(task)
    agent.advance_to(60)
    agent.runner.finish(agent.runner.runs[0], exit_code=1, status=FAILED)
    agent.advance_to(70)
    # A run-now while the retry waits: skip-on-overlap.
    scheduler.fire(task, at(70) + timedelta(microseconds=1), Trigger.MANUAL)
    assert len(agent.runner.runs) == 1
    agent.advance_to(90)
    assert agent.runner.runs[1].attempt == 2
    agent.runner.finish(agent.runner.runs[1])
    agent.settle()
    assert [(r.attempt, r.status) for r in spooled(agent)] == [
        (1, FAILED),
        (1, ResultStatus.SKIPPED),
        (2, ResultStatus.SUCCEEDED),
    ]


def test_a_pending_retry_is_dropped_when_its_task_leaves(tmp_path: Path) -> None:
    agent = start(tmp_path, 55)
    scheduler = agent.service.scheduler
    assert scheduler is not None
    left, kept = retrying(1, 10), retrying(1, 10)
    scheduler.schedule(left)
    scheduler.schedule(kept)
    agent.advance_to(60)
    for run in agent.runner.runs:
        agent.runner.finish(run, exit_code=1, status=FAILED)
    agent.settle()
    scheduler.unschedule(left.task_id)
    agent.advance_to(71)
    assert [(r.key, r.attempt) for r in agent.runner.runs[2:]] == [((kept.task_id, at(60)), 2)]


def test_a_pending_retry_is_dropped_when_the_agent_stops(tmp_path: Path) -> None:
    agent = start(tmp_path, 55)
    scheduler = agent.service.scheduler
    assert scheduler is not None
    scheduler.schedule(retrying(1, 10))
    agent.advance_to(60)
    agent.runner.finish(agent.runner.runs[0], exit_code=1, status=FAILED)
    agent.settle()
    scheduler.stop()
    agent.advance_to(119)
    assert len(agent.runner.runs) == 1, "no retry after the agent stopped"
    # The attempt before stays the agent's result (not final: the server completes the
    # execution at its deadline).
    assert attempts(agent) == [(1, FAILED, False)]


def test_a_retry_due_after_the_next_instant_came_is_dropped(tmp_path: Path) -> None:
    # (A step of the wall clock forward can bring the next instant before the timer.)
    agent = start(tmp_path, 25)
    scheduler = agent.service.scheduler
    assert scheduler is not None
    task = retrying(1, 5, "every 10 seconds")
    assert scheduler._retry(Attempt(task, at(10), number=2)) is False
    assert scheduler._retry(Attempt(task, at(20), number=2)) is True
    assert [(r.key, r.attempt) for r in agent.runner.runs] == [((task.task_id, at(20)), 2)]


def test_a_restarted_runner_finds_a_retrys_run_under_its_attempt() -> None:
    runner, reactor, _ = make_runner()
    key = (uuid.uuid4(), datetime(2026, 11, 30, 12, tzinfo=UTC))
    runner.run("cmd", 60, key=key)
    runner.run("cmd", 60, key=key, attempt=2)
    again = ProcessRunner(reactor, ENV, runner.files.directory, kill_group=GroupKiller())
    again.boot_id = "another boot"
    assert sorted(r.attempt for r in again.recover()) == [1, 2]
    # A run whose result is spooled is only cleaned up: asked under its own attempt.
    other, reactor, _ = make_runner()
    other.run("cmd", 60, key=key)
    other.run("cmd", 60, key=key, attempt=3)
    later = ProcessRunner(reactor, ENV, other.files.directory, kill_group=GroupKiller())
    later.boot_id = "another boot"
    found = later.recover(lambda task_id, at, attempt: attempt == 3)
    assert [r.attempt for r in found] == [1]


def test_attempts_have_their_own_spool_files_and_run_ids(tmp_path: Path) -> None:
    task_id = uuid.uuid4()
    when = datetime(2026, 11, 30, 12, 0, 0, 5, tzinfo=UTC)
    spool = Spool(tmp_path / "spool")
    spool.load()
    for n in (1, 2, 11):
        first = RunResult(task_id, uuid.uuid4(), when, FAILED, attempt=n, final=n == 11)
        assert spool.add(first).result is True
    again = Spool(tmp_path / "spool")
    again.load()
    assert again.result_keys() == [(task_id, when, 1), (task_id, when, 2), (task_id, when, 11)]
    assert [parse_result(json.loads(again.read(e))).attempt for e in again] == [1, 2, 11]
    assert parse_run_id(run_id(task_id, when)) == (task_id, when, 1)
    assert parse_run_id(run_id(task_id, when, 3)) == (task_id, when, 3)
    assert run_id(task_id, when, 3) != run_id(task_id, when)


def test_a_restart_drops_a_pending_retry_and_never_retries_an_adopted_attempt(
    tmp_path: Path,
) -> None:
    first = start(tmp_path, 55)
    task = retrying(retries=3, delay=10)
    first.service.scheduler.schedule(task)  # type: ignore[union-attr]
    first.advance_to(60)
    first.runner.finish(first.runner.runs[0], exit_code=1, status=FAILED)
    first.settle()
    first.crash()  # attempt 2 was due at 70
    # The new life finds attempt 2 of the instant at 60 (a retry a previous life started
    # before it died, say): it ends failed, and is its final attempt.
    outcome: Deferred[Any] = Deferred()
    adopted = RecoveredRun(task.task_id, at(60), at(60), outcome, False, attempt=2)
    second = Agent(tmp_path / "data", first.clock, first.server, recovered=[adopted])
    second.server.down = True
    second.service.scheduler.schedule(task)  # type: ignore[union-attr]
    second.advance_to(80)
    outcome.callback(
        RunOutcome(FAILED, 1, None, at(60), at(61), 1.0, Output(), Output(), reason=REATTACHED)
    )
    second.advance_to(119)
    assert second.runner.runs == [], "no retry is resumed nor planned after a restart"
    assert attempts(second) == [(1, FAILED, False), (2, FAILED, True)]


def test_a_retry_under_way_keeps_its_task_running_when_the_attempt_before_settles(
    tmp_path: Path,
) -> None:
    # The spool writes off the reactor: attempt 1's result is made durable after its
    # retry (no delay) has started; its task must stay running for the retry.
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 55)
    thread = FakeThread()
    agent = Agent(tmp_path / "data", clock, FakeServer(), run_in_thread=thread)
    scheduler = agent.service.scheduler
    assert scheduler is not None
    task = retrying(retries=1, delay=0)
    scheduler.schedule(task)
    agent.advance_to(60)
    agent.runner.finish(agent.runner.runs[0], exit_code=1, status=FAILED)
    agent.settle()
    assert [r.attempt for r in agent.runner.runs] == [1, 2]
    for _ in range(3):  # attempt 1's result is made durable now
        agent.settle(1)
        thread.run_all()
    assert agent.runner.discarded == [(task.task_id, at(60))]
    assert scheduler.running == 1
    scheduler.fire(task, at(61), Trigger.MANUAL)
    assert len(agent.runner.runs) == 2, "skip-on-overlap holds for the retry under way"


def test_a_replacing_run_drops_the_retry_waiting_and_allow_counts_it(tmp_path: Path) -> None:
    agent = start(tmp_path, 55)
    scheduler = agent.service.scheduler
    assert scheduler is not None
    options = TaskOptions(retries=1, retry_delay=timedelta(seconds=30), overlap=Overlap.REPLACE)
    task = replace(spec(every="every 60 seconds"), options=options)
    scheduler.schedule(task)
    agent.advance_to(60)
    agent.runner.finish(agent.runner.runs[0], exit_code=1, status=FAILED)
    agent.advance_to(70)
    scheduler.fire(task, at(70) + timedelta(microseconds=1), Trigger.MANUAL)
    agent.advance_to(119)
    assert [r.attempt for r in agent.runner.runs] == [1, 1], "the retry was replaced"
    # With "allow", a retry waiting is one of the task's runs under max_concurrent.
    allow = TaskOptions(
        retries=1, retry_delay=timedelta(seconds=30), overlap=Overlap.ALLOW, max_concurrent=1
    )
    allowed = replace(spec(every="every 60 seconds"), options=allow)
    scheduler.unschedule(task.task_id)
    scheduler.schedule(allowed)
    agent.advance_to(120)
    assert agent.runner.runs[-1].key == (allowed.task_id, at(120))
    agent.runner.finish(agent.runner.runs[-1], exit_code=1, status=FAILED)
    agent.settle()
    count = len(agent.runner.runs)
    scheduler.fire(allowed, at(121), Trigger.MANUAL)
    assert len(agent.runner.runs) == count


def test_a_command_that_could_not_start_is_retried_too(tmp_path: Path) -> None:
    agent = start(tmp_path, 55)
    agent.service.scheduler.schedule(retrying(retries=1, delay=5))  # type: ignore[union-attr]
    agent.runner.fail_to_start = True
    agent.advance_to(60)
    assert agent.runner.runs == []
    agent.runner.fail_to_start = False
    agent.advance_to(65)
    [retry] = agent.runner.runs
    assert retry.attempt == 2
    agent.runner.finish(retry)
    agent.settle()
    assert attempts(agent) == [(1, FAILED, False), (2, ResultStatus.SUCCEEDED, True)]


def test_a_cron_tasks_retry_is_bounded_by_its_next_cron_time() -> None:
    # 02:30 every day in Paris, from the night of the spring-forward gap: the next time
    # after it is on the next cron time, not a fixed day later.
    options = TaskOptions(retries=1, retry_delay=timedelta(hours=1))
    daily = TaskSpec(
        task_id=uuid.uuid4(),
        command="false",
        frequency=None,
        cron=parse_cron("30 2 * * *", "Europe/Paris"),
        anchor=datetime(2026, 3, 1, tzinfo=UTC),
        time_limit=timedelta(seconds=10),
        options=options,
    )
    first = Attempt(daily, datetime(2026, 3, 29, 1, 0, tzinfo=UTC))  # 03:00, the gap's end
    # The next time is the 30th at 02:30 summer time: 00:30 UTC.
    just_before = datetime(2026, 3, 29, 23, 29, 59, tzinfo=UTC)
    assert retry_start(first, FAILED, just_before) == just_before + timedelta(hours=1)
    assert retry_start(first, FAILED, datetime(2026, 3, 29, 23, 30, tzinfo=UTC)) is None
