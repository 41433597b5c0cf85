"""The pool's rules for a database that fails over: which operations run again on a new
connection when theirs breaks (never one whose commit may have happened, unless it is
idempotent), idle connections to a dead server left unused, read-only sessions reported,
and multi-host DSNs passed to libpq with the pool's defaults (fake connections; the last
tests on the real PostgreSQL)."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Coroutine, Iterator
from types import SimpleNamespace
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
import pytest
import pytest_twisted
from psycopg2.extensions import make_dsn, parse_dsn
from twisted.internet import reactor
from twisted.internet.defer import (
    Deferred,
    DeferredList,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from txpostgres.txpostgres import RollbackFailed

from taskscheduler.server.store import pool
from taskscheduler.server.store.claims import Claims
from taskscheduler.server.store.create_batch import CreateBatches
from taskscheduler.server.store.failover import connect_error, host_count, may_run_again
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.recording import Recording
from taskscheduler.server.store.records import Claim, CommitInDoubt, StoreUnavailable, Task
from tests.conftest import RestartablePostgres, _create_database, _drop_database
from tests.unit.test_store_contract import A_ID, A_URL, ANCHOR, GRACE, at, make_spec, result
from tests.unit.test_store_postgres import within

T = TypeVar("T")

# -- a fake PostgreSQL ---------------------------------------------------------------------


class FakeServer:
    """What the fake connections talk to: every statement they send, what got committed,
    and when a connection breaks (``breaks(statement, connection number)``: the statement
    never reaches it; ``lose_ack``: COMMIT happens, then its answer is lost)."""

    def __init__(self) -> None:
        self.connections: list[FakeConnection] = []
        self.sent: list[tuple[int, str]] = []
        self.committed: list[str] = []
        self.breaks: Callable[[str, int], bool] = lambda statement, number: False
        self.lose_ack = False
        self.refuse: Exception | None = None  # what connecting fails with
        self.read_only = False  # a standby: every write is refused
        self.silent = False  # connecting never ends (a host that drops packets)
        self.host, self.port = "db1", 5432  # where a new connection lands


class FakeCursor:
    def __init__(self, conn: FakeConnection) -> None:
        self._conn = conn

    def execute(self, statement: str, parameters: Any = None) -> Deferred[FakeCursor]:
        return self._conn.execute(statement)

    def fetchone(self) -> tuple[int]:
        return (1,)


class FakeConnection:
    """Enough of txpostgres' ``Connection`` for the pool: statements, transactions, and a
    socket (one end of a socketpair) whose peer the fake server closes when it dies."""

    server: FakeServer

    def __init__(self, reactor: Any) -> None:
        self.number = len(self.server.connections)
        self.server.connections.append(self)
        self.closed = False
        self.params: dict[str, str] = {}
        self.sock, self.peer = socket.socketpair()
        self._pending: list[str] = []
        self._in_transaction = False

    def connect(self, dsn: str, **params: str) -> Deferred[FakeConnection]:
        if self.server.refuse is not None:
            return fail(self.server.refuse)
        if self.server.silent:
            self._connecting: Deferred[FakeConnection] = Deferred()
            return self._connecting
        self.dsn, self.params = dsn, params
        self.info = SimpleNamespace(host=self.server.host, port=self.server.port)
        return succeed(self)

    def pollable(self) -> Any:
        """The psycopg2 connection: its socket, and ``closed`` as psycopg2 reports it."""
        return None if self.closed else self

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if self.server.silent and not self._connecting.called:
            self._connecting.errback(psycopg2.OperationalError("connection closed"))
        if not self.closed:
            self.closed = True
            self.sock.close()
            self.peer.close()

    def cursor(self) -> FakeCursor:
        return FakeCursor(self)

    def execute(self, statement: str) -> Deferred[FakeCursor]:
        if self.closed:
            return fail(psycopg2.InterfaceError("connection already closed"))
        if self.server.breaks(statement, self.number):
            if statement == "commit" and self.server.lose_ack:
                self.server.committed += self._pending
            self.close()
            return fail(psycopg2.OperationalError("server closed the connection unexpectedly"))
        self.server.sent.append((self.number, statement))
        if statement == "begin":
            self._in_transaction, self._pending = True, []
        elif statement == "commit":
            self.server.committed += self._pending
            self._in_transaction = False
        elif statement == "rollback":
            self._in_transaction = False
        elif statement.startswith("write"):
            if self.server.read_only:
                return fail(
                    psycopg2.errors.ReadOnlySqlTransaction(
                        "cannot execute INSERT in a read-only transaction"
                    )
                )
            if self._in_transaction:
                self._pending.append(statement)
            else:
                self.server.committed.append(statement)
        return succeed(FakeCursor(self))

    def runInteraction(self, interaction: Callable[[FakeCursor], Any]) -> Deferred[Any]:
        """As txpostgres: begin, the interaction, commit; rollback on failure, and a
        RollbackFailed when the rollback fails too."""
        cursor = self.cursor()
        d = cursor.execute("begin")
        d.addCallback(lambda _: interaction(cursor))

        def commit(answer: Any) -> Deferred[Any]:
            return cursor.execute("commit").addCallback(lambda _: answer)

        def rollback(failure: Any) -> Deferred[Any]:
            e = maybeDeferred(cursor.execute, "rollback")
            e.addCallbacks(lambda _: failure, lambda _: fail(RollbackFailed(self, failure)))
            return e

        return d.addCallback(commit).addErrback(rollback)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    fake = FakeServer()
    monkeypatch.setattr(FakeConnection, "server", fake, raising=False)
    monkeypatch.setattr(pool, "Connection", FakeConnection)
    yield fake
    for conn in fake.connections:
        conn.close()


class FakeReactor(Clock):
    """Time, and the readers the pool stops watching."""

    def __init__(self) -> None:
        super().__init__()
        self.unwatched: list[Any] = []

    def removeReader(self, reader: Any) -> None:
        self.unwatched.append(reader)


def opened(dsn: str = "host=a,b port=5432,5433 dbname=ts") -> tuple[Database, FakeReactor]:
    clock = FakeReactor()
    db = Database(dsn, clock, pool_size=4, connect_timeout=5, operation_timeout=30)
    db.open()
    return db, clock


class Counted:
    """An operation that writes one row and counts its runs."""

    def __init__(self, name: str = "write 1") -> None:
        self.name = name
        self.runs = 0

    async def __call__(self, cursor: Cursor) -> str:
        self.runs += 1
        await cursor.execute(self.name)
        return "done"


def run(db: Database, operation: Counted, **kwargs: bool) -> Any:
    """The operation's answer, or the exception it raised (everything fires at once)."""
    outcome: list[Any] = []
    Deferred.fromCoroutine(db.run(operation, **kwargs)).addBoth(outcome.append)
    assert outcome, "the fake answers at once"
    (answer,) = outcome
    return answer.value if hasattr(answer, "value") else answer


