"""Two replicas' CacheSync over change buses on one fake database and one store: each
API callback acts on its own replica and on the other through the same handlers; a
resync drops every cache and makes the dispatcher read and deliver again."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from taskscheduler.schedule import utc_now_from
from taskscheduler.server.cache_sync import CacheSync
from taskscheduler.server.notify.notifier import Notifier
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.records import AgentRecord, AuditEvent, Task
from tests.unit.test_changes import FakeDatabase, Replica
from tests.unit.test_store_contract import make_spec

URL = "http://agent-a:8081"
AGENT_ID = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000009")
NOW = utc_now_from(1_800_000_000)


class Calls:
    """Records the calls made to it (the dispatcher, notifier, access and metrics)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.links = [Link(), Link()]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, *args))


class Link:
    def __init__(self) -> None:
        self.kicks = 0

    def kick(self) -> None:
        self.kicks += 1


class Side:
    def __init__(self, name: str, database: FakeDatabase, clock: Clock, store: Any) -> None:
        self.replica = Replica(name, database, clock)
        self.dispatcher, self.notifier, self.access, self.metrics = (
            Calls(),
            Calls(),
            Calls(),
            Calls(),
        )
        self.sync = CacheSync(
            self.replica.bus,
            store,
            self.dispatcher,  # type: ignore[arg-type]
            self.notifier,  # type: ignore[arg-type]
            self.access,  # type: ignore[arg-type]
            self.metrics,  # type: ignore[arg-type]
        )

    def forget(self) -> None:
        for part in (self.dispatcher, self.notifier, self.access, self.metrics):
            part.calls.clear()
        for link in self.dispatcher.links:
            link.kicks = 0


@pytest.fixture
def world() -> tuple[Side, Side, MemoryStore, FakeDatabase, Clock]:
    database, clock, store = FakeDatabase(), Clock(), MemoryStore()
    a, b = Side("a", database, clock, store), Side("b", database, clock, store)
    a.replica.bus.startService()
    b.replica.bus.startService()
    clock.advance(0)
    a.forget()
    b.forget()
    return a, b, store, database, clock


@pytest.fixture
def sides(world: Any) -> tuple[Side, Side, MemoryStore]:
    return world[:3]


def audit(action: str) -> AuditEvent:
    return AuditEvent(NOW, "operator:alice", action, "x", "")


async def a_task(store: MemoryStore) -> Task:
    return await store.create_task(make_spec(), NOW, audit("task.created"))


@pytest_twisted.ensureDeferred
async def test_a_task_created_on_one_replica_is_delivered_and_known_on_both(sides: Any) -> None:
    a, b, store = sides
    task = await a_task(store)
    a.sync.task_created(task)
    assert a.dispatcher.calls == [("task_created", task)]
    assert a.notifier.calls == [("task_changed", task)]
    # B reads it, and calls the same handlers.
    assert b.dispatcher.calls == [("task_created", task)]
    assert b.notifier.calls == [("forget_task", task.task_id), ("task_changed", task)]


@pytest_twisted.ensureDeferred
async def test_a_task_changed_elsewhere_is_read_again_not_taken_from_the_cache(
    sides: Any,
) -> None:
    a, b, store = sides
    task = await a_task(store)
    paused = await store.pause_task(task.task_id, NOW, audit("task.paused"))
    assert paused is not None
    changed = paused[0]
    assert changed.paused
    a.sync.task_changed(changed)
    assert b.dispatcher.calls == [("task_changed", changed)]
    assert b.notifier.calls[-1] == ("task_changed", changed)
    deleted = await store.delete_task(task.task_id, NOW, audit("task.deleted"))
    assert deleted is not None
    a.sync.task_deleted(deleted)
    assert b.dispatcher.calls[-1] == ("task_deleted", deleted)


def test_an_agent_revoked_on_one_replica_is_forgotten_on_the_other(sides: Any) -> None:
    a, b, _ = sides
    agent = AgentRecord(AGENT_ID, URL, NOW)
    a.sync.agent_revoked(agent)
    assert a.access.calls == [], "the route drops its own replica's cache"
    assert b.access.calls == [("forget_agents",)]
    assert b.metrics.calls == [("forget_agent", AGENT_ID)]


