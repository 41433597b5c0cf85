"""``scripts/playground`` as a new user runs it: on ports of their choosing, refusing a
port another program holds, and leaving nothing running however it is stopped.

The script installs into the venv running these tests (``VENV``), as the README's
command does into ``.venv``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from tests.integration.daemons import free_port, http, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PLAYGROUND = ROOT / "scripts" / "playground"


class Playground:
    """``scripts/playground`` in a session of its own, its output collected."""

    def __init__(self, data: Path, server_port: int, agent_ports: list[int]) -> None:
        self.data = data
        self.server_port = server_port
        self.agent_ports = agent_ports
        env = {
            **os.environ,
            "VENV": sys.prefix,
            "PLAYGROUND_DIR": str(data),
            "PLAYGROUND_PORT": str(server_port),
            "PLAYGROUND_AGENT_PORTS": ",".join(map(str, agent_ports)),
        }
        self.process = subprocess.Popen(
            [str(PLAYGROUND)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.seen: list[psutil.Process] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def descendants(self) -> list[psutil.Process]:
        """Every process the script started, and the embedded PostgreSQL's postmaster
        (which runs in a session of its own)."""
        processes = psutil.Process(self.process.pid).children(recursive=True)
        postmaster = self.postmaster()
        if postmaster is not None:
            processes.append(postmaster)
        self.seen.extend(processes)
        return processes

    def postmaster(self) -> psutil.Process | None:
        """The embedded PostgreSQL's postmaster, once it runs (not initdb's postgres)."""
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
            pidfile = self.data / "server" / "postgres" / "postmaster.pid"
            process = psutil.Process(int(pidfile.read_text().splitlines()[0]))
            if process.name() == "postgres":
                return process
        return None

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """Only after a failure: leave nothing behind for the next test."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError, psutil.Error):
                self.descendants()
            os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(10)
        for process in self.seen:  # psutil checks that the pid was not reused
            with contextlib.suppress(psutil.Error):
                if process.is_running():
                    process.kill()


def name(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return str(process.name())
    return ""


def command_line(process: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(process.cmdline())
    return ""


def still_running(processes: list[psutil.Process]) -> list[str]:
    left = []
    for process in processes:
        with contextlib.suppress(psutil.Error):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(process.cmdline()))
    return left


@pytest.fixture
def playground(private_folder: Callable[[], Path]) -> Iterator[Callable[..., Playground]]:
    started: list[Playground] = []

    def start(server_port: int | None = None, agent_ports: list[int] | None = None) -> Playground:
        started.append(
            Playground(
                private_folder() / "playground",
                server_port or free_port(),
                agent_ports or [free_port(), free_port()],
            )
        )
        return started[-1]

    yield start
    for each in started:
        each.kill()


def test_seed_flow_on_chosen_ports_then_sigterm_leaves_nothing_running(
    playground: Callable[..., Playground],
) -> None:
    pg = playground()
    wait_for(lambda: "taskscheduler is up" in pg.output, 50, "the playground to come up")
    assert f"http://localhost:{pg.server_port}" in pg.output
    processes = pg.descendants()
    assert len([p for p in processes if "twistd" in command_line(p)]) == 3
    assert any(name(p) == "postgres" for p in processes)
    base = f"http://127.0.0.1:{pg.server_port}/api/v1"
    # The seed's first curl, without a token, but every second rather than every 30.
    task = {"command": "echo hello world", "frequency": "every 1 seconds"}
    status, created = http("POST", f"{base}/tasks/create", task)
    assert status == 201, created
    task_id = uuid.UUID(created["command_id"])

    def both_agents_answered() -> list[dict[str, str]] | None:
        status, latest = http("GET", f"{base}/tasks/{task_id}/latest_output")
        assert status == 200, latest
        outputs: list[dict[str, str]] = latest["outputs"]
        return outputs if len(outputs) == 2 else None

    outputs = wait_for(both_agents_answered, 20, "both agents' outputs")
    assert [o["stdout"] for o in outputs] == ["hello world\n"] * 2

    pg.process.send_signal(signal.SIGTERM)
    assert pg.finish(60) == 143
    assert still_running(processes) == []
    assert "stopping taskscheduler" in pg.output


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_a_start_cut_short_leaves_nothing_running(
    playground: Callable[..., Playground], stop: str
) -> None:
    pg = playground()

    # The server has just started its embedded PostgreSQL and is still setting up: the
    # moment an impatient user quits.
    wait_for(pg.postmaster, 50, "the embedded PostgreSQL", interval=0.02)
    processes = pg.descendants()
    assert "taskscheduler is up" not in pg.output
    if stop == "ctrl-c":
        os.killpg(pg.process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert pg.finish(60) == 130
    else:
        pg.process.send_signal(signal.SIGTERM)  # what a supervisor or `kill` does
        assert pg.finish(60) == 143
    assert still_running(processes) == []


class _Impostor(BaseHTTPRequestHandler):
    """Another program on the port, answering every health check as ours would."""

    def do_GET(self) -> None:
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("held", ["server", "agent"])
def test_a_port_held_by_another_program_is_refused(
    playground: Callable[..., Playground], held: str
) -> None:
    impostor = ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    port = impostor.server_address[1]
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        if held == "server":
            pg = playground(server_port=port)
        else:
            pg = playground(agent_ports=[free_port(), port])
        assert pg.finish(50) == 1
    finally:
        impostor.shutdown()
        impostor.server_close()
    assert f"port {port} on 127.0.0.1 is already in use by another program" in pg.output
    assert "PLAYGROUND_PORT=" in pg.output
    assert "taskscheduler is up" not in pg.output
    assert not (pg.data / "server.log").exists()  # nothing was started


def test_is_up_is_never_said_of_another_program_on_the_servers_port(tmp_path: Path) -> None:
    # The port was free when the playground checked it, then another program took it
    # before the server could listen: the server exits, and the impostor's health check
    # must not be taken for ours meanwhile.
    impostor = ThreadingHTTPServer(("127.0.0.1", 0), _Impostor)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    server = subprocess.Popen(["sleep", "3"])  # stands for a server that fails to listen
    try:
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "_playground.py"),
                "wait-up",
                str(tmp_path),
                str(impostor.server_address[1]),
                str(server.pid),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.kill()
        server.wait()
        impostor.shutdown()
        impostor.server_close()
    assert result.returncode == 1
    assert "is up" not in result.stdout
    assert "the taskscheduler server stopped during start-up" in result.stderr


def test_stop_ends_an_embedded_postgresql_only_once_nobody_uses_it(
    private_folder: Callable[[], Path],
) -> None:
    # A server killed outright (say, it did not stop within the script's deadline) leaves
    # its embedded PostgreSQL running; the script stops it, but never under a live user.
    data = private_folder()
    folder = data / "server" / "postgres"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from taskscheduler.embedded_pg import EmbeddedPostgres\n"
            "EmbeddedPostgres(sys.argv[1]).start_blocking()\n"
            "print('up', flush=True)\n"
            "time.sleep(600)\n",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "up\n"
        postmaster = psutil.Process(int((folder / "postmaster.pid").read_text().split()[0]))
        stop = [sys.executable, str(ROOT / "scripts" / "_playground.py"), "stop", str(data)]
        kept = subprocess.run(stop, capture_output=True, text=True, timeout=60)
        assert kept.returncode == 0 and postmaster.is_running()
    finally:
        holder.kill()
        holder.wait()
    stopped = subprocess.run(stop, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0
    assert f"the server left running (pid {postmaster.pid})" in stopped.stderr
    assert not postmaster.is_running()
