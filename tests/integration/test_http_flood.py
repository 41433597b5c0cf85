"""A real agent daemon on loopback against slow and flooding clients.

The limits live in the HTTP plumbing both daemons share (``taskscheduler.web``); the
agent is the daemon that starts without a database, so these tests are quick. Every test
is bounded in time and in connections. Clients are plain sockets: a misbehaving client is
exactly what an HTTP library never is.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path

import pytest

from taskscheduler.auth import JOIN_PREFIX, new_token
from tests.integration.daemons import Daemon, free_port, http, wait_for

pytestmark = pytest.mark.integration

HEADER_TIMEOUT = 3.0
BODY_TIMEOUT = 3.0
PER_CLIENT = 20


class Agent:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.daemon = Daemon(
            "agent",
            [
                "taskscheduler-agent",
                "--listen",
                f"tcp:{self.port}:interface=127.0.0.1",
                # Nobody there: the agent keeps trying to enrol, and serves meanwhile.
                "--server",
                f"http://127.0.0.1:{free_port()}",
                "--data-dir",
                str(root / "data"),
                "--header-timeout",
                str(HEADER_TIMEOUT),
                "--body-timeout",
                str(BODY_TIMEOUT),
                "--max-connections-per-client",
                str(PER_CLIENT),
            ],
            root,
            {"TASKSCHEDULER_JOIN_SECRET": new_token(JOIN_PREFIX)},
        )

    def connect(self, source: str = "127.0.0.1", timeout: float = 5) -> socket.socket:
        return socket.create_connection(
            ("127.0.0.1", self.port), timeout=timeout, source_address=(source, 0)
        )

    def healthy(self) -> bool:
        self.daemon.assert_running()
        return http("GET", f"{self.url}/api/v1/health", timeout=2)[0] == 200


@pytest.fixture
def agent(private_folder: Callable[[], Path]) -> Iterator[Agent]:
    agent = Agent(private_folder())
    agent.daemon.start()
    try:
        wait_for(agent.healthy, 60, "the agent to answer /api/v1/health")
        yield agent
    except BaseException:
        print(agent.daemon.log())
        raise
    finally:
        agent.daemon.stop()


def read_answer(s: socket.socket, deadline: float) -> bytes:
    """What the server sends until it closes, or until ``deadline`` (monotonic)."""
    received = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received + b"<reset>"
        if not chunk:
            break
        received += chunk
    return received


def test_a_request_line_sent_a_byte_every_2_s_gets_408_within_the_header_deadline(
    agent: Agent,
) -> None:
    with agent.connect() as s:
        started = time.monotonic()
        answer = b""
        for byte in b"GET /api/v1/health HTTP/1.1\r\n":
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
            answer += read_answer(s, time.monotonic() + 2)
            if answer:
                break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"request_timeout"' in answer and b"<reset>" not in answer
    assert HEADER_TIMEOUT - 0.5 < elapsed < HEADER_TIMEOUT + 2.5


#: What a signature looks like: the headers pass, the signature is checked with the body.
SIGNED = b"Authorization: TS-Ed25519 aud=x,ts=1,nonce=x,sig=x"


def test_a_request_without_a_signature_is_refused_before_its_body(agent: Agent) -> None:
    with agent.connect() as s:
        s.sendall(
            b"POST /api/v1/tasks/schedule HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        answer = read_answer(s, time.monotonic() + 2)
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


def test_a_slow_body_is_cut_at_its_deadline(agent: Agent) -> None:
    with agent.connect() as s:
        s.sendall(
            b"POST /api/v1/tasks/schedule HTTP/1.1\r\nHost: x\r\n" + SIGNED + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        started = time.monotonic()
        answer = b""
        for _ in range(40):  # a byte every 0.5 s: 20 s at most
            try:
                s.sendall(b" ")
            except OSError:
                break
            answer += read_answer(s, time.monotonic() + 0.5)
            if answer:
                break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"body took too long" in answer
    assert BODY_TIMEOUT - 0.5 < elapsed < BODY_TIMEOUT + 2.5


def test_a_header_of_20_kb_gets_431(agent: Agent) -> None:
    with agent.connect() as s:
        s.sendall(
            b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
        )
        answer = read_answer(s, time.monotonic() + 5)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]


def health_on(s: socket.socket) -> bytes:
    s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return read_answer(s, time.monotonic() + 5)


def test_connection_past_the_per_client_cap_is_refused_while_others_are_served(
    agent: Agent,
) -> None:
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(agent.connect()) for _ in range(PER_CLIENT)]
        one_more = stack.enter_context(agent.connect())
        answer = read_answer(one_more, time.monotonic() + 2)
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
        assert b"too_many_connections" in answer
        # Another address is served, and so is a connection the first one already holds.
        with agent.connect("127.0.0.2") as other:
            assert health_on(other).startswith(b"HTTP/1.1 200 ")
        assert health_on(held[0]).startswith(b"HTTP/1.1 200 ")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of ``pid`` (fields 14 and 15 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_established_clients_are_served_through_a_flood_that_exhausts_descriptors(
    agent: Agent,
) -> None:
    assert agent.daemon.process is not None
    pid = agent.daemon.process.pid
    established = HTTPConnection("127.0.0.1", agent.port, timeout=5)
    established.request("GET", "/api/v1/health")
    assert established.getresponse().read()
    # Room for a few dozen more descriptors only: the flood runs the agent out of them.
    limit = open_fds(pid) + 30
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))
    flood: list[socket.socket] = []
    try:
        # 300 connections from 15 addresses (each under the per-client cap), unanswered.
        for i in range(300):
            s = socket.socket()
            s.setblocking(False)
            s.bind((f"127.0.0.{10 + i % 15}", 0))
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", agent.port))
            flood.append(s)
        cpu_before, started = cpu_seconds(pid), time.monotonic()
        for _ in range(5):
            asked = time.monotonic()
            established.request("GET", "/api/v1/health")
            response = established.getresponse()
            assert response.status == 200
            response.read()
            assert time.monotonic() - asked < 1.0
            time.sleep(0.2)
        busy = (cpu_seconds(pid) - cpu_before) / (time.monotonic() - started)
        print(f"flood: agent at {busy:.0%} of a core, {open_fds(pid)}/{limit} descriptors")
        assert open_fds(pid) >= limit - 5, "the flood did not exhaust the descriptors"
    finally:
        for s in flood:
            s.close()
        established.close()
    assert busy < 0.5, f"the agent spun at {busy:.0%} of a core while out of descriptors"
    log = agent.daemon.log_path.read_text(errors="replace")
    assert "paused accepting" in log
    # Not a line per refused connection, as Twisted's own EMFILE recovery would log.
    assert log.count("EMFILE") <= 2, "EMFILE is logged once a minute at most"
    # And once the flood is gone, new clients are served again.
    wait_for(agent.healthy, 10, "new connections to be accepted again")