# -- which operations run again -------------------------------------------------------------


def test_what_may_run_again_when_the_connection_breaks() -> None:
    # A transaction that never reached COMMIT changed nothing: it runs again.
    assert may_run_again(transaction=True, idempotent=False, reached_commit=False)
    # Its COMMIT broke: it may have committed, so only an idempotent one runs again.
    assert not may_run_again(transaction=True, idempotent=False, reached_commit=True)
    assert may_run_again(transaction=True, idempotent=True, reached_commit=True)
    # Without a transaction each statement commits by itself.
    assert not may_run_again(transaction=False, idempotent=False, reached_commit=True)
    assert may_run_again(transaction=False, idempotent=True, reached_commit=True)


def test_a_transaction_broken_before_its_commit_runs_again_on_a_new_connection(
    server: FakeServer,
) -> None:
    db, _ = opened()
    server.breaks = lambda statement, number: statement == "write 1" and number == 0
    operation = Counted()
    assert run(db, operation) == "done"
    assert operation.runs == 2
    assert server.committed == ["write 1"], "committed once, on the second connection"
    assert [conn.closed for conn in server.connections] == [True, False]


def test_a_commit_in_doubt_is_never_run_again_unless_idempotent(server: FakeServer) -> None:
    db, _ = opened()
    # The COMMIT reached the server, which committed; its answer was lost.
    server.lose_ack = True
    server.breaks = lambda statement, number: statement == "commit" and number == 0
    operation = Counted()
    error = run(db, operation)
    assert isinstance(error, CommitInDoubt) and "in doubt" in str(error)
    assert operation.runs == 1
    assert server.committed == ["write 1"], "not written twice"

    idempotent = Counted("write 2")
    server.breaks = lambda statement, number: statement == "commit" and number == 1
    assert run(db, idempotent, idempotent=True) == "done"
    assert idempotent.runs == 2  # its second write finds the first (key and digest)


