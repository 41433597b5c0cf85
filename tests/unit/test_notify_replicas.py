"""Webhooks among server replicas, on a task.Clock over one memory store: a pending
notification is sent by the replica that claimed it; a replica that cannot renew its
claims starts no attempt it could not finish in time; a dead replica's are taken over
once its claims lapse."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from treq.testing import StubTreq

from taskscheduler.retry import no_jitter
from taskscheduler.server.notify.notifier import DEFAULT_TIMEOUT, Notifier
from taskscheduler.server.store.leases import Claimant
from taskscheduler.server.store.memory import MemoryStore
from tests.unit.test_notify import HOOK, SECRET, Receiver, World

RENEW = 2.0
CLAIM_TTL = 10.0 + DEFAULT_TIMEOUT


class CutStore:
    """One replica's view of the shared store, which the test can cut off from it."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self.cut = False

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.cut:
                raise ConnectionError("the database is out of reach")
            return await method(*args, **kwargs)

        return call


def replica(world: World, who: str, receiver: Receiver) -> tuple[Notifier, CutStore]:
    store = CutStore(world.harness.store)
    notifier = Notifier(
        store,  # type: ignore[arg-type]
        StubTreq(receiver),
        world.clock,
        SECRET,
        backoff=(10.0, 600.0),
        jitter=no_jitter,
        claimant=Claimant(who, CLAIM_TTL),
        renew_every=RENEW,
        monotonic=world.clock.seconds,
    )
    return notifier, store


async def setup() -> tuple[World, Receiver, Receiver, Notifier, CutStore, Notifier]:
    world = World()
    to_a, to_b = Receiver(world.clock, [503, 503]), Receiver(world.clock)
    a, a_store = replica(world, "a", to_a)
    b, _ = replica(world, "b", to_b)
    world.notifier = a
    world.harness.api._on_results_stored = a.results_stored  # a stores the results
    b.startService()  # first: at a given instant, b's claims go before a's renewals
    await world.start()
    return world, to_a, to_b, a, a_store, b


def run(world: World, seconds: float) -> None:
    for _ in range(int(seconds * 4)):
        world.clock.advance(0.25)


@pytest_twisted.ensureDeferred
async def test_a_webhook_is_sent_by_the_replica_that_stored_it_and_no_other() -> None:
    world, to_a, to_b, a, _, b = await setup()
    task_id = await world.create({"url": HOOK})
    await world.report(task_id, 0, 3)
    assert to_a.events() == ["failed"]  # 503: retried 10 s, then 20 s later
    run(world, 35)
    assert to_a.events() == ["failed"] * 3 and to_b.received == []
    [notification] = await world.history(task_id)
    assert (notification["status"], notification["attempts"]) == ("delivered", 3)
    a.stopService()
    b.stopService()


@pytest_twisted.ensureDeferred
async def test_a_replica_cut_off_leaves_its_webhooks_to_another_once_its_claims_lapse() -> None:
    world, to_a, to_b, a, a_store, b = await setup()
    task_id = await world.create({"url": HOOK})
    await world.report(task_id, 0, 3)
    assert to_a.events() == ["failed"]
    cut_at = world.clock.seconds()
    a_store.cut = True  # a cannot renew: its retry 10 s on could outlast its claim
    run(world, CLAIM_TTL + 2 * RENEW)
    assert to_a.events() == ["failed"], "a sent without a claim it could be sure of"
    assert to_b.events() == ["failed"]  # b took it over once a's claim lapsed
    assert to_b.received[0].at >= cut_at - RENEW + CLAIM_TTL
    [notification] = await world.history(task_id)
    assert (notification["status"], notification["attempts"]) == ("delivered", 2)
    a.stopService()
    b.stopService()


@pytest_twisted.ensureDeferred
async def test_a_replica_stopping_gives_its_webhooks_back_for_another_to_send_at_once() -> None:
    world, to_a, to_b, a, _, b = await setup()
    task_id = await world.create({"url": HOOK})
    await world.report(task_id, 0, 3)
    assert to_a.events() == ["failed"]  # 503: a retries in 10 s
    stopped_at = world.clock.seconds()
    await a.stopService()
    run(world, RENEW)
    assert to_b.events() == ["failed"] and to_b.received[0].at <= stopped_at + RENEW
    [notification] = await world.history(task_id)
    assert (notification["status"], notification["attempts"]) == ("delivered", 2)
    b.stopService()
