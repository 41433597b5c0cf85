"""What only the PostgreSQL store has: migrations, outages and deadlines, query plans, and
pruning racing result ingestion, against a real PostgreSQL."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from taskscheduler.server.store.migrations import MIGRATIONS
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.records import StoreUnavailable
from taskscheduler.server.store.results import (
    EXECUTION_RESULTS_SQL,
    HISTORY_PAGE_SQL,
    LATEST_EXECUTION_SQL,
    LATEST_OUTPUT_SQL,
    PRUNE_SQL,
)
from tests.conftest import RestartablePostgres, _create_database, _drop_database
from tests.unit.test_store_contract import (
    A_ID,
    A_URL,
    ANCHOR,
    B_ID,
    B_URL,
    GRACE,
    STORED,
    at,
    make_spec,
    result,
    within,
)


def _query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_migrations_apply_once_even_when_servers_start_together(database_dsn: str) -> None:
    stores = [PostgresStore(database_dsn, reactor=reactor) for _ in range(3)]
    await DeferredList([Deferred.fromCoroutine(s.start()) for s in stores], fireOnOneErrback=True)
    task = await stores[0].create_task(make_spec(), ANCHOR)
    for s in stores:
        await s.stop()
    again = PostgresStore(database_dsn, reactor=reactor)
    await again.start()
    assert await again.get_task(task.task_id) == task
    await again.stop()
    versions = _query(database_dsn, "SELECT version FROM schema_migrations ORDER BY version")
    assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]


@pytest_twisted.ensureDeferred
async def test_a_schema_newer_than_the_server_is_refused(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await store.stop()
    _query(database_dsn, "INSERT INTO schema_migrations (version) VALUES (%s)", (999,))
    with pytest.raises(RuntimeError, match="newer"):
        await PostgresStore(database_dsn, reactor=reactor).start()


@pytest_twisted.ensureDeferred
async def test_a_database_restart_is_unavailable_then_recovers_by_itself(
    restartable_postgres: RestartablePostgres,
) -> None:
    name, dsn = _create_database(restartable_postgres.server_dsn)
    try:
        await _survive_a_restart(restartable_postgres, dsn)
    finally:
        _drop_database(restartable_postgres.server_dsn, name)


async def _survive_a_restart(restartable_postgres: RestartablePostgres, dsn: str) -> None:
    store = PostgresStore(dsn, reactor=reactor, connect_timeout=2, operation_timeout=5)
    await store.start()
    await store.set_fleet([A_URL])
    task = await store.create_task(make_spec(), ANCHOR)
    # Fill the pool with idle connections that the restart will kill.
    await DeferredList([Deferred.fromCoroutine(store.get_task(task.task_id)) for _ in range(4)])

    await restartable_postgres.stop()
    with pytest.raises(StoreUnavailable):
        await within(10, store.get_task(task.task_id))
    with pytest.raises(StoreUnavailable):
        await within(10, store.record_results([result(task.task_id, A_ID, 1)], at(1)))
    with pytest.raises(StoreUnavailable):
        await within(10, store.latest_complete_execution(task.task_id, at(5), GRACE))

    await restartable_postgres.start()
    assert await within(10, store.get_task(task.task_id)) == task
    outcomes = await within(10, store.record_results([result(task.task_id, A_ID, 1)], at(1)))
    assert outcomes == [STORED]  # the attempt during the outage stored nothing
    latest = await store.latest_complete_execution(task.task_id, at(1), GRACE)
    assert latest is not None and latest.scheduled_at == at(1)
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_stuck_database_call_gives_up_at_its_deadline(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor, operation_timeout=0.5)
    await store.start()
    task = await store.create_task(make_spec(), ANCHOR)
    blocker = psycopg2.connect(database_dsn)
    try:
        blocker.cursor().execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreUnavailable, match="did not answer"):
            await within(10, store.get_task(task.task_id))
    finally:
        blocker.rollback()
        blocker.close()
    assert await within(10, store.get_task(task.task_id)) == task
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_database_fails_fast(tmp_path: Path) -> None:
    nobody = f"host={tmp_path} port=5432 dbname=nothing"
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await within(10, PostgresStore(nobody, reactor=reactor).start())
    refused = "host=127.0.0.1 port=1 dbname=nothing"
    with pytest.raises(StoreUnavailable):
        await within(10, PostgresStore(refused, reactor=reactor).start())
    # A TCP address that never answers: only our own deadline ends the wait.
    silent = "host=10.255.255.1 port=5432 dbname=nothing"
    with pytest.raises(StoreUnavailable):
        await within(10, PostgresStore(silent, reactor=reactor, connect_timeout=0.5).start())


def _seq_scanned(plan: str, tables: tuple[str, ...]) -> list[str]:
    """The tables, or partitions of ``tables``, a plan reads whole."""
    found = re.findall(r"Seq Scan on (\w+)", plan)
    return [name for name in found if name.split("_")[0] in tables]


@pytest_twisted.ensureDeferred
async def test_latest_output_queries_walk_indexes_not_history(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    tasks = [await store.create_task(make_spec(f"task {i}"), ANCHOR) for i in range(5)]
    for task in tasks:
        for first in range(1, 600, 300):
            batch = [
                result(task.task_id, agent, k)
                for k in range(first, first + 300)
                for agent in (A_ID, B_ID)
                if k % 7 or agent == A_ID  # some executions wait for B
            ]
            await store.record_results(batch, at(600))
    await store.stop()
    _query(database_dsn, "ANALYZE")
    now, task_id = at(450), str(tasks[2].task_id)
    plans = [
        _query(
            database_dsn,
            "EXPLAIN " + LATEST_EXECUTION_SQL,
            {"task_id": task_id, "now": now, "grace": GRACE},
        ),
        _query(
            database_dsn,
            "EXPLAIN " + EXECUTION_RESULTS_SQL,
            {"task_id": task_id, "scheduled_at": at(440)},
        ),
        _query(
            database_dsn,
            "EXPLAIN " + LATEST_OUTPUT_SQL,
            {"task_id": task_id, "now": now, "grace": GRACE},
        ),
        _query(
            database_dsn,
            "EXPLAIN " + HISTORY_PAGE_SQL,
            {"task_id": task_id, "before": at(300), "limit": 20},
        ),
    ]
    texts = ["\n".join(row[0] for row in plan) for plan in plans]
    for text in texts:
        assert "Index" in text, text
        # A handful of tasks may be scanned; the tables the history lives in may not
        # (bar a partition that holds nothing: a week ahead, reading no page at all).
        for scanned in _seq_scanned(text, ("executions", "results")):
            assert _query(database_dsn, f"SELECT count(*) FROM {scanned}") == [(0,)], text
    # Nor may a task's executions be sorted (one execution's few results may be).
    assert "Sort  (" not in texts[0], texts[0]


@pytest_twisted.ensureDeferred
async def test_a_prune_skips_executions_being_recorded_and_never_waits(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor, operation_timeout=5)
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    task = await store.create_task(make_spec(), ANCHOR)
    for k in (1, 2, 3):
        await store.record_results([result(task.task_id, A_ID, k)], at(k))
    # Another transaction holds execution 1 as record_results does while adding to it.
    holder = psycopg2.connect(database_dsn)
    try:
        holder.cursor().execute(
            "SELECT 1 FROM executions WHERE task_id = %s::uuid AND scheduled_at = %s FOR UPDATE",
            (str(task.task_id), at(1)),
        )
        assert await within(5, store.prune_history(at(10), 100)) == 2
        holder.cursor().execute(
            "INSERT INTO results SELECT task_id, scheduled_at, %s::uuid, status, exit_code,"
            " signal, started_at, finished_at, stdout, stdout_bytes, stdout_truncated, stderr,"
            " stderr_bytes, stderr_truncated, digest, received_at FROM results"
            " WHERE task_id = %s::uuid AND scheduled_at = %s",
            (str(B_ID), str(task.task_id), at(1)),
        )
        holder.commit()
    finally:
        holder.close()
    [execution] = await store.list_executions(task.task_id, 10)
    assert execution.scheduled_at == at(1) and len(execution.results) == 2
    assert await store.prune_history(at(10), 100) == 1
    assert await store.list_executions(task.task_id, 10) == []
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_pruning_while_results_pour_in_loses_none_and_never_deadlocks(
    database_dsn: str,
) -> None:
    store = PostgresStore(database_dsn, reactor=reactor, operation_timeout=10)
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    tasks = [await store.create_task(make_spec(f"task {i}"), ANCHOR) for i in range(4)]
    for task in tasks:
        await store.record_results(
            [result(task.task_id, a, k) for k in range(1, 200) for a in (A_ID, B_ID)], at(200)
        )
    recent = [
        [result(task.task_id, agent, k) for task in tasks for k in range(200, 400, 7)]
        for agent in (A_ID, B_ID)
    ]
    calls = [Deferred.fromCoroutine(store.record_results(batch, at(400))) for batch in recent]
    calls += [Deferred.fromCoroutine(store.prune_history(at(200), 50)) for _ in range(8)]
    everything = DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
    everything.addTimeout(30, reactor)
    outcomes = await everything
    assert all(outcome == STORED for _, stored in outcomes[:2] for outcome in stored)
    while await store.prune_history(at(200), 500):
        pass
    for task in tasks:
        history = await store.list_executions(task.task_id, 100)
        assert [e.scheduled_at for e in history] == [at(k) for k in reversed(range(200, 400, 7))]
        assert all(len(e.results) == 2 for e in history)
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_the_prune_query_walks_an_index_not_history(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    tasks = [await store.create_task(make_spec(f"task {i}"), ANCHOR) for i in range(5)]
    for task in tasks:
        for first in range(1, 2000, 500):
            batch = [
                result(task.task_id, agent, k)
                for k in range(first, first + 500)
                for agent in (A_ID, B_ID)
            ]
            await store.record_results(batch, at(2000))
    await store.stop()
    _query(database_dsn, "ANALYZE")
    for keep in (0, 100):  # with --retention-min-executions too
        params = {"before": at(1500), "limit": 50, "keep": keep}
        rows = _query(database_dsn, "EXPLAIN " + PRUNE_SQL, params)
        text = "\n".join(row[0] for row in rows)
        # The index of the partition these instants are in (migration 16: "_low").
        assert re.search(r"Index Scan using executions\w*_by_scheduled_at", text), text
        assert "Tid Scan on executions" in text, text
        for scanned in _seq_scanned(text, ("executions", "results")):
            assert _query(database_dsn, f"SELECT count(*) FROM {scanned}") == [(0,)], text
