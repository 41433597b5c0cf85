"""The lease keeper's rules on a task.Clock, over the memory lease store (the database's
``now()`` is the same clock): who acts on a lease, when it stops, how agents' leases are
shared among replicas, and the service run only while a job's lease is held."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python import usage

from taskscheduler.server.leases import LeasedService, LeaseKeeper
from taskscheduler.server.options import Options
from taskscheduler.server.store.leases import Beat, LeaseGroup, MemoryLeases, fair_share
from taskscheduler.services import Step

TTL = 10.0
RENEW = 2.0
AGENTS = [f"agent:http://a{n}:8081" for n in range(6)]


class Recorder:
    """A listener that acts on what it is told, and checks nobody else acts on it."""

    def __init__(self, who: str, shared: dict[str, str], clock: Clock | None = None) -> None:
        self.who = who
        self.acting: set[str] = set()
        self._shared = shared
        self._clock = clock
        self.gains = 0
        self.events: list[tuple[float, str]] = []

    def lease_gained(self, name: str) -> None:
        holder = self._shared.get(name)
        assert holder is None, f"{self.who} gained {name} that {holder} acts on"
        self._shared[name] = self.who
        self.acting.add(name)
        self.gains += 1
        if self._clock is not None:
            self.events.append((self._clock.seconds(), "gained"))

    def lease_lost(self, name: str) -> None:
        assert self._shared.pop(name) == self.who
        self.acting.discard(name)
        if self._clock is not None:
            self.events.append((self._clock.seconds(), "lost"))


def keeper(store: MemoryLeases, clock: Clock, who: str) -> LeaseKeeper:
    return LeaseKeeper(store, clock, who, ttl=TTL, renew_every=RENEW, monotonic=clock.seconds)


def run(clock: Clock, seconds: float, step: float = 0.25) -> None:
    """Advance ``clock`` by ``seconds``, a little at a time (beats land in between)."""
    clock.advance(0)
    for _ in range(int(seconds / step)):
        clock.advance(step)


def test_fair_share_gives_every_lease_a_holder() -> None:
    assert fair_share(6, 2) == 3
    assert fair_share(6, 4) == 2
    assert fair_share(1, 3) == 1
    assert fair_share(0, 2) == 0
    assert fair_share(5, 0) == 5


def test_lease_options_default_to_ten_and_two_seconds_and_refuse_a_slow_renewal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("TASKSCHEDULER_LEASE_TTL", "TASKSCHEDULER_LEASE_RENEW"):
        monkeypatch.delenv(name, raising=False)
    options = Options()
    options.parseOptions([])
    assert (options["lease-ttl"], options["lease-renew"]) == (10.0, 2.0)
    monkeypatch.setenv("TASKSCHEDULER_LEASE_TTL", "30")
    options = Options()
    options.parseOptions(["--lease-renew", "5"])
    assert (options["lease-ttl"], options["lease-renew"]) == (30.0, 5.0)
    with pytest.raises(usage.UsageError, match="under half"):
        Options().parseOptions(["--lease-renew", "15"])


def test_one_of_two_replicas_runs_a_job_and_the_other_takes_over_once_it_expires() -> None:
    clock = Clock()
    store = MemoryLeases(clock)
    shared: dict[str, str] = {}
    a, b = keeper(store, clock, "a"), keeper(store, clock, "b")
    ra, rb = Recorder("a", shared, clock), Recorder("b", shared, clock)
    a.startService()
    a.follow(ra, ["job:retention"], fair=False)
    run(clock, 1)
    b.startService()
    b.follow(rb, ["job:retention"], fair=False)
    run(clock, 6)
    assert ra.acting == {"job:retention"} and rb.acting == set()
    assert a.holds("job:retention") and not b.holds("job:retention")
    # a loses the database: it stops acting before its lease expires; b takes over
    # after the expiry, within ttl and one renewal of a's last renewal.
    store.unreachable.add("a")
    last_renewal = store.holders["job:retention"][1] - TTL
    run(clock, TTL + RENEW + 0.5)
    assert ra.acting == set() and rb.acting == {"job:retention"}
    assert store.holder("job:retention") == "b"
    [(lost_at, _)] = [e for e in ra.events if e[1] == "lost"]
    [(gained_at, _)] = rb.events
    assert lost_at <= last_renewal + TTL - RENEW  # a stopped before its lease could expire
    assert last_renewal + TTL <= gained_at <= last_renewal + TTL + RENEW
    a.stopService()
    b.stopService()


def test_a_replica_that_cannot_renew_stops_acting_before_its_lease_could_expire() -> None:
    clock = Clock()
    store = MemoryLeases(clock)
    a = keeper(store, clock, "a")
    ra = Recorder("a", {})
    a.startService()
    a.follow(ra, ["job:leaves"], fair=False)
    clock.advance(0)
    assert ra.acting == {"job:leaves"}
    clock.advance(RENEW)  # renewed at 2: the database keeps it until 12
    store.unreachable.add("a")
    clock.advance(RENEW * 2)  # two renewals fail; still its own until 2 + 10 - 2
    assert ra.acting == {"job:leaves"}
    clock.advance(RENEW * 2 - 0.01)
    assert ra.acting == {"job:leaves"} and a.holds("job:leaves")
    clock.advance(0.01)  # 8: stops, while the row is still its own until 12
    assert ra.acting == set() and not a.holds("job:leaves")
    assert store.holder("job:leaves") == "a"
    # Back in reach: it renews and acts again (nobody took it meanwhile).
    store.unreachable.discard("a")
    run(clock, RENEW)
    assert ra.acting == {"job:leaves"}
    a.stopService()
    assert ra.acting == set() and store.holder("job:leaves") is None


class SlowLeases(MemoryLeases):
    """Beats that answer only when the test says so."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.held_back: list[tuple[Deferred[Beat], Beat]] = []
        self.slow = False

    async def beat(
        self, replica_id: str, ttl: float, groups: Sequence[LeaseGroup], release: Collection[str]
    ) -> Beat:
        beat = await super().beat(replica_id, ttl, groups, release)
        if not self.slow:
            return beat
        d: Deferred[Beat] = Deferred()
        self.held_back.append((d, beat))
        return await d


