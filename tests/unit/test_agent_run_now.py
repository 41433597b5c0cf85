"""``POST /api/v1/tasks/{task_id}/run``: an operator's run-now, on the agent.

Over the real Klein resource (StubTreq), signed as the server signs, on a task.Clock.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from taskscheduler.agent import lastruns
from taskscheduler.agent.lastruns import MANUAL_KEPT
from taskscheduler.protocol import ResultStatus, Trigger
from taskscheduler.schedule import format_instant
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, Agent, FakeServer, FakeThread, fired

URL = "http://agent.test:8081"


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    return Agent(tmp_path / "data", clock, FakeServer())


async def call(agent: Agent, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = b"" if body is None else json.dumps(body).encode()
    api: Any = agent.api
    response = await api.request(
        method, URL + path, data=data or None, headers=agent.signed(method, path, data)
    )
    return response.code, json.loads(await api.content(response))


def at(seconds: float) -> str:
    return format_instant(ANCHOR + timedelta(seconds=seconds))


async def schedule(agent: Agent, task_id: str | None = None, **fields: Any) -> str:
    body = {
        "task_id": task_id or str(uuid.uuid4()),
        "command": "echo hi",
        "frequency": "every 60 seconds",
        "anchor": at(0),
        "revision": 1,
        **fields,
    }
    code, answer = await call(agent, "POST", "/api/v1/tasks/schedule", body)
    assert code == 200, answer
    return str(body["task_id"])


async def run_now(agent: Agent, task_id: str, scheduled_at: str, **extra: Any) -> tuple[int, Any]:
    body = {"scheduled_at": scheduled_at, "revision": 1, **extra}
    return await call(agent, "POST", f"/api/v1/tasks/{task_id}/run", body)


def agent_id(agent: Agent) -> str:
    return (agent.service.config.data_dir / "agent_id").read_text().strip()


@pytest_twisted.ensureDeferred
async def test_a_manual_run_runs_once_now_labelled_with_its_instant(agent: Agent) -> None:
    task_id = await schedule(agent, revision=3)
    now = at(5.123456)  # the server's instant (its clock a little ahead): off the grid
    code, answer = await run_now(agent, task_id, now, revision=3, more="ignored")
    assert (code, answer) == (
        202,
        {
            "agent_id": agent_id(agent),
            "task_id": task_id,
            "scheduled_at": now,
            "status": "accepted",
        },
    )
    [run] = agent.runner.runs
    assert run.extra_env["TASKSCHEDULER_SCHEDULED_AT"] == now
    assert (run.revision, run.trigger) == (3, Trigger.MANUAL)
    agent.runner.finish(run, b"by hand\n")
    agent.settle(1)
    [stored] = agent.server.stored.values()
    assert format_instant(stored.scheduled_at) == now
    assert stored.trigger is Trigger.MANUAL
    assert stored.revision == 3
    assert stored.stdout.data == b"by hand\n"


@pytest_twisted.ensureDeferred
async def test_a_manual_run_delivered_again_is_not_run_again(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    first = Agent(tmp_path / "data", clock, FakeServer())
    task_id = await schedule(first)
    assert (await run_now(first, task_id, at(5)))[1]["status"] == "accepted"
    assert (await run_now(first, task_id, at(5)))[1]["status"] == "duplicate"
    assert len(first.runner.runs) == 1
    first.runner.finish(first.runner.runs[0])
    await first.stop()
    # A restarted agent remembers what it accepted.
    clock.advance(1)
    second = Agent(tmp_path / "data", clock, FakeServer())
    code, answer = await run_now(second, task_id, at(5))
    assert (code, answer["status"]) == (202, "duplicate")
    assert second.runner.runs == []
    # Another instant is another run.
    assert (await run_now(second, task_id, at(6)))[1]["status"] == "accepted"
    assert len(second.runner.runs) == 1


@pytest_twisted.ensureDeferred
async def test_a_task_the_agent_does_not_have_is_404_and_nothing_runs(agent: Agent) -> None:
    code, answer = await run_now(agent, str(uuid.uuid4()), at(5))
    assert (code, answer["error"]["code"]) == (404, "unknown_task")
    task_id = await schedule(agent)
    code, _ = await call(agent, "DELETE", f"/api/v1/tasks/{task_id}")
    assert code == 200
    code, answer = await run_now(agent, task_id, at(5))
    assert (code, answer["error"]["code"]) == (404, "unknown_task")
    assert agent.runner.runs == []


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "'scheduled_at' is required"),
        ({"scheduled_at": "now"}, "scheduled_at"),
        ({"scheduled_at": "2026-11-17T20:26:45Z", "revision": 0}, "revision"),
        ({"scheduled_at": "2026-11-17T20:26:45Z", "revision": "2"}, "revision"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_malformed_run_is_400_and_nothing_runs(
    agent: Agent, body: dict[str, Any], words: str
) -> None:
    task_id = await schedule(agent)
    code, answer = await call(agent, "POST", f"/api/v1/tasks/{task_id}/run", body)
    assert (code, answer["error"]["code"]) == (400, "invalid_request")
    assert words in answer["error"]["message"]
    code, answer = await call(agent, "POST", "/api/v1/tasks/nope/run", {"scheduled_at": at(5)})
    assert (code, answer["error"]["code"]) == (400, "invalid_task_id")
    assert agent.runner.runs == []


@pytest_twisted.ensureDeferred
async def test_a_manual_run_while_the_task_runs_is_skipped_with_the_reason(agent: Agent) -> None:
    task_id = await schedule(agent, frequency="every 10 seconds", revision=2)
    agent.advance_to(10)
    [scheduled] = agent.runner.runs
    assert (await run_now(agent, task_id, at(11)))[1]["status"] == "accepted"
    assert len(agent.runner.runs) == 1, "the overlap rule holds for manual runs"
    agent.settle(1)
    [skipped] = agent.server.stored.values()
    assert skipped.status is ResultStatus.SKIPPED
    assert skipped.trigger is Trigger.MANUAL and skipped.revision == 2
    assert skipped.reason == "the previous run was still going"
    # ... and a manual run under way makes the next scheduled instant skip.
    agent.runner.finish(scheduled)
    assert (await run_now(agent, task_id, at(15)))[1]["status"] == "accepted"
    agent.advance_to(20)
    agent.settle(1)
    at_20 = [r for r in agent.server.stored.values() if format_instant(r.scheduled_at) == at(20)]
    assert [(r.status, r.trigger) for r in at_20] == [(ResultStatus.SKIPPED, Trigger.SCHEDULE)]


@pytest_twisted.ensureDeferred
async def test_a_manual_run_past_its_starting_deadline_is_skipped(agent: Agent) -> None:
    # Every 60 s: the starting deadline is 5 s after the run's instant.
    task_id = await schedule(agent)
    agent.settle(10)  # now anchor + 15 s
    assert (await run_now(agent, task_id, at(9)))[1]["status"] == "accepted"
    assert agent.runner.runs == []
    agent.settle(1)
    [skipped] = agent.server.stored.values()
    assert (skipped.status, skipped.trigger) == (ResultStatus.SKIPPED, Trigger.MANUAL)
    assert skipped.reason is not None and "6.0s late" in skipped.reason
    assert (await run_now(agent, task_id, at(11)))[1]["status"] == "accepted"
    assert len(agent.runner.runs) == 1, "4 s late is within the deadline"


@pytest_twisted.ensureDeferred
async def test_a_manual_run_past_the_cap_on_runs_in_flight_is_skipped(agent: Agent) -> None:
    agent.service.scheduler.max_running = 1  # type: ignore[union-attr]
    busy = await schedule(agent, frequency="every 10 seconds")
    task_id = await schedule(agent)
    agent.advance_to(10)
    assert [run.extra_env["TASKSCHEDULER_TASK_ID"] for run in agent.runner.runs] == [busy]
    assert (await run_now(agent, task_id, at(10)))[1]["status"] == "accepted"
    agent.settle(1)
    [skipped] = agent.server.stored.values()
    assert (skipped.task_id, skipped.trigger) == (uuid.UUID(task_id), Trigger.MANUAL)
    assert skipped.reason is not None and "--max-running 1" in skipped.reason


def test_a_delivery_repeated_while_the_first_is_written_waits_for_it(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    thread = FakeThread()
    agent = Agent(tmp_path / "data", clock, FakeServer(), run_in_thread=thread)

    def disk_work() -> None:
        agent.settle()
        while thread.jobs:
            thread.run_all()
            agent.settle()

    scheduling = Deferred.fromCoroutine(schedule(agent))
    disk_work()
    task_id = fired(scheduling)
    first = Deferred.fromCoroutine(run_now(agent, task_id, at(5)))
    second = Deferred.fromCoroutine(run_now(agent, task_id, at(5)))
    agent.settle()
    assert not first.called and not second.called
    assert agent.runner.runs == [], "nothing runs before its acceptance is on disk"
    disk_work()
    assert sorted([fired(first)[1]["status"], fired(second)[1]["status"]]) == [
        "accepted",
        "duplicate",
    ]
    assert len(agent.runner.runs) == 1


@pytest_twisted.ensureDeferred
async def test_an_acceptance_the_disk_refuses_is_503_and_runs_nothing(
    agent: Agent, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id = await schedule(agent)

    def full(path: Path, data: bytes, sync: bool = True) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(lastruns, "atomic_write", full)
        code, answer = await run_now(agent, task_id, at(5))
    assert (code, answer["error"]["code"]) == (503, "storage_unavailable")
    assert agent.runner.runs == []
    # Not remembered: delivered again, it runs.
    assert (await run_now(agent, task_id, at(5)))[1]["status"] == "accepted"
    assert len(agent.runner.runs) == 1


@pytest_twisted.ensureDeferred
async def test_the_manual_runs_remembered_are_bounded(agent: Agent) -> None:
    task_id = await schedule(agent, frequency="every 1 hour")
    scheduler: Any = agent.service.scheduler
    for i in range(MANUAL_KEPT + 5):
        await scheduler.run_now(scheduler.tasks[uuid.UUID(task_id)], ANCHOR + timedelta(seconds=i))
    kept = (agent.service.config.data_dir / "lastrun" / f"{task_id}.manual").read_text().split()
    assert len(kept) == MANUAL_KEPT
    assert kept[0] == at(5) and kept[-1] == at(MANUAL_KEPT + 4)


@pytest_twisted.ensureDeferred
async def test_a_manual_run_accepted_as_the_agent_stops_is_skipped_not_started(
    agent: Agent,
) -> None:
    task_id = await schedule(agent)
    scheduler: Any = agent.service.scheduler
    spec = scheduler.tasks[uuid.UUID(task_id)]
    scheduler.stop()
    assert await scheduler.run_now(spec, ANCHOR + timedelta(seconds=5))
    assert agent.runner.runs == []
    agent.settle(1)
    [skipped] = agent.server.stored.values()
    assert (skipped.status, skipped.trigger) == (ResultStatus.SKIPPED, Trigger.MANUAL)
    assert skipped.reason == "the agent was stopping"
