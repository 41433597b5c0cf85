"""An agent under load, with the real daemons and the real runner. Hand-run; prints
figures, asserts nothing.

    .venv/bin/python bench/bench_agent_load.py [--scenario many-tasks|sweep|both]
        [--tasks 10000] [--interval 100] [--window 60]            # many-tasks
        [--rates 10,50,100,200,400,800] [--step-window 20]          # sweep
        [--drain 10] [--database DSN] [--keep]

It measures whichever ``taskscheduler`` is installed in the venv of the Python running it
(``twistd`` is taken from beside that interpreter), so the same file measures the code
before and after a change: run it with each venv. It starts a real ``twistd -n
taskscheduler-server`` and real ``twistd -n taskscheduler-agent`` processes on free
loopback ports in a temporary folder, secured as in production (operator token, join
secret), on a fresh database: in an embedded PostgreSQL started for the run, or created on
the PostgreSQL server ``--database`` names (and dropped at the end). Tasks are created
through the REST API, then the run waits (up to ``--delivery-timeout``) until every agent
holds them all, says how long creation and delivery took, and measures a window:

- ``many-tasks``: one agent, ``--tasks`` tasks (10,000) ``every --interval seconds``
  (100) running ``:``, i.e. tasks/interval runs a second (100), for ``--window`` s (60).
  Then, after ``--drain`` s, the agent gets SIGTERM and the time until it exits is
  measured (at most ``--term-timeout`` s, then SIGKILL).
- ``sweep``: two agents, each running every task ``every 1 seconds``; for each total rate
  of ``--rates`` (runs a second over both agents) the step's tasks replace the previous
  step's, and a window of ``--step-window`` s (20) is measured. The command,
  ``bash -c 'echo "$TASKSCHEDULER_TASK_ID $TASKSCHEDULER_SCHEDULED_AT $EPOCHREALTIME"
  >> witness'``, appends to a file in its agent's folder: the ground truth of what ran,
  and when it really started.

Figures (an instant is one ``(task, agent, anchor + k * interval)`` inside the window):

- ``due``: instants of the window, the ceiling every other count is a ratio of.
  ``due/s max``: the most due in any one second (a steady load has max close to mean).
- ``stored``: results the server holds for those instants after the drain, by status;
  ``reasons``: the ``reason`` column of non-successful results if the schema has one,
  else the first line of their stderr. ``by window end``: stored before the window ended.
- ``within 1 s / 5 s``: results stored (``received_at``) within 1 s / 5 s of their
  instant, as a fraction of ``due``; the sweep gives those within 1 s per second.
- ``lateness``: ``started_at - scheduled_at`` of stored results (p50/p99/max), and in
  the sweep also the witness's own start time minus the instant.
- ``witnessed``: (sweep) instants of the window whose command wrote its witness line.
- agent ``fds`` (``/proc/PID/fd``, max of samples), ``RSS`` (max), ``CPU`` (share of one
  core over the window), ``health`` (latency of ``GET /api/v1/health``, a new connection
  each time, sampled every ``--sample-interval`` s; ``failed`` = no answer within 10 s),
  ``running``/``spooled`` (max of what health reported), warnings and errors the daemons
  logged during the window (the commonest message shapes in the table).

Tasks are created at a steady pace over one interval (``--burst``: as fast as possible,
``--create-concurrency`` requests at once). A task's anchor is its creation time, so
tasks created in a burst all fall due in the same slice of every interval, a burst of
runs instead of a steady rate; paced, the 10,000 tasks take the 100 s interval to create.
Each scenario prints a table and one JSON line (starting with ``{``) per scenario or
sweep step. ``--keep`` leaves the temporary folder (daemon logs, agent data, witness
files) for inspection; the daemons and the embedded PostgreSQL are stopped whatever
happens, Ctrl-C included. Validate at small scale on a shared machine, e.g.
``--tasks 500 --interval 25 --window 15 --rates 10,50 --step-window 10``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client as httpclient
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg2
from psycopg2.extensions import make_dsn

from taskscheduler.embedded_pg import EmbeddedPostgres
from tests.integration.daemons import Daemon, Fleet, http, wait_for

#: Each run appends "task instant start-time" to ``witness`` in its agent's folder.
SWEEP_COMMAND = (
    'bash -c \'echo "$TASKSCHEDULER_TASK_ID $TASKSCHEDULER_SCHEDULED_AT $EPOCHREALTIME"'
    " >> witness'"
)
MANY_TASKS_COMMAND = ":"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Statuses of results whose command did not run.
NOT_RUN = frozenset({"skipped", "lost"})
MICRO = timedelta(microseconds=1)
US = 1_000_000
HEALTH_TIMEOUT = 10.0
#: Twisted's text log: ``<time> [<namespace>#<level>] <message>``.
LOG_LEVEL = re.compile(r"^\S+ \[[^\]#]*#(warn|error|critical)\] (.*)$")


def micros(value: datetime) -> int:
    return (value - EPOCH) // MICRO


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def spread(values: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {
        "n": len(ordered),
        "p50": round(percentile(ordered, 50), 4),
        "p99": round(percentile(ordered, 99), 4),
        "max": round(ordered[-1], 4),
    }


def seconds(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}s"


def fraction(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# -- processes -------------------------------------------------------------------------------


def stop_daemons(daemons: Sequence[Daemon], grace: float = 20.0) -> None:
    """SIGTERM every live daemon at once, SIGKILL those still alive after ``grace`` s."""
    live = [d for d in daemons if d.process is not None and d.process.poll() is None]
    for daemon in live:
        assert daemon.process is not None
        with contextlib.suppress(ProcessLookupError):
            daemon.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for daemon in live:
        assert daemon.process is not None
        try:
            daemon.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"  {daemon.name} ignored SIGTERM for {grace:g} s: SIGKILL", file=sys.stderr)
            daemon.process.kill()
            daemon.process.wait()


def listening(daemon: Daemon, port: int) -> Callable[[], bool]:
    """Whether the daemon's log says it listens on ``port`` (not a stranger answering)."""
    return lambda: f"Site starting on {port}" in daemon.log()