def test_a_renewal_answered_too_late_is_not_trusted() -> None:
    clock = Clock()
    store = SlowLeases(clock)
    a = keeper(store, clock, "a")
    ra = Recorder("a", {})
    a.startService()
    a.follow(ra, ["job:retention"], fair=False)
    clock.advance(0)
    assert ra.acting == {"job:retention"}
    store.slow = True
    clock.advance(RENEW)  # sent at 2, unanswered
    clock.advance(TTL)  # past 2 + 10 - 2: stopped meanwhile
    assert ra.acting == set()
    d, beat = store.held_back.pop(0)
    d.callback(beat)  # it says a holds it: too late to count
    assert ra.acting == set() and not a.holds("job:retention")
    store.slow = False
    run(clock, RENEW)
    assert ra.acting == {"job:retention"}
    a.stopService()


def test_what_is_wanted_during_a_beat_is_claimed_right_after_it() -> None:
    clock = Clock()
    store = SlowLeases(clock)
    a = keeper(store, clock, "a")
    ra = Recorder("a", {})
    store.slow = True
    a.startService()  # the first beat, under way
    a.follow(ra, ["job:leaves"], fair=False)
    store.slow = False
    d, beat = store.held_back.pop(0)
    d.callback(beat)
    clock.advance(0)  # not at the next renewal: at once
    assert ra.acting == {"job:leaves"}
    a.stopService()


def test_agents_are_shared_fairly_and_rebalance_when_replicas_come_and_go() -> None:
    clock = Clock()
    store = MemoryLeases(clock)
    shared: dict[str, str] = {}
    keepers = {who: keeper(store, clock, who) for who in "abc"}
    recorders = {who: Recorder(who, shared) for who in "abc"}

    def join(who: str) -> None:
        keepers[who].startService()
        keepers[who].follow(recorders[who], AGENTS, fair=True)

    def counts() -> list[int]:
        return sorted(len(r.acting) for r in recorders.values())

    join("a")
    run(clock, 1)
    assert counts() == [0, 0, 6]
    join("b")
    run(clock, 3 * RENEW)
    assert counts() == [0, 3, 3]
    join("c")
    run(clock, 3 * RENEW)
    assert counts() == [2, 2, 2]
    assert set(shared) == set(AGENTS)
    # c dies: a and b take its agents once its leases expired.
    store.unreachable.add("c")
    keepers["c"]._loop.stop()  # type: ignore[union-attr]  # as a killed process does
    died = clock.seconds()
    while set(shared) != set(AGENTS) or counts() != [0, 3, 3]:
        run(clock, 0.25)
        assert clock.seconds() - died <= TTL + 2 * RENEW, counts()
    # a stops cleanly: b has every agent within a renewal.
    keepers["a"].stopService()
    run(clock, RENEW + 0.25)
    assert len(recorders["b"].acting) == 6
    keepers["b"].stopService()


