"""Scenario 5, query: ``latest_output`` and a history page with millions of stored results.

    .venv/bin/python bench/bench_query.py [--quick] [--ceilings FILE] [--json-out FILE]
        [--results 10000000] [--small 10000] [--tasks 10] [--agents 4]
        [--requests 1000] [--explain] [--keep]

For each scale (``--small`` results, then ``--results``: 10 thousand and 10 million;
``--quick``: 1 million) a fresh database on one embedded PostgreSQL in a temporary folder
gets the real schema from a real ``twistd`` server (its migrations), ``--agents`` agents
enrolled with a join secret and ``--tasks`` tasks ``every 1 seconds`` created through the
API. The history is then written straight in SQL (``generate_series``, task by task in
key order, as the server would have appended it): each task's anchor moved back so that
results / (tasks x agents) instants end now, every agent's result of each, the newest
instants incomplete as in life (half the agents reported, some not yet past their
reporting deadline), then ``VACUUM ANALYZE`` (what autovacuum does over the hours the
history took). The server is started again on it and one client with a kept-alive
connection and the operator's token times, over HTTP, after a warm-up:

- ``GET /api/v1/tasks/{id}/latest_output`` of a random task;
- ``GET /api/v1/tasks/{id}/executions`` (20 a page): the first page, and a page deep in
  the history (``?before=`` a random instant).

Figures (p50/p99 in ms, ``--requests`` each; and the server's CPU per request, which a
shared machine's load hides least): targets p99 < 10 ms at the large scale, and no
slower than at the small one (``ratio`` = large p99 / small p99, met while <= 1.25: the
noise of a shared machine). ``--explain`` prints ``EXPLAIN (ANALYZE, BUFFERS)`` of the
store's own SQL (:mod:`taskscheduler.server.store.results`) at each scale. The temporary
folder (database included) is removed at the end unless ``--keep``. Exits non-zero only
if it could not measure.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg2

from bench.contract import Figure, add_arguments, emit
from bench.loadapi import Operator, Postgres
from bench.loadkit import ProcStat, environment, run_in_folder, spread, stop_daemons
from taskscheduler.schedule import format_instant
from taskscheduler.server.store import results as store_sql
from tests.integration.daemons import Daemon, Fleet, http

SCENARIO = "5-query"
P99_TARGET_MS = 10.0
#: Large p99 / small p99 still counted as "no slower" (a shared machine's noise).
NO_SLOWER = 1.25
#: The newest instants of each task with half its agents' results (the others to come).
INCOMPLETE = 20
#: Instants of one task written per statement.
CHUNK = 50_000
PAGE = 20

EXECUTIONS_SQL = """
INSERT INTO executions (task_id, scheduled_at, expected, reported, completed_at,
                        expected_urls, trigger, revision)
SELECT %(task)s::uuid, %(anchor)s + k * interval '1 second', %(agents)s,
       CASE WHEN k > %(complete)s THEN %(half)s ELSE %(agents)s END,
       CASE WHEN k > %(complete)s THEN NULL
            ELSE %(anchor)s + k * interval '1 second' + interval '40 milliseconds' END,
       %(urls)s::text[], 'schedule', 1
FROM generate_series(%(first)s::int, %(last)s::int) AS k
"""

RESULTS_SQL = """
INSERT INTO results (task_id, scheduled_at, agent_id, status, exit_code, signal,
                     started_at, finished_at, stdout, stdout_bytes, stdout_truncated,
                     stderr, stderr_bytes, stderr_truncated, digest, received_at, reason,
                     trigger, revision, attempt, final)
SELECT %(task)s::uuid, at, a.agent_id, s.status, s.code, NULL,
       at + interval '2 milliseconds', at + interval '12 milliseconds',
       convert_to(k::text || E' line of output\n', 'UTF8'), 22, false, '', 0, false,
       sha256(convert_to(k::text || a.agent_id::text, 'UTF8')),
       at + interval '30 milliseconds', NULL, 'schedule', 1, 1, true
FROM generate_series(%(first)s::int, %(last)s::int) AS k
CROSS JOIN LATERAL (SELECT %(anchor)s + k * interval '1 second' AS at) t
CROSS JOIN LATERAL (SELECT CASE WHEN k %% 97 = 0 THEN 'failed' ELSE 'succeeded' END AS status,
                           CASE WHEN k %% 97 = 0 THEN 1 ELSE 0 END AS code) s
JOIN unnest(%(agent_ids)s::uuid[]) WITH ORDINALITY AS a (agent_id, n)
  ON k <= %(complete)s OR a.n <= %(half)s
