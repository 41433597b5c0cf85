"""The agents an execution misses, as operators see them (``latest_output``, a history
page, one execution) in a fleet of many agents, on both stores: named as the rule names
them (:func:`fleet.missing_agents` over every agent), and read at the cost of the
execution, not of the fleet (no route lists every agent; PostgreSQL probes an index per
expected URL)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from taskscheduler.protocol import RunResult
from taskscheduler.protocol.options import Target, TaskOptions, frozen_map
from taskscheduler.schedule import format_instant, instant, utc_now_from
from taskscheduler.server.store.fleet import missing_agents
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.records import AuditEvent, Execution
from tests.unit.test_server_api import START
from tests.unit.test_server_api import Harness as ApiHarness
from tests.unit.test_store_contract import make_spec
from tests.unit.test_store_contract import result as contract_result

NOW = utc_now_from(START)
#: Fleet members: an agent at each but the last two (nobody enrolled there yet).
MEMBERS = [f"http://member-{i:02d}:8081" for i in range(30)]
#: Agents enrolled outside the fleet: assigned nothing, expected by nothing.
OUTSIDERS = [f"http://outside-{i:02d}:8081" for i in range(20)]


def agent_id(n: int) -> uuid.UUID:
    return uuid.UUID(int=0xA9E47 << 64 | n)


def event(action: str, target: uuid.UUID) -> AuditEvent:
    return AuditEvent(NOW, "operator:ops", action, str(target), "")


async def enrol(store: Store, n: int, url: str, zone: str) -> uuid.UUID:
    await store.enrol_agent(
        agent_id(n), url, f"sha256:{n:064x}", NOW, event("agent.enrolled", agent_id(n)),
        {"zone": zone},
    )  # fmt: skip
    return agent_id(n)


class Fleet:
    """Many agents: at members (zone eu at even ones, us at odd ones), outside the fleet
    (eu), one revoked before the runs (its URL barred), one re-enrolled at its URL; two
    tasks (one for every member, one targeting zone eu) whose first run a few agents
    report, then some agents revoked, one URL released and taken by a new agent."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.ids: dict[str, uuid.UUID] = {}

    async def build(self) -> tuple[uuid.UUID, uuid.UUID]:
        store = self.store
        await store.set_fleet(MEMBERS)
        for i, url in enumerate(MEMBERS[:28]):
            self.ids[url] = await enrol(store, i, url, "eu" if i % 2 == 0 else "us")
        for i, url in enumerate(OUTSIDERS):
            await enrol(store, 100 + i, url, "eu")
        # Revoked before the runs: member 2 is expected by neither task.
        await store.revoke_agent(self.ids[MEMBERS[2]], NOW, event("agent.revoked", agent_id(2)))
        # Revoked, released, and a new agent at member 4.
        await store.revoke_agent(self.ids[MEMBERS[4]], NOW, event("agent.revoked", agent_id(4)))
        await store.release_agent_url(self.ids[MEMBERS[4]], NOW, event("url.released", agent_id(4)))
        self.ids[MEMBERS[4]] = await enrol(store, 204, MEMBERS[4], "eu")
        every = await store.create_task(make_spec("every", anchor=NOW), NOW)
        target = Target(labels=frozen_map({"zone": "eu"}))
        eu = await store.create_task(
            dataclasses.replace(make_spec("eu", anchor=NOW), options=TaskOptions(target=target)),
            NOW,
        )
        for task in (every, eu):
            # Members 0 and 6 report; member 1 only for the task it runs.
            reporters = [0, 6] + ([1] if task is every else [])
            await store.record_results(
                [result(task.task_id, agent_id(i), 1, anchor=NOW) for i in reporters], NOW
            )
        # After the runs: member 6 (reported) and 8 (did not) revoked; member 10's agent
        # revoked, its URL released and another agent enrolled there.
        for i in (6, 8, 10):
            await store.revoke_agent(agent_id(i), NOW, event("agent.revoked", agent_id(i)))
        await store.release_agent_url(agent_id(10), NOW, event("url.released", agent_id(10)))
        self.ids[MEMBERS[10]] = await enrol(store, 210, MEMBERS[10], "eu")
        return every.task_id, eu.task_id


def result(task_id: uuid.UUID, agent: uuid.UUID, k: int, anchor: datetime) -> RunResult:
    """Run ``k`` of a task anchored at ``anchor``, every 30 seconds."""
    at = instant(anchor, timedelta(seconds=30), k)
    return dataclasses.replace(
        contract_result(task_id, agent, k),
        scheduled_at=at,
        started_at=at + timedelta(milliseconds=1),
        finished_at=at + timedelta(milliseconds=20),
    )


class Harness(ApiHarness):
    """The API harness over either store: a PostgreSQL store answers on the real
    reactor, so the stub's pending responses are flushed until the request is done."""

    async def request(self, *args: Any, **kwargs: Any) -> tuple[int, Any]:
        done = Deferred.fromCoroutine(ApiHarness.request(self, *args, **kwargs))
        for _ in range(2000):  # 10 s at most
            if done.called:
                break
            self.http.flush()
            await deferLater(reactor, 0.005, lambda: None)
        assert done.called, "the request was not answered"
        answer: tuple[int, Any] = await done
        return answer