def start_fleet(root: Path, agents: int, dsn: str, started: list[Daemon]) -> Fleet:
    """A fleet whose daemons really listen on their own ports (``free_port`` can race).

    Every daemon goes into ``started`` before it starts, so that the caller stops it
    whatever happens next."""
    for attempt in range(3):
        fleet = Fleet(root / f"fleet-{attempt}", agents, dsn)
        # The load measured is the agent's: creation is not rate-limited here.
        fleet.server.env["TASKSCHEDULER_CREATE_RATE"] = "0"
        ports = [fleet.server_port, *fleet.agent_ports]
        if len(set(ports)) != len(ports):
            continue
        daemons = [fleet.server, *fleet.agents]
        started.extend(daemons)
        try:
            fleet.start()
            for daemon, port in zip(daemons, ports, strict=True):
                wait_for(listening(daemon, port), 10, f"{daemon.name} to listen on {port}")
            return fleet
        except AssertionError as e:
            print(f"  fleet attempt {attempt} failed: {e}\n{fleet.logs()}", file=sys.stderr)
            stop_daemons(daemons)
    raise RuntimeError("could not start a fleet on free ports in 3 attempts")


@dataclass
class ProcStat:
    """What ``/proc`` says of one process; zeros once it is gone."""

    pid: int

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def rss_bytes(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process itself (not of its reaped children)."""
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0


class Sampler(threading.Thread):
    """Samples one daemon every ``interval`` s: fds, RSS, health latency and counters."""

    def __init__(self, name: str, pid: int, health_url: str | None, interval: float) -> None:
        super().__init__(name=f"sampler-{name}", daemon=True)
        self.proc = ProcStat(pid)
        self.health_url = health_url
        self.interval = interval
        self.stopping = threading.Event()
        self.fds: list[int] = []
        self.rss: list[int] = []
        self.health: list[float] = []
        self.health_failed = 0
        self.counters: dict[str, int] = collections.defaultdict(int)
        self._cpu0 = self.proc.cpu_seconds()
        self._t0 = time.monotonic()
        self.cpu_share: float | None = None

    def run(self) -> None:
        while not self.stopping.is_set():
            began = time.monotonic()
            self.fds.append(self.proc.fds())
            self.rss.append(self.proc.rss_bytes())
            if self.health_url is not None:
                self._probe_health()
            self.stopping.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def _probe_health(self) -> None:
        assert self.health_url is not None
        sent = time.monotonic()
        try:
            code, body = http("GET", self.health_url, timeout=HEALTH_TIMEOUT)
        except Exception:
            self.health_failed += 1
            return
        if code != 200 or not isinstance(body, dict):
            self.health_failed += 1
            return
        self.health.append(time.monotonic() - sent)
        for name in ("running", "spooled"):
            if isinstance(body.get(name), int):
                self.counters[name] = max(self.counters[name], body[name])

    def finish(self) -> None:
        self.stopping.set()
        self.join(timeout=HEALTH_TIMEOUT + 5)
        elapsed = time.monotonic() - self._t0
        self.cpu_share = (self.proc.cpu_seconds() - self._cpu0) / elapsed if elapsed else None

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fds_max": max(self.fds, default=None),
            "rss_mb_max": round(max(self.rss, default=0) / 2**20, 1),
            "cpu_share": None if self.cpu_share is None else round(self.cpu_share, 3),
        }
        if self.health_url is not None:
            out["health_s"] = {**spread(self.health), "failed": self.health_failed}
            out["running_max"] = self.counters.get("running")
            out["spooled_max"] = self.counters.get("spooled")
        return out


class LogWindow:
    """Warnings and errors a daemon logs from now until :meth:`close`."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.offset = self._size()
        self.levels: collections.Counter[str] = collections.Counter()
        self.shapes: collections.Counter[str] = collections.Counter()

    def _size(self) -> int:
        try:
            return self.daemon.log_path.stat().st_size
        except OSError:
            return 0

    def close(self) -> None:
        with open(self.daemon.log_path, "rb") as log:
            log.seek(self.offset)
            text = log.read(self._size() - self.offset).decode("utf-8", "replace")
        for line in text.splitlines():
            match = LOG_LEVEL.match(line)
            if match:
                self.levels[match.group(1)] += 1
                # One shape per message: ids, instants and numbers blanked.
                shape = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", match.group(2))
                self.shapes[re.sub(r"\d+(\.\d+)?", "N", shape)[:110]] += 1

    def figures(self) -> dict[str, int]:
        return dict(self.levels)

    def top(self, n: int = 3) -> list[str]:
        return [f"{count} x {shape}" for shape, count in self.shapes.most_common(n)]


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
) -> Creation:
    """Create ``count`` tasks, paced evenly over one ``interval`` unless not ``paced``.

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
            if i >= count:
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


# -- accounting ------------------------------------------------------------------------------


def due_instants(
    tasks: Sequence[tuple[str, int, int]], start: int, end: int
) -> dict[str, list[int]]:
    """Each task's instants ``anchor + k * interval`` (k >= 1) in ``[start, end)`` (µs)."""
    out: dict[str, list[int]] = {}
    for task_id, anchor, interval in tasks:
        first = max(1, -(-(start - anchor) // interval))
        last = -(-(end - anchor) // interval) - 1
        out[task_id] = [anchor + k * interval for k in range(first, last + 1)]
    return out


@dataclass
class Stored:
    task_id: str
    agent_id: str
    scheduled_at: int
    status: str
    started_at: int | None
    received_at: int
    reason: str | None


def stored_results(dsn: str, task_ids: Sequence[str], start: int, end: int) -> list[Stored]:
    columns = {
        row[0]
        for row in query(
            dsn, "SELECT column_name FROM information_schema.columns WHERE table_name = 'results'"
        )
    }
    reason = "reason" if "reason" in columns else "NULL"
    rows = query(
        dsn,
        f"""SELECT task_id::text, agent_id::text, scheduled_at, status, started_at,
                   received_at, {reason}, substring(stderr from 1 for 300)
            FROM results
            WHERE task_id = ANY(%s::uuid[]) AND scheduled_at >= %s AND scheduled_at < %s""",
        (list(task_ids), EPOCH + start * MICRO, EPOCH + end * MICRO),
    )
    out = []
    for task_id, agent_id, scheduled, status, started, received, why, stderr in rows:
        if why is None and status != "succeeded" and stderr:
            why = bytes(stderr).decode("utf-8", "replace").strip().splitlines()[0][:120]
        out.append(
            Stored(
                task_id,
                agent_id,
                micros(scheduled),
                status,
                None if started is None else micros(started),
                micros(received),
                why,
            )
        )
    return out


def account(results: Sequence[Stored], due: int, start: int, end: int) -> dict[str, Any]:
    """The window's figures from the stored results of its instants."""
    statuses = collections.Counter(r.status for r in results)
    reasons = collections.Counter(
        f"{r.status}: {r.reason or '(no reason given)'}" for r in results if r.status != "succeeded"
    )
    lags = [(r.received_at - r.scheduled_at) / US for r in results]
    lateness = [(r.started_at - r.scheduled_at) / US for r in results if r.started_at is not None]
    ran_lags = [(r.received_at - r.scheduled_at) / US for r in results if r.status not in NOT_RUN]
    window = (end - start) / US
    within_1s = sum(lag <= 1.0 for lag in lags)
    ran_within_1s = sum(lag <= 1.0 for lag in ran_lags)
    return {
        "due": due,
        "stored": len(results),
        "stored_ratio": fraction(len(results), due),
        "stored_by_window_end": sum(r.received_at < end for r in results),
        "statuses": dict(statuses),
        "reasons": dict(reasons.most_common(10)),
        "within_1s": fraction(within_1s, due),
        "within_5s": fraction(sum(lag <= 5.0 for lag in lags), due),
        "ran_within_1s": fraction(ran_within_1s, due),
        "on_time_per_s": round(within_1s / window, 1),
        "ran_on_time_per_s": round(ran_within_1s / window, 1),
        "lateness_s": spread(lateness),
    }


def due_shape(instants: dict[str, list[int]], agents: int, start: int, end: int) -> dict[str, Any]:
    """Due instants per second of the window: mean and max (the load's burstiness)."""
    buckets = collections.Counter((at - start) // US for ats in instants.values() for at in ats)
    window = (end - start) / US
    total = sum(buckets.values()) * agents
    return {
        "due_per_s_mean": round(total / window, 1),
        "due_per_s_max": max(buckets.values(), default=0) * agents,
    }


def read_witness(path: Path, task_ids: set[str], start: int, end: int) -> list[float]:
    """Start lateness (s) of each witnessed run of those tasks at instants in the window."""
    lateness: dict[tuple[str, int], float] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or parts[0] not in task_ids:
            continue
        try:
            at = micros(datetime.fromisoformat(parts[1]))
            began = float(parts[2])
        except ValueError:
            continue
        if start <= at < end:
            lateness.setdefault((parts[0], at), began - at / US)
    return list(lateness.values())


def sigterm_seconds(daemon: Daemon, timeout: float) -> float | None:
    """Seconds from SIGTERM until the daemon exits; None if it had to be SIGKILLed."""
    assert daemon.process is not None
    sent = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    try:
        daemon.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        daemon.process.wait()
        return None
    return time.monotonic() - sent


# -- scenarios -------------------------------------------------------------------------------


@dataclass
class Window:
    """Samplers and log watchers over one measurement window."""

    fleet: Fleet
    interval: float
    samplers: list[Sampler] = field(default_factory=list)
    logs: list[LogWindow] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, daemon in enumerate(self.fleet.agents):
            assert daemon.process is not None
            url = f"{self.fleet.agent_urls[i]}/api/v1/health"
            self.samplers.append(Sampler(daemon.name, daemon.process.pid, url, self.interval))
        server = self.fleet.server
        assert server.process is not None
        self.samplers.append(Sampler("server", server.process.pid, None, self.interval))
        self.logs = [LogWindow(d) for d in [*self.fleet.agents, self.fleet.server]]
        for sampler in self.samplers:
            sampler.start()

    def close(self) -> None:
        for sampler in self.samplers:
            sampler.finish()
        for log in self.logs:
            log.close()

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sampler, log in zip(self.samplers, self.logs, strict=True):
            out[sampler.name.removeprefix("sampler-")] = {
                **sampler.figures(),
                "log": log.figures(),
            }
        return out

    def top_logs(self) -> list[str]:
        return [f"{log.daemon.name}: {line}" for log in self.logs for line in log.top()]


def measure_window(
    fleet: Fleet, args: argparse.Namespace, length: float
) -> tuple[int, int, Window]:
    """Sample the fleet for ``length`` s from now; the window's bounds in µs."""
    start = micros(datetime.now(UTC))
    window = Window(fleet, args.sample_interval)
    try:
        time.sleep(length)
    finally:
        window.close()
    return start, start + int(length * US), window


def many_tasks(args: argparse.Namespace, pg: Postgres, root: Path, daemons: list[Daemon]) -> None:
    rate = args.tasks / args.interval
    print(
        f"\n== many-tasks: 1 agent, {args.tasks:,} tasks every {args.interval} s running "
        f"'{MANY_TASKS_COMMAND}' ({rate:g} runs/s), window {args.window:g} s"
    )
    dsn = pg.create_database()
    fleet = start_fleet(root / "many-tasks", 1, dsn, daemons)
    api = Operator(fleet)
    creation = create_tasks(
        api, args.tasks, MANY_TASKS_COMMAND, args.interval, not args.burst, args.create_concurrency
    )
    print(
        f"  created {creation.created:,} tasks in {creation.seconds:.1f} s "
        f"({creation.created / creation.seconds:,.0f}/s, "
        f"{'burst' if args.burst else f'paced, at most {creation.behind_pace_max:.1f} s behind'}"
        f"; {len(creation.failed)} failed)"
    )
    tasks = live_tasks(dsn)
    delivery, answers = wait_agents(
        fleet,
        f"the agent to hold {len(tasks):,} tasks",
        holding(len(tasks)),
        args.delivery_timeout,
    )
    held = [None if a is None else a.get("tasks") for a in answers]
    print(f"  delivered: the agent holds {held} tasks {delivery:.1f} s after creation ended")
    start, end, window = measure_window(fleet, args, args.window)
    time.sleep(args.drain)
    instants = due_instants(tasks, start, end)
    due = sum(len(v) for v in instants.values())
    figures = account(stored_results(dsn, [t[0] for t in tasks], start, end), due, start, end)
    term = sigterm_seconds(fleet.agents[0], args.term_timeout)
    record = {
        "scenario": "many-tasks",
        "tasks": len(tasks),
        "interval_s": args.interval,
        "runs_per_s": rate,
        "window_s": args.window,
        "drain_s": args.drain,
        "create_s": round(creation.seconds, 1),
        "create_mode": "burst" if args.burst else "paced",
        "create_failed": len(creation.failed),
        "delivery_s": round(delivery, 1),
        "held_by_agent": held[0],
        **due_shape(instants, 1, start, end),
        **figures,
        **window.figures(),
        "agent_sigterm_exit_s": None if term is None else round(term, 2),
        "term_timeout_s": args.term_timeout,
        **environment(),
    }
    stop_daemons([fleet.server, *fleet.agents])
    agent = record["agent-0"]
    health = agent["health_s"]
    late = figures["lateness_s"]
    rows = [
        (
            "instants due in the window",
            f"{due:,} (per second: mean {record['due_per_s_mean']}, max {record['due_per_s_max']})",
        ),
        (
            "results stored (after drain)",
            f"{figures['stored']:,} = "
            f"{percent(figures['stored_ratio'])} of due; {figures['stored_by_window_end']:,} "
            "by the window's end",
        ),
        (
            "by status",
            ", ".join(f"{k} {v:,}" for k, v in sorted(figures["statuses"].items())) or "-",
        ),
        ("reasons", "; ".join(f"{k} ({v:,})" for k, v in figures["reasons"].items()) or "-"),
        (
            "stored within 1 s / 5 s",
            f"{percent(figures['within_1s'])} / {percent(figures['within_5s'])} of due "
            f"(runs, not skips, within 1 s: {percent(figures['ran_within_1s'])})",
        ),
        (
            "start lateness p50/p99/max",
            f"{seconds(late['p50'])} / {seconds(late['p99'])} / "
            f"{seconds(late['max'])} (n={late['n']:,})",
        ),
        ("agent open fds (max)", f"{agent['fds_max']}"),
        ("agent RSS (max)", f"{agent['rss_mb_max']} MB"),
        (
            "agent / server CPU",
            f"{percent(agent['cpu_share'])} / {percent(record['server']['cpu_share'])} of one core",
        ),
        (
            "agent health p50/p99/max",
            f"{seconds(health['p50'])} / {seconds(health['p99'])} / "
            f"{seconds(health['max'])} ({health['n']} answered, {health['failed']} failed)",
        ),
        ("agent running / spooled (max)", f"{agent['running_max']} / {agent['spooled_max']}"),
        (
            "agent SIGTERM to exit",
            f"killed: still alive after {args.term_timeout:g} s"
            if term is None
            else f"{term:.2f} s",
        ),
        (
            "log warnings/errors",
            ", ".join(f"{name} {record[name]['log']}" for name in ("agent-0", "server")),
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    for line in window.top_logs():
        print(f"    {line}")
    print(json.dumps(record, sort_keys=True))


def sweep(args: argparse.Namespace, pg: Postgres, root: Path, daemons: list[Daemon]) -> None:
    agents = 2
    rates = [int(r) for r in args.rates.split(",") if r.strip()]
    print(
        f"\n== sweep: {agents} agents, tasks every 1 s running bash (witnessed), total rates "
        f"{rates} runs/s, {args.step_window:g} s per step"
    )
    dsn = pg.create_database()
    fleet = start_fleet(root / "sweep", agents, dsn, daemons)
    api = Operator(fleet)
    agent_ids = [str((agent_health(fleet, i) or {}).get("agent_id")) for i in range(agents)]
    header = (
        f"  {'runs/s':>6} {'tasks':>5} {'due':>6} {'witnessed':>9} {'stored':>7} "
        f"{'<=1s/s':>7} {'skipped':>7} {'late p50':>9} {'late p99':>9} {'wit p99':>8} "
        f"{'fds max':>7} {'health p99':>10}  create/deliver"
    )
    lines: list[str] = []
    for rate in rates:
        per_agent = max(1, round(rate / agents))
        old = [t[0] for t in live_tasks(dsn)]
        if old:
            delete_tasks(api, old, args.create_concurrency)
            wait_agents(
                fleet,
                "the agents to drop the last step's tasks",
                lambda a: a.get("tasks") == 0,
                args.delivery_timeout,
            )
        wait_agents(
            fleet,
            "the agents to finish and report the last step's runs",
            lambda a: not a.get("running") and not a.get("spooled"),
            60,
        )
        creation = create_tasks(
            api, per_agent, SWEEP_COMMAND, 1, not args.burst, args.create_concurrency
        )
        tasks = live_tasks(dsn)
        delivery, answers = wait_agents(
            fleet,
            f"the agents to hold {len(tasks)} tasks",
            holding(len(tasks)),
            args.delivery_timeout,
        )
        start, end, window = measure_window(fleet, args, args.step_window)
        time.sleep(args.drain)
        instants = due_instants(tasks, start, end)
        due = sum(len(v) for v in instants.values()) * agents
        task_ids = [t[0] for t in tasks]
        figures = account(stored_results(dsn, task_ids, start, end), due, start, end)
        witness = [
            late
            for agent in fleet.agents
            for late in read_witness(agent.workdir / "witness", set(task_ids), start, end)
        ]
        record = {
            "scenario": "sweep",
            "runs_per_s": rate,
            "tasks": len(tasks),
            "agents": agents,
            "agent_ids": agent_ids,
            "window_s": args.step_window,
            "drain_s": args.drain,
            "create_s": round(creation.seconds, 2),
            "create_failed": len(creation.failed),
            "delivery_s": round(delivery, 1),
            "held_by_agents": [None if a is None else a.get("tasks") for a in answers],
            **due_shape(instants, agents, start, end),
            **figures,
            "witnessed": len(witness),
            "witnessed_ratio": fraction(len(witness), due),
            "witness_lateness_s": spread(witness),
            **window.figures(),
            **environment(),
        }
        late = figures["lateness_s"]
        fds = max(record[f"agent-{i}"]["fds_max"] or 0 for i in range(agents))
        health = max(
            (record[f"agent-{i}"]["health_s"]["p99"] or 0.0 for i in range(agents)), default=0
        )
        line = (
            f"  {rate:>6} {len(tasks):>5} {due:>6} {percent(record['witnessed_ratio']):>9} "
            f"{percent(figures['stored_ratio']):>7} {figures['ran_on_time_per_s']:>7} "
            f"{figures['statuses'].get('skipped', 0):>7} {seconds(late['p50']):>9} "
            f"{seconds(late['p99']):>9} {seconds(record['witness_lateness_s']['p99']):>8} "
            f"{fds:>7} {seconds(health):>10}  {creation.seconds:.1f} s / {delivery:.1f} s"
        )
        lines.append(line)
        print(header)
        print(line)
        if figures["reasons"]:
            print("    reasons: " + "; ".join(f"{k} ({v})" for k, v in figures["reasons"].items()))
        for log_line in window.top_logs():
            print(f"    {log_line}")
        print(json.dumps(record, sort_keys=True))
    stop_daemons([fleet.server, *fleet.agents])
    print(
        "\n  sweep summary (witnessed and stored: ratios to due; <=1s/s: runs, not skips, "
        "whose result was stored within 1 s of their instant, per second; late: started_at "
        "- instant; wit: the witness's start time - instant)"
    )
    print(header)
    for line in lines:
        print(line)


def environment() -> dict[str, Any]:
    try:
        version = metadata.version("taskscheduler")
    except metadata.PackageNotFoundError:
        version = None
    return {
        "taskscheduler": version,
        "venv": sys.prefix,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", choices=["many-tasks", "sweep", "both"], default="both")
    group = parser.add_argument_group("many-tasks")
    group.add_argument("--tasks", type=int, default=10_000, help="tasks on the one agent")
    group.add_argument("--interval", type=int, default=100, help="their interval, in seconds")
    group.add_argument("--window", type=float, default=60.0, help="seconds measured")
    group.add_argument(
        "--term-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the agent to exit on SIGTERM, then SIGKILL",
    )
    group = parser.add_argument_group("sweep")
    group.add_argument(
        "--rates",
        default="10,50,100,200,400,800",
        help="total runs per second over both agents, one step each",
    )
    group.add_argument("--step-window", type=float, default=20.0, help="seconds per step")
    group = parser.add_argument_group("both")
    group.add_argument(
        "--drain",
        type=float,
        default=10.0,
        help="seconds after a window before its results are counted",
    )
    group.add_argument(
        "--burst",
        action="store_true",
        help="create tasks as fast as possible instead of over one interval",
    )
    group.add_argument("--create-concurrency", type=int, default=8)
    group.add_argument(
        "--delivery-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for the agents to hold every task",
    )
    group.add_argument("--sample-interval", type=float, default=0.5)
    group.add_argument(
        "--database",
        default=None,
        help="DSN of a PostgreSQL server to create (and drop) the databases "
        "on; default: an embedded PostgreSQL in the temporary folder",
    )
    group.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder (logs, agent data, witness files)",
    )
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-agent-load-"))
    daemons: list[Daemon] = []
    pg: Postgres | None = None
    interrupted = False
    keep = args.keep

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both end up in the clean-up below (even when started from a
    # script that ignores SIGINT in background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminated)
    print(f"taskscheduler {environment()['taskscheduler']} from {sys.prefix}; folder {root}")
    try:
        pg = Postgres(args.database, root / "postgres")
        if args.scenario in ("many-tasks", "both"):
            many_tasks(args, pg, root, daemons)
        if args.scenario in ("sweep", "both"):
            sweep(args, pg, root, daemons)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the daemons", file=sys.stderr)
        interrupted = True
    except BaseException:
        keep = True  # for the logs
        for daemon in daemons:
            print(f"--- {daemon.name} ({daemon.log_path})\n{daemon.log()[-2000:]}", file=sys.stderr)
        raise
    finally:
        # Cleaning up is bounded (SIGKILL after a grace): let a second Ctrl-C not cut it short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_daemons(daemons)
        if pg is not None:
            pg.close(drop=not keep)
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
