"""Where a daemon listens: its ``--listen`` endpoint, parsed by Twisted, and the rule that
a server without operator tokens serves loopback only, decided on the address it bound.

Twisted parses the endpoint string (``serverFromString``); nothing here reads it again.
Whether a server is reachable from the network is read from the listening port itself
(``port.getHost()``), so ``tcp:8080``, ``systemd:``, ``haproxy:`` or a host name all get
the answer the kernel gives.
"""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IAddress, IStreamServerEndpoint

from taskscheduler.auth import TokenFile
from taskscheduler.tls import TLSConfigError, require_client_certificates

#: The name daemons give the flag that lets a non-loopback server run without tokens.
INSECURE_FLAG = "--insecure-allow-anonymous-operators"


class EndpointSyntaxError(ValueError):
    """A ``--listen`` that Twisted cannot parse."""


class UnprotectedListener(ValueError):
    """A server would accept operator requests from the network without any token."""


def listen_endpoint(
    reactor: Any, listen: str, client_ca_file: str | None = None
) -> IStreamServerEndpoint:
    """The endpoint ``--listen`` describes, requiring client certificates signed by a CA
    in ``client_ca_file`` when given (mutual TLS; ``listen`` must then be ``ssl:``).

    :class:`EndpointSyntaxError` if Twisted cannot parse it: its parsers fail with
    ValueError, TypeError, IndexError, RuntimeError... and a message that does not name
    the option. A file it names that cannot be read raises OSError or TLSConfigError.
    """
    try:
        if client_ca_file is not None:
            return require_client_certificates(reactor, listen, client_ca_file)
        return serverFromString(reactor, listen)
    except (TLSConfigError, OSError):
        raise  # the description parsed; a file it names is the problem
    except (ValueError, TypeError, LookupError, RuntimeError) as e:
        raise EndpointSyntaxError(
            f"cannot parse --listen {listen!r} as a Twisted endpoint description "
            f"({e or type(e).__name__}); e.g. tcp:8080:interface=127.0.0.1"
        ) from None


def is_loopback_interface(interface: str) -> bool:
    """Whether an address (or ``localhost``) reaches this machine only."""
    name = interface.strip()
    if name.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False  # a host name could resolve to anything; assume the worst
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_loopback_address(address: IAddress) -> bool:
    """Whether a listening port bound to ``address`` accepts connections from this machine
    only: a loopback IP address or a UNIX socket. ``0.0.0.0``, ``::``, any other address
    and any other kind of address are not: the answer decides whether a server may run
    without tokens, so every doubt resolves to "no"."""
    if isinstance(address, IPv4Address | IPv6Address):
        return is_loopback_interface(address.host)
    return isinstance(address, UNIXAddress) and bool(address.name)


def advertised_url(scheme: str, address: IAddress) -> str | None:
    """``scheme://host:port`` where a port bound to ``address`` is reached (127.0.0.1 when
    it is bound to every interface), or None if it is not an IP port."""
    if not isinstance(address, IPv4Address | IPv6Address):
        return None
    host = address.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{address.port}"


def is_loopback_url(url: str) -> bool:
    """Whether an http(s) URL names this machine (localhost or a loopback address)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and is_loopback_interface(host)


def check_listen_policy(
    address: IAddress, listen: str, tokens: TokenFile | None, allow_anonymous: bool = False
) -> str | None:
    """Decide whether a server bound to ``address`` (its ``--listen`` is ``listen``) may
    serve with ``tokens``.

    - operator tokens configured (at least one): fine, returns None;
    - no tokens, loopback only (the local playground): allowed, returns a warning to log;
    - no tokens beyond loopback: raises :class:`UnprotectedListener`, unless
      ``allow_anonymous`` (the daemon's :data:`INSECURE_FLAG`) says otherwise, in which
      case it returns a loud warning to log.
    """
    if tokens is not None and len(tokens) > 0:
        return None
    if is_loopback_address(address):
        return (
            "no operator tokens are configured: the API accepts every local caller. "
            "This is the loopback playground; configure tokens before listening elsewhere."
        )
    if not allow_anonymous:
        raise UnprotectedListener(
            f"refusing to listen on {listen!r} without operator tokens: anyone who can reach "
            "it could run commands on every agent. Configure a tokens file or variable, "
            f"listen on loopback (tcp:PORT:interface=127.0.0.1), or pass {INSECURE_FLAG}."
        )
    return (
        f"INSECURE: {INSECURE_FLAG} is set and no operator tokens are configured; anyone "
        f"who can reach {listen!r} can run commands on every agent"
    )
