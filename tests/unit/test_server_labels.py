"""Agent labels on the server's side: taken at enrolment and from every heartbeat, stored
(both stores), and shown by the agent routes."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import pytest_twisted

from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import Heartbeat
from tests.unit.cli_stub import AGENT_1, AGENT_2, StubApi, run
from tests.unit.test_server_api import AGENT_A, AGENTS, CREDENTIALS, OPERATOR
from tests.unit.test_server_security import JOIN, REVOKED_AGENT_ID, Server
from tests.unit.test_store_agents import HASH_A, event
from tests.unit.test_store_contract import A_ID, A_URL, ANCHOR


def beat(**labels: str) -> Heartbeat:
    return Heartbeat("1.0", "host", None, 0, 0, 0, 0, labels)


@pytest_twisted.ensureDeferred
async def test_the_store_keeps_the_labels_an_agent_last_said(store: Store) -> None:
    record = await store.enrol_agent(
        A_ID, A_URL, HASH_A, ANCHOR, event("agent.enrolled"), {"role": "web", "dc": "eu"}
    )
    assert dict(record.labels) == {"role": "web", "dc": "eu"}
    for found in (
        await store.get_agent(A_ID),
        await store.agent_for_url(A_URL),
        await store.agent_by_credential(HASH_A),
        *(await store.list_agents()),
    ):
        assert found is not None and dict(found.labels) == {"role": "web", "dc": "eu"}
    # The same labels again: nothing changed.
    assert await store.record_heartbeat(A_ID, ANCHOR, beat(dc="eu", role="web")) is False
    # A restart with other labels: they replace the stored ones, and the store says so.
    assert await store.record_heartbeat(A_ID, ANCHOR + timedelta(seconds=1), beat(role="db"))
    agent = await store.get_agent(A_ID)
    assert agent is not None and dict(agent.labels) == {"role": "db"}
    assert agent.heartbeat is not None and dict(agent.heartbeat.labels) == {"role": "db"}
    assert await store.record_heartbeat(A_ID, ANCHOR + timedelta(seconds=2), beat()) is True
    agent = await store.get_agent(A_ID)
    assert agent is not None and dict(agent.labels) == {}
    # An agent the store does not know changes nothing.
    assert await store.record_heartbeat(uuid.uuid4(), ANCHOR, beat(role="x")) is False


@pytest_twisted.ensureDeferred
async def test_an_agent_enrolled_without_labels_has_none(store: Store) -> None:
    record = await store.enrol_agent(A_ID, A_URL, HASH_A, ANCHOR, event("agent.enrolled"))
    assert dict(record.labels) == {}
    assert [dict(a.labels) for a in await store.list_agents()] == [{}]


async def server_at(tmp_path: Path) -> tuple[Server, list[str]]:
    server = Server(tmp_path)
    await server.setup()
    relabelled: list[str] = []
    server.api._on_agent_relabelled = relabelled.append
    return server, relabelled


@pytest_twisted.ensureDeferred
async def test_enrolment_takes_the_labels_and_the_agent_routes_show_them(tmp_path: Path) -> None:
    server, _ = await server_at(tmp_path)
    new_id = str(uuid.uuid4())
    body = {"agent_id": new_id, "url": "http://agent-d:8081", "labels": {"role": "web"}}
    code, answer, _ = await server.call("POST", "/api/v1/agents/enrol", body, token=JOIN)
    assert code == 201, answer
    code, listed, _ = await server.call("GET", "/api/v1/agents", token=OPERATOR)
    assert code == 200
    by_id = {a["agent_id"]: a["labels"] for a in listed["agents"]}
    assert by_id[new_id] == {"role": "web"}
    assert by_id[str(AGENT_A)] == {}
    code, one, _ = await server.call("GET", f"/api/v1/agents/{new_id}", token=OPERATOR)
    assert (code, one["labels"]) == (200, {"role": "web"})


@pytest_twisted.ensureDeferred
async def test_enrolment_with_bad_labels_is_refused_and_enrols_nothing(tmp_path: Path) -> None:
    server, _ = await server_at(tmp_path)
    new_id = str(uuid.uuid4())
    for labels in ({"ro le": "web"}, {"role": 1}, ["role=web"]):
        body = {"agent_id": new_id, "url": "http://agent-d:8081", "labels": labels}
        code, answer, _ = await server.call("POST", "/api/v1/agents/enrol", body, token=JOIN)
        assert (code, answer["error"]["code"]) == (400, "invalid_request"), answer
        assert "labels" in answer["error"]["message"]
    assert await server.store.get_agent(uuid.UUID(new_id)) is None


@pytest_twisted.ensureDeferred
async def test_a_heartbeat_with_other_labels_updates_them_and_wakes_the_dispatcher(
    tmp_path: Path,
) -> None:
    server, relabelled = await server_at(tmp_path)
    credential = CREDENTIALS[AGENT_A]

    async def heartbeat(**extra: object) -> int:
        body = {"agent_id": str(AGENT_A), "version": "1", "hostname": "h", **extra}
        code, answer, _ = await server.call(
            "POST", "/api/v1/agents/heartbeat", body, token=credential
        )
        assert code != 200 or answer["in_fleet"] is True
        return int(code)

    assert await heartbeat(labels={"role": "web"}) == 200
    assert relabelled == [AGENTS[0]]
    assert await heartbeat(labels={"role": "web"}) == 200
    assert relabelled == [AGENTS[0]], "the same labels: nothing to redo"
    code, one, _ = await server.call("GET", f"/api/v1/agents/{AGENT_A}", token=OPERATOR)
    assert (code, one["labels"]) == (200, {"role": "web"})
    # An agent that predates labels sends none: it has none.
    assert await heartbeat() == 200
    assert relabelled == [AGENTS[0], AGENTS[0]]
    agent = await server.store.get_agent(AGENT_A)
    assert agent is not None and dict(agent.labels) == {}
    # Malformed labels: the heartbeat is refused, the stored labels stay.
    assert await heartbeat(labels={"role": "web/api"}) == 400
    assert await heartbeat(labels="role=web") == 400
    agent = await server.store.get_agent(AGENT_A)
    assert agent is not None and dict(agent.labels) == {}


def test_agents_ls_and_show_print_the_labels() -> None:
    api = StubApi()
    api.agents = [
        {
            "agent_id": AGENT_1,
            "url": "http://a:1",
            "state": "online",
            "labels": {"role": "web", "dc": "eu"},
        },
        {"agent_id": AGENT_2, "url": "http://b:2", "state": "online", "labels": {}},
    ]
    lines = run(api, "agents", "ls").stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "URL", "LABELS"]
    assert lines[1].split()[:4] == ["aa110000", "online", "http://a:1", "dc=eu,role=web"]
    assert lines[2].split()[:4] == ["bb220000", "online", "http://b:2", "-"]
    api.route("GET", f"/api/v1/agents/{AGENT_1}", api.agents[0])
    shown = run(api, "agents", "show", AGENT_1).stdout
    assert "dc=eu,role=web" in shown


@pytest_twisted.ensureDeferred
async def test_a_target_naming_an_agent_no_live_agent_is_refused(tmp_path: Path) -> None:
    server, _ = await server_at(tmp_path)
    unknown = str(uuid.uuid4())
    revoked = str(REVOKED_AGENT_ID)
    for agents in ([unknown], [str(AGENT_A), revoked]):
        body = {"command": "true", "frequency": "every 1 minute", "target": {"agents": agents}}
        code, answer, _ = await server.call("POST", "/api/v1/tasks/create", body, token=OPERATOR)
        assert (code, answer["error"]["code"]) == (400, "invalid_request"), answer
        assert agents[-1] in answer["error"]["message"]
    assert await server.store.list_tasks(10) == []
    body = {"command": "true", "frequency": "every 1 minute", "target": {"agents": [str(AGENT_A)]}}
    code, created, _ = await server.call("POST", "/api/v1/tasks/create", body, token=OPERATOR)
    assert code == 201, created
    path = f"/api/v1/tasks/{created['command_id']}"
    code, answer, _ = await server.call(
        "PATCH", path, {"target": {"agents": [unknown]}}, token=OPERATOR
    )
    assert (code, answer["error"]["code"]) == (400, "invalid_request")
    code, task, _ = await server.call("GET", path, token=OPERATOR)
    assert task["target"] == {"agents": [str(AGENT_A)]}
    # A change of something else is not held up by the target.
    code, task, _ = await server.call("PATCH", path, {"command": "echo"}, token=OPERATOR)
    assert code == 200, task
