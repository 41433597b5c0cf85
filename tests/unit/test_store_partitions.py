"""History partitioned by week (migration 16, server/store/partitions.py), against a real
PostgreSQL: a populated database migrated online, instants outside every week, weeks made
ahead, and retention dropping whole weeks while keeping each task's newest executions."""

from __future__ import annotations

import re
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock

from taskscheduler.server.retention import HistoryPruner
from taskscheduler.server.store.migrations import MIGRATIONS
from taskscheduler.server.store.partitions import AHEAD, TABLES, WEEK, week_start
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.results import HISTORY_PAGE_SQL, LATEST_OUTPUT_SQL
from tests.unit.test_store_contract import (
    A_ID,
    A_URL,
    B_ID,
    B_URL,
    GRACE,
    STORED,
    make_spec,
    within,
)
from tests.unit.test_store_contract import result as a_result
from tests.unit.test_store_postgres import _query

STEP = timedelta(seconds=30)  # make_spec's interval


def _migrate_to_15(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    try:
        for version, sql in enumerate(MIGRATIONS[:15], start=1):
            assert isinstance(sql, str)
            with conn, conn.cursor() as cursor:
                if version == 1:
                    cursor.execute(
                        "CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                        " applied_at timestamptz NOT NULL DEFAULT now())"
                    )
                cursor.execute(sql)
                cursor.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
    finally:
        conn.close()


#: 8 tasks x 5,000 executions every 2 hours (about 14 months up to now) x 5 agents:
#: 40,000 executions and 200,000 results; a claim and a run-now row every 100th one.
POPULATE_SQL = """
INSERT INTO tasks (task_id, command, frequency, interval_seconds, anchor, time_limit_us,
                   created_at)
SELECT ('00000000-0000-4000-8000-' || lpad(t::text, 12, '0'))::uuid, 'true',
       'every 30 seconds', 30, %(start)s, 10000000, %(start)s
FROM generate_series(1, 8) t;
INSERT INTO executions (task_id, scheduled_at, expected, reported, completed_at)
SELECT ('00000000-0000-4000-8000-' || lpad(t::text, 12, '0'))::uuid,
       %(start)s + k * interval '2 hours', 5, 5, %(start)s + k * interval '2 hours'
FROM generate_series(1, 8) t, generate_series(0, 4999) k;
INSERT INTO results (task_id, scheduled_at, agent_id, status, stdout, stdout_bytes,
                     stdout_truncated, stderr, stderr_bytes, stderr_truncated, digest,
                     received_at)
SELECT e.task_id, e.scheduled_at,
       ('aaaaaaaa-0000-4000-8000-' || lpad(a::text, 12, '0'))::uuid, 'succeeded',
       convert_to(e.scheduled_at::text, 'UTF8'), 25, false, '', 0, false, '\\x00',
       e.scheduled_at
FROM executions e, generate_series(1, 5) a;
INSERT INTO claims (task_id, scheduled_at, agent_id, agent_url, claimed_at)
SELECT task_id, scheduled_at, NULL, 'http://a', scheduled_at FROM executions
WHERE extract(epoch FROM scheduled_at)::bigint %% 720000 = 0;
INSERT INTO manual_runs (task_id, scheduled_at, agent_url, revision, deadline)
SELECT task_id, scheduled_at, 'http://a', 1, scheduled_at FROM executions
WHERE extract(epoch FROM scheduled_at)::bigint %% 720000 = 0;
"""


def _fingerprints(dsn: str) -> dict[str, tuple[int, str]]:
    """Each history table's row count and a digest of all its rows, in key order."""
    found = {}
    for table in TABLES:
        [(count, digest)] = _query(
            dsn,
            f"SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) FROM {table} t",
        )
        found[table] = (count, digest)
    return found


class _Writer(threading.Thread):
    """Records an execution with a result every few milliseconds until told to stop,
    as a server's result ingestion would, on its own connection."""

    def __init__(self, dsn: str, task_id: str, start: datetime) -> None:
        super().__init__(daemon=True)
        self._dsn, self._task_id, self._next = dsn, task_id, start
        self.stop = threading.Event()
        self.written: list[datetime] = []
        self.errors: list[BaseException] = []

    def run(self) -> None:
        conn = psycopg2.connect(self._dsn)
        try:
            while not self.stop.is_set():
                self._next += timedelta(seconds=30)
                with conn, conn.cursor() as cursor:
                    cursor.execute(
                        "INSERT INTO executions (task_id, scheduled_at, expected)"
                        " VALUES (%s::uuid, %s, 1);"
                        " INSERT INTO results (task_id, scheduled_at, agent_id, status,"
                        " stdout, stdout_bytes, stdout_truncated, stderr, stderr_bytes,"
                        " stderr_truncated, digest, received_at) VALUES (%s::uuid, %s,"
                        " %s::uuid, 'succeeded', '', 0, false, '', 0, false, '', now())",
                        (self._task_id, self._next, self._task_id, self._next, str(A_ID)),
                    )
                self.written.append(self._next)
        except BaseException as e:
            self.errors.append(e)
        finally:
            conn.close()