def test_a_fleet_member_removed_is_let_go_and_a_new_one_claimed() -> None:
    clock = Clock()
    store = MemoryLeases(clock)
    a = keeper(store, clock, "a")
    ra = Recorder("a", {})
    a.startService()
    a.follow(ra, AGENTS[:2], fair=True)
    clock.advance(0)
    assert ra.acting == set(AGENTS[:2])
    a.follow(ra, AGENTS[1:3], fair=True)
    assert ra.acting == {AGENTS[1]}  # let go at once, before the database hears of it
    clock.advance(0)
    assert ra.acting == set(AGENTS[1:3])
    assert store.holder(AGENTS[0]) is None


class Boom(Exception):
    pass


class FailingLeases(MemoryLeases):
    fail = False

    async def beat(
        self, replica_id: str, ttl: float, groups: Sequence[LeaseGroup], release: Collection[str]
    ) -> Beat:
        if self.fail:
            raise Boom("a bug in the store")
        return await super().beat(replica_id, ttl, groups, release)


def test_the_keeper_carries_on_after_failures_of_its_store_and_of_its_listeners() -> None:
    clock = Clock()
    store = FailingLeases(clock)
    a = keeper(store, clock, "a")

    class Clumsy(Recorder):
        def lease_gained(self, name: str) -> None:
            super().lease_gained(name)
            raise Boom("a listener's bug")

    clumsy = Clumsy("a", {})
    a.startService()
    a.follow(clumsy, ["job:x"], fair=False)
    store.fail = True
    run(clock, 3 * RENEW)
    assert clumsy.acting == set()
    store.fail = False
    run(clock, RENEW)
    assert clumsy.acting == {"job:x"}
    assert a._loop is not None and a._loop.running
    a.stopService()


def test_a_leased_service_runs_only_while_its_lease_is_held() -> None:
    clock = Clock()
    store = MemoryLeases(clock)
    a, b = keeper(store, clock, "a"), keeper(store, clock, "b")
    events: list[str] = []

    def starter(who: str) -> Callable[[], None]:
        return lambda: events.append(f"start {who}")

    def stopper(who: str) -> Callable[[], None]:
        return lambda: events.append(f"stop {who}")

    jobs = {
        who: LeasedService(
            k,
            "job:retention",
            Step(f"pruner {who}", starter(who), stopper(who)),
        )
        for who, k in (("a", a), ("b", b))
    }
    a.startService()
    jobs["a"].startService()
    b.startService()
    jobs["b"].startService()
    run(clock, RENEW)
    assert events == ["start a"]
    assert jobs["a"].child.running and not jobs["b"].child.running
    store.unreachable.add("a")
    run(clock, TTL + RENEW)
    assert events == ["start a", "stop a", "start b"]
    # Stopping the wrapper stops its child and gives the lease back.
    jobs["b"].stopService()
    assert events[-1] == "stop b" and not jobs["b"].child.running
    store.unreachable.discard("a")
    run(clock, RENEW * 2)
    assert events[-1] == "start a"
    for service in (jobs["a"], a, b):
        service.stopService()
    assert events[-1] == "stop a"


class SlowStop(Step):
    """A child whose stop ends only when the test says so (a tick finishing)."""

    def __init__(self, events: list[str]) -> None:
        super().__init__("slow")
        self.events = events
        self.stopping: list[Deferred[None]] = []

    def startService(self) -> None:  # type: ignore[override]
        super().startService()
        self.events.append("start")

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        self.events.append("stop")
        self.stopping.append(Deferred())
        return self.stopping[-1]


def test_a_job_regained_during_its_stop_starts_once_the_stop_is_over_and_not_if_lost() -> None:
    clock = Clock()
    store = MemoryLeases(clock)
    a = keeper(store, clock, "a")
    events: list[str] = []
    child = SlowStop(events)
    job = LeasedService(a, "job:retention", child)
    a.startService()
    job.startService()
    clock.advance(0)
    assert events == ["start"]
    job.lease_lost("job:retention")  # (as the keeper says it)
    job.lease_gained("job:retention")
    assert events == ["start", "stop"]  # not started again while the stop is under way
    child.stopping[0].callback(None)
    assert events == ["start", "stop", "start"]
    job.lease_lost("job:retention")
    job.lease_gained("job:retention")
    job.lease_lost("job:retention")  # lost again before the stop is over
    child.stopping[1].callback(None)
    assert events == ["start", "stop", "start", "stop"] and not child.running
    a.stopService()