ORDER BY k, a.agent_id
"""


class Scale:
    """One database with ``results`` results, its server, and the figures measured."""

    def __init__(self, args: argparse.Namespace, pg: Postgres, root: Path, results: int) -> None:
        self.args = args
        self.results = results
        self.instants = max(INCOMPLETE + 1, results // (args.tasks * args.agents))
        self.dsn = pg.create_database()
        self.fleet = Fleet(root / f"scale-{results}", 0, self.dsn)
        self.urls = [f"http://bench-agent-{i}.invalid:1" for i in range(args.agents)]
        self.fleet.server.env["AVAILABLE_SERVERS"] = ",".join(self.urls)
        self.agent_ids: list[str] = []
        self.tasks: list[str] = []
        self.now = datetime.now(UTC)

    def prepare(self, daemons: list[Daemon]) -> None:
        """Schema, agents and tasks by the server; the history in SQL."""
        daemons.append(self.fleet.server)
        self.fleet.start()
        base = self.fleet.server_url
        for url in self.urls:
            agent_id = str(uuid.uuid4())
            code, body = http(
                "POST",
                base + "/api/v1/agents/enrol",
                {"agent_id": agent_id, "url": url},
                headers={"Authorization": f"Bearer {self.fleet.join_secret}"},
            )
            assert code == 201, body
            self.agent_ids.append(agent_id)
        for _ in range(self.args.tasks):
            code, body = self.fleet.api(
                "POST",
                "/api/v1/tasks/create",
                {"command": "echo bench", "frequency": "every 1 seconds"},
            )
            assert code == 201, body
            self.tasks.append(body["command_id"])
        # The server stays down while its history is written (it would try to reach the
        # agents, which are not there, meanwhile).
        self.fleet.server.stop()
        began = time.monotonic()
        self._write_history()
        print(
            f"  {self.results:,} results: {len(self.tasks)} tasks x {len(self.agent_ids)} agents x "
            f"{self.instants:,} instants written in {time.monotonic() - began:.0f} s"
        )
        self.fleet.start()

    def _write_history(self) -> None:
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        half = len(self.agent_ids) // 2
        complete = self.instants - INCOMPLETE
        try:
            with conn.cursor() as cursor:
                cursor.execute("SET synchronous_commit = off")
                for task in self.tasks:
                    # Every instant k = 1..instants of the task is in the past, the last
                    # one now: its anchor moves back, with its creation and revision 1.
                    anchor = self.now - timedelta(seconds=self.instants)
                    cursor.execute(
                        "UPDATE tasks SET anchor = %s, created_at = %s WHERE task_id = %s",
                        (anchor, anchor, task),
                    )
                    cursor.execute(
                        "UPDATE task_revisions SET anchor = %s, effective_at = %s"
                        " WHERE task_id = %s AND revision = 1",
                        (anchor, anchor, task),
                    )
                    for first in range(1, self.instants + 1, CHUNK):
                        params = {
                            "task": task,
                            "anchor": anchor,
                            "first": first,
                            "last": min(self.instants, first + CHUNK - 1),
                            "agents": len(self.agent_ids),
                            "half": half,
                            "complete": complete,
                            "urls": self.urls,
                            "agent_ids": sorted(self.agent_ids),
                        }
                        cursor.execute(EXECUTIONS_SQL, params)
                        cursor.execute(RESULTS_SQL, params)
                cursor.execute("VACUUM ANALYZE executions")
                cursor.execute("VACUUM ANALYZE results")
        finally:
            conn.close()

    def explain(self) -> dict[str, str]:
        """EXPLAIN (ANALYZE, BUFFERS) of the store's reads for one task."""
        task = self.tasks[0]
        deep = self.now - timedelta(seconds=self.instants // 2)
        plans = {}
        statements: dict[str, tuple[str, dict[str, Any]]] = {
            "latest_output": (
                store_sql.LATEST_OUTPUT_SQL,
                {"task_id": task, "now": datetime.now(UTC), "grace": timedelta(seconds=5)},
            ),
            "history page, first": (
                store_sql.HISTORY_PAGE_SQL,
                {"task_id": task, "before": None, "limit": PAGE},
            ),
            "history page, deep": (
                store_sql.HISTORY_PAGE_SQL,
                {"task_id": task, "before": deep, "limit": PAGE},
            ),
        }
        conn = psycopg2.connect(self.dsn)
        try:
            with conn.cursor() as cursor:
                for name, (sql, params) in statements.items():
                    cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)
                    plans[name] = "\n".join(row[0] for row in cursor.fetchall())
        finally:
            conn.close()
        return plans

    def measure(self) -> dict[str, dict[str, Any]]:
        api = Operator(self.fleet)
        rng = random.Random(13)

        def latest() -> str:
            return f"/api/v1/tasks/{rng.choice(self.tasks)}/latest_output"

        def first_page() -> str:
            return f"/api/v1/tasks/{rng.choice(self.tasks)}/executions?limit={PAGE}"

        def deep_page() -> str:
            ago = rng.randrange(INCOMPLETE, self.instants)
            before = format_instant(self.now - timedelta(seconds=ago))
            return f"/api/v1/tasks/{rng.choice(self.tasks)}/executions?limit={PAGE}&before={before}"

        out = {}
        for name, path in (
            ("latest_output", latest),
            ("history first page", first_page),
            ("history deep page", deep_page),
        ):
            out[name] = self._time(api, path)
        return out

    def _time(self, api: Operator, path: Callable[[], str]) -> dict[str, Any]:
        for _ in range(max(20, self.args.requests // 10)):
            api.request("GET", path())
        took = []
        assert self.fleet.server.process is not None
        server = ProcStat(self.fleet.server.process.pid)
        cpu = server.cpu_seconds()
        for _ in range(self.args.requests):
            target = path()
            began = time.perf_counter()
            code, body = api.request("GET", target)
            took.append(1000 * (time.perf_counter() - began))
            if code != 200:
                raise RuntimeError(f"GET {target}: {code} {str(body)[:300]}")
        # The server's own CPU per request: what a shared machine's load hides least.
        cpu_ms = 1000 * (server.cpu_seconds() - cpu) / self.args.requests
        return {**spread(took), "server_cpu_ms": round(cpu_ms, 3)}

    def stop(self) -> None:
        stop_daemons([self.fleet.server])


def run(args: argparse.Namespace, root: Path, daemons: list[Daemon]) -> dict[str, Any]:
    pg = Postgres(None, root / "postgres")
    try:
        conn = psycopg2.connect(pg.dsn)
        conn.autocommit = True
        with conn.cursor() as cursor:
            # Fewer checkpoints while millions of rows are written (this instance only).
            cursor.execute("ALTER SYSTEM SET max_wal_size = '8GB'")
            cursor.execute("SELECT pg_reload_conf()")
        conn.close()
        record: dict[str, Any] = {"tasks": args.tasks, "agents": args.agents, "scales": {}}
        for results in (args.small, args.results):
            scale = Scale(args, pg, root, results)
            scale.prepare(daemons)
            if args.explain:
                for name, plan in scale.explain().items():
                    print(f"  -- EXPLAIN {name} ({results:,} results)\n{plan}")
            figures = scale.measure()
            scale.stop()
            record["scales"][str(results)] = figures
            for name, s in figures.items():
                print(
                    f"  {results:>12,} results  {name:<20} "
                    f"p50 {s['p50']:.2f} ms  p99 {s['p99']:.2f} ms  "
                    f"server CPU {s['server_cpu_ms']:.2f} ms a request"
                )
        return record
    finally:
        stop_daemons(daemons)
        pg.close(drop=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)  # --quick: 1 million results, not 10; --ceilings: unused
    parser.add_argument("--results", type=int, default=None, help="the large scale (10 M)")
    parser.add_argument("--small", type=int, default=10_000, help="the small scale")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--requests", type=int, default=None, help="timed requests each (1000)")
    parser.add_argument("--explain", action="store_true", help="print the store's plans")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.results is None:
        args.results = 1_000_000 if args.quick else 10_000_000
    if args.requests is None:
        args.requests = 300 if args.quick else 1000
    return args


def main() -> int:
    args = parse_args()
    record = run_in_folder(
        SCENARIO, "bench-query-", args.keep, lambda root, daemons: run(args, root, daemons)
    )
    if record is None:
        return 1
    record.update(environment())
    small = record["scales"][str(args.small)]
    large = record["scales"][str(args.results)]
    for name in large:
        p99, base = large[name]["p99"], small[name]["p99"]
        ratio = round(p99 / base, 3) if base else None
        emit(
            args.json_out,
            Figure(
                SCENARIO,
                f"{name} p99 at {args.results:,} results",
                p99,
                "ms",
                ceiling=f"{name} p99 at {args.small:,} results",
                ratio=ratio,
                target=f"< {P99_TARGET_MS:g} ms and <= {NO_SLOWER:g} x the small scale's",
                met=p99 < P99_TARGET_MS and ratio is not None and ratio <= NO_SLOWER,
                detail={"small": small[name], "large": large[name], **record},
            ),
        )
    print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
