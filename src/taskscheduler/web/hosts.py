"""Which host names a daemon answers to, and which origins may change its state
(:class:`HostPolicy`, against DNS rebinding), from the ``Host`` and ``Origin`` headers."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from taskscheduler.web.errors import HOST_NOT_ALLOWED, ORIGIN_NOT_ALLOWED, ApiError

#: The host names of a loopback listener: what a local client types in its URL.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
#: Methods that change state: refused when they carry another site's ``Origin``.
STATE_CHANGING_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})
_HOST_NAME_RE = re.compile(r"[a-z0-9._-]+|[0-9a-f:.]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_ORIGIN_RE = re.compile(r"(https?)://([^/?#@]+)")


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``),
    lower-cased, without a trailing dot; None if it is not one."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1 :]
        if ":" not in host:
            return None
    else:
        host, colon, port_text = value.partition(":")
        rest = colon + port_text
    port = None
    if rest:
        if not rest.startswith(":") or _PORT_RE.fullmatch(rest[1:]) is None:
            return None
        port = int(rest[1:])
        if port > 65535:
            return None
    host = host.lower()
    host = host[:-1] if host.endswith(".") else host
    if not host or _HOST_NAME_RE.fullmatch(host) is None:
        return None
    return host, port


class HostPolicy:
    """Which ``Host`` a daemon answers to, and which ``Origin`` may change its state.

    A web page a developer visits can make the browser send requests to a server without
    tokens on loopback, through DNS rebinding (its own name resolving to 127.0.0.1): the
    browser then sends that page's host name as ``Host``, and its origin as ``Origin``.
    So a request is refused (403, before its body is read) when its ``Host`` is not one
    of ``hosts`` (``None``: any host), and a POST, PUT, PATCH or DELETE is refused when it
    carries an ``Origin`` other than the server's own (same scheme, host and port as the
    request's ``Host``). Our own clients send no ``Origin``.
    """

    def __init__(self, hosts: Iterable[str] | None = None, option: str = "--accept-hosts"):
        self.hosts = None if hosts is None else frozenset(_host_entry(h) for h in hosts)
        self._option = option

    @classmethod
    def parse(cls, text: str, option: str = "--accept-hosts") -> HostPolicy:
        """``host1,host2`` (any port), or ``*`` for any host; ValueError if malformed."""
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise ValueError(f"{option} is empty: give host names separated by commas, or *")
        if "*" in items:
            if len(items) > 1:
                raise ValueError(f"{option}: '*' accepts any host; give it alone")
            return cls(None, option)
        return cls(items, option)

    def describe(self) -> str:
        return "any host" if self.hosts is None else ", ".join(sorted(self.hosts))

    def refusal(self, method: bytes, headers: Any, secure: bool) -> ApiError | None:
        """Why a request with these headers is refused, or None."""
        values = headers.getRawHeaders(b"host") or []
        host = split_host(values[0].decode("latin-1")) if len(values) == 1 else None
        if self.hosts is not None and (host is None or host[0] not in self.hosts):
            return HOST_NOT_ALLOWED(hosts=self.describe(), option=self._option)
        if method.upper() in STATE_CHANGING_METHODS:
            origins = headers.getRawHeaders(b"origin")
            if origins is not None and not _same_origin(origins, host, secure):
                return ORIGIN_NOT_ALLOWED()
        return None


def _host_entry(text: str) -> str:
    entry = text.strip()
    if ":" in entry and not entry.startswith("["):
        entry = f"[{entry}]"  # a bare IPv6 address, as people write it in a list
    parsed = split_host(entry)
    if parsed is None or parsed[1] is not None:
        raise ValueError(f"not a host name (without a port): {text!r}")
    return parsed[0]


def _same_origin(origins: list[bytes], host: tuple[str, int | None] | None, secure: bool) -> bool:
    if host is None or len(origins) != 1:
        return False
    match = _ORIGIN_RE.fullmatch(origins[0].decode("latin-1").strip().lower())
    if match is None:
        return False  # "null" (a sandboxed page, a redirect) or garbage: not ours
    scheme = "https" if secure else "http"
    origin = split_host(match.group(2))
    if match.group(1) != scheme or origin is None:
        return False
    default = 443 if secure else 80
    return origin[0] == host[0] and (origin[1] or default) == (host[1] or default)
