"""Scenario 6's creation rate: tasks created a second through the REST API by 8 clients.

    .venv/bin/python bench/bench_create.py [--quick] [--ceilings FILE] [--json-out FILE]
        [--clients 8] [--tasks 20000] [--agents 2] [--profile FILE]

It measures whichever ``taskscheduler`` the interpreter imports (``twistd`` is taken from
beside it), so the same file measures the code before and after a change. A real server
(on its embedded PostgreSQL) and ``--agents`` real agents (2) run on loopback, secured as
in production (operator token, join secret; the agents enrolled), so that every create
assigns the task to the fleet and the server delivers it as in life. The server's create
rate limit is raised out of the way (it is an operator's policy, not the server's speed;
the limiter still runs on every request).

``--clients`` threads (8), each with one keep-alive connection and the operator's token,
create ``--tasks`` tasks (``:`` every hour, so that nothing runs during the measure) as
fast as the server answers, after a warm-up. The clients are lean (a request's bytes built
once, the answer parsed just enough to check it) so that the load generator takes as
little as possible of the two cores the server needs. The detail gives the CPU the
server, its PostgreSQL, the agents and the clients spent per task created.

Figures: tasks created a second (201 answers over the measured burst), as a ratio of the
``web-requests`` ceiling (``--ceilings``; without it, measured here as
``bench/ceilings.py`` does: a plain ``twisted.web`` resource); every answer is
checked (status 201, a task id); the detail says how long until every agent held every
task. ``--profile FILE`` records the server under ``py-spy`` during the burst (py-spy must
be installed in the venv; it is not a dependency).

Exits non-zero only if it could not measure (a daemon failed, answers other than 201).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ceilings import CORES, serve_plain, web_rate
from bench.contract import Figure, add_arguments, ceiling_value, emit, load_ceilings, ratio
from tests.integration.daemons import Fleet, wait_for

SCENARIO = "6-fanout"
FIGURE = "tasks created/s"
TARGET = 3000.0
BODY = {"command": ":", "frequency": "every 1 hour"}


class Client:
    """One keep-alive HTTP/1.1 connection sending the same request again and again."""

    def __init__(self, port: int, request: bytes) -> None:
        self._request = request
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buffer = b""

    def call(self) -> tuple[int, bytes]:
        """Send the request; the answer's (status, body)."""
        self._sock.sendall(self._request)
        head = self._until(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            return status, self._exactly(int(headers[b"content-length"]))
        body = b""
        while True:  # chunked
            size = int(self._until(b"\r\n").split(b";")[0], 16)
            chunk = self._exactly(size + 2)[:-2]
            if size == 0:
                return status, body
            body += chunk

    def _until(self, mark: bytes) -> bytes:
        while mark not in self._buffer:
            self._fill()
        head, _, self._buffer = self._buffer.partition(mark)
        return head

    def _exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _fill(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buffer += data

    def close(self) -> None:
        self._sock.close()


def post_request(port: int, path: str, token: str | None, body: Any) -> bytes:
    data = json.dumps(body).encode()
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
    ]
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + data


def load(
    port: int, request: bytes, clients: int, count: int, check: Callable[[int, bytes], str | None]
) -> tuple[float, int, list[str]]:
    """``count`` requests over ``clients`` connections: (seconds, good answers, errors)."""
    lock = threading.Lock()
    left = [count]
    good = [0]
    errors: list[str] = []
    connections = [Client(port, request) for _ in range(clients)]

    def worker(client: Client) -> None:
        mine = 0
        while True:
            with lock:
                if left[0] <= 0 or len(errors) > 20:
                    break
                left[0] -= 1
            try:
                status, body = client.call()
            except OSError as e:
                with lock:
                    errors.append(repr(e))
                return
            error = check(status, body)
            if error is None:
                mine += 1
            else:
                with lock:
                    errors.append(error)
        with lock:
            good[0] += mine

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in connections]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    for client in connections:
        client.close()
    return elapsed, good[0], errors