def test_an_agent_enrolled_on_one_replica_gets_its_tasks_from_either(sides: Any) -> None:
    a, b, _ = sides
    a.sync.agent_enrolled(AgentRecord(AGENT_ID, URL, NOW))
    for side in (a, b):
        assert side.dispatcher.calls == [("agent_enrolled", URL)]
        assert side.access.calls == [("forget_agents",)]


def test_fleet_and_label_changes_reach_the_other_dispatcher(sides: Any) -> None:
    a, b, _ = sides
    a.sync.fleet_changed()
    b.sync.agent_relabelled(URL)
    assert a.dispatcher.calls == [("fleet_changed",), ("agent_relabelled", URL)]
    assert b.dispatcher.calls == [("fleet_changed",), ("agent_relabelled", URL)]


def test_a_reconnection_drops_every_cache_reads_the_fleet_and_delivers(world: Any) -> None:
    _, b, _, database, clock = world
    [listener] = [s for s in database.open_sessions() if s.observers[0].__self__ is b.replica.bus]
    listener.break_()
    clock.advance(0)
    assert b.access.calls == [("forget_agents",)]
    assert b.notifier.calls == [("forget_tasks",)]
    assert b.dispatcher.calls == [("fleet_changed",)]
    assert [link.kicks for link in b.dispatcher.links] == [1, 1]


@pytest_twisted.ensureDeferred
async def test_a_task_deleted_for_good_is_only_forgotten(sides: Any) -> None:
    a, b, store = sides
    task = await a_task(store)
    gone = dataclasses.replace(task.spec, task_id=uuid.uuid4())
    a.sync.task_changed(dataclasses.replace(task, spec=gone))  # not in the store
    assert b.notifier.calls == [("forget_task", gone.task_id)]
    assert b.dispatcher.calls == []


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get_task(self, task_id: uuid.UUID) -> Task | None:
        self.reads += 1
        return await super().get_task(task_id)


@pytest_twisted.ensureDeferred
async def test_the_webhook_notifier_judges_with_the_task_another_replica_changed() -> None:
    database, clock, store = FakeDatabase(), Clock(), CountingStore()
    a, b = Side("a", database, clock, store), Side("b", database, clock, store)
    notifier = Notifier(store, None, clock, b"secret")
    b.sync = CacheSync(b.replica.bus, store, b.dispatcher, notifier, b.access, b.metrics)  # type: ignore[arg-type]
    a.replica.bus.startService()
    b.replica.bus.startService()
    clock.advance(0)
    task = await a_task(store)
    assert await notifier._task(task.task_id) == task  # cached for seconds from now on
    paused = await store.pause_task(task.task_id, NOW, audit("task.paused"))
    assert paused is not None
    a.sync.task_changed(paused[0])
    reads = store.reads
    assert await notifier._task(task.task_id) == paused[0]
    assert store.reads == reads, "read once by the sync, not again"
    # A reconnection: anything may have changed, so it is read again.
    [listener] = [s for s in database.open_sessions() if s.observers[0].__self__ is b.replica.bus]
    listener.break_()
    clock.advance(0)
    assert await notifier._task(task.task_id) == paused[0]
    assert store.reads == reads + 1


@pytest_twisted.ensureDeferred
async def test_a_task_changed_elsewhere_is_not_judged_from_the_cache_while_it_is_read() -> None:
    database, clock, store = FakeDatabase(), Clock(), CountingStore()
    a, b = Side("a", database, clock, store), Side("b", database, clock, store)
    notifier = Notifier(store, None, clock, b"secret")
    b.sync = CacheSync(b.replica.bus, store, b.dispatcher, notifier, b.access, b.metrics)  # type: ignore[arg-type]
    a.replica.bus.startService()
    b.replica.bus.startService()
    clock.advance(0)
    task = await a_task(store)
    assert await notifier._task(task.task_id) == task
    paused = await store.pause_task(task.task_id, NOW, audit("task.paused"))
    assert paused is not None
    gate: Deferred[None] = Deferred()
    real_get = store.get_task

    async def slow_get(task_id: uuid.UUID) -> Task | None:
        await gate
        return await real_get(task_id)

    store.get_task = slow_get  # type: ignore[method-assign]
    a.sync.task_changed(paused[0])  # B's read of it waits
    looked_up = Deferred.fromCoroutine(notifier._task(task.task_id))
    assert not looked_up.called, "not the stale task from the cache: read again"
    gate.callback(None)
    assert await looked_up == paused[0]
