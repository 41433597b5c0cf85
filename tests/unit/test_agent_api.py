"""The agent's HTTP API over the real Klein resource (StubTreq), on a task.Clock."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from taskscheduler.agent.api import MAX_BODY_BYTES
from taskscheduler.schedule import format_instant, utc_now_from
from taskscheduler.web.guards import make_site
from tests.unit.agent_fakes import (
    ANCHOR,
    ANCHOR_SECONDS,
    SERVER,
    Agent,
    FakeServer,
    FakeThread,
    fired,
)

URL = "http://agent.test:8081"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    return Agent(tmp_path / "data", clock, FakeServer())


async def call(
    agent: Agent, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """A request signed by the agent's server, as the server sends them."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    api: Any = agent.api
    signed = agent.signed(method, path, data or b"")
    response = await api.request(
        method, URL + path, data=data, headers={**signed, **(headers or {})}
    )
    return response.code, json.loads(await api.content(response))


def task_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task_id": str(uuid.uuid4()),
        "command": "echo hello world",
        "frequency": "every 10 seconds",
        "anchor": format_instant(ANCHOR),
        "time_limit_seconds": 8,
    }
    body.update(overrides)
    return body


def task_files(agent: Agent) -> list[Path]:
    return sorted((agent.service.config.data_dir / "tasks").glob("*.json"))


def agent_id(agent: Agent) -> str:
    return (agent.service.config.data_dir / "agent_id").read_text().strip()


@pytest_twisted.ensureDeferred
async def test_schedule_persists_the_task_then_runs_it(agent: Agent) -> None:
    body = task_body()
    code, answer = await call(agent, "POST", "/api/v1/tasks/schedule", body)
    assert code == 200
    assert answer == {
        "agent_id": agent_id(agent),
        "task_id": body["task_id"],
        "status": "scheduled",
    }
    [stored] = task_files(agent)
    assert json.loads(stored.read_text())["command"] == "echo hello world"
    code, answer = await call(agent, "GET", "/api/v1/agent/tasks")
    assert (code, answer) == (200, {"agent_id": agent_id(agent), "task_ids": [body["task_id"]]})
    agent.advance_to(10)
    [run] = agent.runner.runs
    assert run.command == "echo hello world"
    assert run.time_limit == 8


@pytest_twisted.ensureDeferred
async def test_the_seeds_three_field_request_works_and_is_idempotent(agent: Agent) -> None:
    body = {"task_id": str(uuid.uuid4()), "command": "echo hi", "frequency": "every 30 seconds"}
    assert (await call(agent, "POST", "/api/v1/tasks/schedule", body))[0] == 200
    before = task_files(agent)[0].read_bytes()
    agent.settle(7)
    assert (await call(agent, "POST", "/api/v1/tasks/schedule", body))[0] == 200
    assert task_files(agent)[0].read_bytes() == before, "a resend keeps the first anchor"
    # Anchored when first received (5 s after ANCHOR): runs at 35 s, not 42 s.
    agent.advance_to(35)
    assert len(agent.runner.runs) == 1
    assert json.loads(before)["time_limit_seconds"] == 30


@pytest_twisted.ensureDeferred
async def test_scheduling_the_same_task_again_changes_nothing(agent: Agent) -> None:
    body = task_body()
    await call(agent, "POST", "/api/v1/tasks/schedule", body)
    agent.advance_to(9)
    loops_before = dict(agent.service.scheduler._loops)  # type: ignore[union-attr]
    code, _ = await call(agent, "POST", "/api/v1/tasks/schedule", body)
    assert code == 200
    assert agent.service.scheduler._loops == loops_before  # type: ignore[union-attr]
    agent.advance_to(10)
    assert len(agent.runner.runs) == 1


@pytest_twisted.ensureDeferred
async def test_the_same_task_id_with_a_new_spec_replaces_the_task(agent: Agent) -> None:
    body = task_body()
    await call(agent, "POST", "/api/v1/tasks/schedule", body)
    code, _ = await call(
        agent, "POST", "/api/v1/tasks/schedule", {**body, "command": "echo replaced"}
    )
    assert code == 200
    [stored] = task_files(agent)
    assert json.loads(stored.read_text())["command"] == "echo replaced"
    agent.advance_to(10)
    assert [r.command for r in agent.runner.runs] == ["echo replaced"]


