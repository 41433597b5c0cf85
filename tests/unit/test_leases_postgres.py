"""Leases and webhook claims among replicas on a real PostgreSQL: keepers of separate
stores (separate pools, as separate processes have) on one database; expiry judged by
the database's clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from datetime import timedelta
from typing import Any

import psycopg2
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater

from taskscheduler.server.leases import LeaseKeeper
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.leases import Beat, Claimant, LeaseGroup, Leases
from taskscheduler.server.store.postgres import PostgresStore
from tests.unit.test_store_contract import ANCHOR, make_spec
from tests.unit.test_store_notify import FAILED, seen

TTL = 3.0
RENEW = 0.5
AGENTS = [f"agent:http://a{n}:8081" for n in range(6)]


async def eventually(condition: Callable[[], Any], what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {seconds}s waiting for {what}"
        await deferLater(reactor, 0.05, lambda: None)


def rows(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        conn.close()


class Cut:
    """A replica's lease store, which the test can cut off from the database."""

    def __init__(self, leases: Leases) -> None:
        self._leases = leases
        self.cut = False

    async def beat(
        self, replica_id: str, ttl: float, groups: Sequence[LeaseGroup], release: Collection[str]
    ) -> Beat:
        if self.cut:
            raise ConnectionError("the database is out of reach")
        return await self._leases.beat(replica_id, ttl, groups, release)

    async def release_all(self, replica_id: str) -> None:
        if not self.cut:
            await self._leases.release_all(replica_id)


class Acting:
    """A listener: what it acts on, and when (monotonic) it gained and lost each."""

    def __init__(self) -> None:
        self.acting: set[str] = set()
        self.events: list[tuple[float, str, str]] = []

    def lease_gained(self, name: str) -> None:
        self.acting.add(name)
        self.events.append((time.monotonic(), "gained", name))

    def lease_lost(self, name: str) -> None:
        self.acting.discard(name)
        self.events.append((time.monotonic(), "lost", name))


class Replica:
    def __init__(self, dsn: str, who: str) -> None:
        self.store = PostgresStore(dsn, reactor=reactor)
        self.leases = Cut(self.store.leases)
        self.keeper = LeaseKeeper(self.leases, reactor, who, ttl=TTL, renew_every=RENEW)
        self.listener = Acting()

    async def start(self, names: Sequence[str], fair: bool) -> Replica:
        await self.store.start()
        self.keeper.startService()
        self.keeper.follow(self.listener, names, fair=fair)
        return self

    async def stop(self) -> None:
        await self.keeper.stopService()
        await self.store.stop()


@pytest_twisted.ensureDeferred
async def test_one_replica_holds_a_job_and_another_takes_over_once_it_expires(
    database_dsn: str,
) -> None:
    replicas = [await Replica(database_dsn, w).start(["job:retention"], False) for w in "ab"]

    def holders() -> list[Replica]:
        return [r for r in replicas if r.listener.acting]

    await eventually(lambda: len(holders()) == 1, "a holder")
    await deferLater(reactor, 4 * RENEW, lambda: None)  # a few renewals later: the same one
    [holder] = holders()
    [other] = [r for r in replicas if r is not holder]
    assert rows(database_dsn, "SELECT holder FROM leases WHERE name = 'job:retention'") == [
        (holder.keeper.replica_id,)
    ]
    holder.leases.cut = True  # it can no longer renew: as good as dead to the others
    await eventually(lambda: other.listener.acting, "the other replica to take over")
    [(lost_at, _, _)] = [e for e in holder.listener.events if e[1] == "lost"]
    [(gained_at, _, _)] = other.listener.events
    assert lost_at < gained_at  # never both at once
    assert holder.listener.acting == set()
    assert rows(database_dsn, "SELECT holder FROM leases WHERE name = 'job:retention'") == [
        (other.keeper.replica_id,)
    ]
    for replica in replicas:
        await replica.stop()


@pytest_twisted.ensureDeferred
async def test_agents_split_fairly_between_replicas_and_rebalance_when_a_third_joins(
    database_dsn: str,
) -> None:
    replicas = [await Replica(database_dsn, w).start(AGENTS, True) for w in "ab"]

    def counts() -> list[int]:
        return sorted(len(r.listener.acting) for r in replicas)

    await eventually(lambda: counts() == [3, 3], "a 3/3 split")
    replicas.append(await Replica(database_dsn, "c").start(AGENTS, True))
    await eventually(lambda: counts() == [2, 2, 2], "a 2/2/2 split")
    held = rows(database_dsn, "SELECT holder, name FROM leases WHERE expires_at > now()")
    assert {(r.keeper.replica_id, n) for r in replicas for n in r.listener.acting} == set(held)
    for replica in replicas:
        await replica.stop()
    # Stopped cleanly: given back at once.
    assert rows(database_dsn, "SELECT count(*) FROM leases WHERE holder IS NOT NULL") == [(0,)]


# -- webhooks: each pending notification claimed by one replica --------------------------


def claimant(who: str, ttl: float = 60.0) -> Claimant:
    return Claimant(who, ttl)


async def pending(store: Store, count: int) -> list[int]:
    """``count`` pending notifications, stored unclaimed (as before replicas)."""
    made = []
    for n in range(count):
        task = await store.create_task(make_spec(f"echo {n}"), ANCHOR)
        made += await store.observe_results([seen(task.task_id, 0, FAILED)], ANCHOR)
    return [m.notification_id for m in made]


def ids(notifications: Sequence[Any]) -> set[int]:
    return {n.notification_id for n in notifications}


