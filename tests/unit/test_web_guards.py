"""The HTTP guards every daemon's site has, driven byte by byte over a fake transport and
a fake clock: deadlines from the accept, lingering answers, 431, Host and Origin, credentials
decided on headers, connection caps, and the pause on EMFILE."""

from __future__ import annotations

import errno
import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from taskscheduler import protocol
from taskscheduler.auth import OPERATOR_PREFIX, TokenFile, hash_token, new_token
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.web import guards
from taskscheduler.web.guards import connection_budget, make_site
from taskscheduler.web.hosts import LOOPBACK_HOSTS, HostPolicy
from taskscheduler.web.listener import PausingListener

HEADER_TIMEOUT = 10.0
BODY_TIMEOUT = 30.0
OPERATOR = new_token(OPERATOR_PREFIX)


class Hello(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"hello":"world"}'


class Transport(StringTransport):
    """A transport that, like a TCP socket, can shut its write side only."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class Client:
    """One connection to a site: bytes in, what the site answered, how it closed."""

    def __init__(self, site: guards.LimitedSite, host: str = "10.0.0.1") -> None:
        self.protocol = site.buildProtocol(IPv4Address("TCP", host, 40000))
        self.transport = Transport(peerAddress=IPv4Address("TCP", host, 40000))
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def answer(self) -> bytes:
        return bytes(self.transport.value())

    def status(self) -> int | None:
        answer = self.answer()
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None

    def error(self) -> dict[str, Any]:
        return dict(json.loads(self.answer().split(b"\r\n\r\n", 1)[1])["error"])

    def closing(self) -> bool:
        return self.transport.write_closed or self.transport.disconnecting

    def close(self) -> None:
        self.protocol.connectionLost(None)


def hello_site(clock: Clock, **limits: Any) -> guards.LimitedSite:
    limits.setdefault("header_timeout", HEADER_TIMEOUT)
    limits.setdefault("body_timeout", BODY_TIMEOUT)
    return make_site(Hello(), 1000, reactor=clock, **limits)


# -- deadlines and answers ------------------------------------------------------------------


def test_a_request_line_dribbled_from_the_accept_gets_a_408_within_the_header_deadline() -> None:
    clock = Clock()
    client = Client(hello_site(clock))
    # One byte every 2 s, never a full line: the deadline counts from the accept.
    for byte in b"GET /api/v1/he":
        client.send(bytes([byte]))
        clock.advance(2)
        if client.status() is not None:
            break
    assert client.status() == 408
    assert client.error()["code"] == "request_timeout"
    assert clock.seconds() <= HEADER_TIMEOUT + 2


def test_the_408_is_a_whole_answer_then_a_lingering_close_not_a_reset() -> None:
    clock = Clock()
    client = Client(hello_site(clock))
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: a")
    clock.advance(HEADER_TIMEOUT)
    assert client.status() == 408
    assert b"Content-Length: " in client.answer() and b"Connection: close" in client.answer()
    # Only the write side is shut; what the client still sends is read and dropped.
    assert client.transport.write_closed and not client.transport.aborted
    client.send(b"more")
    assert not client.transport.aborted
    clock.advance(guards.LINGER_SECONDS)
    assert client.transport.aborted, "a client that never closes is cut off after the linger"


def test_a_slow_body_is_cut_at_its_deadline() -> None:
    clock = Clock()
    client = Client(hello_site(clock))
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
    for _ in range(int(BODY_TIMEOUT) - 1):
        client.send(b"x")  # a byte a second keeps the idle timeout at bay
        clock.advance(1)
    assert client.status() is None
    clock.advance(1)
    assert client.status() == 408
    assert "body" in client.error()["message"]


def test_a_kept_alive_connection_waits_idle_without_a_header_deadline() -> None:
    clock = Clock()
    client = Client(hello_site(clock))
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.status() == 200
    client.transport.clear()
    clock.advance(HEADER_TIMEOUT * 3)  # idle between requests: not a slow request
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
    clock.advance(HEADER_TIMEOUT)
    assert client.status() == 408


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 20_000 + b"\r\n",  # one line over the limit
        b"".join(b"X-Big-%d: %s\r\n" % (i, b"a" * 1000) for i in range(20)),  # many lines
    ],
)
def test_headers_over_16_kib_get_431(headers: bytes) -> None:
    client = Client(hello_site(Clock()))
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert client.status() == 431
    assert client.error()["code"] == "headers_too_large"


def test_malformed_http_gets_a_json_400() -> None:
    client = Client(hello_site(Clock()))
    client.send(b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n")
    assert client.status() == 400
    assert client.error()["code"] == "bad_http_request"


# -- Host and Origin ----------------------------------------------------------------------


def loopback_site(clock: Clock) -> guards.LimitedSite:
    return hello_site(clock, host_policy=HostPolicy(LOOPBACK_HOSTS))


@pytest.mark.parametrize(
    "host", [b"localhost:8080", b"LOCALHOST", b"127.0.0.1:1", b"[::1]:8080", b"localhost."]
)
def test_the_loopback_names_are_answered(host: bytes) -> None:
    client = Client(loopback_site(Clock()))
    client.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert client.status() == 200


@pytest.mark.parametrize(
    "host_headers",
    [
        b"Host: evil.example\r\n",
        b"Host: evil.example:8080\r\n",
        b"Host: 127.0.0.1.evil.example\r\n",
        b"Host: localhost@evil.example\r\n",
        b"",
        b"Host: localhost\r\nHost: evil.example\r\n",
    ],
)
def test_a_host_name_the_server_is_not_reached_by_is_403_before_the_body(
    host_headers: bytes,
) -> None:
    client = Client(loopback_site(Clock()))
    client.send(
        b"POST / HTTP/1.1\r\n" + host_headers + b"Content-Type: application/json\r\n"
        b"Content-Length: 900\r\n\r\n"
    )
    assert client.status() == 403, client.answer()
    assert client.error()["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (b"http://localhost:8080", True),
        (b"HTTP://LOCALHOST:8080", True),
        (b"http://evil.example", False),
        (b"http://localhost:9999", False),
        (b"https://localhost:8080", False),
        (b"null", False),
    ],
)
@pytest.mark.parametrize("method", [b"POST", b"PUT", b"PATCH", b"DELETE"])
def test_a_state_changing_request_from_another_origin_is_403(
    method: bytes, origin: bytes, allowed: bool
) -> None:
    client = Client(hello_site(Clock()))  # any Host: the Origin is checked all the same
    client.send(
        method + b" / HTTP/1.1\r\nHost: localhost:8080\r\nOrigin: " + origin + b"\r\n"
        b"Content-Length: 2\r\n\r\n"
    )
    if allowed:
        assert client.status() is None  # waiting for the body
        client.send(b"{}")
        assert client.status() == 200
    else:
        assert client.status() == 403
        assert client.error()["code"] == "origin_not_allowed"


def test_a_read_from_another_origin_is_answered() -> None:
    client = Client(hello_site(Clock()))
    client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example\r\n\r\n")
    assert client.status() == 200


def test_accept_hosts_parsing() -> None:
    assert HostPolicy.parse("*").hosts is None
    assert HostPolicy.parse("Server, localhost.,::1,[::2]").hosts == {
        "server",
        "localhost",
        "::1",
        "::2",
    }
    for bad in ["", " , ", "*,localhost", "host:8080", "a/b"]:
        with pytest.raises(ValueError):
            HostPolicy.parse(bad)


# -- credentials before the body ------------------------------------------------------------


def server_site(clock: Clock, open_operator_routes: bool = False) -> guards.LimitedSite:
    store = MemoryStore()
    tokens = TokenFile({hash_token(OPERATOR): "admin"})
    access = ServerAccess(
        store,
        clock,
        None if open_operator_routes else tokens,
        None,
        open_operator_routes=open_operator_routes,
    )
    api = ServerAPI(store, clock, access)
    return make_site(api.resource(), 1_000_000, reactor=clock)


CREATE = b"POST /api/v1/tasks/create HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    ("authorization", "status"),
    [
        (b"", 401),
        (b"Authorization: Basic abc\r\n", 401),
        (b"Authorization: Bearer tso_unknown0000000000\r\n", 401),
        (b"Authorization: Bearer " + OPERATOR.encode() + b"\r\n", None),
    ],
)
def test_an_operator_route_refuses_a_missing_or_unknown_credential_before_the_body(
    authorization: bytes, status: int | None
) -> None:
    client = Client(server_site(Clock()))
    client.send(CREATE + authorization + b"Content-Length: 900000\r\n\r\n")
    assert client.status() == status
    if status is not None:
        assert client.error()["code"] == "unauthorized"
        assert b"WWW-Authenticate: Bearer" in client.answer()


def test_an_agent_route_refuses_an_operator_token_before_the_body() -> None:
    client = Client(server_site(Clock()))
    client.send(
        b"POST /api/v1/results HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + OPERATOR.encode()
        + b"\r\nContent-Length: 900000\r\n\r\n"
    )
    assert client.status() == 403


def test_the_open_playground_reads_an_anonymous_operators_body() -> None:
    client = Client(server_site(Clock(), open_operator_routes=True))
    client.send(CREATE + b"Content-Length: 900000\r\n\r\n")
    assert client.status() is None  # the body is awaited, as the route is open


# -- connection caps and descriptors ----------------------------------------------------------


def test_connection_n_plus_one_from_one_address_is_503_while_others_are_served() -> None:
    site = hello_site(Clock(), max_connections=10, max_connections_per_client=3)
    held = [Client(site, "10.0.0.1") for _ in range(3)]
    refused = Client(site, "10.0.0.1")
    assert refused.status() == 503 and refused.transport.disconnecting
    assert refused.error()["code"] == "too_many_connections"
    assert b"Retry-After: 1" in refused.answer()
    other = Client(site, "10.0.0.2")
    other.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert other.status() == 200
    held[0].close()
    again = Client(site, "10.0.0.1")
    assert again.status() is None, "a closed connection frees its place"


def test_connections_past_the_total_are_503() -> None:
    site = hello_site(Clock(), max_connections=4, max_connections_per_client=100)
    clients = [Client(site, f"10.0.0.{i}") for i in range(4)]
    assert all(c.status() is None for c in clients)
    assert Client(site, "10.0.1.1").status() == 503
    clients[1].close()
    assert Client(site, "10.0.1.1").status() is None


def test_the_connection_budget_leaves_descriptors_to_the_rest(monkeypatch: Any) -> None:
    monkeypatch.setattr(guards, "getrlimit", lambda which: (256, 4096))
    assert connection_budget(1000) == 256 - guards.FD_RESERVE
    assert connection_budget(10) == 10
    monkeypatch.setattr(
        guards, "getrlimit", lambda which: (guards.RLIM_INFINITY, guards.RLIM_INFINITY)
    )
    assert connection_budget(1000) == 1000


class FakePort:
    def __init__(self) -> None:
        self.reading = True
        self.connected = True
        self.disconnecting = False

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class OutOfDescriptors:
    def __init__(self) -> None:
        self.accepts = 0
        self.full = True

    def accept(self) -> Any:
        self.accepts += 1
        if self.full:
            raise OSError(errno.EMFILE, "Too many open files")
        return ("client", ("127.0.0.1", 1))

    def fileno(self) -> int:
        return 7


def test_out_of_descriptors_pauses_accepting_for_a_moment() -> None:
    clock, port, sock = Clock(), FakePort(), OutOfDescriptors()
    listener = PausingListener(sock, port, clock, 0.5)
    with pytest.raises(BlockingIOError) as raised:
        listener.accept()
    assert raised.value.errno == errno.EAGAIN  # Twisted's port then waits quietly
    assert not port.reading, "the reactor must not call accept again at once"
    assert listener.fileno() == 7
    clock.advance(0.5)
    assert port.reading
    sock.full = False
    assert listener.accept() == ("client", ("127.0.0.1", 1))


def test_a_port_closed_while_paused_is_not_read_again() -> None:
    clock, port = Clock(), FakePort()
    listener = PausingListener(OutOfDescriptors(), port, clock, 0.5)
    with pytest.raises(BlockingIOError):
        listener.accept()
    port.connected = False
    clock.advance(1)
    assert not port.reading


# -- bodies and identifiers -------------------------------------------------------------------


def test_a_utf16_json_body_is_400_naming_utf8() -> None:
    client = Client(server_site(Clock(), open_operator_routes=True))
    body = json.dumps({"command": "true", "frequency": "every 30 seconds"}).encode("utf-16")
    client.send(CREATE + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert client.status() == 400
    assert b'"invalid_json"' in client.answer() and b"not valid UTF-8" in client.answer()


@pytest.mark.parametrize(
    "spelling",
    [
        "{123e4567-e89b-12d3-a456-426614174000}",
        "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
        "123e4567e89b12d3a456426614174000",
        "123e4567-e89b12d3-a456-426614174000",
        " 123e4567-e89b-12d3-a456-426614174000",
    ],
)
def test_only_the_canonical_uuid_spelling_is_accepted(spelling: str) -> None:
    with pytest.raises(protocol.InvalidMessage):
        protocol.parse_uuid(spelling, "task_id")


def test_a_uuid_in_capitals_is_the_same_uuid() -> None:
    upper = protocol.parse_uuid("123E4567-E89B-12D3-A456-426614174000", "task_id")
    assert str(upper) == "123e4567-e89b-12d3-a456-426614174000"


def test_a_non_canonical_uuid_in_a_path_is_400() -> None:
    client = Client(server_site(Clock(), open_operator_routes=True))
    client.send(b"GET /api/v1/tasks/123e4567e89b12d3a456426614174000 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert client.status() == 400


# -- the server's choice of host names ----------------------------------------------------------


def server_options(*args: str) -> Any:
    from taskscheduler.server.tap import Options

    options = Options()
    options.parseOptions(list(args))
    return options


def test_the_server_answers_any_host_with_tokens_and_the_loopback_names_without() -> None:
    from taskscheduler.server.tap import host_policy_for

    assert host_policy_for(None, has_tokens=True).hosts is None
    assert host_policy_for(None, has_tokens=False).hosts == set(LOOPBACK_HOSTS)
    chosen = server_options("--accept-hosts", "ts.example.com,localhost")["host-policy"]
    assert host_policy_for(chosen, has_tokens=True).hosts == {"ts.example.com", "localhost"}
    with pytest.raises(Exception, match="accept-hosts"):
        server_options("--accept-hosts", "*,x")


def test_the_default_compose_server_answers_the_seeds_curl_and_its_agents() -> None:
    from taskscheduler.server.tap import host_policy_for
    from tests.unit.test_compose_files import DEFAULT, argv, load

    services = load(DEFAULT)["services"]
    args = argv(services["server"])
    options = server_options(*args[args.index("taskscheduler-server") + 1 :])
    policy = host_policy_for(options["host-policy"], has_tokens=False)
    agent_env = services["agent1"]["environment"]
    agent_host = agent_env["TASKSCHEDULER_SERVER_URL"].split("//")[1].encode()
    for host in [b"localhost:8080", b"127.0.0.1:8080", agent_host]:
        assert policy.refusal(b"POST", _headers(host), secure=False) is None, host
    assert policy.refusal(b"POST", _headers(b"evil.example:8080"), secure=False) is not None


def _headers(host: bytes) -> Any:
    from twisted.web.http_headers import Headers

    return Headers({b"host": [host]})


def test_a_request_refused_on_its_headers_gets_no_100_continue() -> None:
    client = Client(server_site(Clock()))
    client.send(CREATE + b"Expect: 100-continue\r\nContent-Length: 900000\r\n\r\n")
    assert client.status() == 401
    assert b"100 Continue" not in client.answer()


# -- the early check agrees with the full one ---------------------------------------------------


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("open_operator_routes", [False, True])
async def test_what_headers_refuse_is_what_the_full_check_answers(
    tmp_path: Any, open_operator_routes: bool
) -> None:
    from twisted.web.http_headers import Headers

    from tests.unit.route_sweep import PUBLIC, concrete, routes
    from tests.unit.test_server_api import AGENT_A, CREDENTIALS
    from tests.unit.test_server_security import (
        JOIN,
        REVOKED_AGENT,
        REVOKED_JOIN,
        REVOKED_OPERATOR,
        Server,
    )
    from tests.unit.test_server_security import (
        OPERATOR as ALICE,
    )

    server = Server(tmp_path, open_operator_routes)
    if not open_operator_routes:
        await server.setup()  # revokes through an operator route, which needs a token
    credentials = [
        None,
        "Basic YWxpY2U6eA==",
        "Bearer",
        ALICE,
        REVOKED_OPERATOR,
        new_token(OPERATOR_PREFIX),
        JOIN,
        REVOKED_JOIN,
        CREDENTIALS[AGENT_A],
        REVOKED_AGENT,
        "tsx_something",
    ]
    decided = 0
    for method, rule, endpoint in routes(ServerAPI.app):
        if (method, rule) in PUBLIC:
            continue
        level = ServerAPI.ACCESS[endpoint]
        path = concrete(rule)
        for credential in credentials:
            header = None
            if credential is not None:
                header = credential if " " in credential or credential == "Bearer" else None
                header = header or f"Bearer {credential}"
            early = server.access.check_headers(
                Headers({b"authorization": [header.encode()]} if header else {}), level
            )
            if early is None:
                continue
            decided += 1
            headers = dict(JSON_HEADERS)
            if header is not None:
                headers["Authorization"] = header
            response = await server.http.request(
                method, "http://server" + path, data=b"{}", headers=headers
            )
            assert response.code == early.status, (method, rule, credential)
    assert decided >= 30


JSON_HEADERS = {"Content-Type": "application/json"}


def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline_unanswered() -> None:
    clock = Clock()
    client = Client(hello_site(clock))
    clock.advance(HEADER_TIMEOUT - 0.1)
    assert not client.closing()
    clock.advance(0.1)
    assert client.closing() and client.answer() == b""