def test_an_operation_without_a_transaction_runs_again_only_when_idempotent(
    server: FakeServer,
) -> None:
    db, _ = opened()
    server.lose_ack = True
    server.breaks = lambda statement, number: statement.startswith("write") and number == 0
    operation = Counted()
    assert isinstance(run(db, operation, transaction=False), CommitInDoubt)
    assert operation.runs == 1

    server.breaks = lambda statement, number: statement.startswith("write") and number == 1
    idempotent = Counted("write 2")
    assert run(db, idempotent, transaction=False, idempotent=True) == "done"
    assert idempotent.runs == 2
    assert server.committed == ["write 2"]


def test_an_operation_runs_again_once_at_most(server: FakeServer) -> None:
    db, _ = opened()
    server.breaks = lambda statement, number: statement == "write 1"
    operation = Counted()
    error = run(db, operation)
    # Broken twice before COMMIT: nothing was changed, and the answer may say so.
    assert isinstance(error, StoreUnavailable) and not isinstance(error, CommitInDoubt)
    assert operation.runs == 2
    assert server.committed == []


def test_a_connection_that_cannot_be_made_is_not_tried_again_at_once(server: FakeServer) -> None:
    db, _ = opened()
    server.refuse = psycopg2.OperationalError(
        'connection to server at "a" (10.0.0.1), port 5432 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?\n"
        'connection to server at "b" (10.0.0.2), port 5433 failed: session is read-only\n'
    )
    error = run(db, Counted())
    assert isinstance(error, StoreUnavailable)
    # Every host's reason, and what a read-only answer means.
    assert 'at "a" (10.0.0.1), port 5432 failed: Connection refused' in str(error)
    assert 'at "b" (10.0.0.2), port 5433 failed: session is read-only' in str(error)
    assert "no host listed is a writable primary" in str(error)
    assert len(server.connections) == 1


def test_an_idle_connection_whose_server_closed_it_is_never_used(server: FakeServer) -> None:
    db, clock = opened()
    assert run(db, Counted("write 1")) == "done"
    assert len(server.connections) == 1
    assert clock.unwatched == server.connections, "idle, the reactor does not watch it"
    # The primary dies: the kernel closes its end of every connection.
    server.connections[0].peer.close()
    sent_before = len(server.sent)
    assert run(db, Counted("write 2")) == "done"
    assert [number for number, _ in server.sent[sent_before:]] == [1, 1, 1]
    assert server.connections[0].closed
    # A live idle connection is used again.
    assert run(db, Counted("write 3")) == "done"
    assert len(server.connections) == 2


def test_a_connection_that_lands_on_another_host_is_logged(server: FakeServer) -> None:
    db, _ = opened()
    with capturedLogs() as events:
        run(db, Counted())
        server.connections[0].peer.close()  # the primary dies; the standby takes over
        server.host, server.port = "db2", 5433
        run(db, Counted())
        run(db, Counted())
    said = [formatEvent(e) for e in events if "connected to PostgreSQL" in e["log_format"]]
    assert said == [
        "connected to PostgreSQL at db1:5432",
        "connected to PostgreSQL at db2:5433 (it was at db1:5432)",
    ]


def test_a_write_to_a_read_only_standby_is_reported_and_its_connection_dropped(
    server: FakeServer,
) -> None:
    db, _ = opened("host=a,b dbname=ts target_session_attrs=any")
    server.read_only = True
    with capturedLogs() as events:
        error = run(db, Counted())
    errors = [e["log_format"] for e in events if e.get("log_level") is LogLevel.error]
    assert isinstance(error, StoreUnavailable) and "read-only" in str(error)
    assert any("target_session_attrs=read-write" in text for text in errors)
    assert server.connections[0].closed, "a standby's connection is not pooled"


