"""The fleet routes, the heartbeat and the agents' states, through StubTreq over the
server's real Klein app (on a MemoryStore and a task.Clock)."""

from __future__ import annotations

import uuid
from typing import Any
from urllib.parse import quote

import pytest_twisted
from twisted.logger import Logger, formatEvent

from taskscheduler.auth import AGENT_PREFIX, hash_token, new_token
from taskscheduler.schedule import format_instant, utc_now_from
from taskscheduler.server.store.records import AuditEvent
from tests.unit.test_server_api import (
    AGENT_A,
    AGENT_B,
    AGENTS,
    CREDENTIALS,
    JSON,
    START,
    Harness,
    enrol_test_agents,
)

OUTSIDE = "http://agent-c:8081"
NOW = format_instant(utc_now_from(START))
AGENT_C = uuid.UUID("cccccccc-0000-4000-8000-000000000003")
CREDENTIAL_C = new_token(AGENT_PREFIX)


class FleetHarness(Harness):
    def __init__(self) -> None:
        self.fleet_changes = 0
        super().__init__(on_fleet_changed=self._changed)
        self.logged: list[dict[str, Any]] = []
        self.api.log = Logger(observer=self.logged.append)

    def _changed(self) -> None:
        self.fleet_changes += 1

    def warnings(self, words: str) -> list[str]:
        return [formatEvent(e) for e in self.logged if words in formatEvent(e)]

    async def beat(self, agent: uuid.UUID = AGENT_A, **fields: Any) -> tuple[int, Any]:
        credential = CREDENTIALS.get(agent, CREDENTIAL_C)
        body = {
            "agent_id": str(agent),
            "version": "0.1.0",
            "hostname": "host",
            "started_at": "2026-11-30T10:00:00.000000Z",
            "tasks": 2,
            "running": 1,
            "spooled": 3,
            "dropped_results": 0,
            "a_field_from_a_newer_agent": True,
            **fields,
        }
        headers = {**JSON, "Authorization": f"Bearer {credential}"}
        return await self.request("POST", "/api/v1/agents/heartbeat", body, headers=headers)


async def harness() -> FleetHarness:
    h = FleetHarness()
    await h.store.set_fleet(AGENTS)
    await enrol_test_agents(h.store)
    return h


async def enrol_outside(h: FleetHarness) -> None:
    now = utc_now_from(h.clock.seconds())
    await h.store.enrol_agent(
        AGENT_C,
        OUTSIDE,
        hash_token(CREDENTIAL_C),
        now,
        AuditEvent(now, "join:test", "agent.enrolled", str(AGENT_C), ""),
    )


@pytest_twisted.ensureDeferred
async def test_an_agent_is_online_within_three_heartbeat_intervals_then_offline() -> None:
    h = await harness()
    code, body = await h.request("GET", f"/api/v1/agents/{AGENT_A}")
    assert code == 200 and body["state"] == "offline" and body["last_seen_at"] is None
    code, body = await h.beat()
    assert (code, body) == (200, {"state": "online", "in_fleet": True, "interval_seconds": 10.0})
    code, body = await h.request("GET", f"/api/v1/agents/{AGENT_A}")
    assert body["state"] == "online"
    assert body["last_seen_at"] == NOW
    assert (body["version"], body["hostname"], body["started_at"]) == (
        "0.1.0",
        "host",
        "2026-11-30T10:00:00.000000Z",
    )
    assert (body["tasks"], body["running"], body["spooled"], body["dropped_results"]) == (
        2,
        1,
        3,
        0,
    )
    h.clock.advance(30)
    assert (await h.request("GET", f"/api/v1/agents/{AGENT_A}"))[1]["state"] == "online"
    h.clock.advance(0.001)
    assert (await h.request("GET", f"/api/v1/agents/{AGENT_A}"))[1]["state"] == "offline"
    _, listed = await h.request("GET", "/api/v1/agents")
    assert {a["agent_id"]: a["state"] for a in listed["agents"]} == {
        str(AGENT_A): "offline",
        str(AGENT_B): "offline",
    }


@pytest_twisted.ensureDeferred
async def test_a_heartbeat_under_another_agents_id_is_refused() -> None:
    h = await harness()
    code, body = await h.beat(AGENT_A, agent_id=str(AGENT_B))
    assert code == 400 and body["error"]["code"] == "invalid_request"
    code, body = await h.beat(AGENT_A, tasks=-1)
    assert code == 400


@pytest_twisted.ensureDeferred
async def test_a_revoked_agent_is_revoked_whatever_it_said_and_is_told_to_leave() -> None:
    h = await harness()
    await h.beat()
    code, body = await h.request("DELETE", f"/api/v1/agents/{AGENT_A}")
    assert code == 200 and body["state"] == "revoked"
    assert h.fleet_changes == 1
    assert [(x.agent_id, x.reason) for x in await h.store.pending_leaves(10)] == [
        (AGENT_A, "revoked")
    ]
    code, body = await h.beat()
    assert code == 401
    assert (await h.request("GET", f"/api/v1/agents/{AGENT_A}"))[1]["state"] == "revoked"


