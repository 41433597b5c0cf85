"""A cron task on the agent: its callLater chain fires each instant labelled exactly,
across daylight-saving transitions, and a late wake-up fires the latest instant due."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from taskscheduler.agent.taskloop import MAX_SKIPS_RECORDED
from taskscheduler.agent.taskstore import TaskStore
from taskscheduler.cron import parse_cron
from taskscheduler.protocol import TaskSpec, parse_task_spec, task_spec_to_json
from taskscheduler.schedule import CronTimes, format_instant
from tests.unit.agent_fakes import Agent, FakeServer


def cron_spec(expression: str, zone: str, anchor: datetime) -> TaskSpec:
    return TaskSpec(
        task_id=uuid.uuid4(),
        command="echo hi",
        frequency=None,
        cron=parse_cron(expression, zone),
        anchor=anchor,
        time_limit=timedelta(seconds=1),
    )


def start(tmp_path: Path, at: datetime) -> Agent:
    clock = Clock()
    clock.advance(at.timestamp())
    return Agent(tmp_path / "data", clock, FakeServer())


def run_until(agent: Agent, end: datetime, step: float = 1.0) -> list[str]:
    """Let time pass to ``end``, finishing each run at once; the instants run."""
    while agent.clock.seconds() < end.timestamp():
        agent.settle(min(step, end.timestamp() - agent.clock.seconds()))
        for run in agent.runner.runs:
            if not run.done:
                agent.runner.finish(run, b"hi\n")
    return [run.extra_env["TASKSCHEDULER_SCHEDULED_AT"] for run in agent.runner.runs]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def labels(*instants: datetime) -> list[str]:
    return [format_instant(at) for at in instants]


def test_a_cron_task_with_seconds_runs_on_each_instant_labelled_exactly(tmp_path: Path) -> None:
    now = utc(2026, 11, 30, 12, 0, 0) + timedelta(milliseconds=300)
    agent = start(tmp_path, now)
    task = cron_spec("*/2 * * * * *", "UTC", now)
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    assert run_until(agent, utc(2026, 11, 30, 12, 0, 7), step=0.25) == labels(
        utc(2026, 11, 30, 12, 0, 2), utc(2026, 11, 30, 12, 0, 4), utc(2026, 11, 30, 12, 0, 6)
    )
    assert agent.runner.runs[0].time_limit == 1


@pytest.mark.parametrize(
    "zone, start_at, end, expected",
    [
        # Paris springs forward at 01:00 UTC (02:00 CET -> 03:00 CEST): 02:00 and 02:30 do
        # not exist; 03:00 CEST runs once.
        (
            "Europe/Paris",
            utc(2026, 3, 29, 0, 10),
            utc(2026, 3, 29, 2, 10),
            [
                utc(2026, 3, 29, 0, 30),
                utc(2026, 3, 29, 1),
                utc(2026, 3, 29, 1, 30),
                utc(2026, 3, 29, 2),
            ],
        ),
        # Paris falls back at 01:00 UTC (03:00 CEST -> 02:00 CET): the second 02:00 and
        # 02:30 (01:00 and 01:30 UTC) ran in the first pass already.
        (
            "Europe/Paris",
            utc(2026, 10, 25, 0, 10),
            utc(2026, 10, 25, 2, 40),
            [utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 2), utc(2026, 10, 25, 2, 30)],
        ),
        # New York falls back at 06:00 UTC (02:00 EDT -> 01:00 EST).
        (
            "America/New_York",
            utc(2026, 11, 1, 5, 10),
            utc(2026, 11, 1, 7, 40),
            [utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 7), utc(2026, 11, 1, 7, 30)],
        ),
        # New York springs forward at 07:00 UTC (02:00 EST -> 03:00 EDT).
        (
            "America/New_York",
            utc(2026, 3, 8, 6, 10),
            utc(2026, 3, 8, 7, 40),
            [utc(2026, 3, 8, 6, 30), utc(2026, 3, 8, 7), utc(2026, 3, 8, 7, 30)],
        ),
    ],
)
def test_daylight_saving_transitions_fired_through_the_loop(
    tmp_path: Path, zone: str, start_at: datetime, end: datetime, expected: list[datetime]
) -> None:
    agent = start(tmp_path, start_at)
    agent.service.scheduler.schedule(cron_spec("*/30 * * * *", zone, start_at))  # type: ignore[union-attr]
    assert run_until(agent, end, step=60) == labels(*expected)


def test_a_fixed_time_in_the_spring_gap_runs_once_through_the_loop(tmp_path: Path) -> None:
    start_at = utc(2026, 3, 29, 0, 50)
    agent = start(tmp_path, start_at)
    task = cron_spec("15,45 2 * * *", "Europe/Paris", start_at)
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    assert run_until(agent, utc(2026, 3, 29, 3), step=60) == labels(utc(2026, 3, 29, 1))


def test_a_late_wake_up_fires_the_latest_instant_and_records_the_others(tmp_path: Path) -> None:
    now = utc(2026, 11, 30, 12, 0, 0)
    agent = start(tmp_path, now)
    agent.service.scheduler.schedule(cron_spec("*/10 * * * * *", "UTC", now))  # type: ignore[union-attr]
    agent.settle(41)  # a stalled reactor: 10, 20, 30 and 40 all pass before it wakes
    assert [run.extra_env["TASKSCHEDULER_SCHEDULED_AT"] for run in agent.runner.runs] == labels(
        utc(2026, 11, 30, 12, 0, 40)
    )
    agent.settle()
    skipped = sorted(r.scheduled_at for r in agent.server.stored.values() if r.reason)
    assert skipped == [utc(2026, 11, 30, 12, 0, s) for s in (10, 20, 30)]
    agent.runner.finish(agent.runner.runs[0])
    assert run_until(agent, utc(2026, 11, 30, 12, 0, 51))[-1] == format_instant(
        utc(2026, 11, 30, 12, 0, 50)
    ), "the chain goes on from the latest instant"


def test_the_starting_deadline_counts_on_the_shortest_gap_of_the_expression(
    tmp_path: Path,
) -> None:
    now = utc(2026, 11, 30, 12, 0, 0)
    agent = start(tmp_path, now)
    agent.service.scheduler.schedule(cron_spec("*/10 * * * * *", "UTC", now))  # type: ignore[union-attr]
    agent.settle(13)  # 10 comes 3 s late: past a quarter of its 10 s gap
    agent.settle()
    assert agent.runner.runs == []
    reasons = [r.reason for r in agent.server.stored.values()]
    assert reasons == ["the agent was overloaded: the instant came 3.0s late"]


def test_a_day_suspended_records_only_the_newest_instants_it_missed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walked: list[datetime] = []
    instants_of = CronTimes.instants_after

    def counting(self: CronTimes, t: datetime) -> Iterator[datetime]:
        for at in instants_of(self, t):
            walked.append(at)
            yield at

    monkeypatch.setattr(CronTimes, "instants_after", counting)
    now = utc(2026, 11, 30, 12, 0, 0)
    agent = start(tmp_path, now)
    agent.service.scheduler.schedule(cron_spec("* * * * * *", "UTC", now))  # type: ignore[union-attr]
    agent.settle(86_400)  # wakes a day later, on an instant
    agent.settle()
    due = utc(2026, 12, 1, 12, 0, 0)
    assert [run.extra_env["TASKSCHEDULER_SCHEDULED_AT"] for run in agent.runner.runs] == labels(due)
    skipped = sorted(r.scheduled_at for r in agent.server.stored.values() if r.reason)
    assert len(skipped) == MAX_SKIPS_RECORDED
    assert skipped[-1] == due - timedelta(seconds=1)
    assert len(walked) < 3 * MAX_SKIPS_RECORDED, "the end of the day looked at, not all of it"


def test_cron_and_timezone_travel_to_the_agent_and_back() -> None:
    task = cron_spec("@hourly", "Asia/Kolkata", utc(2026, 11, 30, 12))
    body = task_spec_to_json(task)
    assert (body["cron"], body["timezone"]) == ("@hourly", "Asia/Kolkata")
    assert "frequency" not in body
    assert parse_task_spec(body, utc(2030, 1, 1)) == task
    # An older server's message, and a cron without a zone (UTC).
    del body["timezone"]
    assert parse_task_spec(body, utc(2030, 1, 1)).cron == parse_cron("@hourly", "UTC")
    body.pop("time_limit_seconds")
    assert parse_task_spec(body, utc(2030, 1, 1)).time_limit == timedelta(hours=1)


@pytest_twisted.ensureDeferred
async def test_a_restarted_agent_reloads_a_cron_task_and_replays_nothing(tmp_path: Path) -> None:
    now = utc(2026, 3, 29, 0, 50)
    agent = start(tmp_path, now)
    task = cron_spec("*/20 * * * *", "Europe/Paris", now)
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    TaskStore(tmp_path / "data" / "tasks").save(task)  # what the API does first
    assert run_until(agent, utc(2026, 3, 29, 1, 1), step=60) == labels(utc(2026, 3, 29, 1))
    agent.settle()
    await agent.stop()
    # Down across 01:20 UTC; back at 01:30, from the stored task (cron and zone included).
    agent.clock.advance((utc(2026, 3, 29, 1, 30) - utc(2026, 3, 29, 1, 1)).total_seconds())
    again = Agent(tmp_path / "data", agent.clock, agent.server)
    assert again.service.scheduler.tasks[task.task_id] == task  # type: ignore[union-attr]
    assert run_until(again, utc(2026, 3, 29, 2, 1), step=60) == labels(
        utc(2026, 3, 29, 1, 40), utc(2026, 3, 29, 2)
    ), "01:20 passed while it was down: not replayed"