def oracle(execution: Execution, everyone: list[Any]) -> list[dict[str, str | None]]:
    """The missing agents as the routes named them before: the rule over every agent."""
    return [
        {"url": url, "agent_id": None if a is None else str(a)}
        for url, a in missing_agents(execution.expected_urls, execution.results, everyone)
    ]


async def views(h: Harness, task_id: uuid.UUID) -> list[Any]:
    """The missing agents of the task's first run on each route that shows them."""
    at = format_instant(instant(NOW, timedelta(seconds=30), 1))
    code, latest = await h.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200, latest
    code, page = await h.request("GET", f"/api/v1/tasks/{task_id}/executions")
    assert code == 200, page
    code, one = await h.request("GET", f"/api/v1/tasks/{task_id}/executions/{at}")
    assert code == 200, one
    [in_page] = page["executions"]
    return [latest["missing_agents"], in_page["missing_agents"], one["missing_agents"]]


@pytest_twisted.ensureDeferred
async def test_the_missing_agents_are_named_among_many_agents(store: Store) -> None:
    fleet = Fleet(store)
    every, eu = await fleet.build()
    h = Harness(store)  # type: ignore[arg-type]
    h.clock.advance(30 + 10 + 30 + 30 + 1)  # past run 1's time limit and grace
    everyone = await store.list_agents()
    assert len(everyone) == 28 + 20 + 2
    ids = fleet.ids
    for task_id in (every, eu):
        [execution] = await store.list_executions(task_id, 10)
        for shown in await views(h, task_id):
            assert shown == oracle(execution, everyone)
    # What a user sees, pinned: every member expected bar 2 (revoked before the run);
    # 0, 1 and 6 reported (6 revoked since); 8 named as its revoked agent; 10 as the
    # agent enrolled there since; 28 and 29, where nobody enrolled, by URL alone.
    [every_view, *_] = await views(h, every)
    named = {m["url"]: m["agent_id"] for m in every_view}
    assert list(named) == [u for i, u in enumerate(MEMBERS) if i not in (0, 1, 2, 6)]
    assert named[MEMBERS[8]] == str(agent_id(8))
    assert named[MEMBERS[10]] == str(agent_id(210))
    assert named[MEMBERS[4]] == str(agent_id(204))
    assert named[MEMBERS[28]] is None and named[MEMBERS[29]] is None
    # The targeted task: the members whose agent is in zone eu (even ones with an
    # agent), less 2 (revoked) and the two that reported; nobody outside the fleet.
    [eu_view, *_] = await views(h, eu)
    assert [(m["url"], m["agent_id"]) for m in eu_view] == [
        (u, str(ids[u])) for i, u in enumerate(MEMBERS[:28]) if i % 2 == 0 and i not in (0, 2, 6)
    ]
    assert ids[MEMBERS[8]] == agent_id(8) and ids[MEMBERS[10]] == agent_id(210)


class CountingStore:
    """A store that counts what the routes read of the fleet."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.agents_listed = 0

    async def list_agents(self) -> Any:
        self.agents_listed += 1
        return await self._store.list_agents()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest_twisted.ensureDeferred
async def test_reading_an_execution_does_not_list_the_fleet(store: Store) -> None:
    every, eu = await Fleet(store).build()
    counting = CountingStore(store)
    h = Harness(counting)  # type: ignore[arg-type]
    h.clock.advance(30 + 10 + 30 + 30 + 1)
    for task_id in (every, eu):
        shown = await views(h, task_id)
        assert all(view for view in shown)  # agents are missing: they were named
    assert counting.agents_listed == 0
    if isinstance(store, PostgresStore):
        await _no_agent_scan(store, every)


async def _no_agent_scan(store: PostgresStore, task_id: uuid.UUID) -> None:
    """PostgreSQL reads the agents of the expected URLs by index (never the whole
    table), and only those: the rows read from ``agents`` are a few per expected URL."""
    from taskscheduler.server.store.results import HISTORY_PAGE_SQL, LATEST_OUTPUT_SQL

    async def plans(cursor: Any) -> list[str]:
        # As the table grows, the planner's choice is the index's: pin it here, with
        # 50 agents, by making a scan look as dear as it is at 100,000.
        await cursor.execute("ANALYZE agents")
        await cursor.execute("SET LOCAL enable_seqscan = off")
        texts = []
        for sql, params in (
            (LATEST_OUTPUT_SQL, {"task_id": str(task_id), "now": NOW + timedelta(hours=1),
                                 "grace": timedelta(0)}),
            (HISTORY_PAGE_SQL, {"task_id": str(task_id), "before": None, "limit": 20}),
        ):  # fmt: skip
            await cursor.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
            texts.append(cursor.fetchone()[0])
        return texts

    for plan in await store.db.run(plans):
        nodes = list(_nodes(plan[0]["Plan"]))
        on_agents = [n for n in nodes if n.get("Relation Name") == "agents"]
        assert on_agents, plan
        assert all(n["Node Type"] != "Seq Scan" for n in on_agents), on_agents
        # 30 expected URLs, each probed for its reporter and its holder (a row or two
        # each, once per execution: not again for each result joined), of 50 agents.
        read = sum(n["Actual Rows"] * n["Actual Loops"] for n in on_agents)
        assert read <= 2 * len(MEMBERS), (read, on_agents)


def _nodes(node: dict[str, Any]) -> Any:
    yield node
    for child in node.get("Plans", []):
        yield from _nodes(child)
