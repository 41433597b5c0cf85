"""Connections to PostgreSQL and the policy for using them: deadlines, retries, failures.

Connections are txpostgres ``Connection`` objects (asynchronous psycopg2) kept in a small
pool of our own rather than txpostgres' ``ConnectionPool``, which opens its connections
once and never replaces one: here a connection that breaks is thrown away, the idle ones
with it (a broken connection usually means the server restarted), and the next call
opens fresh ones. Nothing waits forever: connecting has a deadline, and an operation
that outlives its deadline has its connection closed under it. Every failure to reach
the database surfaces as :class:`~taskscheduler.server.store.records.StoreUnavailable`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import psycopg2
import psycopg2.errors
from psycopg2.extensions import parse_dsn
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from txpostgres.txpostgres import Connection, RollbackFailed

from taskscheduler.server.store.records import StoreUnavailable

T = TypeVar("T")
Cursor = Any  # txpostgres.Cursor: execute() returns a Deferred, the rest is psycopg2's
Operation = Callable[[Cursor], Coroutine[Any, Any, T]]

#: How often a transaction that lost a deadlock against another is retried.
ROLLBACK_RETRIES = 5


class QueryObserver(Protocol):
    """Told how long each operation took (:class:`taskscheduler.server.metrics.QueryMetrics`)."""

    def observe(self, operation: Callable[..., Any], seconds: float) -> None: ...


def is_connection_failure(error: BaseException) -> bool:
    """Whether ``error`` means the database could not be reached (not that it refused)."""
    return isinstance(
        error,
        psycopg2.OperationalError
        | psycopg2.InterfaceError
        | ConnectionDone
        | ConnectionLost
        | RollbackFailed,
    ) and not isinstance(error, psycopg2.errors.TransactionRollbackError)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def connection_params(dsn: str) -> dict[str, str]:
    """What every connection of the server adds to ``dsn`` unless it says otherwise
    (the pool's and the change listener's, :mod:`taskscheduler.server.changes`)."""
    # Keepalives make a vanished server (no RST) fail a query within ~15 s on TCP.
    given = parse_dsn(dsn)
    defaults = {
        "application_name": "taskscheduler",
        "keepalives": "1",
        "keepalives_idle": "5",
        "keepalives_interval": "2",
        "keepalives_count": "3",
    }
    return {k: v for k, v in defaults.items() if k not in given}


class _Pool:
    """Up to ``size`` txpostgres connections, opened on demand, replaced when broken."""

    log = Logger()

    def __init__(self, dsn: str, reactor: Any, size: int, connect_timeout: float) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self.size = size
        self._slots = DeferredSemaphore(size)
        self._idle: list[Connection] = []
        self._closed = False
        self._params = connection_params(dsn)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection for one operation; closed instead of reused if it broke."""
        if self._closed:
            raise StoreUnavailable("the store is stopped")
        await self._slots.acquire()
        conn: Connection | None = None
        try:
            conn = self._take_idle()
            if conn is None:
                conn = await self._connect()
            try:
                yield conn
            except BaseException as e:
                if is_connection_failure(e) or conn.closed:
                    # Probably a server restart: every idle connection is dead too.
                    self._discard(conn)
                    conn = None
                    self.close_idle()
                raise
        finally:
            if conn is not None:
                if self._closed or conn.closed:
                    self._discard(conn)
                else:
                    self._idle.append(conn)
            self._slots.release()

    def state(self) -> tuple[int, int, int, int]:
        """(size, in use, idle, waiting) now."""
        slots = self._slots
        return self.size, self.size - slots.tokens, len(self._idle), len(slots.waiting)

    def _take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
            self._discard(conn)
        return None

    async def _connect(self) -> Connection:
        conn = Connection(self._reactor)
        timed_out = []

        def give_up() -> None:
            timed_out.append(True)
            self._discard(conn)

        # libpq's connect_timeout does not apply to asynchronous connections.
        timer = self._reactor.callLater(self._connect_timeout, give_up)
        try:
            await conn.connect(self._dsn, **self._params)
        except (psycopg2.OperationalError, ConnectionDone, ConnectionLost) as e:
            self._discard(conn)
            if timed_out:
                raise StoreUnavailable(
                    f"PostgreSQL did not answer within {self._connect_timeout:g} s"
                ) from None
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {first_line(e)}") from e
        finally:
            if timer.active():
                timer.cancel()
        return conn

    @staticmethod
    def _discard(conn: Connection) -> None:
        if conn.pollable() is not None:
            conn.close()

    def close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)

    def close(self) -> None:
        self._closed = True
        self.close_idle()


