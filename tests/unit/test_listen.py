"""Where a daemon listens: ``--listen`` parsed by Twisted, loopback decided on the address
the port is bound to, and the rule that a server without tokens stays on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Factory, Protocol

from taskscheduler.auth import TokenFile, hash_token, new_token
from taskscheduler.listen import (
    INSECURE_FLAG,
    EndpointSyntaxError,
    UnprotectedListener,
    advertised_url,
    check_listen_policy,
    is_loopback_address,
    listen_endpoint,
)

LOOPBACK = IPv4Address("TCP", "127.0.0.1", 8080)
EVERYWHERE = IPv4Address("TCP", "0.0.0.0", 8080)


@contextmanager
def bound(listen: str) -> Iterator[IListeningPort]:
    """The port ``listen`` binds (on the real reactor: binding is synchronous)."""
    ports: list[IListeningPort] = []
    listen_endpoint(reactor, listen).listen(Factory.forProtocol(Protocol)).addCallback(ports.append)
    [port] = ports
    try:
        yield port
    finally:
        port.stopListening()


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("tcp:0:interface=127.0.0.1", True),
        ("tcp:port=0:interface=127.0.0.1", True),
        ("tcp:0:127.0.0.1", True),  # interface is _parseTCP's second positional argument
        ("tcp:0:interface=localhost", True),
        ("tcp:0:interface=\\:\\:1", True),
        ("tcp6:0:interface=\\:\\:1", True),
        ("tcp6:0:50:\\:\\:1", True),
        ("tcp:0:interface=\\:\\:ffff\\:127.0.0.1", True),
        ("unix:{tmp}/ts.sock", True),
        ("haproxy:tcp:0:interface=127.0.0.1", True),
        ("tcp:0", False),
        ("tcp:0:interface=", False),
        ("tcp:0:interface=0.0.0.0", False),
        ("tcp:0:interface=\\:\\:", False),
        ("tcp6:0", False),
        ("haproxy:tcp:0", False),
    ],
)
def test_loopback_is_read_from_the_address_the_port_is_bound_to(
    listen: str, loopback: bool, tmp_path: Path
) -> None:
    with bound(listen.format(tmp=tmp_path)) as port:
        assert is_loopback_address(port.getHost()) is loopback


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        (LOOPBACK, True),
        (IPv4Address("TCP", "127.8.9.10", 8080), True),
        (IPv6Address("TCP", "::1", 8080), True),
        (IPv6Address("TCP", "::ffff:127.0.0.1", 8080), True),
        (UNIXAddress(b"/run/taskscheduler.sock"), True),
        (EVERYWHERE, False),
        (IPv6Address("TCP", "::", 8080), False),
        (IPv4Address("TCP", "10.0.0.5", 8080), False),
        (IPv6Address("TCP", "::ffff:10.0.0.5", 8080), False),
        (IPv6Address("TCP", "fe80::1%eth0", 8080), False),
        (UNIXAddress(None), False),
    ],
)
def test_loopback_addresses(address: IAddress, loopback: bool) -> None:
    assert is_loopback_address(address) is loopback


def test_listen_policy() -> None:
    tokens = TokenFile.from_env_value(f"alice {hash_token(new_token())}")
    no_tokens = TokenFile.from_env_value("")
    assert check_listen_policy(EVERYWHERE, "tcp:8080", tokens) is None
    assert check_listen_policy(LOOPBACK, "tcp:8080:interface=127.0.0.1", tokens) is None
    for empty in (None, no_tokens):
        warning = check_listen_policy(LOOPBACK, "tcp:8080:interface=127.0.0.1", empty)
        assert warning is not None and "playground" in warning
        with pytest.raises(UnprotectedListener) as info:
            check_listen_policy(EVERYWHERE, "tcp:8080", empty)
        assert "refusing to listen on 'tcp:8080' without operator tokens" in str(info.value)
        assert INSECURE_FLAG in str(info.value)
        loud = check_listen_policy(EVERYWHERE, "tcp:8080", empty, allow_anonymous=True)
        assert loud is not None and loud.startswith("INSECURE")


@pytest.mark.parametrize(
    "listen",
    ["tcp:8080\\", "", ":8080", "  :8080:interface=127.0.0.1", "tcp:8080:127.0.0.1:interface=x"],
)
def test_an_unparseable_listen_is_said_to_be_unparseable(listen: str) -> None:
    with pytest.raises(EndpointSyntaxError, match="cannot parse --listen") as info:
        listen_endpoint(reactor, listen)
    assert repr(listen) in str(info.value)
    assert not isinstance(info.value, UnprotectedListener)


@pytest.mark.parametrize(
    ("scheme", "address", "url"),
    [
        ("http", EVERYWHERE, "http://127.0.0.1:8080"),
        ("http", IPv6Address("TCP", "::", 8081), "http://127.0.0.1:8081"),
        ("http", LOOPBACK, "http://127.0.0.1:8080"),
        ("http", IPv4Address("TCP", "10.1.2.3", 8081), "http://10.1.2.3:8081"),
        ("https", IPv6Address("TCP", "::1", 8443), "https://[::1]:8443"),
        ("http", UNIXAddress(b"/run/agent.sock"), None),
    ],
)
def test_the_advertised_url_is_where_the_port_is_bound(
    scheme: str, address: IAddress, url: str | None
) -> None:
    assert advertised_url(scheme, address) == url
