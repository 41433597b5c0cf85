"""Real ``twistd`` daemons for end-to-end tests, driven over HTTP like a user would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

TWISTD = str(Path(sys.executable).with_name("twistd"))
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], T | None], timeout: float, what: str, interval: float = 0.1
) -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError) as e:
            last_error = e
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error})"
    )


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> tuple[int, Any]:
    """One HTTP request; returns (status, decoded JSON body) for errors as well."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Daemon:
    """One ``twistd -n`` process with its log in a file."""

    def __init__(self, name: str, args: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.workdir = workdir
        self.env = env
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TASKSCHEDULER_", "AVAILABLE_SERVERS"))
        }
        env.update(self.env)
        self.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", *self.args],
            cwd=self.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the daemon only (its runs live in their own sessions)."""
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def assert_running(self) -> None:
        assert self.process is not None and self.process.poll() is None, (
            f"{self.name} exited with {self.process and self.process.returncode}:\n{self.log()}"
        )


class Fleet:
    """A server (on the embedded PostgreSQL unless a DSN is given) and some agents."""

    def __init__(self, root: Path, agents: int = 2, database: str | None = None) -> None:
        self.root = root
        self.server_port = free_port()
        self.server_url = f"http://127.0.0.1:{self.server_port}"
        self.agent_ports = [free_port() for _ in range(agents)]
        self.agents = [
            Daemon(
                f"agent-{i}",
                [
                    "taskscheduler-agent",
                    "--listen",
                    f"tcp:{port}:interface=127.0.0.1",
                    "--server",
                    self.server_url,
                    "--data-dir",
                    str(root / f"agent-{i}" / "data"),
                ],
                root / f"agent-{i}",
                {},
            )
            for i, port in enumerate(self.agent_ports)
        ]
        server_env = {
            "AVAILABLE_SERVERS": ",".join(f"http://127.0.0.1:{p}" for p in self.agent_ports),
            "TASKSCHEDULER_REPORT_GRACE": "5",
        }
        if database:
            server_env["TASKSCHEDULER_DATABASE"] = database
        self.server = Daemon(
            "server",
            [
                "taskscheduler-server",
                "--listen",
                f"tcp:{self.server_port}:interface=127.0.0.1",
                "--data-dir",
                str(root / "server" / "data"),
            ],
            root / "server",
            server_env,
        )

    def start(self) -> None:
        for agent in self.agents:
            agent.start()
        self.server.start()
        self.wait_until_healthy()

    def wait_until_healthy(self, timeout: float = 90) -> None:
        def healthy() -> bool:
            self.server.assert_running()
            for agent in self.agents:
                agent.assert_running()
            agents_up = all(
                http("GET", f"http://127.0.0.1:{p}/api/v1/health", timeout=2)[0] == 200
                for p in self.agent_ports
            )
            return agents_up and self.api("GET", "/api/v1/health")[0] == 200

        wait_for(healthy, timeout, "the server and agents to answer /api/v1/health")

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return http(method, self.server_url + path, body, timeout=5)

    def stop(self) -> None:
        for daemon in [self.server, *self.agents]:
            daemon.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {d.name}\n{d.log()}" for d in [self.server, *self.agents])


@contextlib.contextmanager
def running_fleet(root: Path, agents: int = 2, database: str | None = None) -> Iterator[Fleet]:
    fleet = Fleet(root, agents, database)
    try:
        fleet.start()
        yield fleet
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
