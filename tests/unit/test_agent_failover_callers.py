"""Every request of an agent listing several replicas follows the one it chose:
heartbeats, run-on-one claims, enrolment and reports; each switch is logged once, and
every replica down once more, not each request."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.logger import Logger, formatEvent

from taskscheduler.agent.enrolment import Enroller
from taskscheduler.agent.heartbeat import HeartbeatLoop, Membership
from taskscheduler.agent.server_client import (
    Enrolled,
    HeartbeatAnswer,
    Refused,
    RetryLater,
    ServerClient,
)
from taskscheduler.agent.service import AgentConfig, AgentService
from tests.unit.agent_fakes import ANCHOR, FakeRunner, fired, provision, result
from tests.unit.replica_fakes import AGENT_ID, AGENT_URL, TASK, A, B, C, Setup, now

# -- every request follows the chosen server --------------------------------------------


@pytest_twisted.ensureDeferred
async def test_heartbeats_claims_and_reports_follow_the_chosen_server(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.http.refused.add(A)
    beat = {"agent_id": str(AGENT_ID), "tasks": 1, "running": 0, "spooled": 0}
    answer = await s.run(s.client.heartbeat(beat))
    assert isinstance(answer, HeartbeatAnswer) and answer.in_fleet
    # B's verdict on a claim (the task is not run-on-one): asked of B alone.
    at = result(TASK, 1, AGENT_ID).scheduled_at
    claimed = await s.run(s.client.claim(TASK, at, 1, timeout=10))
    assert isinstance(claimed, Refused) and "not_run_on_one" in claimed.reason
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert s.http.asked == [A, B, B, B]
    assert len(s.stored()) == 1


@pytest_twisted.ensureDeferred
async def test_a_heartbeat_loop_logs_no_problem_when_another_replica_answers(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    s.site(A).down = True
    logged: list[dict[str, Any]] = []
    loop = HeartbeatLoop(
        s.client, s.clock, Membership(), lambda: {"agent_id": str(AGENT_ID)}, interval=10
    )
    loop.log = Logger(observer=logged.append)
    loop.start()
    s.settle()
    s.settle(10)
    loop.stop()
    assert s.http.asked == [A, B, B]
    assert logged == []


def test_enrolment_follows_the_chosen_server(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.http.refused.add(A)
    client = ServerClient(s.http, s.clock, (A, B))
    agent_id = uuid.uuid4()
    now(s.store.set_fleet([AGENT_URL, "http://agent2.test:8081"]))
    enrolled: list[Enrolled] = []
    enroller = Enroller(
        client, s.clock, tmp_path, agent_id, "http://agent2.test:8081", s.join, enrolled.append
    )
    enroller.start()
    s.settle()
    assert len(enrolled) == 1 and client.credential is not None
    assert s.http.asked == [A, B] and client.url == B


@pytest_twisted.ensureDeferred
async def test_a_replica_with_no_time_left_is_not_asked(tmp_path: Path) -> None:
    # A claim waits at most until the task's next instant: the failover fits in it.
    s = Setup(tmp_path)
    s.site(A).hang = True
    d = Deferred.fromCoroutine(s.client.claim(TASK, ANCHOR, 1, timeout=2))
    s.settle()
    s.settle(2)
    assert isinstance(await d, RetryLater)
    assert s.http.asked == [A]


# -- logging ----------------------------------------------------------------------------


def test_a_failover_is_logged_once_per_switch_not_per_request(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.http.refused.add(A)
    for k in range(1, 6):
        s.spool_results(k)
        s.reporter.start()
        s.settle(1)
    assert len(s.stored()) == 5
    [warning] = s.warnings()
    assert A in warning and B in warning and "connection refused" in warning


def test_all_servers_down_is_said_once_then_quiet_until_one_answers(tmp_path: Path) -> None:
    s = Setup(tmp_path, urls=(A, B, C))
    s.http.refused = {A, B, C}
    s.spool_results(1)
    s.reporter.start()
    for _ in range(6):
        s.settle(30)
    warnings = s.warnings()
    assert len(warnings) == 3, warnings  # A -> B, B -> C, then "none of the 3"
    assert "none of the 3 servers answers" in warnings[2]
    s.http.refused = {A, C}
    s.settle(30)
    assert len(s.stored()) == 1
    answered = [formatEvent(e) for e in s.logged if "answers again" in formatEvent(e)]
    assert answered == [f"the server at {B} answers again; the agent uses it"]


# -- where it says which replica it uses ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_agents_health_and_metrics_name_the_replica_it_uses(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.http.refused.add(A)
    provision(tmp_path / "data")
    runner = FakeRunner(s.clock)
    service = AgentService(
        AgentConfig(tmp_path / "data", f"{A},{B}"), s.clock, lambda: runner, s.http
    )
    service.startService()
    s.settle()  # the first heartbeat: A refuses, B answers
    assert service.api is not None
    api = StubTreq(service.api.resource())
    health = await api.json_content(await api.get("http://agent.test/api/v1/health"))
    assert health["server"] == B and health["server_failovers"] == 1
    scraped = {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in text_string_to_metric_families(
            generate_latest(service.metrics.registry).decode()
        )
        for sample in family.samples
    }
    assert scraped[("taskscheduler_agent_server", (B,))] == 1
    assert scraped[("taskscheduler_agent_server_failovers_total", ())] == 1
    fired(service.stopService())
