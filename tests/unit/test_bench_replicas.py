"""Scenario 8's pure parts: the simulated agents' result bodies (read back by the
server's own parsers), their reporting and failover between replicas (on a Clock,
against fake servers over StubTreq), their runs of instants, and the figures."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from bench.contract import Figure, problems
from bench.fleetsim import rotated
from bench.replicaprobe import (
    freshness_figures,
    latency_figures,
    next_instant,
    parse_instant,
    profile_top,
)
from bench.simresults import SimReporter, SimRuns, result_body
from taskscheduler.agent.server_client import ServerClient
from taskscheduler.protocol import ResultStatus, parse_result, parse_result_batch
from taskscheduler.schedule import Grid, utc_now_from
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, FakeServer, UnreachableHttp

A, B = "http://replica-a.test:8080", "http://replica-b.test:8080"
TASK = uuid.UUID(int=7)


class Routed:
    """treq to two fake replicas, by URL; each can be made unreachable or down."""

    def __init__(self) -> None:
        self.servers = {A: FakeServer(), B: FakeServer()}
        self.http = {
            url: UnreachableHttp(StubTreq(s.app.resource())) for url, s in self.servers.items()
        }

        #: While set, requests wait here until :meth:`release`.
        self.held: list[tuple[Deferred[Any], tuple[Any, ...], dict[str, Any]]] | None = None

    def release(self) -> None:
        held, self.held = self.held or [], None
        for d, args, kwargs in held:
            self.request(*args, **kwargs).chainDeferred(d)

    def _for(self, url: str) -> UnreachableHttp:
        return next(h for base, h in self.http.items() if url.startswith(base))

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        if self.held is not None:
            d: Deferred[Any] = Deferred()
            self.held.append((d, (method, url), kwargs))
            return d
        return self._for(url).request(method, url, **kwargs)

    def content(self, response: Any) -> Any:
        return self.http[A].content(response)

    def flush(self) -> None:
        for http in self.http.values():
            http.flush()


class FakeAgent:
    def __init__(self, index: int, client: ServerClient) -> None:
        self.index = index
        self.agent_id = uuid.UUID(int=1000 + index)
        self.client = client
        self.tasks: dict[uuid.UUID, int] = {}
        self.arrived: dict[uuid.UUID, float] = {}


def fleet(count: int = 1) -> tuple[Clock, Routed, SimReporter, list[FakeAgent]]:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS)
    routed = Routed()
    reporter = SimReporter(clock, jitter=lambda: 1.0)
    agents = [
        FakeAgent(i, ServerClient(routed, clock, rotated([A, B], i), credential="agent_x"))
        for i in range(count)
    ]
    return clock, routed, reporter, agents


def settle(clock: Clock, routed: Routed, seconds: float = 0.0) -> None:
    for _ in range(5):
        routed.flush()
    clock.advance(seconds)
    for _ in range(5):
        routed.flush()


def body(agent: FakeAgent, k: int) -> bytes:
    return result_body(agent.agent_id, TASK, ANCHOR + timedelta(seconds=k), 3, 0.01)


def test_a_result_body_is_read_back_by_the_servers_own_parsers() -> None:
    agent_id = uuid.uuid4()
    at = ANCHOR + timedelta(seconds=10)
    raw = result_body(agent_id, TASK, at, 4, 0.25)
    result = parse_result(json.loads(raw), TASK)
    assert result.key == (TASK, agent_id, at)
    assert (result.status, result.exit_code, result.revision) == (ResultStatus.SUCCEEDED, 0, 4)
    assert result.started_at == at and result.finished_at == at + timedelta(seconds=0.25)
    assert result.stdout.data.startswith(b"sim ") and result.final
    batch = parse_result_batch(json.loads(b'{"results":[' + raw + b"," + raw + b"]}"))
    assert batch == [result, result]


def test_one_result_goes_alone_and_a_pile_as_one_batch_with_the_agents_credential() -> None:
    clock, routed, reporter, [agent] = fleet()
    routed.held = []
    reporter.add(agent, TASK, ANCHOR, body(agent, 0))
    for k in range(1, 4):  # spooled while the first is in flight
        reporter.add(agent, TASK, ANCHOR + timedelta(seconds=k), body(agent, k))
    assert len(routed.held) == 1
    routed.release()
    settle(clock, routed)
    server = routed.servers[A]
    assert server.requests == [("single", 1), ("batch", 3)]
    assert len(server.stored) == 4 and not routed.servers[B].stored
    assert set(server.authorizations) == {"Bearer agent_x"}
    assert reporter.stats.acknowledged == 4 and reporter.waiting() == 0


def test_an_unreachable_replica_sends_the_agent_to_the_other_losing_and_doubling_nothing() -> None:
    clock, routed, reporter, agents = fleet(2)
    routed.http[A].unreachable = True
    for agent in agents:
        reporter.add(agent, TASK, ANCHOR, body(agent, 0))
    settle(clock, routed)
    # The agent's own client moved to B and sent it there at once.
    assert agents[0].client.url == B and agents[0].client.servers.failovers == 1
    stored = routed.servers[B].stored
    assert len(stored) == 2 and reporter.waiting() == 0 and not routed.servers[A].stored
    assert reporter.stats.acknowledged == 2


def test_results_no_replica_takes_wait_for_the_back_off_and_go_once() -> None:
    clock, routed, reporter, [agent] = fleet()
    routed.servers[A].down = True  # 503
    routed.http[B].unreachable = True
    reporter.add(agent, TASK, ANCHOR, body(agent, 0))
    settle(clock, routed)
    assert reporter.waiting() == 1 and reporter.stats.failed_requests == 1
    routed.http[B].unreachable = False
    settle(clock, routed, 0.9)
    assert reporter.waiting() == 1  # still backing off (1 s)
    settle(clock, routed, 0.2)
    assert reporter.waiting() == 0 and len(routed.servers[B].stored) == 1
    assert reporter.stats.acknowledged == 1 and not routed.servers[A].stored


def test_a_refusal_is_a_verdict_not_a_reason_to_move() -> None:
    clock, routed, reporter, [agent] = fleet()
    routed.servers[A].conflicting.add(TASK)
    reporter.add(agent, TASK, ANCHOR, body(agent, 0))
    settle(clock, routed)
    assert agent.client.url == A and sum(reporter.stats.refused.values()) == 1
    assert reporter.waiting() == 0 and reporter.stats.acknowledged == 0


def test_agents_are_spread_over_the_replicas() -> None:
    assert [rotated([A, B], i)[0] for i in range(4)] == [A, B, A, B]
    assert rotated([A, B, "c"], 2) == ["c", A, B]


def test_runs_an_instant_on_the_agents_that_held_the_task_before_it() -> None:
    clock, routed, reporter, agents = fleet(3)
    runs = SimRuns(clock, agents, reporter, run_seconds=0.01)
    grid = Grid(ANCHOR, timedelta(seconds=5))
    now = clock.seconds()
    agents[0].tasks[TASK], agents[0].arrived[TASK] = 2, now
    agents[1].tasks[TASK], agents[1].arrived[TASK] = 2, now
    runs.held(TASK, grid)
    clock.advance(4.0)
    agents[2].tasks[TASK], agents[2].arrived[TASK] = 2, clock.seconds() + 2.0  # after it
    settle(clock, routed, 1.1)
    assert runs.instants == 1 and runs.runs == 2
    stored = {**routed.servers[A].stored, **routed.servers[B].stored}
    assert {key[1] for key in stored} == {agents[0].agent_id, agents[1].agent_id}
    assert {r.scheduled_at for r in stored.values()} == {utc_now_from(ANCHOR_SECONDS + 5)}
    assert {r.revision for r in stored.values()} == {2}
    for agent in agents:
        del agent.tasks[TASK]  # deleted: no more instants
    settle(clock, routed, 5.0)
    assert runs.instants == 2 and runs.runs == 2 and not clock.getDelayedCalls()


def test_latency_and_freshness_figures() -> None:
    samples = [("read", "a", 0.001 * i, 200) for i in range(1, 101)]
    samples += [("read", "b", 0.5, 503), ("read", "b", 0.002, 0), ("read", "b", 0.003, 200)]
    figures = latency_figures(samples)["read"]
    assert (figures["n"], figures["errors"]) == (103, 2)
    # 101 answered: 1..100 ms and a 3 ms (nearest rank)
    assert figures["p50_ms"] == 50.0 and figures["p99_ms"] == 99.0
    assert figures["p99_by_replica"] == {"a": 99.0, "b": 3.0}
    fresh = freshness_figures([0.05, None, 0.02, 0.2])
    assert fresh == {"n": 4, "never": 1, "p50_ms": 50.0, "p99_ms": 200.0, "max_ms": 200.0}
    assert freshness_figures([])["p99_ms"] is None


def test_next_instant_is_strictly_after() -> None:
    first = parse_instant("2026-12-01T03:00:00Z")
    assert next_instant(first, 2.0, first - timedelta(seconds=5)) == first
    assert next_instant(first, 2.0, first) == first + timedelta(seconds=2)
    assert next_instant(first, 2.0, first + timedelta(seconds=3)) == first + timedelta(seconds=4)


def test_scenario_8_figures_keep_the_suites_contract() -> None:
    record = Figure("8-replicas", "p99 latest output under the fleet", 12.5, "ms").record()
    assert problems(record) == []


def test_profile_top_shares_of_samples() -> None:
    raw = "\n".join(
        [
            "run (twistd:1);handle (taskscheduler/server/api.py:3);_doit (txpostgres.py:9) 6",
            "run (twistd:1);doPoll (epollreactor.py:2) 3",
            "run (twistd:1);handle (taskscheduler/server/api.py:3) 1",
            "not a line",
        ]
    )
    top = profile_top(raw)
    assert top["samples"] == 10
    assert top["own"][:2] == [("_doit (txpostgres.py:9)", 0.6), ("doPoll (epollreactor.py:2)", 0.3)]
    assert top["ours"] == [("handle (taskscheduler/server/api.py:3)", 0.7)]
