"""Real ``twistd`` daemons for end-to-end tests, driven over HTTP like a user would."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from taskscheduler.auth import JOIN_PREFIX, OPERATOR_PREFIX, hash_token, new_token

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
    context: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    """One HTTP request; returns (status, decoded JSON body) for errors as well.

    ``context`` verifies an https:// server (e.g. against a test CA)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


class Daemon:
    """One ``twistd -n`` process with its log in a file.

    With ``separate_stderr`` what it writes on stderr goes to its own file
    (:meth:`stderr`) instead of the log."""

    def __init__(
        self,
        name: str,
        args: list[str],
        workdir: Path,
        env: dict[str, str],
        *,
        separate_stderr: bool = False,
    ) -> None:
        self.name = name
        self.args = args
        self.workdir = workdir
        self.env = env
        self.log_path = workdir / f"{name}.log"
        self.stderr_path = workdir / f"{name}.stderr" if separate_stderr else None
        self.process: subprocess.Popen[bytes] | None = None
        #: A command that execs the rest (``setpriv ... --``); the daemon keeps its pid.
        self.wrapper: list[str] = []
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
        errors: Any = subprocess.STDOUT
        if self.stderr_path is not None:
            errors = open(self.stderr_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [*self.wrapper, TWISTD, "-n", "--pidfile=", *self.args],
            cwd=self.workdir,
            env=env,
            stdout=log,
            stderr=errors,
            start_new_session=True,
        )
        log.close()
        if errors is not subprocess.STDOUT:
            errors.close()

    def wait(self, timeout: float) -> int:
        """Wait for the daemon to exit; its exit status (negative: killed by that signal)."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stderr(self) -> str:
        assert self.stderr_path is not None, "start it with separate_stderr=True"
        return self.stderr_path.read_text(errors="replace")

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
        """The end of the daemon's log (to show in a failure)."""
        return self.whole_log()[-5000:]

    def whole_log(self) -> str:
        """All of the daemon's log (to count lines in: a busy moment may log thousands)."""
        return self.log_path.read_text(errors="replace")

    def assert_running(self) -> None:
        assert self.process is not None and self.process.poll() is None, (
            f"{self.name} exited with {self.process and self.process.returncode}:\n{self.log()}"
        )


def run_as_nobody(daemon: Daemon) -> tuple[int, int] | None:
    """Make ``daemon`` start as user ``nobody`` (tests run as root); its (uid, gid), or None
    where that cannot be done (no setpriv, no Python that user may run). Its workdir is
    given to nobody; the folders above it must let nobody through."""
    python = _python_others_may_run()
    if shutil.which("setpriv") is None or python is None:
        return None
    nobody = pwd.getpwnam("nobody")
    daemon.wrapper = ["setpriv", "--reuid", str(nobody.pw_uid), "--regid", str(nobody.pw_gid)]
    daemon.wrapper += ["--clear-groups", "--", python]
    site = Path(TWISTD).parent.parent / "lib" / f"python3.{sys.version_info[1]}"
    daemon.env["PYTHONPATH"] = str(site / "site-packages")
    os.chown(daemon.workdir, nobody.pw_uid, nobody.pw_gid)
    return nobody.pw_uid, nobody.pw_gid


def _python_others_may_run() -> str | None:
    """An interpreter of this Python version every user may run (this one may live in a
    private home folder), or None."""
    for python in [Path(sys.executable).resolve(), Path(f"/usr/bin/python3.{sys.version_info[1]}")]:
        if python.exists() and all(
            f.stat().st_mode & stat.S_IXOTH for f in [python, *python.parents]
        ):
            return str(python)
    return None


