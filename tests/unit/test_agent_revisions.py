"""A task's revisions on the agent, and its pause (removal) and resume (scheduled again).

``POST /api/v1/tasks/schedule`` with a higher revision replaces the task from now on; an
equal or lower one changes nothing. Removed then scheduled again, a task goes on on its
grid from the next instant, with no catch-up and nothing recorded for its absence.
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
from twisted.internet.task import Clock

from taskscheduler.protocol import ResultStatus, Trigger
from taskscheduler.schedule import format_instant
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, Agent, FakeServer

URL = "http://agent.test:8081"


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    return start(tmp_path)


def start(tmp_path: Path, seconds_after_anchor: float = 5, clock: Clock | None = None) -> Agent:
    if clock is None:
        clock = Clock()
        clock.advance(ANCHOR_SECONDS + seconds_after_anchor)
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


TASK_ID = str(uuid.uuid4())


def body(revision: int | None, **fields: Any) -> dict[str, Any]:
    task: dict[str, Any] = {
        "task_id": TASK_ID,
        "command": f"echo revision {revision}",
        "frequency": "every 10 seconds",
        "anchor": at(0),
        "time_limit_seconds": 8,
        **fields,
    }
    if revision is not None:
        task["revision"] = revision
    return task


async def schedule(agent: Agent, task: dict[str, Any]) -> None:
    code, answer = await call(agent, "POST", "/api/v1/tasks/schedule", task)
    assert (code, answer["status"]) == (200, "scheduled"), answer


def stored_file(agent: Agent) -> dict[str, Any]:
    path = agent.service.config.data_dir / "tasks" / f"{TASK_ID}.json"
    return dict(json.loads(path.read_text()))


def results(agent: Agent) -> list[tuple[str, str, int | None, str]]:
    """(instant, status, revision, trigger) of every result the server got, in order."""
    return sorted(
        (format_instant(r.scheduled_at), r.status.value, r.revision, r.trigger.value)
        for r in agent.server.stored.values()
    )


def finish_all(agent: Agent) -> None:
    for run in agent.runner.runs:
        if not run.done:
            agent.runner.finish(run)
    agent.settle(0)


def run_to(agent: Agent, seconds_after_anchor: float) -> None:
    """Let time pass up to ``anchor + s``, each run ending within its second."""
    while agent.clock.seconds() < ANCHOR_SECONDS + seconds_after_anchor:
        agent.advance_to(min(seconds_after_anchor, agent.clock.seconds() - ANCHOR_SECONDS + 1))
        finish_all(agent)


@pytest_twisted.ensureDeferred
async def test_a_higher_revision_replaces_the_task_and_a_run_under_way_finishes_as_it_was(
    agent: Agent,
) -> None:
    await schedule(agent, body(1))
    agent.advance_to(10)
    [first] = agent.runner.runs
    await schedule(agent, body(2))
    assert stored_file(agent)["revision"] == 2
    agent.runner.finish(first)
    agent.advance_to(20)
    finish_all(agent)
    agent.settle(1)
    assert [(r.command, r.revision) for r in agent.runner.runs] == [
        ("echo revision 1", 1),
        ("echo revision 2", 2),
    ]
    assert results(agent) == [
        (at(10), "succeeded", 1, "schedule"),
        (at(20), "succeeded", 2, "schedule"),
    ]


@pytest.mark.parametrize("older", [1, 2], ids=["lower", "equal"])
@pytest_twisted.ensureDeferred
async def test_a_lower_or_equal_revision_changes_nothing(agent: Agent, older: int) -> None:
    await schedule(agent, body(2))
    before = stored_file(agent)
    loops = dict(agent.service.scheduler._loops)  # type: ignore[union-attr]
    # A late delivery of an older revision, or the same revision saying something else.
    await schedule(agent, body(older, command="echo stale", frequency="every 1 second"))
    assert stored_file(agent) == before
    assert agent.service.scheduler._loops == loops  # type: ignore[union-attr]
    agent.advance_to(20)
    assert [(r.command, r.revision) for r in agent.runner.runs] == [("echo revision 2", 2)] * 1
    code, answer = await call(
        agent, "POST", "/api/v1/tasks/schedule", {"tasks": [body(3), body(1)]}
    )
    assert code == 200
    assert [entry["status"] for entry in answer["results"]] == ["scheduled", "scheduled"]
    assert stored_file(agent)["revision"] == 3, "a batch ends as its newest revision"


@pytest_twisted.ensureDeferred
async def test_a_body_without_a_revision_replaces_the_task_as_the_seeds_did(agent: Agent) -> None:
    await schedule(agent, body(None))
    await schedule(agent, body(None, command="echo replaced"))
    assert stored_file(agent)["command"] == "echo replaced"


@pytest_twisted.ensureDeferred
async def test_a_restarted_agent_keeps_the_newest_revision(tmp_path: Path) -> None:
    first = start(tmp_path)
    await schedule(first, body(1))
    await schedule(first, body(4, command="echo newest"))
    await schedule(first, body(3))
    await first.stop()
    second = start(tmp_path, clock=first.clock)
    [spec] = second.service.scheduler.tasks.values()  # type: ignore[union-attr]
    assert (spec.revision, spec.command) == (4, "echo newest")
    await schedule(second, body(3))
    assert stored_file(second)["revision"] == 4


@pytest_twisted.ensureDeferred
async def test_a_new_frequency_and_anchor_are_planned_from_now_with_no_catch_up(
    agent: Agent,
) -> None:
    """A PATCH of the frequency re-anchors at the change: the first new instant is one
    new interval after it. Nothing is run or recorded for the old grid's instants to
    come, nor for the new grid's before the change."""
    await schedule(agent, body(1))
    run_to(agent, 25)
    # Re-anchored at 23 s every 7 s: 30 s, 37 s... (the old grid's 30 s and 40 s are gone).
    await schedule(agent, body(2, frequency="every 7 seconds", anchor=at(23)))
    run_to(agent, 29.9)
    assert len(agent.runner.runs) == 2
    run_to(agent, 38)
    agent.settle(1)
    assert results(agent) == [
        (at(10), "succeeded", 1, "schedule"),
        (at(20), "succeeded", 1, "schedule"),
        (at(30), "succeeded", 2, "schedule"),
        (at(37), "succeeded", 2, "schedule"),
    ]
    # An older anchor (the first grid's, every second now), sent at 39 s: from the next
    # instant on.
    await schedule(agent, body(3, frequency="every 1 second"))
    run_to(agent, 40)
    agent.settle(0)
    assert results(agent)[4:] == [
        (at(40), "succeeded", 3, "schedule"),
    ], "the instants of revision 3 before it came (up to 38 s) are neither run nor skipped"


