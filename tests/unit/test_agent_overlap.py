"""Overlap policies (skip, allow, replace), a task's env and working_dir on the agent:
the admission rule, the scheduler on a task.Clock over a fake runner, and the process
runner over a fake process reactor."""

from __future__ import annotations

import signal
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from taskscheduler.agent.admission import refusal
from taskscheduler.agent.outcome import REATTACHED, RecoveredRun, RunOutcome
from taskscheduler.agent.runjournal import RunJournal, run_id
from taskscheduler.agent.runprocess import SETSID, SUPERVISOR_IN_DIR
from taskscheduler.protocol import Output, ResultStatus, TaskSpec
from taskscheduler.protocol.options import Overlap, TaskOptions
from taskscheduler.schedule import format_instant
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, Agent, FakeServer, spec
from tests.unit.test_runner import make_runner, result_of

STEP = timedelta(seconds=10)


def with_options(task: TaskSpec, **options: Any) -> TaskSpec:
    return replace(task, options=TaskOptions(**options))


def at(seconds: float) -> str:
    return format_instant(ANCHOR + timedelta(seconds=seconds))


def start(tmp_path: Path, seconds: float, **kwargs: Any) -> Agent:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + seconds)
    return Agent(tmp_path / "data", clock, kwargs.pop("server", None) or FakeServer(), **kwargs)


def statuses(agent: Agent) -> dict[str, ResultStatus]:
    return {format_instant(r.scheduled_at): r.status for r in agent.server.stored.values()}


# -- the admission rule ------------------------------------------------------------------


def refused(task: TaskSpec, task_runs: int, runs_in_flight: int = 0, late: float = 0) -> str | None:
    return refusal(
        task,
        ANCHOR,
        ANCHOR + timedelta(seconds=late),
        task_runs=task_runs,
        runs_in_flight=max(runs_in_flight, task_runs),
        max_running=10,
        starting_deadline=None,
    )


def test_skip_refuses_an_instant_while_a_run_of_the_task_goes_on() -> None:
    task = spec()  # the default policy
    assert task.options.overlap is Overlap.SKIP
    assert refused(task, 0) is None
    assert refused(task, 1) == "the previous run was still going"


def test_allow_refuses_only_once_max_concurrent_runs_of_the_task_go_on() -> None:
    task = with_options(spec(), overlap=Overlap.ALLOW, max_concurrent=3)
    assert refused(task, 0) is None
    assert refused(task, 2) is None
    assert refused(task, 3) == "3 runs of the task were already going (max_concurrent 3)"


def test_replace_never_refuses_an_instant_for_the_runs_of_its_task() -> None:
    task = with_options(spec(), overlap=Overlap.REPLACE)
    assert refused(task, 1) is None
    # Those runs are being ended for this one: they do not count against --max-running.
    assert refused(task, 10, runs_in_flight=10) is None
    assert refused(task, 1, runs_in_flight=11) == (
        "10 runs were already going on this agent (--max-running 10)"
    )


def test_a_late_instant_is_refused_whatever_the_policy() -> None:
    for overlap in Overlap:
        task = with_options(spec(), overlap=overlap)
        reason = refused(task, 0, late=5)
        assert reason is not None and "overloaded" in reason


# -- the scheduler ---------------------------------------------------------------------