class Fleet:
    """A server (on the embedded PostgreSQL unless a DSN is given) and some agents.

    Secure as in production: the server has an operator token (``operator_token``, sent
    by :meth:`api`) and a join secret (``join_secret``) the agents enrol with. With
    ``tls=True`` both daemons listen on ``ssl:`` endpoints with certificates from a test
    CA (``pki``), and every client verifies them (``ssl_context`` for the tests' own).
    """

    def __init__(
        self,
        root: Path,
        agents: int = 2,
        database: str | None = None,
        *,
        tls: bool = False,
        mutual_tls: bool = False,
    ) -> None:
        self.root = root
        tls = tls or mutual_tls
        self.tls = tls
        self.operator_token = new_token(OPERATOR_PREFIX)
        self.join_secret = new_token(JOIN_PREFIX)
        self.ssl_context: ssl.SSLContext | None = None
        scheme = "https" if tls else "http"
        tls_server: list[str] = []
        tls_agent: list[str] = []
        if tls:
            from tests.tlsfixtures import make_pki

            self.pki = make_pki(root / "pki")
            self.ssl_context = ssl.create_default_context(cafile=str(self.pki.ca))
            tls_server = ["--agent-ca", str(self.pki.ca)]
            tls_agent = ["--server-ca", str(self.pki.ca)]
        if mutual_tls:
            # Both daemons demand a client certificate from the CA, and present one.
            client = ["--client-cert", str(self.pki.client.cert)]
            client += ["--client-key", str(self.pki.client.key)]
            tls_server += ["--tls-client-ca", str(self.pki.ca), *client]
            tls_agent += ["--tls-client-ca", str(self.pki.ca), *client]
            assert self.ssl_context is not None
            self.ssl_context.load_cert_chain(str(self.pki.client.cert), str(self.pki.client.key))
        self.server_port = free_port()
        self.server_url = f"{scheme}://127.0.0.1:{self.server_port}"
        self.agent_ports = [free_port() for _ in range(agents)]
        self.agent_urls = [f"{scheme}://127.0.0.1:{p}" for p in self.agent_ports]
        self.agents = [
            Daemon(
                f"agent-{i}",
                [
                    "taskscheduler-agent",
                    "--listen",
                    self._listen(port),
                    "--server",
                    self.server_url,
                    "--data-dir",
                    str(root / f"agent-{i}" / "data"),
                    *tls_agent,
                ],
                root / f"agent-{i}",
                {"TASKSCHEDULER_JOIN_SECRET": self.join_secret},
            )
            for i, port in enumerate(self.agent_ports)
        ]
        server_env = {
            "AVAILABLE_SERVERS": ",".join(self.agent_urls),
            "TASKSCHEDULER_REPORT_GRACE": "5",
            "TASKSCHEDULER_TOKENS": f"tests {hash_token(self.operator_token)}",
            "TASKSCHEDULER_JOIN_SECRETS": f"fleet {hash_token(self.join_secret)}",
        }
        if database:
            server_env["TASKSCHEDULER_DATABASE"] = database
        self.server = Daemon(
            "server",
            [
                "taskscheduler-server",
                "--listen",
                self._listen(self.server_port),
                "--data-dir",
                str(root / "server" / "data"),
                *tls_server,
            ],
            root / "server",
            server_env,
        )

    def _listen(self, port: int) -> str:
        if not self.tls:
            return f"tcp:{port}:interface=127.0.0.1"
        return (
            f"ssl:{port}:privateKey={self.pki.server.key}:certKey={self.pki.server.cert}"
            ":interface=127.0.0.1"
        )

    def start(self) -> None:
        for agent in self.agents:
            agent.start()
        self.server.start()
        self.wait_until_healthy()

    def wait_until_healthy(self, timeout: float = 90) -> None:
        """Wait until the server and every agent answer, and every agent has enrolled."""

        def healthy() -> bool:
            self.server.assert_running()
            for agent in self.agents:
                agent.assert_running()
            answers = [
                http("GET", f"{url}/api/v1/health", timeout=2, context=self.ssl_context)
                for url in self.agent_urls
            ]
            agents_up = all(code == 200 and body.get("enrolled") for code, body in answers)
            return agents_up and self.api("GET", "/api/v1/health")[0] == 200

        wait_for(healthy, timeout, "the server and agents to answer /api/v1/health, enrolled")

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A request to the server's API with the operator's token."""
        return http(
            method,
            self.server_url + path,
            body,
            headers={"Authorization": f"Bearer {self.operator_token}"},
            timeout=5,
            context=self.ssl_context,
        )

    def agent_health(self, index: int) -> dict[str, Any]:
        code, body = http(
            "GET", f"{self.agent_urls[index]}/api/v1/health", timeout=5, context=self.ssl_context
        )
        assert code == 200, body
        return dict(body)

    def stop(self) -> None:
        for daemon in [self.server, *self.agents]:
            daemon.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {d.name}\n{d.log()}" for d in [self.server, *self.agents])


@contextlib.contextmanager
def running_fleet(
    root: Path,
    agents: int = 2,
    database: str | None = None,
    *,
    tls: bool = False,
    mutual_tls: bool = False,
    prepared: Fleet | None = None,
) -> Iterator[Fleet]:
    """A started fleet (``prepared``, if given: one whose arguments a test adjusted)."""
    fleet = prepared or Fleet(root, agents, database, tls=tls, mutual_tls=mutual_tls)
    try:
        fleet.start()
        yield fleet
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()


def listening_on_their_ports(fleet: Fleet, daemons: list[tuple[Any, int]]) -> bool:
    """Whether each daemon listens on its port within 10 s; if not (another process took
    a port meanwhile), the fleet is stopped, for the caller to try other ports."""
    try:
        for daemon, port in daemons:
            wait_for(
                lambda d=daemon, p=port: f"Site starting on {p}" in d.log(),
                10,
                f"{daemon.name} to listen on its port {port}",
            )
    except AssertionError:
        print(fleet.logs())
        fleet.stop()
        return False
    return True