class FlagDatabase:
    """Records how each operation asks to be run; runs none."""

    def __init__(self) -> None:
        self.calls: list[dict[str, bool]] = []

    async def run(self, operation: Any, **how: bool) -> Any:
        self.calls.append(how)
        return []


@pytest_twisted.ensureDeferred
async def test_results_and_claims_may_run_again_and_creates_may_not() -> None:
    db = FlagDatabase()
    task_id = uuid.uuid4()
    # A result stored twice is found by key and digest: "duplicate", which the agent
    # takes as stored.
    await Recording(db).record_results([result(task_id, A_ID, 1)], at(1))  # type: ignore[arg-type]
    # The holder of a claim is granted it again.
    claim = Claim(task_id, at(1), A_ID, A_URL, 1)
    await Claims(db).claim_instant(claim, at(1), GRACE, at(0))  # type: ignore[arg-type]
    # A task's id is made by the API: created twice, it would be two tasks.
    await CreateBatches(db).create(Task(make_spec(), ANCHOR), None)  # type: ignore[arg-type]
    assert db.calls == [
        {"transaction": False, "idempotent": True},
        {"transaction": False, "idempotent": True},
        {"transaction": False},
    ]


# -- multi-host DSNs --------------------------------------------------------------------------

MULTI_HOST = [
    "host=db1,db2 port=5432,5433 dbname=ts user=app target_session_attrs=read-write",
    "postgresql://app@db1:5432,db2:5433/ts?target_session_attrs=read-write",
]


@pytest.mark.parametrize("dsn", MULTI_HOST)
def test_the_pools_defaults_leave_a_multi_host_dsn_whole(server: FakeServer, dsn: str) -> None:
    db, _ = opened(dsn)
    assert run(db, Counted()) == "done"
    (conn,) = server.connections
    # What psycopg2 hands libpq: the DSN and the defaults merged, every host kept.
    merged = parse_dsn(make_dsn(conn.dsn, **conn.params))
    assert merged["host"] == "db1,db2" and merged["port"] == "5432,5433"
    assert merged["dbname"] == "ts" and merged["target_session_attrs"] == "read-write"
    assert merged["keepalives"] == "1" and merged["tcp_user_timeout"] == "5000"
    assert host_count(dsn) == 2


def test_a_dsn_that_does_not_say_asks_for_a_writable_session(server: FakeServer) -> None:
    db, _ = opened("host=db1 dbname=ts keepalives_idle=30")
    run(db, Counted())
    (conn,) = server.connections
    assert conn.params["target_session_attrs"] == "read-write"
    assert "keepalives_idle" not in conn.params, "the DSN's own settings win"
    assert host_count("host=/tmp dbname=ts") == 1
    assert host_count("hostaddr=10.0.0.1,10.0.0.2,10.0.0.3 dbname=ts") == 3


def test_connecting_may_take_the_connect_timeout_for_each_host(server: FakeServer) -> None:
    # libpq tries the hosts in turn, each within tcp_user_timeout: the pool's own deadline
    # (libpq's does not apply to asynchronous connections) leaves time for every one.
    db, clock = opened("host=a,b port=5432,5433 dbname=ts")
    server.silent = True
    outcome: list[Any] = []
    Deferred.fromCoroutine(db.run(Counted())).addBoth(outcome.append)
    clock.advance(9.9)
    assert not outcome, "the second host still has time"
    clock.advance(0.1)
    (error,) = outcome
    assert error.check(StoreUnavailable) and "within 10 s" in str(error.value)


def test_connect_error_names_each_host_on_one_line() -> None:
    error = psycopg2.OperationalError(
        'connection to server at "a", port 1 failed: Connection refused\n\tIs the server...\n'
        'connection to server at "b", port 2 failed: timeout expired\n'
    )
    assert connect_error(error) == (
        'connection to server at "a", port 1 failed: Connection refused; '
        'connection to server at "b", port 2 failed: timeout expired'
    )
    assert connect_error(psycopg2.OperationalError("fe_sendauth: no password")) == (
        "fe_sendauth: no password"
    )


# -- on the real PostgreSQL -----------------------------------------------------------------