@pytest_twisted.ensureDeferred
async def test_a_populated_database_migrates_online_and_loses_nothing(database_dsn: str) -> None:
    _migrate_to_15(database_dsn)
    now = datetime.now(UTC)
    start = (now - 5000 * timedelta(hours=2)).replace(microsecond=0)
    _query(database_dsn, POPULATE_SQL, {"start": start})
    _query(database_dsn, "ANALYZE")
    before = _fingerprints(database_dsn)
    assert before["results"][0] == 200_000 and before["executions"][0] == 40_000
    writer = _Writer(database_dsn, "00000000-0000-4000-8000-000000000001", now)
    writer.start()
    try:
        store = PostgresStore(database_dsn, reactor=reactor)
        await store.start()  # migration 16, while the writer writes
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.errors == []
    assert len(writer.written) > 0
    versions = _query(database_dsn, "SELECT max(version) FROM schema_migrations")
    assert versions == [(len(MIGRATIONS),)]
    kinds = _query(
        database_dsn,
        "SELECT relname, relkind FROM pg_class WHERE relname = ANY(%s) ORDER BY relname",
        (list(TABLES),),
    )
    assert kinds == sorted((t, "p") for t in TABLES)
    # Nothing lost: today's rows are all there, as they were, and the writer's too.
    written = _query(
        database_dsn,
        "SELECT count(*) FROM results WHERE scheduled_at > %s",
        (now,),
    )
    assert written == [(len(writer.written),)]
    _query(database_dsn, "DELETE FROM results WHERE scheduled_at > %s", (now,))
    _query(database_dsn, "DELETE FROM executions WHERE scheduled_at > %s", (now,))
    assert _fingerprints(database_dsn) == before
    # The weeks ahead exist, and the tables are partitions of them.
    weeks = _query(
        database_dsn,
        "SELECT count(*) FROM pg_inherits WHERE inhparent = 'results'::regclass"
        " AND inhrelid::regclass::text LIKE 'results_w%%'",
    )
    assert weeks[0][0] >= 2
    # The store reads the migrated history back.
    task_id = uuid.UUID("00000000-0000-4000-8000-000000000003")
    page = await store.list_executions(task_id, 3)
    assert [e.scheduled_at for e in page] == [
        start + k * timedelta(hours=2) for k in (4999, 4998, 4997)
    ]
    assert all(len(e.results) == 5 for e in page)
    await store.stop()
    _query(database_dsn, "ANALYZE")
    # A task's newest output and a page of its history are index probes; a page before an
    # instant reads no partition after it (pruned when planned).
    plans = {
        "latest": _explain(
            database_dsn,
            LATEST_OUTPUT_SQL,
            {"task_id": str(task_id), "now": now, "grace": GRACE},
        ),
        "page": _explain(
            database_dsn,
            HISTORY_PAGE_SQL,
            {"task_id": str(task_id), "before": start + timedelta(days=30), "limit": 20},
        ),
    }
    for name, text in plans.items():
        assert "Index Scan Backward using executions_low" in text, (name, text)
        assert "Seq Scan on executions_low" not in text, (name, text)
        assert "Seq Scan on results_low" not in text, (name, text)
    assert "executions_w" not in plans["page"] and "executions_high" not in plans["page"]
    # The results of the newest execution are read from its partition alone (pruned when
    # run: the instant comes from the execution's row).
    analyzed = _explain(
        database_dsn,
        LATEST_OUTPUT_SQL,
        {"task_id": str(task_id), "now": now, "grace": GRACE},
        analyze=True,
    )
    others = [line for line in analyzed.splitlines() if re.search(r" on results_(w|high)", line)]
    assert others and all("never executed" in line for line in others), analyzed


def _explain(dsn: str, sql: str, params: dict[str, Any], analyze: bool = False) -> str:
    explain = "EXPLAIN (ANALYZE) " if analyze else "EXPLAIN "
    return "\n".join(row[0] for row in _query(dsn, explain + sql, params))


