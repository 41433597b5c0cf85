"""Hand-run benchmark of PostgresStore (not a test).

    PYTHONPATH=src /tmp/venv/bin/python bench/bench_store.py [--dsn DSN] [--history 1000000]

Prints results stored per second through ``record_results`` with batches of 1, 100 and
1000 (batches of 1 both one at a time and 16 at once, as many agents reporting singly
would), then the latency of ``latest_complete_execution`` for a task with 10k stored
results and for one with ``--history`` (default 1M). Without ``--dsn`` it runs on an
embedded PostgreSQL in a temporary folder; with one, it creates and drops a database.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2.extensions import make_dsn
from twisted.internet import defer, task

from taskscheduler.embedded_pg import EmbeddedPostgres
from taskscheduler.protocol import Output, ResultStatus, RunResult, TaskSpec
from taskscheduler.schedule import instant, parse_frequency
from taskscheduler.server.store.postgres import PostgresStore

ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)
FREQUENCY = parse_frequency("every 1 second")
AGENTS = [uuid.UUID(int=i + 1) for i in range(10)]
OUTPUT = Output.of(b"Filesystem 1K-blocks Used Available Use% Mounted on\n" * 2)


def spec() -> TaskSpec:
    return TaskSpec(uuid.uuid4(), "df -k /", FREQUENCY, ANCHOR, timedelta(seconds=1))


def results_for(task_id: uuid.UUID, first_k: int, count: int) -> list[RunResult]:
    """``count`` distinct results: every agent for consecutive executions."""
    out: list[RunResult] = []
    k = first_k
    while len(out) < count:
        at = instant(ANCHOR, FREQUENCY.interval, k)
        for agent in AGENTS:
            out.append(
                RunResult(
                    task_id,
                    agent,
                    at,
                    ResultStatus.SUCCEEDED,
                    exit_code=0,
                    started_at=at,
                    finished_at=at + timedelta(milliseconds=3),
                    stdout=OUTPUT,
                )
            )
        k += 1
    return out[:count]


async def throughput(store: PostgresStore, batch: int, total: int, concurrency: int = 1) -> float:
    created = await store.create_task(spec(), ANCHOR)
    results = results_for(created.task_id, 1, total)
    batches = [results[i : i + batch] for i in range(0, total, batch)]
    now = datetime.now(UTC)

    async def worker(mine: Sequence[list[RunResult]]) -> None:
        for chunk in mine:
            await store.record_results(chunk, now)

    started = time.perf_counter()
    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker(batches[i::concurrency])) for i in range(concurrency)]
    )
    return total / (time.perf_counter() - started)


def fill_history(dsn: str, task_id: uuid.UUID, results: int) -> None:
    """Store ``results`` results (2 agents per execution) directly, in bulk."""
    executions = results // 2
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO executions (task_id, scheduled_at, expected, reported, completed_at)
            SELECT %(t)s::uuid, %(anchor)s::timestamptz + k * interval '1 second', 2, 2,
                   %(anchor)s::timestamptz + k * interval '1 second'
            FROM generate_series(1, %(n)s) AS k;
            INSERT INTO results (task_id, scheduled_at, agent_id, status, exit_code,
                started_at, finished_at, stdout, stdout_bytes, stdout_truncated,
                stderr, stderr_bytes, stderr_truncated, digest, received_at)
            SELECT %(t)s::uuid, %(anchor)s::timestamptz + k * interval '1 second', a,
                   'succeeded', 0, now(), now(), %(out)s, length(%(out)s), false,
                   '', 0, false, sha256(%(out)s), now()
            FROM generate_series(1, %(n)s) AS k,
                 unnest(ARRAY[%(a1)s::uuid, %(a2)s::uuid]) AS a;
            ANALYZE executions;
            ANALYZE results;
            """,
            {
                "t": str(task_id),
                "anchor": ANCHOR,
                "n": executions,
                "out": psycopg2.Binary(OUTPUT.data),
                "a1": str(AGENTS[0]),
                "a2": str(AGENTS[1]),
            },
        )
    conn.close()


async def latency(
    store: PostgresStore, task_id: uuid.UUID, executions: int, calls: int = 500
) -> tuple[float, float]:
    # "now" falls amid the history, with the newest executions incomplete, as in life.
    now = instant(ANCHOR, FREQUENCY.interval, executions) + timedelta(seconds=1)
    timings = []
    for _ in range(calls):
        started = time.perf_counter()
        execution = await store.latest_complete_execution(task_id, now, timedelta(seconds=30))
        timings.append(time.perf_counter() - started)
        assert execution is not None and len(execution.results) == 2
    timings.sort()
    return statistics.median(timings) * 1000, timings[int(len(timings) * 0.99)] * 1000


async def main(reactor: Any, options: argparse.Namespace) -> None:
    embedded = None
    server_dsn = options.dsn
    if server_dsn is None:
        folder = Path(tempfile.mkdtemp(prefix="bench-store-"))
        embedded = EmbeddedPostgres(folder / "pgdata", reactor)
        server_dsn = await embedded.start()
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(server_dsn)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name}")
    dsn = make_dsn(server_dsn, dbname=name)
    store = PostgresStore(dsn, reactor, pool_size=options.pool_size)
    try:
        await store.start()
        await store.set_fleet([f"http://agent-{i}:8081" for i in range(len(AGENTS))])
        print("record_results throughput (distinct results, one transaction per call):")
        for batch, total, concurrency in [
            (1, 3_000, 1),
            (1, 10_000, 16),
            (100, 50_000, 1),
            (1000, 100_000, 1),
            (1000, 100_000, 4),
        ]:
            rate = await throughput(store, batch, total, concurrency)
            print(
                f"  batch {batch:>4} x {concurrency:>2} concurrent: {rate:>9,.0f} results/s"
                f"  ({total:,} results)"
            )
        print("latest_complete_execution latency (500 calls, one at a time):")
        for size in (10_000, options.history):
            created = await store.create_task(spec(), ANCHOR)
            started = time.perf_counter()
            fill_history(dsn, created.task_id, size)
            filled = time.perf_counter() - started
            median, p99 = await latency(store, created.task_id, size // 2)
            print(
                f"  {size:>9,} stored results: median {median:.3f} ms, p99 {p99:.3f} ms"
                f"  (history filled in {filled:.1f} s)"
            )
    finally:
        await store.stop()
        admin.cursor().execute(f"DROP DATABASE {name} WITH (FORCE)")
        admin.close()
        if embedded is not None:
            await embedded.stop()
            shutil.rmtree(embedded.data_dir.parent, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dsn", help="a PostgreSQL server DSN (default: embedded)")
    parser.add_argument("--history", type=int, default=1_000_000)
    parser.add_argument("--pool-size", type=int, default=PostgresStore.DEFAULT_POOL_SIZE)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, parser.parse_args())))