class Database:
    """Runs operations on pooled connections, each within ``operation_timeout``.

    ``reactor`` must provide ``IReactorFDSet`` and ``IReactorTime``. Every domain
    component of the store runs its SQL through :meth:`run`.
    """

    def __init__(
        self,
        dsn: str,
        reactor: Any,
        *,
        pool_size: int,
        connect_timeout: float,
        operation_timeout: float,
    ) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._operation_timeout = operation_timeout
        self._pool: _Pool | None = None
        #: Times each operation (the server's metrics); None: nobody asks.
        self.observer: QueryObserver | None = None

    def pool_state(self) -> tuple[int, int, int, int] | None:
        """The pool's (size, in use, idle, waiting), or None before :meth:`open`."""
        return None if self._pool is None else self._pool.state()

    def use_dsn(self, dsn: str) -> None:
        """Connect to ``dsn`` from the next :meth:`open` on."""
        self._dsn = dsn

    def open(self) -> None:
        """Start with fresh connections (closing those of an earlier start)."""
        if self._pool is not None:
            self._pool.close()
        self._pool = _Pool(self._dsn, self._reactor, self._pool_size, self._connect_timeout)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    async def run(self, operation: Operation[T], *, transaction: bool = True) -> T:
        """Run ``operation`` with a cursor, in a transaction unless told otherwise.

        A transaction that lost a deadlock is retried; past :data:`ROLLBACK_RETRIES`, and
        on any failure to reach the database, this raises StoreUnavailable.
        """
        if self._pool is None:
            raise StoreUnavailable("the store is not started")
        if self.observer is not None:
            started = time.monotonic()
            try:
                return await self._run(self._pool, operation, transaction)
            finally:
                self.observer.observe(operation, time.monotonic() - started)
        return await self._run(self._pool, operation, transaction)

    async def _run(self, pool: _Pool, operation: Operation[T], transaction: bool) -> T:
        for attempt in range(ROLLBACK_RETRIES):
            try:
                return await self._run_once(pool, operation, transaction)
            except psycopg2.errors.TransactionRollbackError:
                # A deadlock or serialization failure: the transaction changed nothing.
                if attempt + 1 == ROLLBACK_RETRIES:
                    raise StoreUnavailable("the database is too contended; retry") from None
        raise AssertionError("unreachable")

    async def _run_once(self, pool: _Pool, operation: Operation[T], transaction: bool) -> T:
        try:
            async with pool.connection() as conn:
                timed_out = []

                def abort() -> None:
                    timed_out.append(True)
                    conn.close()

                watchdog = self._reactor.callLater(self._operation_timeout, abort)
                try:
                    if transaction:
                        return await conn.runInteraction(
                            lambda cursor: Deferred.fromCoroutine(operation(cursor))
                        )
                    return await operation(conn.cursor())
                except BaseException as e:
                    if timed_out:
                        raise StoreUnavailable(
                            f"the database did not answer within {self._operation_timeout:g} s"
                        ) from e
                    raise
                finally:
                    if watchdog.active():
                        watchdog.cancel()
        except StoreUnavailable:
            raise
        except BaseException as e:
            if isinstance(e, RollbackFailed) and not is_connection_failure(e.originalFailure.value):
                e.originalFailure.raiseException()
            if is_connection_failure(e):
                raise StoreUnavailable(f"database unavailable: {first_line(e)}") from e
            raise
