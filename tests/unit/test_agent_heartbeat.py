"""The agent's heartbeat loop and membership, on a task.Clock, against the server's real
Klein app through StubTreq."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from treq.testing import StubTreq
from twisted.logger import Logger, formatEvent

from taskscheduler.agent.heartbeat import HeartbeatLoop, Membership
from taskscheduler.agent.server_client import ServerClient
from tests.unit.test_server_api import AGENT_A, AGENTS, CREDENTIALS, Harness, enrol_test_agents


class Beating:
    def __init__(self, h: Harness, tmp_path: Path, agent: Any = AGENT_A) -> None:
        self.h = h
        self.http = StubTreq(h.api.resource())
        self.client = ServerClient(
            self.http, h.clock, "http://server", credential=CREDENTIALS[agent]
        )
        self.membership = Membership(tmp_path / "membership")
        self.logged: list[dict[str, Any]] = []
        self.membership.log = Logger(observer=self.logged.append)
        self.fail_next = False
        self.loop = HeartbeatLoop(self.client, h.clock, self.membership, self.report, 10)
        self.loop.log = Logger(observer=self.logged.append)
        self.agent = agent

    def report(self) -> dict[str, Any]:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("a bug in the counters")
        return {"agent_id": str(self.agent), "tasks": 1, "running": 0, "spooled": 0}

    def advance(self, seconds: float) -> None:
        self.h.clock.advance(seconds)
        self.http.flush()
        self.h.clock.advance(0)
        self.http.flush()

    def lines(self, words: str) -> list[str]:
        return [formatEvent(e) for e in self.logged if words in formatEvent(e)]


async def harness(fleet: list[str]) -> Harness:
    h = Harness()
    await h.store.set_fleet(fleet)
    await enrol_test_agents(h.store)
    return h


@pytest_twisted.ensureDeferred
async def test_heartbeats_keep_the_agent_online_every_interval(tmp_path: Path) -> None:
    h = await harness(AGENTS)
    b = Beating(h, tmp_path)
    b.loop.start()
    b.advance(0)
    agent = await h.store.get_agent(AGENT_A)
    assert agent is not None and agent.last_seen_at is not None
    first = agent.last_seen_at
    b.advance(10)
    agent = await h.store.get_agent(AGENT_A)
    assert agent is not None and (agent.last_seen_at - first).total_seconds() == 10
    assert agent.heartbeat is not None and agent.heartbeat.tasks == 1
    assert b.membership.in_fleet is True
    b.loop.stop()


@pytest_twisted.ensureDeferred
async def test_outside_the_fleet_the_agent_warns_once_per_change(tmp_path: Path) -> None:
    h = await harness(AGENTS[1:])
    b = Beating(h, tmp_path)
    b.loop.start()
    for _ in range(4):
        b.advance(10)
    assert b.membership.in_fleet is False
    assert len(b.lines("not in its server's fleet")) == 1
    await h.store.set_fleet(AGENTS)
    b.advance(10)
    b.advance(10)
    assert b.membership.in_fleet is True
    assert len(b.lines("is in its server's fleet")) == 1
    b.loop.stop()


@pytest_twisted.ensureDeferred
async def test_a_refused_credential_is_said_once_and_the_loop_survives_errors(
    tmp_path: Path,
) -> None:
    h = await harness(AGENTS)
    b = Beating(h, tmp_path)
    await h.request("DELETE", f"/api/v1/agents/{AGENT_A}")
    h.access.forget_agents()
    b.fail_next = True
    b.loop.start()
    b.advance(0)
    assert len(b.lines("could not send a heartbeat")) == 1
    for _ in range(3):
        b.advance(10)
    assert len(b.lines("was this agent revoked?")) == 1
    assert b.loop._loop.running


def test_membership_is_kept_in_the_data_folder_and_a_removed_agent_added_back_is_a_member(
    tmp_path: Path,
) -> None:
    path = tmp_path / "membership"
    membership = Membership(path)
    logged: list[dict[str, Any]] = []
    membership.log = Logger(observer=logged.append)
    assert membership.state == "member" and not path.exists()
    membership.left("removed", 3)
    membership.left("removed", 0)  # told again (its confirmation was lost): said once
    assert [formatEvent(e) for e in logged] == [
        "the server told this agent to leave the fleet (removed): dropped 3 tasks; it runs "
        "nothing until an operator adds it again"
    ]
    assert Membership(path).state == "removed"
    membership.heard(True)
    assert membership.state == "member" and Membership(path).state == "member"
    membership.left("revoked", 0)
    membership.heard(True)  # an answer never undoes a revocation
    assert Membership(path).state == "revoked"
