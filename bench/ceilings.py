"""What this machine itself can do, measured bare, for the scenarios' ratios.

    .venv/bin/python bench/ceilings.py --json-out FILE [--command LABEL=CMD ...] [--quick]

Writes one JSON object to FILE (replacing it)::

    {"spawn:bash-echo": {"value": 820.0, "unit": "/s", "command": "..."},
     "insert-rows": {...}, "web-requests": {...}, "machine": {"cores": 2, ...}}

- ``spawn:<label>``: starts/s of ``/bin/sh -c CMD`` by ``subprocess.run``, one worker
  process per core, each starting the next as soon as the last has exited. The command
  runs in a temporary folder (a ``>> witness`` lands there) with the task/instant
  variables an agent would set. By default the command of scenario 1 (``bash-echo``);
  ``--command LABEL=CMD`` adds others.
- ``insert-rows``: rows/s of multi-row ``INSERT``s (``execute_values``, 1000 rows a
  statement, one commit each) from one connection into a table ``LIKE results`` (columns,
  defaults, keys and indexes of the real schema, every migration applied) on an embedded
  PostgreSQL started for the measure.
- ``web-requests``: requests/s of a plain ``twisted.web`` ``Resource`` (one process)
  answering a small JSON body to POSTs of a small JSON body, loaded by client processes
  (one per core) holding ``--connections`` keep-alive connections in all.

Each is measured ``--rounds`` times (the median is the value; every round is in the
entry). Exits non-zero only if a ceiling could not be measured.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from hashlib import sha256
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg2
from psycopg2.extras import execute_values

from bench.bench_agent_load import SWEEP_COMMAND
from bench.loadapi import Postgres
from taskscheduler.server.store.migrations import MIGRATIONS
from tests.integration.daemons import free_port, wait_for

DEFAULT_COMMANDS = {"bash-echo": SWEEP_COMMAND}
INSERT_BATCH = 1000
CORES = os.cpu_count() or 1


def median_of(rounds: Callable[[], float], count: int) -> tuple[float, list[float]]:
    values = [round(rounds(), 1) for _ in range(count)]
    return round(statistics.median(values), 1), values


# -- spawn ------------------------------------------------------------------------------------


def _spawn_worker(command: str, folder: str, until: float) -> int:
    """Start ``command`` again and again until ``until`` (monotonic, shared by workers)."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "TASKSCHEDULER_TASK_ID": str(uuid.uuid4()),
        "TASKSCHEDULER_SCHEDULED_AT": datetime.now(UTC).isoformat(),
    }
    started = 0
    while time.monotonic() < until:
        subprocess.run(["/bin/sh", "-c", command], cwd=folder, env=env, check=False)
        started += 1
    return started


def spawn_rate(pool: ProcessPoolExecutor, command: str, seconds: float) -> float:
    folder = tempfile.mkdtemp(prefix="bench-ceiling-spawn-")
    try:
        began = time.monotonic() + 0.2  # every worker starts at the same moment
        until = began + seconds
        futures = [pool.submit(_spawn_worker, command, folder, until) for _ in range(CORES)]
        started = sum(f.result() for f in futures)
        # The last start of each worker ends after ``until``: count the real span.
        return started / (time.monotonic() - began)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def spawn_ceiling(command: str, seconds: float) -> float:
    """``spawn:<label>`` of one command, for a script run without ``--ceilings``."""
    with ProcessPoolExecutor(CORES) as pool:
        return spawn_rate(pool, command, seconds)


# -- insert ----------------------------------------------------------------------------------

OUTPUT = b"Filesystem 1K-blocks Used Available Use% Mounted on\n" * 2


def insert_rate(dsn: str, seconds: float) -> float:
    """Rows/s of 1000-row INSERTs into a copy of ``results``' shape, one commit each."""
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS ceiling_results")
            cursor.execute("CREATE TABLE ceiling_results (LIKE results INCLUDING ALL)")
        conn.commit()
        agent = str(uuid.uuid4())
        anchor = datetime(2026, 1, 1, tzinfo=UTC)
        body = (OUTPUT, len(OUTPUT), False, b"", 0, False, sha256(OUTPUT).digest(), anchor)
        rows = 0
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            task = str(uuid.uuid4())
            batch = [
                (task, anchor + timedelta(seconds=i), agent, "succeeded", 0, anchor, anchor, *body)
                for i in range(INSERT_BATCH)
            ]
            with conn.cursor() as cursor:
                execute_values(
                    cursor,
                    """INSERT INTO ceiling_results (task_id, scheduled_at, agent_id, status,
                        exit_code, started_at, finished_at, stdout, stdout_bytes,
                        stdout_truncated, stderr, stderr_bytes, stderr_truncated, digest,
                        received_at) VALUES %s""",
                    batch,
                    page_size=INSERT_BATCH,
                )
            conn.commit()
            rows += len(batch)
        return rows / (time.monotonic() - began)
    finally:
        conn.close()


