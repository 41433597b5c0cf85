"""The change bus on a task.Clock over a fake database: notices reach the other replicas'
subscribers and not the sender's, a lost listener reconnects with back-off, LISTENs again
and resyncs, and changes that could not be announced make every replica resync."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import psycopg2
import pytest
from psycopg2.extensions import Notify
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from taskscheduler.retry import Backoff, no_jitter
from taskscheduler.server.changes import CHANNEL, Change, ChangeBus, Kind

TASK = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")


class FakeListener:
    """One session of :class:`FakeDatabase`."""

    def __init__(self, database: FakeDatabase, on_lost: Callable[[Failure], None]) -> None:
        self.database = database
        self.on_lost = on_lost
        self.observers: list[Callable[[Any], object]] = []
        self.channels: set[str] = set()
        self.closed = False
        self.pid = len(database.sessions) + 1000
        self.hanging: list[Deferred[None]] = []

    def addNotifyObserver(self, observer: Callable[[Any], object]) -> None:
        self.observers.append(observer)

    def runOperation(self, sql: str, params: Any = None) -> Deferred[None]:
        assert not self.closed, "a query on a closed connection"
        if self.database.hang:
            self.hanging.append(Deferred())
            return self.hanging[-1]
        if self.database.down:
            return Deferred.fromCoroutine(_raise(psycopg2.OperationalError("server closed")))
        if sql.startswith("LISTEN "):
            self.channels.add(sql.removeprefix("LISTEN "))
        elif "pg_notify" in sql:
            channel, payloads = params
            for payload in payloads:
                self.database.notify(self.pid, channel, payload)
        else:
            raise AssertionError(sql)
        return succeed(None)

    def close(self) -> None:
        # As txpostgres: what was under way fails.
        self.closed = True
        hanging, self.hanging = self.hanging, []
        for d in hanging:
            d.errback(ConnectionDone("closed"))

    def break_(self) -> None:
        """The server went away under this session."""
        self.closed = True
        self.on_lost(Failure(ConnectionLost("the server closed the connection")))


async def _raise(error: Exception) -> None:
    raise error


class FakeDatabase:
    """NOTIFY delivered to every open session LISTENing on the channel, the sender's too,
    as PostgreSQL does."""

    def __init__(self) -> None:
        self.sessions: list[FakeListener] = []
        self.down = False
        self.hang = False
        self.connects = 0

    async def connect(self, dsn: str, on_lost: Callable[[Failure], None]) -> FakeListener:
        assert dsn == "dbname=fake"
        self.connects += 1
        if self.down:
            raise psycopg2.OperationalError("connection refused")
        session = FakeListener(self, on_lost)
        self.sessions.append(session)
        return session

    def notify(self, pid: int, channel: str, payload: str) -> None:
        for session in self.sessions:
            if not session.closed and channel in session.channels:
                for observer in session.observers:
                    observer(Notify(pid, channel, payload))

    def open_sessions(self) -> list[FakeListener]:
        return [s for s in self.sessions if not s.closed]

    def crash(self) -> None:
        """Every session breaks."""
        for session in self.open_sessions():
            session.break_()


class Recorder:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.resyncs = 0

    def changed(self, change: Change) -> None:
        self.changes.append(change)

    def resync(self) -> None:
        self.resyncs += 1


class Replica:
    def __init__(self, name: str, database: FakeDatabase, clock: Clock) -> None:
        self.bus = ChangeBus(
            lambda: "dbname=fake",
            clock,
            name,
            database.connect,
            backoff=Backoff(0.5, 10.0, no_jitter),
        )
        self.seen = Recorder()
        self.bus.subscribe(self.seen)


@pytest.fixture
def world() -> tuple[FakeDatabase, Clock, Replica, Replica]:
    database, clock = FakeDatabase(), Clock()
    a, b = Replica("a", database, clock), Replica("b", database, clock)
    a.bus.startService()
    b.bus.startService()
    clock.advance(0)
    assert a.bus.listening and b.bus.listening
    return database, clock, a, b


def test_a_change_reaches_the_other_replica_and_not_its_sender(world: Any) -> None:
    _, _, a, b = world
    a.bus.publish(Change(Kind.TASK_CREATED, TASK))
    assert b.seen.changes == [Change(Kind.TASK_CREATED, TASK, replica="a")]
    assert a.seen.changes == [], "the sender hears its own notice and ignores it"
    assert (a.bus.published, b.bus.received, a.bus.received) == (1, 1, 0)
    b.bus.publish(Change(Kind.AGENT_ENROLLED, TASK, "http://agent-a:8081"))
    assert a.seen.changes == [Change(Kind.AGENT_ENROLLED, TASK, "http://agent-a:8081", "b")]


def test_every_replica_resyncs_once_it_first_listens(world: Any) -> None:
    _, _, a, b = world
    assert (a.seen.resyncs, b.seen.resyncs) == (1, 1)


def test_a_lost_listener_listens_again_then_resyncs_and_hears_later_changes(world: Any) -> None:
    database, clock, a, b = world
    [listener] = [s for s in database.open_sessions() if s.observers[0].__self__ is b.bus]
    listener.break_()
    assert not b.bus.listening
    clock.advance(0)
    assert b.bus.listening
    [again] = [s for s in database.open_sessions() if s.observers[0].__self__ is b.bus]
    assert again is not listener and again.channels == {CHANNEL}, "LISTEN issued again"
    assert b.seen.resyncs == 2
    a.bus.publish(Change(Kind.FLEET_CHANGED))
    assert b.seen.changes == [Change(Kind.FLEET_CHANGED, replica="a")]


def test_a_database_that_stays_down_is_retried_with_back_off(world: Any) -> None:
    database, clock, a, b = world
    database.down = True
    database.crash()
    connects = database.connects
    clock.advance(0)  # the first attempt comes at once, and fails
    assert database.connects == connects + 2
    for wait in (0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0):
        clock.advance(wait - 0.01)
        assert database.connects == connects + 2, "not before the back-off is over"
        clock.advance(0.01)
        assert database.connects == connects + 4
        connects += 2
    database.down = False
    clock.advance(10.0)
    assert a.bus.listening and b.bus.listening
    assert (a.seen.resyncs, b.seen.resyncs) == (2, 2)


def test_a_change_made_while_the_listener_is_down_makes_every_replica_resync(
    world: Any,
) -> None:
    database, clock, a, b = world
    [listener] = [s for s in database.open_sessions() if s.observers[0].__self__ is a.bus]
    database.down = True
    listener.break_()
    a.bus.publish(Change(Kind.TASK_DELETED, TASK))  # never raises: the request is done
    assert a.bus.dropped == 1
    database.down = False
    clock.advance(0.5)
    assert a.bus.listening
    assert b.seen.resyncs == 2, "told to resync: it missed a change"
    assert b.seen.changes == [], "a resync notice is no change of its own"
    assert a.seen.resyncs == 2  # its own reconnection
    a.bus.publish(Change(Kind.TASK_CHANGED, TASK))
    assert b.seen.changes == [Change(Kind.TASK_CHANGED, TASK, replica="a")]


def test_a_notice_that_never_returns_gives_the_connection_up(world: Any) -> None:
    database, clock, a, b = world
    database.hang = True
    a.bus.publish(Change(Kind.TASK_CREATED, TASK))
    a.bus.publish(Change(Kind.TASK_CHANGED, TASK))  # queued behind the first
    clock.advance(9.9)
    assert a.bus.listening
    clock.advance(0.1)  # the send deadline
    assert not a.bus.listening and a.bus.dropped == 2
    clock.advance(10)  # its LISTEN on a new connection never returns either
    assert not a.bus.listening
    database.hang = False
    clock.advance(0.5)
    assert a.bus.listening
    assert b.seen.resyncs == 2, "asked to resync for the changes that were dropped"


def test_a_notice_nobody_understands_resyncs(world: Any) -> None:
    database, _, _, b = world
    database.notify(1, CHANNEL, json.dumps({"k": "task.renamed", "r": "c", "id": str(TASK)}))
    database.notify(1, CHANNEL, "not json")
    database.notify(1, CHANNEL, json.dumps({"k": "task.created", "r": "c"}))  # no id
    assert b.seen.resyncs == 1 + 3 and b.seen.changes == []


def test_a_subscriber_that_fails_does_not_stop_the_others(world: Any) -> None:
    _, _, a, b = world

    class Broken(Recorder):
        def changed(self, change: Change) -> None:
            raise RuntimeError("bug")

    broken, after = Broken(), Recorder()
    b.bus.subscribe(broken)
    b.bus.subscribe(after)
    a.bus.publish(Change(Kind.FLEET_CHANGED))
    assert after.changes == [Change(Kind.FLEET_CHANGED, replica="a")]


def test_a_stopped_bus_closes_its_listener_and_stays_closed(world: Any) -> None:
    database, clock, a, b = world
    b.bus.stopService()
    assert [s.observers[0].__self__ for s in database.open_sessions()] == [a.bus]
    clock.advance(60)
    assert not b.bus.listening
    a.bus.publish(Change(Kind.FLEET_CHANGED))
    assert b.seen.changes == []


def test_payloads_are_small_and_round_trip() -> None:
    change = Change(Kind.AGENT_ENROLLED, TASK, "http://agent-a:8081")
    payload = change.to_payload("host:1:abcd")
    assert len(payload) < 200
    assert Change.from_payload(payload) == Change(
        Kind.AGENT_ENROLLED, TASK, "http://agent-a:8081", "host:1:abcd"
    )
