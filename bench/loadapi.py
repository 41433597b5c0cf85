"""The database and the operator's API of a load scenario: a PostgreSQL (embedded, or a
server a DSN names) with one fresh database per scenario, the REST API with the
operator's token (tasks created at a steady pace or in a burst, deleted), and the agents'
health polled until they hold their tasks."""

from __future__ import annotations

import http.client as httpclient
import itertools
import json
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg2
from psycopg2.extensions import make_dsn

from bench.loadkit import (
    US,
    micros,
)
from taskscheduler.embedded_pg import EmbeddedPostgres
from tests.integration.daemons import Fleet, http

# -- database and API ------------------------------------------------------------------------


class Postgres:
    """The PostgreSQL the scenarios' databases live on: embedded, or the one ``dsn`` names."""

    def __init__(self, dsn: str | None, folder: Path) -> None:
        self.embedded: EmbeddedPostgres | None = None
        if dsn is None:
            self.embedded = EmbeddedPostgres(folder)
            dsn = self.embedded.start_blocking()
        self.dsn = dsn
        self.databases: list[str] = []

    def create_database(self) -> str:
        name = f"bench_agent_load_{uuid.uuid4().hex[:12]}"
        self._execute(f"CREATE DATABASE {name} TEMPLATE template0")
        self.databases.append(name)
        return str(make_dsn(self.dsn, dbname=name))

    def _execute(self, statement: str) -> None:
        conn = psycopg2.connect(self.dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(statement)
        finally:
            conn.close()

    def close(self, drop: bool) -> None:
        if drop and self.embedded is None:
            for name in self.databases:
                try:
                    self._execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
                except psycopg2.Error as e:
                    print(f"  could not drop database {name}: {e}", file=sys.stderr)
        if self.embedded is not None:
            self.embedded.stop_blocking()


def query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())
    finally:
        conn.close()


class Operator:
    """The server's REST API with the operator's token; a keep-alive connection per thread."""

    def __init__(self, fleet: Fleet) -> None:
        url = urlsplit(fleet.server_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 80
        self.headers = {
            "Authorization": f"Bearer {fleet.operator_token}",
            "Content-Type": "application/json",
        }
        self._local = threading.local()

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request (a broken kept-alive connection is reopened once)."""
        for attempt in range(2):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = httpclient.HTTPConnection(
                    self.host, self.port, timeout=60
                )
            try:
                conn.request(method, path, None if body is None else json.dumps(body), self.headers)
                response = conn.getresponse()
                data = response.read()
                return response.status, json.loads(data or b"null")
            except (OSError, httpclient.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


@dataclass
class Creation:
    seconds: float
    created: int
    failed: list[str] = field(default_factory=list)
    behind_pace_max: float = 0.0


def create_tasks(
    api: Operator,
    count: int,
    command: str,
    interval: int,
    paced: bool,
    concurrency: int,
    within: float | None = None,
) -> Creation:
    """Create ``count`` tasks, paced evenly over one ``interval`` unless not ``paced``;
    with ``within``, no new create is sent after that many seconds (``created`` says how
    many there were).

    The database is the truth of what exists: a request retried after a lost answer may
    have created its task twice, which the scenarios see (they read tasks from it)."""
    indices = itertools.count()
    lock = threading.Lock()
    outcome = Creation(0.0, 0)
    started = time.monotonic()
    give_up = threading.Event()

    def worker() -> None:
        while not give_up.is_set():
            with lock:
                i = next(indices)
            if i >= count or (within is not None and time.monotonic() - started > within):
                return
            if paced:
                lag = time.monotonic() - (started + i * interval / count)
                if lag < 0:
                    time.sleep(-lag)
                else:
                    with lock:
                        outcome.behind_pace_max = max(outcome.behind_pace_max, lag)
            error = ""
            for attempt in range(5):
                try:
                    code, body = api.request(
                        "POST",
                        "/api/v1/tasks/create",
                        {"command": command, "frequency": f"every {interval} seconds"},
                    )
                except (OSError, httpclient.HTTPException) as e:
                    code, body = 0, repr(e)
                if code == 201:
                    with lock:
                        outcome.created += 1
                    break
                error = f"{code} {str(body)[:200]}"
                time.sleep(0.5 * (attempt + 1))
            else:
                with lock:
                    outcome.failed.append(error)
                    if len(outcome.failed) > 20:
                        give_up.set()

    run_pool(worker, concurrency)
    outcome.seconds = time.monotonic() - started
    if give_up.is_set():
        raise RuntimeError(f"task creation keeps failing: {outcome.failed[:3]}")
    return outcome


def run_pool(worker: Any, threads: int) -> None:
    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def delete_tasks(api: Operator, task_ids: Sequence[str], concurrency: int) -> None:
    pending = iter(list(task_ids))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                task_id = next(pending, None)
            if task_id is None:
                return
            for _ in range(5):
                try:
                    code, _body = api.request("DELETE", f"/api/v1/tasks/{task_id}")
                except (OSError, httpclient.HTTPException):
                    code = 0
                if code in (200, 404):
                    break
                time.sleep(0.5)

    run_pool(worker, concurrency)


def live_tasks(dsn: str) -> list[tuple[str, int, int]]:
    """Every task not deleted: (id, anchor in µs, interval in µs)."""
    rows = query(
        dsn, "SELECT task_id::text, anchor, interval_seconds FROM tasks WHERE deleted_at IS NULL"
    )
    return [(task_id, micros(anchor), interval * US) for task_id, anchor, interval in rows]


def agent_health(fleet: Fleet, index: int, timeout: float = 5.0) -> dict[str, Any] | None:
    try:
        code, body = http("GET", f"{fleet.agent_urls[index]}/api/v1/health", timeout=timeout)
    except Exception:
        return None
    return body if code == 200 and isinstance(body, dict) else None


def wait_agents(
    fleet: Fleet, what: str, ready: Any, timeout: float, progress: float = 15.0
) -> tuple[float, list[dict[str, Any] | None]]:
    """Poll every agent's health until ``ready(body)`` holds for all, or ``timeout``.

    Returns the seconds waited and the last answers (a timeout is reported, not raised:
    an agent that cannot take its tasks is a figure, not an error)."""
    started = time.monotonic()
    next_note = started + progress
    while True:
        for daemon in fleet.agents:
            daemon.assert_running()
        answers = [agent_health(fleet, i) for i in range(len(fleet.agents))]
        waited = time.monotonic() - started
        if all(a is not None and ready(a) for a in answers):
            return waited, answers
        if waited > timeout:
            print(f"  gave up waiting after {waited:.0f} s for {what}: {summarise(answers)}")
            return waited, answers
        if time.monotonic() > next_note:
            print(f"  ... {waited:.0f} s waiting for {what}: {summarise(answers)}")
            next_note += progress
        time.sleep(0.5)


def holding(count: int) -> Any:
    """A health check that holds when the agent has at least ``count`` tasks."""
    return lambda answer: answer.get("tasks", 0) >= count


def summarise(answers: Sequence[dict[str, Any] | None]) -> str:
    return "; ".join(
        "no answer"
        if a is None
        else f"tasks={a.get('tasks')} running={a.get('running')} spooled={a.get('spooled')}"
        for a in answers
    )