@pytest_twisted.ensureDeferred
async def test_a_pending_notification_is_claimed_by_one_replica(store: Store) -> None:
    made = await pending(store, 5)
    first = await store.claim_notifications(claimant("a"), [], 3, ANCHOR)
    second = await store.claim_notifications(claimant("b"), [], 10, ANCHOR)
    assert len(first) == 3 and ids(first) | ids(second) == set(made)
    assert not ids(first) & ids(second)
    assert await store.claim_notifications(claimant("c"), [], 10, ANCHOR) == []
    # One stored with a claim is its replica's alone.
    task = await store.create_task(make_spec("echo claimed"), ANCHOR)
    [mine] = await store.observe_results([seen(task.task_id, 0, FAILED)], ANCHOR, claimant("a"))
    assert await store.claim_notifications(claimant("b"), [], 10, ANCHOR) == []
    assert mine.notification_id not in ids(first)


@pytest_twisted.ensureDeferred
async def test_a_lapsed_claim_is_taken_over_and_a_renewed_one_is_not(store: Store) -> None:
    ttl = 0.5
    made = await pending(store, 2)
    taken = await store.claim_notifications(claimant("a", ttl), [], 10, ANCHOR)
    assert ids(taken) == set(made)
    task = await store.create_task(make_spec("echo stored by a"), ANCHOR)
    observed = [seen(task.task_id, 0, FAILED)]
    [stored] = await store.observe_results(observed, ANCHOR, claimant("a", ttl))
    later = ANCHOR + timedelta(seconds=ttl * 2)  # the memory store's now; PostgreSQL's own
    found: list[Any] = []
    deadline = time.monotonic() + 30

    async def claim_by_b() -> bool:
        # a renews its claims on the first and on the one it stored (it sends them);
        # not on the second, no longer being sent.
        renew = [made[0], stored.notification_id]
        await store.claim_notifications(claimant("a", ttl), renew, 0, later)
        found.extend(await store.claim_notifications(claimant("b", ttl), [], 10, later))
        return bool(found)

    while not await claim_by_b():
        assert time.monotonic() < deadline, "a's lapsed claim was never taken over"
        await deferLater(reactor, 0.05, lambda: None)
    assert ids(found) == {made[1]}


@pytest_twisted.ensureDeferred
async def test_replicas_claiming_at_once_never_claim_the_same_notification(
    database_dsn: str,
) -> None:
    stores = [PostgresStore(database_dsn, reactor=reactor) for _ in range(3)]
    for s in stores:
        await s.start()
    made = await pending(stores[0], 60)
    claims: list[tuple[bool, Any]] = await DeferredList(
        [
            Deferred.fromCoroutine(s.claim_notifications(claimant(f"r{n}"), [], 25, ANCHOR))
            for n, s in enumerate(stores)
        ],
        fireOnOneErrback=True,
    )
    claimed = [ids(found) for _, found in claims]
    assert sum(len(c) for c in claimed) == 60
    assert set.union(*claimed) == set(made)
    for s in stores:
        await s.stop()


@pytest_twisted.ensureDeferred
async def test_claims_given_back_are_claimed_at_once(store: Store) -> None:
    made = await pending(store, 2)
    assert ids(await store.claim_notifications(claimant("a"), [], 10, ANCHOR)) == set(made)
    await store.claim_notifications(claimant("a"), [], 0, ANCHOR, release=made[:1])
    assert ids(await store.claim_notifications(claimant("b"), [], 10, ANCHOR)) == {made[0]}


@pytest_twisted.ensureDeferred
async def test_renewals_do_not_wait_behind_a_busy_pool(database_dsn: str) -> None:
    replica = Replica(database_dsn, "a")
    await replica.store.start()
    blocker = psycopg2.connect(database_dsn)
    blocker.autocommit = True
    blocker.cursor().execute("SELECT pg_advisory_lock(42)")

    async def stuck(cursor: Any) -> None:
        await cursor.execute("SELECT pg_advisory_lock_shared(42)")
        await cursor.execute("SELECT pg_advisory_unlock_shared(42)")

    # Every connection of the pool waits on the lock, and one more call queues.
    size = PostgresStore.DEFAULT_POOL_SIZE
    busy = [Deferred.fromCoroutine(replica.store.db.run(stuck)) for _ in range(size + 1)]
    try:
        replica.keeper.startService()
        replica.keeper.follow(replica.listener, ["job:retention"], fair=False)
        await eventually(lambda: replica.listener.acting, "the lease, with the pool busy")
        assert not any(d.called for d in busy)
    finally:
        blocker.close()
    await DeferredList(busy, fireOnOneErrback=True)
    await replica.stop()


@pytest_twisted.ensureDeferred
async def test_leases_and_replicas_gone_for_long_are_forgotten(database_dsn: str) -> None:
    replica = await Replica(database_dsn, "a").start(["job:retention"], False)
    await eventually(lambda: replica.listener.acting, "the lease")
    rows(
        database_dsn,
        """
        INSERT INTO replicas SELECT 'gone', t, t FROM (SELECT now() - interval '2 hours') v (t);
        INSERT INTO leases VALUES ('agent:http://removed:8081', 'gone', now() - interval '2 hours'),
            ('agent:http://free:8081', NULL, now() - interval '59 minutes');
        SELECT 1
        """,
    )
    await eventually(
        lambda: (
            rows(database_dsn, "SELECT count(*) FROM replicas WHERE replica_id = 'gone'") == [(0,)]
        ),
        "the gone replica forgotten",
    )
    names = {name for (name,) in rows(database_dsn, "SELECT name FROM leases")}
    assert names == {"job:retention", "agent:http://free:8081"}
    await replica.stop()