def created(status: int, body: bytes) -> str | None:
    if status != 201:
        return f"{status} {body[:200]!r}"
    if not json.loads(body).get("command_id"):
        return f"201 without a task id: {body[:200]!r}"
    return None


def web_requests_ceiling(connections: int, seconds: float) -> float:
    """The suite's ``web-requests`` ceiling (:mod:`bench.ceilings`), when run alone."""
    server, port = serve_plain()
    try:
        with ProcessPoolExecutor(CORES) as pool:
            web_rate(pool, port, connections, 1.0)  # warm-up
            return web_rate(pool, port, connections, seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)


def held(root: Path, agents: int) -> list[int]:
    """How many tasks each agent holds (a task's file is written before it acknowledges)."""
    return [
        sum(1 for _ in (root / f"agent-{i}" / "data" / "tasks").glob("*.json"))
        for i in range(agents)
    ] or [sys.maxsize]  # no agents (a diagnostic): nothing to wait for


def start_profile(pid: int, out: str, seconds: float) -> subprocess.Popen[bytes] | None:
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        print("  py-spy is not installed in this venv: no profile", file=sys.stderr)
        return None
    return subprocess.Popen(
        [
            *[py_spy, "record", "--pid", str(pid), "--duration", str(int(seconds) + 1)],
            *["--rate", "200", "--format", "raw", "--output", out, "--nonblocking"],
        ],
        stdout=subprocess.DEVNULL,
    )