def _with_dead_host_first(dsn: str) -> str:
    """``dsn`` with a host that refuses connections listed before its own."""
    given = parse_dsn(dsn)
    host, port = given.get("host", "localhost"), given.get("port", "5432")
    return make_dsn(dsn, host=f"127.0.0.1,{host}", port=f"1,{port}")


@pytest_twisted.ensureDeferred
async def test_a_multi_host_dsn_reaches_the_host_that_answers(database_dsn: str) -> None:
    store = PostgresStore(_with_dead_host_first(database_dsn), reactor=reactor)
    await within(20, store.start())
    assert await within(10, store.list_fleet()) == []
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_read_only_server_is_refused_or_reported(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await within(20, store.start())  # migrated while writable
    await store.stop()
    read_only = make_dsn(database_dsn, options="-c default_transaction_read_only=on")
    # As a standby: no host takes writes, and the error says so.
    store = PostgresStore(read_only, reactor=reactor)
    with pytest.raises(StoreUnavailable, match=r"session is read-only.*writable primary"):
        await within(10, store.start())
    # Told to take any session, it lands on the read-only server, and its first write
    # (the migration's, at start) says why it fails.
    store = PostgresStore(make_dsn(read_only, target_session_attrs="any"), reactor=reactor)
    with pytest.raises(StoreUnavailable, match="the database is read-only"):
        await within(10, store.start())
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_server_that_went_away_between_calls_costs_no_failure(
    restartable_postgres: RestartablePostgres,
) -> None:
    name, dsn = _create_database(restartable_postgres.server_dsn)
    store = PostgresStore(dsn, reactor=reactor, connect_timeout=5, operation_timeout=10)
    try:
        await store.start()
        task = await store.create_task(make_spec(), ANCHOR)
        # Idle connections to a server that then restarts (or fails over) with no call
        # in between: none of them is used, so no call fails.
        await DeferredList([Deferred.fromCoroutine(store.get_task(task.task_id)) for _ in range(4)])
        assert store.db.pool_state() == (PostgresStore.DEFAULT_POOL_SIZE, 0, 4, 0)
        with capturedLogs() as events:
            await restartable_postgres.stop()
            await restartable_postgres.start()
            found = await within(30, _all(*(store.get_task(task.task_id) for _ in range(4))))
        assert found == [task] * 4
        # Nor does the reactor log a traceback for each connection that died idle.
        # (the reactor's errors are legacy events: "isError", "failure")
        tracebacks = [e for e in events if e.get("isError") or "log_failure" in e]
        assert [formatEvent(e) for e in tracebacks] == []
    finally:
        await store.stop()
        _drop_database(restartable_postgres.server_dsn, name)


async def _all(*calls: Coroutine[Any, Any, T]) -> list[T]:
    return list(await gatherResults([Deferred.fromCoroutine(call) for call in calls]))


@pytest_twisted.ensureDeferred
async def test_a_transaction_whose_backend_is_killed_runs_again_on_the_real_database(
    database_dsn: str,
) -> None:
    """The error shapes txpostgres really raises (a failed ROLLBACK after the lost
    connection): the transaction is run again, and commits once."""
    store = PostgresStore(database_dsn, reactor=reactor)
    await within(20, store.start())
    runs: list[int] = []

    async def operation(cursor: Cursor) -> int:
        await cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
        runs.append(pid)
        await cursor.execute("CREATE TABLE IF NOT EXISTS marks (n int)")
        await cursor.execute("INSERT INTO marks VALUES (1)")
        if len(runs) == 1:
            # Another session kills this one mid-transaction, as a failover would.
            killer = psycopg2.connect(database_dsn)
            try:
                killer.autocommit = True
                killer.cursor().execute("SELECT pg_terminate_backend(%s)", (pid,))
            finally:
                killer.close()
        await cursor.execute("SELECT count(*) FROM marks")
        (count,) = cursor.fetchone()
        return int(count)

    try:
        assert await within(10, store.db.run(operation)) == 1
        assert len(runs) == 2 and runs[0] != runs[1]
        # Outside a transaction the same break is not run again: it may have committed.
        runs.clear()

        async def autocommit(cursor: Cursor) -> int:
            return await operation(cursor)

        with pytest.raises(CommitInDoubt):
            await within(10, store.db.run(autocommit, transaction=False))
        assert len(runs) == 1
    finally:
        await store.stop()
