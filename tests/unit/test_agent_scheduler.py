"""The agent's scheduler: runs on anchored instants, skip-on-overlap, never a dead loop."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from taskscheduler.agent.admission import starting_deadline_for
from taskscheduler.agent.spool import Spool
from taskscheduler.agent.tap import base_environment
from taskscheduler.agent.taskloop import MAX_SKIPS_RECORDED
from taskscheduler.agent.taskstore import TaskStore
from taskscheduler.protocol import ResultStatus, parse_result
from taskscheduler.schedule import format_instant
from tests.unit.agent_fakes import (
    ANCHOR,
    ANCHOR_SECONDS,
    Agent,
    FakeServer,
    spec,
)


def start(tmp_path: Path, at: float, server: FakeServer | None = None) -> Agent:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + at)
    return Agent(tmp_path / "data", clock, server or FakeServer())


def scheduled(agent: Agent) -> list[str]:
    return [run.extra_env["TASKSCHEDULER_SCHEDULED_AT"] for run in agent.runner.runs]


def at(seconds: float) -> str:
    return format_instant(ANCHOR + timedelta(seconds=seconds))


def test_runs_fire_exactly_on_the_anchored_instants(tmp_path: Path) -> None:
    agent = start(tmp_path, 25)
    task = spec(every="every 10 seconds")
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(29.5)
    assert agent.runner.runs == [], "the first instant is the first one after now"
    agent.advance_to(30)
    assert scheduled(agent) == [at(30)]
    run = agent.runner.runs[0]
    assert run.command == "echo hi"
    assert run.time_limit == 10
    assert run.extra_env == {
        "TASKSCHEDULER_TASK_ID": str(task.task_id),
        "TASKSCHEDULER_SCHEDULED_AT": at(30),
    }
    agent.runner.finish(run, b"hi\n")
    agent.advance_to(39.9)
    assert len(agent.runner.runs) == 1
    agent.advance_to(40)
    agent.runner.finish(agent.runner.runs[1], b"hi\n")
    agent.advance_to(50)
    assert scheduled(agent) == [at(30), at(40), at(50)]
    # Their results, with the exact instants, reached the server.
    assert sorted(key[2] for key in agent.server.stored) == [
        ANCHOR + timedelta(seconds=30),
        ANCHOR + timedelta(seconds=40),
    ]


def test_an_instant_that_falls_exactly_now_is_not_run_twice_nor_early(tmp_path: Path) -> None:
    agent = start(tmp_path, 30)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.settle()
    assert agent.runner.runs == [], "an instant that is now is already past"
    agent.advance_to(40)
    assert scheduled(agent) == [at(40)]


def test_a_long_interval_uses_the_anchor_not_the_start_time(tmp_path: Path) -> None:
    agent = start(tmp_path, 3 * 3600 + 17)
    agent.service.scheduler.schedule(spec(every="every 2 hours"))  # type: ignore[union-attr]
    agent.advance_to(4 * 3600 - 1, step=600)
    assert agent.runner.runs == []
    agent.advance_to(4 * 3600, step=600)
    assert scheduled(agent) == [at(4 * 3600)]


@pytest_twisted.ensureDeferred
async def test_a_restart_resumes_without_replaying_missed_instants(tmp_path: Path) -> None:
    server = FakeServer()
    agent = start(tmp_path, 25, server)
    task = spec()
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    TaskStore(tmp_path / "data" / "tasks").save(task)  # what the API does first
    agent.advance_to(35)
    agent.runner.finish(agent.runner.runs[0])
    agent.settle()
    await agent.stop()
    # Down from 35 s to 72 s: instants 40..70 pass unseen.
    agent.clock.advance(37)
    again = Agent(tmp_path / "data", agent.clock, server)
    again.advance_to(79)
    assert again.runner.runs == [], "missed instants are not replayed"
    again.advance_to(80)
    assert scheduled(again) == [at(80)]
    assert again.runner.runs[0].extra_env["TASKSCHEDULER_TASK_ID"] == str(task.task_id)


def test_a_run_still_going_at_the_next_instant_skips_it(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    task = spec()
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(10)
    agent.advance_to(20)
    agent.advance_to(30)
    assert scheduled(agent) == [at(10)], "never two runs of one task at once"
    skipped = [r for r in agent.server.stored.values() if r.status is ResultStatus.SKIPPED]
    assert sorted(format_instant(r.scheduled_at) for r in skipped) == [at(20), at(30)]
    assert all(r.started_at is None and r.exit_code is None for r in skipped)
    assert all(r.reason == "the previous run was still going" for r in skipped)
    agent.runner.finish(agent.runner.runs[0])
    agent.advance_to(40)
    assert scheduled(agent) == [at(10), at(40)]


def test_a_command_that_cannot_start_is_reported_and_the_loop_goes_on(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.runner.fail_to_start = True
    agent.advance_to(10)
    [failed] = agent.server.stored.values()
    assert failed.status is ResultStatus.FAILED
    assert b"Too many open files" in failed.stderr.data
    assert agent.service.scheduler.running == 0  # type: ignore[union-attr]
    agent.runner.fail_to_start = False
    agent.advance_to(20)
    assert scheduled(agent) == [at(20)], "the loop survived the failure"


def test_a_loop_survives_an_error_while_recording(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    spool = agent.service.spool
    assert spool is not None
    original = spool.add

    def broken(*args: object) -> None:
        raise OSError(28, "No space left on device")

    spool.add = broken  # type: ignore[method-assign]
    agent.advance_to(10)
    agent.runner.finish(agent.runner.runs[0])  # its result cannot be recorded
    spool.add = original  # type: ignore[method-assign]
    agent.advance_to(20)
    assert scheduled(agent) == [at(10), at(20)], "the loop survived the failure"
    assert agent.service.scheduler.running == 1  # type: ignore[union-attr]


def test_replacing_a_task_stops_its_old_loop(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    old = spec("echo old")
    scheduler = agent.service.scheduler
    assert scheduler is not None
    scheduler.schedule(old)
    agent.advance_to(10)
    agent.runner.finish(agent.runner.runs[0])
    new = spec("echo new", every="every 15 seconds", task_id=old.task_id)
    scheduler.schedule(new)
    for t in (15, 30, 45):
        agent.advance_to(t)
        agent.runner.finish(agent.runner.runs[-1])
    assert [r.command for r in agent.runner.runs] == ["echo old"] + ["echo new"] * 3
    assert scheduled(agent) == [at(10), at(15), at(30), at(45)]
    assert scheduler.tasks == {old.task_id: new}


def test_a_replaced_task_does_not_overlap_its_previous_version(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    old = spec("sleep 100", time_limit=100)
    scheduler = agent.service.scheduler
    assert scheduler is not None
    scheduler.schedule(old)
    agent.advance_to(10)
    scheduler.schedule(spec("echo new", task_id=old.task_id))
    agent.advance_to(20)
    assert [r.command for r in agent.runner.runs] == ["sleep 100"]
    statuses = {format_instant(r.scheduled_at): r.status for r in agent.server.stored.values()}
    assert statuses == {at(20): ResultStatus.SKIPPED}


def test_results_reach_the_spool_with_the_run_details(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    agent.server.down = True
    task = spec()
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(10)
    agent.advance_to(12)
    agent.runner.finish(
        agent.runner.runs[0], b"out\xff\x00", exit_code=3, status=ResultStatus.FAILED
    )
    agent.settle()
    spool = agent.service.spool
    assert spool is not None
    [entry] = list(spool)
    stored = parse_result(json.loads(spool.read(entry)))
    assert stored.task_id == task.task_id
    assert stored.agent_id == agent.service.api._agent_id  # type: ignore[union-attr]
    assert stored.scheduled_at == ANCHOR + timedelta(seconds=10)
    assert stored.status is ResultStatus.FAILED
    assert stored.exit_code == 3
    assert stored.stdout.data == b"out\xff\x00"
    assert stored.started_at == ANCHOR + timedelta(seconds=10)
    assert stored.finished_at == ANCHOR + timedelta(seconds=12)
    # Marker gone once the result is spooled.
    assert list((tmp_path / "data" / "running").iterdir()) == []


def test_a_run_is_started_under_its_task_and_instant_for_the_runner_to_record(
    tmp_path: Path,
) -> None:
    agent = start(tmp_path, 5)
    task = spec()
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(10)
    [run] = agent.runner.runs
    assert run.key == (task.task_id, ANCHOR + timedelta(seconds=10))


def test_runs_get_a_small_explicit_environment_never_the_agents(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("PATH", "/home/someone/bin")
    env = base_environment()
    assert set(env) == {"PATH", "LANG", "HOME"}
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["LANG"] == "C.UTF-8"
    assert env["HOME"] and "hunter2" not in env.values()
    assert os.path.isabs(env["HOME"])


def test_spool_is_shared_state_not_memory(tmp_path: Path) -> None:
    # Sanity of the fakes: a Spool over the same folder sees what the agent spooled.
    agent = start(tmp_path, 5)
    agent.server.down = True
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.advance_to(10)
    agent.runner.finish(agent.runner.runs[0])
    other = Spool(tmp_path / "data" / "spool")
    other.load()
    assert len(other) == 1


def test_a_late_first_wake_up_does_not_shift_the_later_runs(tmp_path: Path) -> None:
    agent = start(tmp_path, 25)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.settle(5.3)  # the reactor wakes 0.3 s after the first instant
    assert scheduled(agent) == [at(30)]
    agent.runner.finish(agent.runner.runs[0])
    agent.advance_to(39.99, step=0.01)
    assert len(agent.runner.runs) == 1
    agent.advance_to(40, step=0.01)
    assert scheduled(agent) == [at(30), at(40)], "on the instant, not 0.3 s after it"


def test_a_wake_up_later_than_an_interval_labels_the_run_with_the_due_instant(
    tmp_path: Path,
) -> None:
    agent = start(tmp_path, 25)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.settle(27.5)  # the host was suspended across 30, 40 and 50
    assert scheduled(agent) == [at(50)]
    agent.runner.finish(agent.runner.runs[0])
    agent.advance_to(60)
    assert scheduled(agent) == [at(50), at(60)]


def test_a_stalled_reactor_skips_instants_without_mislabelling_the_next(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.advance_to(10)
    agent.runner.finish(agent.runner.runs[0])
    agent.settle(25)  # blocked from 10 s to 35 s: 20 and 30 pass, 30 by 5 s
    # 30 comes later than its starting deadline (a quarter of 10 s): an overloaded agent
    # sheds it rather than start it late; 40 runs on time, labelled 40.
    assert scheduled(agent) == [at(10)]
    agent.settle()
    skipped = {r.scheduled_at: r.reason for r in agent.server.stored.values() if r.reason}
    assert skipped == {
        ANCHOR
        + timedelta(seconds=20): "the agent was overloaded: it came to the instant 15.0s late",
        ANCHOR + timedelta(seconds=30): "the agent was overloaded: the instant came 5.0s late",
    }
    agent.advance_to(40)
    assert scheduled(agent) == [at(10), at(40)]


def test_a_suspended_host_records_only_the_newest_instants_it_missed(tmp_path: Path) -> None:
    agent = start(tmp_path, 5)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.settle(2000)  # suspended from 5 s to 2005 s: 10 to 1990 pass, 2000 is due
    agent.settle()
    skipped = sorted(
        r.scheduled_at
        for r in agent.server.stored.values()
        if r.reason and "it came to the instant" in r.reason
    )
    assert skipped == [ANCHOR + timedelta(seconds=10 * k) for k in range(100, 200)], (
        f"the newest {MAX_SKIPS_RECORDED}, not a day of them"
    )


# -- shedding load -----------------------------------------------------------------------


def test_an_instant_later_than_the_starting_deadline_is_skipped_with_the_reason(
    tmp_path: Path,
) -> None:
    agent = start(tmp_path, 55)
    agent.service.scheduler.schedule(spec(every="every 60 seconds"))  # type: ignore[union-attr]
    agent.settle(11.5)  # the reactor was held from 55 s to 66.5 s: 60 comes 6.5 s late
    assert agent.runner.runs == [], "an overloaded agent does not pile a late run up"
    [skipped] = agent.server.stored.values()
    assert (skipped.status, skipped.scheduled_at) == (
        ResultStatus.SKIPPED,
        ANCHOR + timedelta(seconds=60),
    )
    assert skipped.reason == "the agent was overloaded: the instant came 6.5s late"
    agent.advance_to(120)
    assert scheduled(agent) == [at(120)], "the next instant on time runs"


def test_instants_a_busy_agent_passed_over_are_recorded_skipped_and_the_latest_runs(
    tmp_path: Path,
) -> None:
    agent = start(tmp_path, 9.5)
    agent.service.scheduler.schedule(spec(every="every 2 seconds"))  # type: ignore[union-attr]
    agent.settle(4.75)  # held from 9.5 s to 14.25 s: 10 and 12 passed, 14 is due
    assert scheduled(agent) == [at(14)]
    skipped = sorted(agent.server.stored.values(), key=lambda r: r.scheduled_at)
    assert [(r.status, r.scheduled_at) for r in skipped] == [
        (ResultStatus.SKIPPED, ANCHOR + timedelta(seconds=10)),
        (ResultStatus.SKIPPED, ANCHOR + timedelta(seconds=12)),
    ]
    assert skipped[0].reason == "the agent was overloaded: it came to the instant 4.2s late"


def test_instants_past_the_cap_on_runs_in_flight_are_skipped_with_the_reason(
    tmp_path: Path,
) -> None:
    agent = start(tmp_path, 5)
    scheduler = agent.service.scheduler
    assert scheduler is not None
    scheduler.max_running = 2
    tasks = [spec() for _ in range(3)]
    for task in tasks:
        scheduler.schedule(task)
    agent.advance_to(10)
    assert len(agent.runner.runs) == 2
    [skipped] = agent.server.stored.values()
    assert skipped.status is ResultStatus.SKIPPED
    assert skipped.reason == "2 runs were already going on this agent (--max-running 2)"
    assert scheduler.skipped == 1


@pytest.mark.parametrize(
    ("interval", "configured", "deadline"),
    [
        (1, None, 0.25),
        (10, None, 2.5),
        (60, None, 5.0),
        (3600, None, 36.0),
        (86400, None, 864.0),
        (60, 30.0, 30.0),
        (10, 30.0, 10.0),  # never more than one interval: the next instant is due
    ],
)
def test_the_starting_deadline_scales_with_the_interval(
    interval: float, configured: float | None, deadline: float
) -> None:
    assert starting_deadline_for(interval, configured) == deadline
