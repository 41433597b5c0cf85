"""Connections to PostgreSQL and the policy for using them: deadlines, retries, failures.

Connections are txpostgres ``Connection`` objects (asynchronous psycopg2) kept in a small
pool of our own rather than txpostgres' ``ConnectionPool``, which opens its connections
once and never replaces one: here a connection that breaks is thrown away, the idle ones
with it (a broken connection usually means the server restarted), and the next call
opens fresh ones. Nothing waits forever: connecting has a deadline, and an operation
that outlives its deadline has its connection closed under it. Every failure to reach
the database surfaces as :class:`~taskscheduler.server.store.records.StoreUnavailable`.

What to do when the primary fails over is :mod:`~taskscheduler.server.store.failover`:
a multi-host DSN's session, idle connections to a dead server never used, and which
operations run again when their connection breaks (:func:`~.failover.may_run_again`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar

import psycopg2
import psycopg2.errors
from psycopg2.extensions import parse_dsn
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.txpostgres import Connection, RollbackFailed

from taskscheduler.server.store.failover import (
    RECONNECT_RETRIES,
    SESSION_ATTRS,
    connect_error,
    host_count,
    idle_is_dead,
    is_read_only,
    may_run_again,
    session_params,
)
from taskscheduler.server.store.records import CommitInDoubt, StoreUnavailable
from taskscheduler.shield import uncancellable

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
        given = parse_dsn(dsn)
        self._params = session_params(dsn, connect_timeout)
        # libpq's connect_timeout does not apply to asynchronous connections: ours covers
        # the whole connect, so it grows with the hosts libpq may have to try.
        self._connect_deadline = connect_timeout * host_count(dsn)
        self._host: str | None = None  # where the last connection went
        attrs = given.get("target_session_attrs", SESSION_ATTRS)
        if attrs not in (SESSION_ATTRS, "primary"):
            self.log.warn(
                "the database DSN says target_session_attrs={attrs}: a connection may land "
                "on a read-only standby, where every write fails; use read-write",
                attrs=attrs,
            )

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
                if is_connection_failure(e) or is_read_only(e) or conn.closed:
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
                    # Unwatched while idle (nothing LISTENs on it): a server gone away
                    # is found when it is next taken (_idle_is_dead), not by a
                    # traceback from txpostgres in the reactor.
                    self._reactor.removeReader(conn)
                    self._idle.append(conn)
            self._slots.release()

    def state(self) -> tuple[int, int, int, int]:
        """(size, in use, idle, waiting) now."""
        slots = self._slots
        return self.size, self.size - slots.tokens, len(self._idle), len(slots.waiting)

    def _take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and not idle_is_dead(conn):
                return conn
            # Its server went away (a restart, a failover): so did the others'.
            self._discard(conn)
            self.close_idle()
        return None

    async def _connect(self) -> Connection:
        conn = Connection(self._reactor)
        timed_out = []

        def give_up() -> None:
            timed_out.append(True)
            self._discard(conn)

        timer = self._reactor.callLater(self._connect_deadline, give_up)
        try:
            await conn.connect(self._dsn, **self._params)
        except (psycopg2.OperationalError, ConnectionDone, ConnectionLost) as e:
            self._discard(conn)
            if timed_out:
                raise StoreUnavailable(
                    f"PostgreSQL did not answer within {self._connect_deadline:g} s"
                ) from None
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {connect_error(e)}") from e
        finally:
            if timer.active():
                timer.cancel()
        self._note_host(conn)
        return conn

    def _note_host(self, conn: Connection) -> None:
        """Log the host a connection reached when it is not the last one's: after a
        failover, the operator reads where the server now writes."""
        try:
            info = conn.pollable().info
            where = f"{info.host}:{info.port}"
        except (AttributeError, psycopg2.Error):
            return
        if where != self._host:
            self.log.info(
                "connected to PostgreSQL at {where}{was}",
                where=where,
                was="" if self._host is None else f" (it was at {self._host})",
            )
            self._host = where

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

    log = Logger()

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

    async def run(
        self, operation: Operation[T], *, transaction: bool = True, idempotent: bool = False
    ) -> T:
        """Run ``operation`` with a cursor, in a transaction unless told otherwise.

        A transaction that lost a deadlock is retried; one whose connection broke is run
        again on a fresh connection when :func:`may_run_again` (``idempotent``: running it
        twice leaves what running it once does). Past :data:`ROLLBACK_RETRIES`, and on any
        other failure to reach the database, this raises StoreUnavailable.

        Cancelling the call raises StoreUnavailable at once and leaves the operation to
        end by itself (within its deadline): txpostgres' own cancel raises out of
        ``cancel()`` (``_CancelInProgress``) and leaves its connection busy.
        """
        if self._pool is None:
            raise StoreUnavailable("the store is not started")
        work = Deferred.fromCoroutine(
            self._observed(self._pool, operation, transaction, idempotent)
        )
        try:
            return await uncancellable(work, _unheard)
        except CancelledError:
            raise StoreUnavailable("the operation was cancelled (it ends by itself)") from None

    async def _observed(
        self, pool: _Pool, operation: Operation[T], transaction: bool, idempotent: bool
    ) -> T:
        if self.observer is not None:
            started = time.monotonic()
            try:
                return await self._run(pool, operation, transaction, idempotent)
            finally:
                self.observer.observe(operation, time.monotonic() - started)
        return await self._run(pool, operation, transaction, idempotent)

    async def _run(
        self, pool: _Pool, operation: Operation[T], transaction: bool, idempotent: bool
    ) -> T:
        deadline = self._reactor.seconds() + self._operation_timeout
        rollbacks = reconnects = 0
        while True:
            attempt = _Attempt()
            try:
                return await self._run_once(
                    pool, operation, transaction, attempt, deadline - self._reactor.seconds()
                )
            except psycopg2.errors.TransactionRollbackError:
                # A deadlock or serialization failure: the transaction changed nothing.
                rollbacks += 1
                if rollbacks == ROLLBACK_RETRIES:
                    raise StoreUnavailable("the database is too contended; retry") from None
            except _Broken as e:
                again = may_run_again(
                    transaction=transaction,
                    idempotent=idempotent,
                    reached_commit=attempt.reached_commit,
                )
                if not again or reconnects == RECONNECT_RETRIES:
                    if attempt.reached_commit and not idempotent:
                        raise CommitInDoubt(str(e)) from e
                    raise
                if self._reactor.seconds() >= deadline:
                    raise
                reconnects += 1
                self.log.info(
                    "the database connection broke ({error}): running the operation again "
                    "on a new connection",
                    error=str(e),
                )

    async def _run_once(
        self,
        pool: _Pool,
        operation: Operation[T],
        transaction: bool,
        attempt: _Attempt,
        timeout: float,
    ) -> T:
        try:
            async with pool.connection() as conn:
                timed_out = []

                def abort() -> None:
                    timed_out.append(True)
                    conn.close()

                watchdog = self._reactor.callLater(max(0.0, timeout), abort)
                try:
                    if transaction:

                        async def body(cursor: Cursor) -> T:
                            answer = await operation(cursor)
                            attempt.reached_commit = True  # what follows is COMMIT
                            return answer

                        return await conn.runInteraction(
                            lambda cursor: Deferred.fromCoroutine(body(cursor))
                        )
                    attempt.reached_commit = True  # each statement commits by itself
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
            if is_read_only(e):
                self.log.error(
                    "the database refused a write: this connection is to a read-only standby. "
                    "List every host in the DSN with target_session_attrs=read-write"
                )
                raise StoreUnavailable(
                    f"the database is read-only (a standby?): {first_line(e)}"
                ) from e
            if is_connection_failure(e):
                in_doubt = " (its commit is in doubt)" if attempt.reached_commit else ""
                raise _Broken(f"database unavailable{in_doubt}: {first_line(e)}") from e
            raise


def _unheard(work: Deferred[Any]) -> None:
    def failed(failure: Failure) -> None:
        Database.log.debug("a cancelled operation failed: {e}", e=failure.getErrorMessage())

    work.addErrback(failed)


class _Attempt:
    """How far one run of an operation got: whether it may have committed anything."""

    __slots__ = ("reached_commit",)

    def __init__(self) -> None:
        self.reached_commit = False


class _Broken(StoreUnavailable):
    """The connection broke under an operation (not while connecting, nor at a deadline)."""
