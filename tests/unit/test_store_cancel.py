"""A store operation cancelled by its caller (a service stopping, a request given up) on
the real PostgreSQL: the caller hears StoreUnavailable at once, the operation ends by
itself, its connection is not handed on busy, and nothing goes unhandled (txpostgres' own
cancel raises ``_CancelInProgress`` out of ``cancel()`` mid-query, and OperationalError
"asynchronous connection attempt underway" mid-connect: both seen in the replicas' logs).
"""

from __future__ import annotations

import gc
import socket
from collections.abc import Iterator
from typing import Any, TypeVar

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, capturedLogs, formatEvent

from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import StoreUnavailable
from tests.unit.test_store_contract import within

T = TypeVar("T")
LOCK = 14_0001  # an advisory lock that another session holds: the query waits on it


def _database(dsn: str, connect_timeout: float = 5.0) -> Database:
    db = Database(
        dsn, reactor, pool_size=1, connect_timeout=connect_timeout, operation_timeout=30.0
    )
    db.open()
    return db


async def _settled(d: Deferred[T]) -> T:
    """``d``'s outcome, within 10 s."""
    d.addTimeout(10, reactor)
    return await d


def _loud(events: list[dict[str, Any]]) -> list[str]:
    return [
        formatEvent(e) or repr(e)
        for e in events
        if e.get("log_level", LogLevel.info) >= LogLevel.error or e.get("isError")
    ]


async def _select_one(cursor: Cursor) -> int:
    await cursor.execute("SELECT 1")
    (one,) = cursor.fetchone()
    return int(one)


@pytest.fixture
def held_lock(database_dsn: str) -> Iterator[Any]:
    holder = psycopg2.connect(database_dsn)
    holder.autocommit = True
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (LOCK,))
    yield holder
    holder.close()


@pytest.mark.parametrize("transaction", [True, False])
@pytest_twisted.ensureDeferred
async def test_an_operation_cancelled_mid_query_is_store_unavailable(
    database_dsn: str, held_lock: Any, transaction: bool
) -> None:
    db = _database(database_dsn)
    waiting: Deferred[None] = Deferred()

    async def blocked(cursor: Cursor) -> int:
        query = cursor.execute("SELECT pg_advisory_lock(%s)", (LOCK,))
        waiting.callback(None)  # the query is sent: txpostgres polls for its answer
        await query
        return 1

    try:
        with capturedLogs() as events:
            running = Deferred.fromCoroutine(db.run(blocked, transaction=transaction))
            await _settled(waiting)
            running.cancel()
            with pytest.raises(StoreUnavailable, match="cancelled"):
                await _settled(running)
            held_lock.close()
            # The operation ended (the lock was given); the pool's one connection was
            # not handed on with its query under way.
            assert await within(10, db.run(_select_one)) == 1
            gc.collect()
        assert _loud(events) == []
    finally:
        db.close()


@pytest_twisted.ensureDeferred
async def test_an_operation_cancelled_while_connecting_is_store_unavailable() -> None:
    # A server that accepts the TCP connection and never says a word.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    port = silent.getsockname()[1]
    db = _database(f"host=127.0.0.1 port={port} dbname=x user=x", connect_timeout=1.0)
    try:
        with capturedLogs() as events:
            running = Deferred.fromCoroutine(db.run(_select_one))
            assert not running.called
            running.cancel()
            with pytest.raises(StoreUnavailable, match="cancelled"):
                await _settled(running)
            gc.collect()
        assert _loud(events) == []
    finally:
        db.close()
        silent.close()
