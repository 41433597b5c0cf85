"""The dispatcher follows the fleet at run time and tells agents to leave it: on a
task.Clock, through StubTreq over the agent's real Klein app (a real agent service
checking the server's signatures, over a fake runner)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from taskscheduler.schedule import utc_now_from
from taskscheduler.server.dispatch import Dispatcher
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.records import AuditEvent
from tests.unit.test_dispatch import AGENT_ID, URL, AgentFront, enrol, real_setup, settle, signer
from tests.unit.test_dispatch import spec as make_spec

OTHER = "http://agent-b:8081"
OTHER_ID = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")


def event(action: str, clock: Clock) -> AuditEvent:
    return AuditEvent(utc_now_from(clock.seconds()), "operator:ops", action, URL, "")


def membership(agent: AgentFront) -> str:
    assert agent.agent.service.api is not None
    return agent.agent.service.api.membership.state


@pytest_twisted.ensureDeferred
async def test_a_member_added_at_run_time_gets_every_active_task(tmp_path: Path) -> None:
    clock = Clock()
    store = MemoryStore()
    await store.set_fleet([])
    await enrol(store, clock)
    agent = AgentFront(tmp_path / "agent", clock)
    http = StubTreq(agent)
    dispatcher = Dispatcher(store, http, clock, [], signer=signer(clock), jitter=lambda: 1.0)
    dispatcher.startService()
    task = await store.create_task(make_spec(), utc_now_from(0))
    dispatcher.task_created(task)
    settle(clock, http)
    assert agent.tasks == {}
    await store.add_fleet_member(URL, utc_now_from(0), event("fleet.added", clock))
    dispatcher.fleet_changed()
    settle(clock, http)
    assert set(agent.tasks) == {task.task_id}
    assert [link.url for link in dispatcher.links] == [URL]
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_member_removed_is_told_to_leave_and_drops_every_task(tmp_path: Path) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    tasks = [await store.create_task(make_spec(f"echo {n}"), utc_now_from(0)) for n in range(3)]
    dispatcher.task_created(tasks[0])
    settle(clock, http)
    assert len(agent.tasks) == 3 and membership(agent) == "member"
    await store.remove_fleet_member(URL, event("fleet.removed", clock))
    dispatcher.fleet_changed()
    settle(clock, http)
    assert agent.tasks == {}
    assert membership(agent) == "removed"
    assert await store.pending_leaves(10) == []
    assert dispatcher.links == []
    # A new task is not sent to it.
    dispatcher.task_created(await store.create_task(make_spec(), utc_now_from(0)))
    settle(clock, http, 60)
    assert agent.tasks == {}
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_leave_is_delivered_until_acknowledged_even_across_a_restart(
    tmp_path: Path,
) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(make_spec(), utc_now_from(0))
    dispatcher.task_created(task)
    settle(clock, http)
    agent.down = True
    await store.remove_fleet_member(URL, event("fleet.removed", clock))
    dispatcher.fleet_changed()
    settle(clock, http, 5)
    assert [leave.agent_id for leave in await store.pending_leaves(10)] == [AGENT_ID]
    dispatcher.stopService()
    # The server restarts; the agent is back.
    agent.down = False
    fresh = Dispatcher(store, http, clock, [], signer=signer(clock), jitter=lambda: 1.0)
    fresh.startService()
    settle(clock, http)
    assert agent.tasks == {} and membership(agent) == "removed"
    assert await store.pending_leaves(10) == []
    fresh.stopService()


@pytest_twisted.ensureDeferred
async def test_a_revoked_agent_is_told_to_leave_signed_for_its_identity(tmp_path: Path) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(make_spec(), utc_now_from(0))
    dispatcher.task_created(task)
    settle(clock, http)
    assert set(agent.tasks) == {task.task_id}
    await store.revoke_agent(AGENT_ID, utc_now_from(0), event("agent.revoked", clock))
    dispatcher.fleet_changed()
    settle(clock, http)
    assert agent.tasks == {}
    assert membership(agent) == "revoked"
    # Said again after a restart of the agent: the data folder keeps it.
    assert (tmp_path / "agent" / "membership").read_text().strip() == "revoked"
    dispatcher.stopService()


async def instruct(agent: AgentFront, body: bytes) -> tuple[int, Any]:
    path = "/api/v1/agent/leave"
    api: Any = agent.agent.api
    d = api.request("POST", URL + path, data=body, headers=agent.agent.signed("POST", path, body))
    agent.agent.settle()
    response = await d
    return response.code, json.loads(await api.content(response))


@pytest_twisted.ensureDeferred
async def test_the_agent_takes_a_leave_with_a_known_reason_and_ignores_new_fields(
    tmp_path: Path,
) -> None:
    agent = AgentFront(tmp_path / "agent", Clock())
    code, body = await instruct(agent, b'{"reason": "retired"}')
    assert (code, body["error"]["code"]) == (400, "invalid_request")
    assert membership(agent) == "member"
    code, body = await instruct(agent, b'{"reason": "removed", "from_a_newer_server": 1}')
    assert code == 200
    assert body == {"agent_id": str(AGENT_ID), "status": "left", "reason": "removed"}
    assert membership(agent) == "removed"
    code, _ = await instruct(agent, b'{"reason": "removed"}')  # again: still 200
    assert code == 200


class Router(Resource):
    """Agent A's real app; anything sent to another host hangs, never answered."""

    isLeaf = True

    def __init__(self, agent: AgentFront) -> None:
        super().__init__()
        self.agent = agent
        self.hung = 0

    def render(self, request: Any) -> Any:
        if request.getHeader(b"host") == b"agent-a:8081":
            return self.agent.render(request)
        if request.path == b"/api/v1/agent/leave":
            self.hung += 1
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_an_agent_that_never_answers_holds_up_no_other_leave(tmp_path: Path) -> None:
    clock = Clock()
    store = MemoryStore()
    await store.set_fleet([URL, OTHER])
    now = utc_now_from(0)
    await store.enrol_agent(
        OTHER_ID, OTHER, "sha256:" + "b" * 64, now, AuditEvent(now, "join:t", "x", "y", "")
    )
    await enrol(store, clock)
    agent = AgentFront(tmp_path / "agent", clock)
    router = Router(agent)
    http = StubTreq(router)
    dispatcher = Dispatcher(store, http, clock, [], signer=signer(clock), jitter=lambda: 1.0)
    dispatcher.startService()
    await store.remove_fleet_member(OTHER, event("fleet.removed", clock))  # told first
    await store.remove_fleet_member(URL, event("fleet.removed", clock))
    dispatcher.fleet_changed()
    settle(clock, http)
    assert router.hung == 1
    assert membership(agent) == "removed"
    assert [leave.agent_id for leave in await store.pending_leaves(10)] == [OTHER_ID]
    dispatcher.stopService()