def results_database(pg: Postgres) -> str:
    """A fresh database with every migration applied (the real ``results`` table)."""
    dsn = pg.create_database()
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cursor:
            for sql in MIGRATIONS:
                cursor.execute(sql)
        conn.commit()
    finally:
        conn.close()
    return dsn


# -- web -------------------------------------------------------------------------------------

PLAIN_SERVER = """
import json, sys
from twisted.internet import reactor
from twisted.web import resource, server

class Plain(resource.Resource):
    isLeaf = True
    def render_POST(self, request):
        json.loads(request.content.read())
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"status": "ok"}).encode()

reactor.listenTCP(int(sys.argv[1]), server.Site(Plain()), interface="127.0.0.1")
reactor.run()
"""
BODY = json.dumps({"command": ":", "frequency": "every 1 hour"}).encode()


def _request(port: int) -> bytes:
    return (
        f"POST /api/v1/ping HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


def _one_connection(port: int, until: float, counts: list[int]) -> None:
    """Keep-alive requests on one connection until ``until``; 200s counted in ``counts``."""
    request = _request(port)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        while time.monotonic() < until:
            sock.sendall(request)
            while b"\r\n\r\n" not in buffer:
                buffer += sock.recv(65536) or _closed()
            head, _, buffer = buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffer) < length:
                buffer += sock.recv(65536) or _closed()
            buffer = buffer[length:]
            if head.split(b" ", 2)[1] != b"200":
                raise RuntimeError(f"the plain server answered {head[:100]!r}")
            counts[0] += 1


def _closed() -> bytes:
    raise ConnectionError("the plain server closed the connection")


def _web_client(port: int, connections: int, until: float) -> int:
    counts = [[0] for _ in range(connections)]
    threads = [threading.Thread(target=_one_connection, args=(port, until, c)) for c in counts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(c[0] for c in counts)


def web_rate(pool: ProcessPoolExecutor, port: int, connections: int, seconds: float) -> float:
    began = time.monotonic() + 0.2
    until = began + seconds
    shares = [connections // CORES + (i < connections % CORES) for i in range(CORES)]
    futures = [pool.submit(_web_client, port, n, until) for n in shares if n]
    answered = sum(f.result() for f in futures)
    return answered / (time.monotonic() - began)


def serve_plain() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, str(port)])

    def up() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_for(up, 30, "the plain twisted.web server")
    return process, port


# -- the lot ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = None
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cores": CORES,
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    seconds = 2.0 if args.quick else args.seconds
    rounds = 1 if args.quick else args.rounds
    commands = dict(DEFAULT_COMMANDS)
    for item in args.command:
        label, _, command = item.partition("=")
        if not command:
            raise SystemExit(f"--command {item!r}: expected LABEL=CMD")
        commands[label] = command
    out: dict[str, Any] = {"machine": machine()}
    with ProcessPoolExecutor(CORES) as pool:
        for label, command in commands.items():
            value, values = median_of(functools.partial(spawn_rate, pool, command, seconds), rounds)
            out[f"spawn:{label}"] = {
                "value": value,
                "unit": "/s",
                "command": command,
                "rounds": values,
                "workers": CORES,
            }
            print(f"  spawn:{label:<14} {value:>10,.0f} starts/s  ({command})")
        server, port = serve_plain()
        try:
            web_rate(pool, port, args.connections, 1.0)  # warm-up
            value, values = median_of(
                lambda: web_rate(pool, port, args.connections, seconds), rounds
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
        out["web-requests"] = {
            "value": value,
            "unit": "/s",
            "rounds": values,
            "connections": args.connections,
            "client_processes": CORES,
        }
        print(f"  {'web-requests':<20} {value:>10,.0f} requests/s ({args.connections} conns)")
    root = Path(tempfile.mkdtemp(prefix="bench-ceilings-"))
    pg = Postgres(args.database, root / "postgres")
    try:
        dsn = results_database(pg)
        insert_rate(dsn, 1.0)  # warm-up
        value, values = median_of(lambda: insert_rate(dsn, seconds), rounds)
    finally:
        pg.close(drop=True)
        shutil.rmtree(root, ignore_errors=True)
    out["insert-rows"] = {
        "value": value,
        "unit": "/s",
        "rounds": values,
        "batch": INSERT_BATCH,
        "connections": 1,
    }
    print(f"  {'insert-rows':<20} {value:>10,.0f} rows/s ({INSERT_BATCH} a statement)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json-out", required=True, help="write the ceilings' JSON here")
    parser.add_argument("--command", action="append", default=[], metavar="LABEL=CMD")
    parser.add_argument("--quick", action="store_true", help="2 s, one round each")
    parser.add_argument("--seconds", type=float, default=5.0, help="per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8, help="web-requests' clients")
    parser.add_argument("--database", help="a PostgreSQL server DSN (default: embedded)")
    args = parser.parse_args()
    print(f"ceilings ({CORES} cores):")
    ceilings = measure(args)
    Path(args.json_out).write_text(json.dumps(ceilings, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