@pytest_twisted.ensureDeferred
async def test_an_agent_outside_the_fleet_is_shown_and_warned_about_once_per_change() -> None:
    h = await harness()
    await enrol_outside(h)
    for _ in range(3):
        code, body = await h.beat(AGENT_C)
        assert (code, body["state"], body["in_fleet"]) == (200, "not_in_fleet", False)
    assert len(h.warnings("is not in the fleet")) == 1
    _, listed = await h.request("GET", "/api/v1/agents")
    assert {a["url"]: a["state"] for a in listed["agents"]}[OUTSIDE] == "not_in_fleet"
    code, _ = await h.request("POST", "/api/v1/fleet", {"url": OUTSIDE})
    assert code == 201
    code, body = await h.beat(AGENT_C)
    assert body == {"state": "online", "in_fleet": True, "interval_seconds": 10.0}
    assert len(h.warnings("is in the fleet now")) == 1
    await h.beat(AGENT_A)  # in the fleet from the start: nothing to say
    assert len(h.warnings("is in the fleet now")) == 1
    await h.request("DELETE", f"/api/v1/fleet/{quote(OUTSIDE, safe='')}")
    await h.beat(AGENT_C)
    assert len(h.warnings("is not in the fleet")) == 2


@pytest_twisted.ensureDeferred
async def test_the_fleet_is_listed_added_to_and_removed_from_with_audits() -> None:
    h = await harness()
    await h.beat()
    code, body = await h.request("GET", "/api/v1/fleet")
    assert code == 200
    assert [(m["url"], m["agent_id"], m["state"]) for m in body["members"]] == [
        (AGENTS[0], str(AGENT_A), "online"),
        (AGENTS[1], str(AGENT_B), "offline"),
    ]
    task_id = await h.create()
    code, member = await h.request("POST", "/api/v1/fleet", {"url": OUTSIDE + "/"})
    assert code == 201
    assert member == {
        "url": OUTSIDE,
        "added_at": NOW,
        "agent_id": None,
        "state": "not_enrolled",
    }
    assert await h.store.assigned_task_ids(OUTSIDE) == {uuid.UUID(task_id)}
    code, again = await h.request("POST", "/api/v1/fleet", {"url": OUTSIDE})
    assert (code, again) == (200, member)
    assert h.fleet_changes == 1
    code, body = await h.request("DELETE", f"/api/v1/fleet/{quote(AGENTS[0], safe='')}")
    assert code == 200 and body["url"] == AGENTS[0] and body["agent_id"] == str(AGENT_A)
    assert h.fleet_changes == 2
    code, body = await h.request("DELETE", f"/api/v1/fleet/{quote(AGENTS[0], safe='')}")
    assert (code, body["error"]["code"]) == (404, "not_in_fleet")
    events = [(e.action, e.target, e.actor) for e in await h.store.audit_events(10)]
    assert ("fleet.added", OUTSIDE, "operator:alice") in events
    assert ("fleet.removed", AGENTS[0], "operator:alice") in events
    _, listed = await h.request("GET", "/api/v1/fleet")
    assert sorted(m["url"] for m in listed["members"]) == [AGENTS[1], OUTSIDE]


@pytest_twisted.ensureDeferred
async def test_a_fleet_url_is_validated_as_an_available_servers_entry() -> None:
    h = await harness()
    for url in ["ftp://agent:21", "agent-c:8081", "http://", "http://a b", 42, None, ""]:
        code, body = await h.request("POST", "/api/v1/fleet", {"url": url})
        assert (code, body["error"]["code"]) == (400, "invalid_url"), url
    assert h.fleet_changes == 0


@pytest_twisted.ensureDeferred
async def test_executions_name_the_expected_agents_that_did_not_report() -> None:
    h = await harness()
    task_id = await h.create()
    code, _ = await h.report(h.result(task_id, AGENT_A, 1, b"hi\n"))
    assert code == 200
    h.clock.advance(30 + 10 + 30 + 30 + 1)  # past instant 1's time limit and grace
    code, body = await h.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200 and body["expected_agents"] == 2
    assert body["missing_agents"] == [{"url": AGENTS[1], "agent_id": str(AGENT_B)}]
    code, body = await h.request("GET", f"/api/v1/tasks/{task_id}/executions")
    assert [e["missing_agents"] for e in body["executions"]] == [
        [{"url": AGENTS[1], "agent_id": str(AGENT_B)}]
    ]


@pytest_twisted.ensureDeferred
async def test_an_agent_removed_or_revoked_counts_no_more_in_new_executions() -> None:
    h = await harness()
    task_id = await h.create()
    await h.request("DELETE", f"/api/v1/fleet/{quote(AGENTS[1], safe='')}")
    await h.report(h.result(task_id, AGENT_A, 1))
    await h.request("POST", "/api/v1/fleet", {"url": AGENTS[1]})
    await h.request("DELETE", f"/api/v1/agents/{AGENT_A}")
    await h.report(h.result(task_id, AGENT_B, 2))
    _, body = await h.request("GET", f"/api/v1/tasks/{task_id}/executions")
    assert [(e["expected_agents"], e["missing_agents"]) for e in body["executions"]] == [
        (1, []),
        (1, []),
    ]