@pytest_twisted.ensureDeferred
async def test_instants_far_in_the_past_or_future_are_stored_and_move_into_their_week(
    database_dsn: str,
) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    now = datetime.now(UTC)
    past = await store.create_task(make_spec("past", datetime(1990, 1, 1, tzinfo=UTC)), now)
    future = week_start(now) + AHEAD + 2 * WEEK  # past every week made so far
    later = await store.create_task(make_spec("future", future), now)
    far = await store.create_task(make_spec("far", datetime(2200, 1, 1, tzinfo=UTC)), now)
    outcomes = await store.record_results(
        [
            a_result(past.task_id, A_ID, 0, scheduled_at=past.spec.anchor + STEP),
            a_result(later.task_id, A_ID, 0, scheduled_at=future + STEP),
            a_result(far.task_id, A_ID, 0, scheduled_at=far.spec.anchor + STEP),
        ],
        now,
    )
    assert outcomes == [STORED] * 3
    assert _partition_of(database_dsn, later.task_id) == ("executions_high", "results_high")
    # Time passes: the weeks are made; the row stored above them moves into its own.
    assert await store.ensure_partitions(future) == (AHEAD + 2 * WEEK) // WEEK
    name = f"w{week_start(future):%Y%m%d}"
    assert _partition_of(database_dsn, later.task_id) == (f"executions_{name}", f"results_{name}")
    for task in (past, later, far):
        [execution] = await store.list_executions(task.task_id, 5)
        assert len(execution.results) == 1
    assert _partition_of(database_dsn, past.task_id) == ("executions_low", "results_low")
    assert _partition_of(database_dsn, far.task_id) == ("executions_high", "results_high")
    assert await store.ensure_partitions(future) == 0  # once
    await store.stop()


def _partition_of(dsn: str, task_id: uuid.UUID) -> tuple[str, str]:
    [(executions,)] = _query(
        dsn, "SELECT tableoid::regclass::text FROM executions WHERE task_id = %s", (str(task_id),)
    )
    [(results,)] = _query(
        dsn, "SELECT tableoid::regclass::text FROM results WHERE task_id = %s", (str(task_id),)
    )
    return executions, results