@pytest_twisted.ensureDeferred
async def test_health_reports_counts(agent: Agent) -> None:
    await call(agent, "POST", "/api/v1/tasks/schedule", task_body())
    agent.advance_to(10)
    code, answer = await call(agent, "GET", "/api/v1/health")
    assert code == 200
    assert answer == {
        "status": "ok",
        "agent_id": agent_id(agent),
        "tasks": 1,
        "running": 1,
        "enrolled": True,
        "membership": "member",
        "in_fleet": None,
        "labels": {},
        "spooled": 0,
        "spooled_bytes": 0,
        "dropped": 0,
        "rejected": 0,
        "server": SERVER,
        "server_failovers": 0,
    }


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        (b"{not json", 400, "invalid_json", "not valid JSON"),
        (b"", 400, "invalid_json", "empty"),
        (b"[1, 2]", 400, "invalid_request", "JSON object"),
        (b'{"command": "\xff"}', 400, "invalid_json", "UTF-8"),
        (task_body(task_id="nope"), 400, "invalid_request", "task_id"),
        (task_body(task_id=None), 400, "invalid_request", "'task_id' is required"),
        (task_body(command=""), 400, "invalid_request", "command"),
        (task_body(command=7), 400, "invalid_request", "command"),
        (task_body(frequency="every 0 seconds"), 400, "invalid_request", "every 1 second"),
        (task_body(frequency="every 1.5 minutes"), 400, "invalid_request", "frequency"),
        (task_body(frequency="every 5 days"), 400, "invalid_request", "frequency"),
        (task_body(anchor="yesterday"), 400, "invalid_request", "anchor"),
        (task_body(anchor="2026-11-27T07:30:00"), 400, "invalid_request", "anchor"),
        (task_body(time_limit_seconds=0), 400, "invalid_request", "time_limit_seconds"),
        (task_body(time_limit_seconds=True), 400, "invalid_request", "time_limit_seconds"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_task_is_refused_and_changes_nothing(
    agent: Agent, body: Any, status: int, code: str, words: str
) -> None:
    answer_code, answer = await call(agent, "POST", "/api/v1/tasks/schedule", body)
    assert answer_code == status
    assert answer["error"]["code"] == code
    assert words in answer["error"]["message"]
    assert task_files(agent) == []
    assert agent.service.scheduler.tasks == {}  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_body_that_is_not_json_is_415(agent: Agent) -> None:
    code, answer = await call(
        agent, "POST", "/api/v1/tasks/schedule", task_body(), {"Content-Type": "text/plain"}
    )
    assert code == 415
    assert answer["error"]["code"] == "unsupported_media_type"
    assert task_files(agent) == []


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_wrong_methods(agent: Agent) -> None:
    code, answer = await call(agent, "GET", "/api/v1/nothing")
    assert (code, answer["error"]["code"]) == (404, "not_found")
    code, answer = await call(agent, "GET", "/api/v1/tasks/schedule")
    assert (code, answer["error"]["code"]) == (405, "method_not_allowed")
    code, answer = await call(agent, "DELETE", "/api/v1/health")
    assert (code, answer["error"]["code"]) == (405, "method_not_allowed")


@pytest_twisted.ensureDeferred
async def test_a_task_the_disk_cannot_take_is_503_and_not_scheduled(agent: Agent) -> None:
    store = agent.service.api._task_store  # type: ignore[union-attr]

    def full(spec: object) -> None:
        raise OSError(28, "No space left on device")

    store.save = full  # type: ignore[method-assign]
    data = json.dumps(task_body()).encode()
    api: Any = agent.api
    path = "/api/v1/tasks/schedule"
    response = await api.post(URL + path, data=data, headers=agent.signed("POST", path, data))
    answer = json.loads(await api.content(response))
    assert (response.code, answer["error"]["code"]) == (503, "storage_unavailable")
    assert response.headers.getRawHeaders("Retry-After") == ["5"], "the server retries later"
    assert agent.service.scheduler.tasks == {}  # type: ignore[union-attr]


def test_a_body_over_the_limit_is_413_before_it_is_read(agent: Agent) -> None:
    assert agent.service.api is not None
    site = make_site(agent.service.api.resource(), MAX_BODY_BYTES)
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        b"POST /api/v1/tasks/schedule HTTP/1.1\r\nHost: agent\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(MAX_BODY_BYTES + 1).encode() + b"\r\n\r\n{"
    )
    answer = transport.value()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert b'"payload_too_large"' in answer
    assert task_files(agent) == []


# -- removing a task -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_stops_the_task_and_the_run_under_way_still_reports(agent: Agent) -> None:
    kept, gone = task_body(command="kept"), task_body(command="gone")
    for body in (kept, gone):
        assert (await call(agent, "POST", "/api/v1/tasks/schedule", body))[0] == 200
    agent.advance_to(10)
    assert sorted(run.command for run in agent.runner.runs) == ["gone", "kept"]
    [under_way] = [run for run in agent.runner.runs if run.command == "gone"]

    code, answer = await call(agent, "DELETE", f"/api/v1/tasks/{gone['task_id']}")
    assert (code, answer) == (
        200,
        {"agent_id": agent_id(agent), "task_id": gone["task_id"], "status": "removed"},
    )
    assert [p.name for p in task_files(agent)] == [f"{kept['task_id']}.json"]
    code, answer = await call(agent, "GET", "/api/v1/agent/tasks")
    assert answer["task_ids"] == [kept["task_id"]]

    # The run that began before the removal finishes, and its result goes to the server.
    agent.runner.finish(under_way, b"last words\n")
    agent.settle()
    [last] = [r for r in agent.server.stored.values() if str(r.task_id) == gone["task_id"]]
    assert last.stdout.data == b"last words\n"

    # No new run of it, ever; the other task goes on.
    for seconds in (10, 20, 30, 40):
        agent.advance_to(seconds)
        for run in agent.runner.runs:
            if not run.done:
                agent.runner.finish(run)
    commands = [run.command for run in agent.runner.runs]
    assert commands.count("gone") == 1
    assert commands.count("kept") == 4


@pytest_twisted.ensureDeferred
async def test_delete_is_idempotent_and_checks_the_id(agent: Agent) -> None:
    body = task_body()
    await call(agent, "POST", "/api/v1/tasks/schedule", body)
    for _ in range(2):
        code, answer = await call(agent, "DELETE", f"/api/v1/tasks/{body['task_id']}")
        assert (code, answer["status"]) == (200, "removed")
    unknown = str(uuid.uuid4())
    code, answer = await call(agent, "DELETE", f"/api/v1/tasks/{unknown}")
    assert (code, answer["task_id"]) == (200, unknown), "the server's retries converge"
    code, answer = await call(agent, "DELETE", "/api/v1/tasks/not-a-uuid")
    assert (code, answer["error"]["code"]) == (400, "invalid_task_id")
    assert task_files(agent) == []
    assert agent.service.scheduler.tasks == {}  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_removal_the_disk_cannot_take_is_503_and_the_task_goes_on(agent: Agent) -> None:
    body = task_body()
    await call(agent, "POST", "/api/v1/tasks/schedule", body)
    store = agent.service.api._task_store  # type: ignore[union-attr]

    def read_only(task_id: object) -> None:
        raise OSError(30, "Read-only file system")

    store.delete = read_only  # type: ignore[method-assign]
    code, answer = await call(agent, "DELETE", f"/api/v1/tasks/{body['task_id']}")
    assert (code, answer["error"]["code"]) == (503, "storage_unavailable")
    assert set(agent.service.scheduler.tasks) == {uuid.UUID(body["task_id"])}  # type: ignore[union-attr]
    assert len(task_files(agent)) == 1


# -- task files off the reactor thread ---------------------------------------------------


@pytest.fixture
def threaded(tmp_path: Path) -> tuple[Agent, FakeThread]:
    """An agent whose disk work waits in a fake thread until the test runs it."""
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    thread = FakeThread()
    return Agent(tmp_path / "data", clock, FakeServer(), run_in_thread=thread), thread


def send(
    agent: Agent, method: str, path: str, body: Any = None, settle: bool = True
) -> Deferred[tuple[int, Any]]:
    """A request under way: the test decides when the agent's disk work completes."""
    d = Deferred.fromCoroutine(call(agent, method, path, body))
    if settle:
        agent.settle()
    return d


def finish_disk_work(agent: Agent, thread: FakeThread) -> None:
    """Let the thread do every job, and the reactor everything that follows."""
    agent.settle()
    while thread.jobs:
        thread.run_all()
        agent.settle()


def test_a_task_is_written_off_the_reactor_and_acknowledged_once_on_disk(
    threaded: tuple[Agent, FakeThread],
) -> None:
    agent, thread = threaded
    body = task_body()
    answer = send(agent, "POST", "/api/v1/tasks/schedule", body)
    again = send(agent, "POST", "/api/v1/tasks/schedule", body)
    # The reactor is free again, and nothing is written, scheduled nor acknowledged yet.
    assert len(thread.jobs) == 1
    assert task_files(agent) == []
    assert not answer.called and not again.called, "no acknowledgement before the disk"
    assert agent.service.scheduler.tasks == {}  # type: ignore[union-attr]
    thread.run_all()
    assert [p.name for p in task_files(agent)] == [f"{body['task_id']}.json"]
    agent.settle()
    assert fired(answer)[0] == 200
    assert fired(again)[0] == 200, "the same request waited for the first one's write"
    assert set(agent.service.scheduler.tasks) == {uuid.UUID(body["task_id"])}  # type: ignore[union-attr]
    assert thread.jobs == [], "written once"


def test_a_resent_seed_request_keeps_the_anchor_of_one_still_being_written(
    threaded: tuple[Agent, FakeThread],
) -> None:
    agent, thread = threaded
    body = {"task_id": str(uuid.uuid4()), "command": "echo hi", "frequency": "every 30 seconds"}
    first = send(agent, "POST", "/api/v1/tasks/schedule", body)
    agent.settle(2)
    second = send(agent, "POST", "/api/v1/tasks/schedule", body)
    thread.run_all()
    agent.settle()
    assert (fired(first)[0], fired(second)[0]) == (200, 200)
    assert thread.jobs == [], "the resend is the same task: nothing more to write"
    [stored] = task_files(agent)
    assert json.loads(stored.read_text())["anchor"] == format_instant(
        utc_now_from(ANCHOR_SECONDS + 5)
    )


@pytest.mark.parametrize("one_batch", [True, False])
def test_a_task_saved_then_deleted_quickly_ends_deleted(
    threaded: tuple[Agent, FakeThread], one_batch: bool
) -> None:
    agent, thread = threaded
    body = task_body()
    # In one batch: both come in one turn of the reactor. Else the save is being
    # written when the removal comes.
    saved = send(agent, "POST", "/api/v1/tasks/schedule", body, settle=not one_batch)
    deleted = send(agent, "DELETE", f"/api/v1/tasks/{body['task_id']}")
    assert len(thread.jobs) == 1
    assert not saved.called and not deleted.called
    finish_disk_work(agent, thread)
    assert (fired(saved)[0], fired(deleted)[0]) == (200, 200)
    assert task_files(agent) == []
    assert agent.service.scheduler.tasks == {}  # type: ignore[union-attr]
    agent.advance_to(30)
    assert agent.runner.runs == []


def test_a_task_deleted_then_scheduled_again_quickly_ends_scheduled(
    threaded: tuple[Agent, FakeThread],
) -> None:
    agent, thread = threaded
    body = task_body()
    first = send(agent, "POST", "/api/v1/tasks/schedule", body)
    thread.run_all()
    agent.settle()
    assert fired(first)[0] == 200
    deleted = send(agent, "DELETE", f"/api/v1/tasks/{body['task_id']}")
    again = send(agent, "POST", "/api/v1/tasks/schedule", body)
    finish_disk_work(agent, thread)
    assert (fired(deleted)[0], fired(again)[0]) == (200, 200)
    assert len(task_files(agent)) == 1
    assert set(agent.service.scheduler.tasks) == {uuid.UUID(body["task_id"])}  # type: ignore[union-attr]


def test_a_removal_is_written_off_the_reactor_and_acknowledged_once_on_disk(
    threaded: tuple[Agent, FakeThread],
) -> None:
    agent, thread = threaded
    body = task_body()
    send(agent, "POST", "/api/v1/tasks/schedule", body)
    thread.run_all()
    agent.settle()
    deleted = send(agent, "DELETE", f"/api/v1/tasks/{body['task_id']}")
    assert len(thread.jobs) == 1 and not deleted.called
    assert len(task_files(agent)) == 1
    assert set(agent.service.scheduler.tasks) == {uuid.UUID(body["task_id"])}  # type: ignore[union-attr]
    thread.run_all()
    agent.settle()
    assert fired(deleted)[0] == 200
    assert task_files(agent) == []
    assert agent.service.scheduler.tasks == {}  # type: ignore[union-attr]


def test_a_task_the_disk_refuses_in_the_thread_is_503_and_not_scheduled(
    threaded: tuple[Agent, FakeThread],
) -> None:
    agent, thread = threaded
    shutil.rmtree(agent.service.config.data_dir / "tasks")  # the write will fail
    answer = send(agent, "POST", "/api/v1/tasks/schedule", task_body())
    thread.run_all()
    agent.settle()
    code, body = fired(answer)
    assert (code, body["error"]["code"]) == (503, "storage_unavailable")
    assert agent.service.scheduler.tasks == {}  # type: ignore[union-attr]
