"""A real listening port cuts off slow, oversized and idle clients.

The site is the server's own (its API behind the access gate, on a MemoryStore), with
short limits so that the tests are quick; the clients are plain sockets in threads,
because a misbehaving client is exactly what twisted's own clients never are.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread

from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.web.guards import make_site

pytestmark = pytest.mark.integration
reactor: Any = _reactor
HEADER_TIMEOUT = 0.5
IDLE_TIMEOUT = 1.0


@pytest_twisted.async_yield_fixture
async def port() -> AsyncIterator[int]:
    store = MemoryStore()
    api = ServerAPI(
        store, reactor, ServerAccess(store, reactor, None, None, open_operator_routes=True)
    )
    site = make_site(api.resource(), 1024, idle_timeout=IDLE_TIMEOUT, header_timeout=HEADER_TIMEOUT)
    listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
    address = listening.getHost()
    assert isinstance(address, IPv4Address)
    yield address.port
    await maybeDeferred(listening.stopListening)


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _read_until_closed(s: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def dribble(port: int) -> tuple[float, bytes, int]:
    """Send a request line, then one header byte every 0.1 s: the server must hang up."""
    with _connect(port) as s:
        started = time.monotonic()
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(0.1)
        sent = 0
        answer = b""
        while time.monotonic() - started < 10:
            try:
                s.sendall(b"X-Slow: " if sent == 0 else b"a")
                sent += 1
            except OSError:
                break
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
        return time.monotonic() - started, answer, sent


@pytest_twisted.ensureDeferred
async def test_a_client_dribbling_its_headers_is_cut_off(port: int) -> None:
    elapsed, answer, sent = await deferToThread(dribble, port)
    assert elapsed < HEADER_TIMEOUT + 3, "the connection stayed open"
    assert sent > 1, "the client did get to dribble"
    # A whole answer, not a bare reset: the server reads and drops what still comes.
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert b'"request_timeout"' in answer


def oversized_headers(port: int) -> bytes:
    with _connect(port) as s:
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        try:
            for i in range(40):
                s.sendall(b"X-Big-%d: %s\r\n" % (i, b"a" * 1000))
            s.sendall(b"\r\n")
        except OSError:
            pass  # the server hung up mid-way, as it should
        return _read_until_closed(s)


@pytest_twisted.ensureDeferred
async def test_headers_over_twisteds_total_size_are_refused(port: int) -> None:
    answer = await deferToThread(oversized_headers, port)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]


def idle(port: int) -> tuple[float, bytes]:
    """One request on a kept-alive connection, then silence."""
    with _connect(port) as s:
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first[:100]
        started = time.monotonic()
        answer = _read_until_closed(s)
        return time.monotonic() - started, answer


@pytest_twisted.ensureDeferred
async def test_an_idle_connection_is_closed(port: int) -> None:
    elapsed, answer = await deferToThread(idle, port)
    assert IDLE_TIMEOUT - 0.2 < elapsed < IDLE_TIMEOUT + 5
    assert answer == b""


def silent(port: int) -> tuple[float, bytes]:
    with _connect(port) as s:
        started = time.monotonic()
        answer = _read_until_closed(s)
        return time.monotonic() - started, answer


@pytest_twisted.ensureDeferred
async def test_a_connection_that_never_sends_is_closed_at_the_header_deadline(port: int) -> None:
    elapsed, answer = await deferToThread(silent, port)
    assert HEADER_TIMEOUT - 0.2 < elapsed < HEADER_TIMEOUT + 3
    assert answer == b"", "nothing was asked: nothing is answered"


def big_body(port: int) -> tuple[bytes, int]:
    """Declare a body far over the limit and try to send it: 413 comes before it is read."""
    with _connect(port) as s:
        s.sendall(
            b"POST /api/v1/tasks/create HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n"
        )
        sent = 0
        try:
            for _ in range(1000):
                s.sendall(b"x" * 65536)
                sent += 65536
        except OSError:
            pass
        return _read_until_closed(s), sent


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_limit_is_refused_on_a_real_port(port: int) -> None:
    answer, sent = await deferToThread(big_body, port)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:100]
    assert b"payload_too_large" in answer
    assert sent < 100_000_000


def health(port: int) -> bytes:
    with _connect(port) as s:
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return _read_until_closed(s)


@pytest_twisted.ensureDeferred
async def test_a_well_behaved_client_is_served(port: int) -> None:
    answer = await deferToThread(health, port)
    assert answer.startswith(b"HTTP/1.1 200 ")