@pytest_twisted.ensureDeferred
async def test_a_removed_task_scheduled_again_goes_on_on_its_grid_with_nothing_for_its_absence(
    agent: Agent,
) -> None:
    await schedule(agent, body(1))
    run_to(agent, 20)
    code, _ = await call(agent, "DELETE", f"/api/v1/tasks/{TASK_ID}")  # paused
    assert code == 200
    run_to(agent, 75)  # 30 s .. 70 s pass while the task is away
    await schedule(agent, body(1))  # resumed: the same anchor
    run_to(agent, 79.9)
    assert len(agent.runner.runs) == 2, "no catch-up run"
    run_to(agent, 90)
    agent.settle(1)
    assert results(agent) == [
        (at(10), "succeeded", 1, "schedule"),
        (at(20), "succeeded", 1, "schedule"),
        (at(80), "succeeded", 1, "schedule"),
        (at(90), "succeeded", 1, "schedule"),
    ]
    skipped = [r for r in agent.server.stored.values() if r.status is ResultStatus.SKIPPED]
    assert skipped == []


@pytest_twisted.ensureDeferred
async def test_a_task_removed_and_scheduled_again_across_a_restart_records_nothing_missed(
    tmp_path: Path,
) -> None:
    first = start(tmp_path)
    await schedule(first, body(1))
    first.advance_to(10)
    finish_all(first)
    first.settle(1)
    await call(first, "DELETE", f"/api/v1/tasks/{TASK_ID}")
    await first.stop()
    first.clock.advance(100)
    second = start(tmp_path, clock=first.clock)
    second.advance_to(117)
    await schedule(second, body(2))  # resumed, and changed while paused
    run_to(second, 130)
    second.settle(1)
    assert results(second) == [
        (at(120), "succeeded", 2, "schedule"),
        (at(130), "succeeded", 2, "schedule"),
    ]


@pytest_twisted.ensureDeferred
async def test_a_manual_run_moves_neither_the_grid_nor_the_labels_after_a_restart(
    tmp_path: Path,
) -> None:
    """A manual run is labelled with the server's instant, which may be a little ahead
    of the agent's clock: spooled when the agent restarts, it is not an instant the
    task's loop fired, so the labels do not jump ahead to it."""
    first = start(tmp_path)
    first.server.down = True
    await schedule(first, body(1, frequency="every 60 seconds"))
    code, answer = await call(
        first, "POST", f"/api/v1/tasks/{TASK_ID}/run", {"scheduled_at": at(8.5), "revision": 1}
    )
    assert (code, answer["status"]) == (202, "accepted")
    finish_all(first)
    first.crash()
    second = start(tmp_path, clock=first.clock)
    assert second.service.scheduler.lead == 0  # type: ignore[union-attr]
    second.server.down = False
    second.advance_to(60)
    finish_all(second)
    second.settle(5)
    assert results(second) == [
        (at(8.5), "succeeded", 1, "manual"),
        (at(60), "succeeded", 1, "schedule"),
    ]
    assert [r.trigger for r in second.runner.runs] == [Trigger.SCHEDULE]
