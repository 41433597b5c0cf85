"""Two server replicas' dispatchers on one store (and one lease store), on a task.Clock,
through StubTreq over fake agents: each agent is delivered to by one replica, its share;
a dead replica's agents are taken over once its leases expire."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from taskscheduler.schedule import utc_now_from
from taskscheduler.server.dispatch import Dispatcher
from taskscheduler.server.leases import LeaseKeeper
from taskscheduler.server.store.leases import MemoryLeases
from taskscheduler.server.store.memory import MemoryStore
from tests.unit.test_dispatch import FakeAgent, spec

TTL = 10.0
RENEW = 2.0
URLS = [f"http://agent-{n}:8081" for n in range(4)]


class Agents(Resource):
    """Four fake agents by host name; who sent each request (which replica)."""

    isLeaf = True

    def __init__(self, who: str, agents: dict[str, FakeAgent], senders: dict[str, set[str]]):
        super().__init__()
        self._who = who
        self._agents = agents
        self._senders = senders

    def render(self, request: Any) -> Any:
        host = request.getHeader(b"host").decode()
        self._senders.setdefault(f"http://{host}", set()).add(self._who)
        return self._agents[f"http://{host}"].app.resource().render(request)


class Replica:
    def __init__(
        self,
        who: str,
        store: MemoryStore,
        leases: MemoryLeases,
        clock: Clock,
        agents: dict[str, FakeAgent],
        senders: dict[str, set[str]],
    ) -> None:
        self.keeper = LeaseKeeper(
            leases, clock, who, ttl=TTL, renew_every=RENEW, monotonic=clock.seconds
        )
        self.http = StubTreq(Agents(who, agents, senders))
        self.dispatcher = Dispatcher(
            store, self.http, clock, URLS, keeper=self.keeper, jitter=lambda: 1.0
        )

    def start(self) -> None:
        self.keeper.startService()
        self.dispatcher.startService()

    @property
    def linked(self) -> set[str]:
        return {link.url for link in self.dispatcher.links}


def run(clock: Clock, replicas: list[Replica], seconds: float) -> None:
    """Time passes, a quarter second at a time; no agent is ever linked by two replicas."""
    for _ in range(max(1, int(seconds / 0.25))):
        clock.advance(0.25)
        for replica in replicas:
            replica.http.flush()
        clock.advance(0)
        for replica in replicas:
            replica.http.flush()
        linked = [replica.linked for replica in replicas]
        assert not set.intersection(*linked), f"an agent linked twice: {linked}"


@pytest_twisted.ensureDeferred
async def test_each_agent_is_delivered_to_by_one_replica_and_taken_over_when_it_dies() -> None:
    clock = Clock()
    store = MemoryStore()
    await store.start()
    await store.set_fleet(URLS)
    leases = MemoryLeases(clock)
    agents = {url: FakeAgent() for url in URLS}
    senders: dict[str, set[str]] = {}
    a, b = (Replica(who, store, leases, clock, agents, senders) for who in "ab")
    both = [a, b]
    a.start()
    run(clock, both, 1)
    assert a.linked == set(URLS)  # alone, it has them all
    b.start()
    run(clock, both, 3 * RENEW)
    assert len(a.linked) == 2 and len(b.linked) == 2
    senders.clear()

    task = await store.create_task(spec(), utc_now_from(0))
    for replica in both:  # each told (locally, or through the change bus)
        replica.dispatcher.task_created(task)
    run(clock, both, 1)
    assert all(set(agent.tasks) == {task.task_id} for agent in agents.values())
    assert all(senders[url] == {"a" if url in a.linked else "b"} for url in URLS), senders
    assert sum(len(agent.batches) for agent in agents.values()) == 4  # once each

    # b dies (no more renewals, no release): a links its agents once their leases
    # expired, and delivers what was created meanwhile.
    leases.unreachable.add("b")
    assert b.keeper._loop is not None
    b.keeper._loop.stop()
    died = clock.seconds()
    late = await store.create_task(spec("echo late"), utc_now_from(0))
    a.dispatcher.task_created(late)
    while a.linked != set(URLS):
        run(clock, both, 0.25)
        assert clock.seconds() - died <= TTL + RENEW, a.linked
    assert b.linked == set()
    run(clock, both, 1)
    assert all(late.task_id in agent.tasks for agent in agents.values())
    a.dispatcher.stopService()
    b.dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_member_added_at_run_time_is_linked_by_one_replica() -> None:
    clock = Clock()
    store = MemoryStore()
    await store.start()
    await store.set_fleet(URLS[:3])
    leases = MemoryLeases(clock)
    agents = {url: FakeAgent() for url in URLS}
    senders: dict[str, set[str]] = {}
    a, b = (Replica(who, store, leases, clock, agents, senders) for who in "ab")
    for replica in (a, b):
        replica.start()
    run(clock, [a, b], 3 * RENEW)
    assert sorted([len(a.linked), len(b.linked)]) == [1, 2]
    await store.set_fleet(URLS)
    for replica in (a, b):
        replica.dispatcher.fleet_changed()
    run(clock, [a, b], 3 * RENEW)
    assert a.linked | b.linked == set(URLS)
    assert sorted([len(a.linked), len(b.linked)]) == [2, 2]
    a.dispatcher.stopService()
    b.dispatcher.stopService()