@pytest_twisted.ensureDeferred
async def test_retention_drops_whole_weeks_and_keeps_each_tasks_newest(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    now = datetime.now(UTC)
    first = week_start(now) + AHEAD  # the first week the store makes
    await store.ensure_partitions(first + 20 * WEEK)
    busy = await store.create_task(make_spec("busy", first), now)
    stopped = await store.create_task(make_spec("stopped", first), now)
    day = timedelta(days=1) // STEP  # instants of make_spec's grid a day apart

    def on(k: int) -> datetime:
        return first + STEP + k * day * STEP

    batch = [
        a_result(busy.task_id, agent, 0, scheduled_at=on(k))
        for k in range(0, 20 * 7)
        for agent in (A_ID, B_ID)
    ] + [
        a_result(stopped.task_id, A_ID, 0, scheduled_at=on(k))
        for k in range(0, 10)  # its last runs in the second week
    ]
    assert set(await store.record_results(batch, now)) == {STORED}
    clock = Clock()
    retention = timedelta(days=30)
    clock.advance((first + 10 * WEEK + timedelta(days=3) + retention).timestamp())
    pruner = HistoryPruner(store, clock, retention, keep=3)
    writing = await store.create_task(make_spec("writing", now), now)
    writer = _Writer(database_dsn, str(writing.task_id), now)  # ingestion goes on
    writer.start()
    try:
        await pruner.prune()
    finally:
        writer.stop.set()
        writer.join(30)
    assert writer.errors == [] and writer.written
    # Weeks 0-9 are wholly past retention: gone, as tables.
    weeks = _query(
        database_dsn,
        "SELECT inhrelid::regclass::text FROM pg_inherits"
        " WHERE inhparent = 'executions'::regclass ORDER BY 1",
    )
    names = {row[0] for row in weeks}
    assert f"executions_w{first:%Y%m%d}" not in names
    assert f"executions_w{first + 9 * WEEK:%Y%m%d}" not in names
    assert f"executions_w{first + 10 * WEEK:%Y%m%d}" in names
    # The busy task's history starts with week 10 (partly past retention, kept whole).
    history = await store.list_executions(busy.task_id, 1000)
    assert history[-1].scheduled_at == on(70)
    assert len(history) == 70 and all(len(e.results) == 2 for e in history)
    # The stopped task keeps its newest 3 executions, with their results, however old.
    kept = await store.list_executions(stopped.task_id, 1000)
    assert [e.scheduled_at for e in kept] == [on(k) for k in (9, 8, 7)]
    assert all(len(e.results) == 1 for e in kept)
    # A result for a dropped week is still stored (below the weeks), then pruned.
    late = a_result(busy.task_id, A_ID, 0, scheduled_at=on(3))
    assert await store.record_results([late], now) == [STORED]
    await pruner.prune()
    history = await store.list_executions(busy.task_id, 1000)
    assert history[-1].scheduled_at == on(70) and len(history) == 70
    assert all(len(e.results) == 2 for e in history)
    assert len(await store.list_executions(stopped.task_id, 1000)) == 3
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_pruning_rows_below_the_weeks_touches_no_row_of_a_week(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    now = datetime.now(UTC)
    task = await store.create_task(make_spec("rows", datetime(1990, 1, 1, tzinfo=UTC)), now)
    old = datetime(1990, 1, 1, 0, 0, 30, tzinfo=UTC)
    recent = week_start(now) + AHEAD - WEEK + STEP  # in the last week made
    # The first row of each partition: the same row address (ctid) in both.
    for at in (old, recent):
        _query(
            database_dsn,
            "INSERT INTO executions (task_id, scheduled_at, expected) VALUES (%s, %s, 1);"
            " INSERT INTO claims (task_id, scheduled_at, agent_url, claimed_at)"
            " VALUES (%s, %s, 'http://a', %s)",
            (str(task.task_id), at, str(task.task_id), at + STEP, at),
        )
    assert _partition_of_row(database_dsn, recent) == f"executions_w{week_start(recent):%Y%m%d}"
    assert await store.prune_history(datetime(1991, 1, 1, tzinfo=UTC), 100) == 1
    assert _query(database_dsn, "SELECT scheduled_at FROM executions") == [(recent,)]
    assert _query(database_dsn, "SELECT scheduled_at FROM claims") == [(recent + STEP,)]
    await store.stop()


def _partition_of_row(dsn: str, at: datetime) -> str:
    [(name,)] = _query(
        dsn, "SELECT tableoid::regclass::text FROM executions WHERE scheduled_at = %s", (at,)
    )
    return str(name)


@pytest_twisted.ensureDeferred
async def test_a_busy_table_delays_new_weeks_a_bounded_while_and_changes_nothing(
    database_dsn: str,
) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    later = week_start(datetime.now(UTC)) + AHEAD + 2 * WEEK
    reader = psycopg2.connect(database_dsn)  # a long query in flight
    try:
        reader.cursor().execute("SELECT count(*) FROM results")
        assert await within(8, store.ensure_partitions(later)) == 0
    finally:
        reader.close()
    assert await within(8, store.ensure_partitions(later)) == (AHEAD + 2 * WEEK) // WEEK
    await store.stop()


def test_no_step_of_migration_16_scans_a_table_while_it_holds_it(database_dsn: str) -> None:
    """Only the validations read today's rows (under SHARE UPDATE EXCLUSIVE: writes go on);
    the steps that take ACCESS EXCLUSIVE change the catalog only (PostgreSQL says so at
    DEBUG1: a table it checks is "verifying", an attach it need not check is "implied")."""
    _migrate_to_15(database_dsn)
    _query(database_dsn, POPULATE_SQL, {"start": datetime(2025, 1, 1, tzinfo=UTC)})
    conn = psycopg2.connect(database_dsn)
    said = []
    try:
        for step in MIGRATIONS[15]:
            with conn, conn.cursor() as cursor:
                cursor.execute("SET LOCAL client_min_messages = debug1")
                cursor.execute(step)
            said.append(" ".join(conn.notices))
            del conn.notices[:]
    finally:
        conn.close()
    bound, *validations, swap = said
    assert "verifying" not in bound
    for table, validation in zip(TABLES, validations, strict=True):
        assert f'verifying table "{table}"' in validation
    for table in TABLES:
        assert f'partition constraint for table "{table}_low" is implied' in swap, swap
        assert f'building index "{table}_low' not in swap
    assert "verifying" not in swap
    assert _fingerprints(database_dsn)["results"][0] == 200_000


@pytest_twisted.ensureDeferred
async def test_migration_16_stopped_after_its_first_steps_runs_again_whole(
    database_dsn: str,
) -> None:
    _migrate_to_15(database_dsn)
    _query(database_dsn, POPULATE_SQL, {"start": datetime(2025, 1, 1, tzinfo=UTC)})
    for step in MIGRATIONS[15][:2]:  # the server stopped after the first validation
        _query(database_dsn, step)
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await store.stop()
    assert _query(database_dsn, "SELECT max(version) FROM schema_migrations") == [(16,)]
    assert _fingerprints(database_dsn)["results"][0] == 200_000