class CpuMeter:
    """CPU used from now on by the server, its PostgreSQL, the agents and this process,
    in cores (1.0: one core busy all along), from /proc via psutil."""

    def __init__(self, server_pid: int, root: Path) -> None:
        self._root = str(root)
        self._started = time.monotonic()
        self._processes = self._find(server_pid)
        self._before = {name: self._used(ps) for name, ps in self._processes.items()}

    def _find(self, server_pid: int) -> dict[str, list[psutil.Process]]:
        found: dict[str, list[psutil.Process]] = {
            "server": [psutil.Process(server_pid)],
            "postgres": [],
            "agents": [],
            "clients": [psutil.Process()],
        }
        for process in psutil.process_iter(["name", "cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if process.info["name"] == "postgres" and self._root in cmdline:
                found["postgres"].append(process)
                found["postgres"].extend(process.children())
            elif "taskscheduler-agent" in cmdline and self._root in cmdline:
                found["agents"].append(process)
        return found

    @staticmethod
    def _used(processes: list[psutil.Process]) -> float:
        total = 0.0
        for process in processes:
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def shares(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._started
        return {
            name: round((self._used(ps) - self._before[name]) / elapsed, 2)
            for name, ps in self._processes.items()
        }


def measure(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    fleet = Fleet(root, args.agents)
    # Out of the way, but still taken on every request.
    fleet.server.env["TASKSCHEDULER_CREATE_RATE"] = "1000000000"
    fleet.server.env["TASKSCHEDULER_CREATE_BURST"] = "1000000000"
    if args.cprofile:
        # twistd's own profiler: the whole server run, written when it stops.
        fleet.server.args[:0] = ["--profiler=cprofile", f"--profile={args.cprofile}", "--savestats"]
    try:
        fleet.start()
        port = fleet.server_port
        request = post_request(port, "/api/v1/tasks/create", fleet.operator_token, BODY)
        warm = max(200, args.tasks // 10)
        _, good, errors = load(port, request, args.clients, warm, created)
        if errors:
            raise RuntimeError(f"creating tasks failed: {errors[:3]}")
        wait_for(lambda: min(held(root, args.agents)) >= warm, 300, "the warm-up's delivery")
        profiler = None
        if args.profile:
            assert fleet.server.process is not None
            # Roughly the burst's length at the rate seen so far, capped.
            profiler = start_profile(fleet.server.process.pid, args.profile, args.profile_seconds)
        cpu = CpuMeter(fleet.server.process.pid, root)
        seconds, good, errors = load(port, request, args.clients, args.tasks, created)
        burst_end = time.monotonic()
        cpu_shares = cpu.shares()
        if errors:
            raise RuntimeError(f"creating tasks failed: {errors[:3]}")
        total = warm + good

        def everywhere() -> bool:
            return min(held(root, args.agents)) >= total

        delivered_s: float | None = None
        try:
            wait_for(everywhere, args.delivery_timeout, "every agent to hold every task", 0.2)
            delivered_s = time.monotonic() - burst_end
        except AssertionError:
            pass
        if profiler is not None:
            profiler.wait(timeout=args.profile_seconds + 60)
        fleet.server.assert_running()
        return {
            "created": good,
            "seconds": seconds,
            "rate": good / seconds,
            "delivered_after_s": delivered_s,
            "held": held(root, args.agents),
            "cpu": cpu_shares,
        }
    except BaseException:
        print(fleet.logs()[-5000:], file=sys.stderr)
        raise
    finally:
        fleet.stop()


def main() -> int:
    # Stopped by the suite (a timeout): stop the daemons too (they have sessions of their own).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=None, help="tasks in the burst (20,000)")
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--delivery-timeout", type=float, default=300.0)
    parser.add_argument("--profile", help="record the server with py-spy (raw) into this file")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--cprofile", help="run the server under cProfile (pstats) into this file")
    args = parser.parse_args()
    if args.tasks is None:
        args.tasks = 3000 if args.quick else 20000

    if args.ceilings:
        ceiling = ceiling_value(load_ceilings(args.ceilings), "web-requests")
        source = args.ceilings
    else:
        ceiling = web_requests_ceiling(args.clients, 2.0 if args.quick else 5.0)
        source = "measured here (bench/ceilings.py's plain twisted.web resource)"

    with tempfile.TemporaryDirectory(prefix="bench-create-") as folder:
        try:
            figures = measure(args, Path(folder))
        except (RuntimeError, AssertionError, OSError) as e:
            print(f"could not measure: {e}", file=sys.stderr)
            return 1

    rate = figures["rate"]
    cpu_ms = {
        name: round(1000 * cores * figures["seconds"] / max(1, figures["created"]), 3)
        for name, cores in figures["cpu"].items()
    }
    figure = Figure(
        scenario=SCENARIO,
        figure=FIGURE,
        value=round(rate, 1),
        unit="/s",
        ceiling="web-requests" if ceiling else None,
        ratio=ratio(rate, ceiling),
        target=f">= {TARGET:,.0f}/s",
        met=rate >= TARGET,
        detail={
            "clients": args.clients,
            "agents": args.agents,
            "tasks": figures["created"],
            "seconds": round(figures["seconds"], 2),
            "ceiling_value": None if ceiling is None else round(ceiling, 1),
            "ceiling_source": source,
            "delivered_to_every_agent_after_s": (
                None
                if figures["delivered_after_s"] is None
                else round(figures["delivered_after_s"], 2)
            ),
            "held": figures["held"],
            "cpu_cores": figures["cpu"],
            # CPU each part spent per task created, over the burst (ms).
            "cpu_ms_per_task": cpu_ms,
        },
    )
    print(f"{'scenario':<10} {'figure':<17} {'value':>9} {'ceiling':>9} {'ratio':>6}  target")
    print(
        f"{SCENARIO:<10} {FIGURE:<17} {rate:>9,.0f} "
        f"{'-' if ceiling is None else f'{ceiling:,.0f}':>9} "
        f"{'-' if figure.ratio is None else f'{figure.ratio:.2f}':>6}  "
        f"{figure.target} ({'met' if figure.met else 'not met'})"
    )
    delivered = figure.detail["delivered_to_every_agent_after_s"]
    print(
        f"  {figures['created']:,} tasks in {figures['seconds']:.1f} s by {args.clients} "
        f"clients; every agent held every task {delivered} s after the last create"
    )
    print(f"  CPU in cores during the burst: {figures['cpu']}")
    print(f"  CPU ms per task created: {cpu_ms}")
    emit(args.json_out, figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