def test_allow_runs_up_to_max_concurrent_runs_of_a_task_at_once(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    task = with_options(spec("sleep 25"), overlap=Overlap.ALLOW, max_concurrent=2)
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(30)
    assert [run.key for run in agent.runner.runs] == [
        (task.task_id, ANCHOR + STEP),
        (task.task_id, ANCHOR + 2 * STEP),
    ]
    [skipped] = agent.server.stored.values()
    assert (format_instant(skipped.scheduled_at), skipped.status) == (at(30), ResultStatus.SKIPPED)
    assert skipped.reason == "2 runs of the task were already going (max_concurrent 2)"
    agent.runner.finish(agent.runner.runs[0])
    agent.advance_to(40)
    assert len(agent.runner.runs) == 3, "a run ended: the next instant runs beside the other"
    assert agent.service.scheduler.running == 2  # type: ignore[union-attr]


def test_replace_ends_the_running_run_records_it_replaced_and_starts_the_new_one(
    tmp_path: Path,
) -> None:
    agent = start(tmp_path, 5)
    task = with_options(spec("sleep 25", time_limit=60), overlap=Overlap.REPLACE)
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(10)
    agent.advance_to(20)
    first, second = agent.runner.runs
    assert agent.runner.replaced == [(task.task_id, ANCHOR + STEP)]
    assert first.done and not second.done
    assert second.key == (task.task_id, ANCHOR + 2 * STEP)
    agent.advance_to(30)
    assert agent.runner.replaced[-1] == (task.task_id, ANCHOR + 2 * STEP)
    assert statuses(agent) == {at(10): ResultStatus.REPLACED, at(20): ResultStatus.REPLACED}
    assert all(r.signal == signal.SIGTERM for r in agent.server.stored.values())
    assert len(agent.runner.runs) == 3
    agent.runner.finish(agent.runner.runs[2])
    agent.advance_to(40)
    assert agent.runner.replaced[-1] != (task.task_id, ANCHOR + 4 * STEP)
    assert len(agent.runner.replaced) == 2, "a run that ended is not replaced"


def test_replace_ends_every_run_of_the_task_even_of_its_previous_revision(
    tmp_path: Path,
) -> None:
    agent = start(tmp_path, 5)
    allowing = with_options(
        spec("sleep 25", time_limit=60), overlap=Overlap.ALLOW, max_concurrent=2
    )
    scheduler = agent.service.scheduler
    assert scheduler is not None
    scheduler.schedule(allowing)
    agent.advance_to(20)
    assert len(agent.runner.runs) == 2
    scheduler.schedule(replace(allowing, revision=2, options=TaskOptions(overlap=Overlap.REPLACE)))
    agent.advance_to(30)
    assert agent.runner.replaced == [
        (allowing.task_id, ANCHOR + STEP),
        (allowing.task_id, ANCHOR + 2 * STEP),
    ]
    assert statuses(agent) == {at(10): ResultStatus.REPLACED, at(20): ResultStatus.REPLACED}
    assert [run.revision for run in agent.runner.runs] == [1, 1, 2]
    assert scheduler.running == 1


def test_a_refused_instant_replaces_nothing(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    task = with_options(spec("sleep 25", time_limit=60), overlap=Overlap.REPLACE)
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(19.5)
    agent.settle(4)  # the reactor held up: 20 comes 3.5 s late, past its deadline
    assert agent.runner.replaced == []
    assert len(agent.runner.runs) == 1 and not agent.runner.runs[0].done
    [skipped] = agent.server.stored.values()
    assert (format_instant(skipped.scheduled_at), skipped.status) == (at(20), ResultStatus.SKIPPED)
    assert skipped.reason is not None and "overloaded" in skipped.reason


def test_a_run_a_crashed_agent_left_counts_for_the_overlap_policy(tmp_path: Path) -> None:
    task = with_options(spec(), overlap=Overlap.ALLOW, max_concurrent=1)
    began = ANCHOR + STEP
    outcome: Deferred[Any] = Deferred()
    left = RecoveredRun(task.task_id, began, began, outcome, still_running=True)
    agent = start(tmp_path, 15, recovered=[left])
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(20)
    assert agent.runner.runs == [], "the adopted run is the one allowed"
    assert statuses(agent) == {at(20): ResultStatus.SKIPPED}
    outcome.callback(
        RunOutcome(
            status=ResultStatus.SUCCEEDED,
            exit_code=0,
            signal=None,
            started_at=began,
            finished_at=began + STEP,
            duration=10.0,
            stdout=Output(),
            stderr=Output(),
            reason=REATTACHED,
        )
    )
    agent.advance_to(30)
    assert [run.key for run in agent.runner.runs] == [(task.task_id, ANCHOR + 3 * STEP)]


def test_replace_ends_a_run_a_crashed_agent_left(tmp_path: Path) -> None:
    task = with_options(spec(), overlap=Overlap.REPLACE)
    began = ANCHOR + STEP
    left = RecoveredRun(task.task_id, began, began, Deferred(), still_running=True)
    agent = start(tmp_path, 15, recovered=[left])
    replaced: list[Any] = []
    agent.runner.replace = lambda key, attempt=1: replaced.append(key) or True  # type: ignore[method-assign]
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(20)
    assert replaced == [(task.task_id, began)]
    assert [run.key for run in agent.runner.runs] == [(task.task_id, began + STEP)]


def test_a_tasks_env_reaches_its_runs_under_the_agents_own_variables(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    task = with_options(
        spec(),
        env={
            "GREETING": "hello",
            "PATH": "/opt/bin",
            "TASKSCHEDULER_TASK_ID": "forged",
            "TASKSCHEDULER_OTHER": "the server refuses these names; the agent drops them",
        },
        working_dir="/srv/app",
    )
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(10)
    [run] = agent.runner.runs
    assert run.extra_env == {
        "GREETING": "hello",
        "PATH": "/opt/bin",  # over the agent's own environment (the runner's base)
        "TASKSCHEDULER_TASK_ID": str(task.task_id),
        "TASKSCHEDULER_SCHEDULED_AT": at(10),
    }
    assert run.working_dir == "/srv/app"


def test_env_values_are_never_logged(tmp_path: Path) -> None:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    try:
        agent = start(tmp_path, 5)
        task = with_options(
            spec("sleep 25", time_limit=60), overlap=Overlap.REPLACE, env={"TOKEN": "s3cr3t"}
        )
        agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
        agent.advance_to(20)
        agent.runner.fail_to_start = True
        agent.advance_to(30)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events
    assert not [e for e in events if "s3cr3t" in formatEvent(e) + repr(e)]


# -- the runner ------------------------------------------------------------------------


def test_replace_ends_the_whole_group_as_the_time_limit_would_and_reports_replaced() -> None:
    runner, reactor, killer = make_runner(kill_grace=5)
    key = (uuid.uuid4(), ANCHOR)
    d = runner.run("sleep 100", 60, key=key)
    pid = reactor.last.pid
    assert runner.replace(key) is True
    assert killer.calls == [(pid, signal.SIGTERM)]
    reactor.advance(5)
    assert killer.calls == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]
    reactor.advance(60)  # its time limit no longer matters
    assert killer.calls[-1] == (pid, signal.SIGKILL) and len(killer.calls) == 2
    reactor.last.finish(code=None, signal=signal.SIGKILL)
    outcome = result_of(d)
    assert (outcome.status, outcome.signal) == (ResultStatus.REPLACED, signal.SIGKILL)


def test_a_replaced_run_that_exits_by_itself_still_names_the_signal() -> None:
    runner, reactor, _ = make_runner()
    key = (uuid.uuid4(), ANCHOR)
    d = runner.run("trap 'exit 3' TERM; sleep 100", 60, key=key)
    runner.replace(key)
    reactor.last.finish(code=3)
    outcome = result_of(d)
    assert (outcome.status, outcome.exit_code, outcome.signal) == (
        ResultStatus.REPLACED,
        3,
        signal.SIGTERM,
    )


def test_replace_is_recorded_in_the_journal_for_a_restarted_agent() -> None:
    runner, reactor, _ = make_runner()
    key = (uuid.uuid4(), ANCHOR)
    runner.run("sleep 100", 60, key=key)
    runner.replace(key)
    assert RunJournal.replayed(runner.files.directory).replaced == {run_id(*key)}
    reactor.last.finish(code=None, signal=signal.SIGTERM)
    runner.discard(key)  # its result is durable: the journal forgets it
    assert RunJournal.replayed(runner.files.directory).replaced == set()


def test_replace_of_a_run_not_going_is_false_and_ends_nothing() -> None:
    runner, reactor, killer = make_runner()
    key = (uuid.uuid4(), ANCHOR)
    d = runner.run("true", 60, key=key)
    assert runner.replace((key[0], ANCHOR + STEP)) is False
    assert killer.calls == []
    reactor.last.finish(code=0)
    assert result_of(d).status is ResultStatus.SUCCEEDED
    assert runner.replace(key) is False


def test_a_working_dir_is_entered_by_the_shell_on_the_fast_path() -> None:
    runner, reactor, _ = make_runner()
    runner.run("pwd", 10, working_dir="/srv/app dir")
    [call] = reactor.spawned
    assert call.args == [
        SETSID,
        "/bin/sh",
        "-c",
        SUPERVISOR_IN_DIR,
        "sh",
        "",
        "pwd",
        "/srv/app dir",
    ]
    # path= would make Twisted fork instead of posix_spawn.
    assert (call.path, call.uid, call.gid) == (None, None, None)
