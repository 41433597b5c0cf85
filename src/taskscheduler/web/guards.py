"""The limits both daemons' HTTP servers hold a client to: body size, header size and
time, body time, connections in all and per address; and the early refusals (413, 403,
401) given on a request's headers, before its body is read."""

from __future__ import annotations

import io
from collections.abc import Callable
from resource import RLIM_INFINITY, RLIMIT_NOFILE, getrlimit
from typing import Any
from urllib.parse import unquote_to_bytes as unquote

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import Request, Site

from taskscheduler.web.errors import (
    BAD_HTTP_REQUEST,
    HEADERS_TOO_LARGE,
    REQUEST_TIMEOUT,
    TOO_MANY_CONNECTIONS,
    ApiError,
    raw_error,
    too_large,
)
from taskscheduler.web.hosts import HostPolicy

#: Largest request body accepted by default. A result batch with capped outputs fits.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: Seconds a connection may stay idle before it is closed.
DEFAULT_IDLE_TIMEOUT = 60.0
#: Seconds a client has to send a request's line and headers, from the accept (or, on a
#: kept-alive connection, from the next request's first byte).
DEFAULT_HEADER_TIMEOUT = 10.0
#: Seconds a client has to send a request's body once its headers are in: 16 MiB at
#: 300 KiB/s. A client that needs longer is too slow to hold a connection.
DEFAULT_BODY_TIMEOUT = 60.0
#: Client connections a daemon holds at once, and from one address (Nomad's and Consul's
#: default per client); see :func:`connection_budget`.
DEFAULT_MAX_CONNECTIONS = 1000
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 100
#: Descriptors left to everything but client connections (database, agents, files, runs).
FD_RESERVE = 128
#: After an early answer, what the client still sends is read and dropped for at most
#: this long and this much, so that the answer is not destroyed by a reset.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024

_log = Logger(namespace="taskscheduler.web")


class LimitedRequest(Request):
    """A request refused on its headers alone, before its body is read, when (in order):

    - its declared length (or, for a chunked body, the bytes received so far) passes
      ``max_body_bytes``, 413;
    - its ``Host`` or ``Origin`` is not accepted (:class:`HostPolicy`), 403;
    - the route it is for needs a credential its headers do not carry (the resource's
      ``refuse_early``, :meth:`taskscheduler.web.gate.AuthGate.refuse_early`), 401 or 403.

    twisted.web would buffer any body it is sent; this answers and closes the connection
    without rendering anything.
    """

    max_body_bytes = DEFAULT_MAX_BODY_BYTES
    host_policy = HostPolicy()
    _refused = False
    _received = 0

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self._refuse_too_large()
            return
        refusal = self._early_refusal()
        if refusal is not None:
            self._refuse(raw_error(refusal))
            return
        super().gotLength(length)
        self._received = 0

    def _early_refusal(self) -> ApiError | None:
        # The request line is the channel's until requestReceived; these are its names.
        channel: Any = self.channel
        method = getattr(channel, "_command", b"")
        uri = getattr(channel, "_path", b"")
        refusal = self.host_policy.refusal(method, self.requestHeaders, channel.isSecure())
        if refusal is not None:
            return refusal
        refuse_early = getattr(getattr(channel, "site", None), "resource", None)
        refuse_early = getattr(refuse_early, "refuse_early", None)
        if refuse_early is None:
            return None
        path = uri.split(b"?", 1)[0]
        postpath = [unquote(segment) for segment in path[1:].split(b"/")]
        result: ApiError | None = refuse_early(method, postpath, self.requestHeaders)
        return result

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > self.max_body_bytes:
            self._refuse_too_large()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if not self._refused:
            super().process()

    def _refuse_too_large(self) -> None:
        self._refuse(raw_error(too_large(self.max_body_bytes)))

    def _refuse(self, response: bytes) -> None:
        self._refused = True
        self.content = io.BytesIO()
        close = getattr(self.channel, "close_with", None)
        if close is not None:
            close(response)
            return
        transport = self.channel.transport
        assert transport is not None
        transport.write(response)
        transport.loseConnection()


class GuardedChannel(http.HTTPChannel):
    """An HTTP channel that bounds how long and how much a client may take.

    - The request line and headers must arrive within ``header_timeout`` seconds, counted
      from the accept (and, on a kept-alive connection, from the next request's first
      byte): the idle timeout alone would not do, since every byte received resets it.
      A new connection that sent nothing at all is closed without an answer.
    - A body must arrive within ``body_timeout`` seconds of its headers.
    - Headers over ``totalHeadersSize`` (16 KiB), or one line over it, get 431.

    Every such answer (and twisted.web's own 400s) is a complete JSON response followed
    by a lingering close: the write side is shut, and what the client still sends is read
    and dropped for a moment (at most :data:`LINGER_SECONDS` and :data:`LINGER_BYTES`),
    since closing a socket with unread data makes the kernel send a reset that can
    destroy the answer before the client reads it.
    """

    header_timeout = DEFAULT_HEADER_TIMEOUT
    body_timeout = DEFAULT_BODY_TIMEOUT
    #: Called once when the connection is gone (the site's connection count).
    on_close: Callable[[], None] | None = None
    _deadline: IDelayedCall | None = None
    _linger: IDelayedCall | None = None
    _closing = False
    _heard = False
    _dropped = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline(self.header_timeout, _HEADERS_TOO_SLOW)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            self._drop(data)
            return
        self._heard = True
        self._maybe_time_headers()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        self._maybe_time_headers()  # also lines replayed from a kept-alive buffer
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self._headers_too_large()
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._headers_too_large()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._closing:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        super().allHeadersReceived()
        if not self._closing and self.length != 0:
            self._start_deadline(self.body_timeout, _BODY_TOO_SLOW)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def _send100Continue(self) -> None:
        if not self._closing:  # a request refused on its headers wants no body
            super()._send100Continue()

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.close_with(raw_error(BAD_HTTP_REQUEST()))

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()
        super().connectionLost(reason)

    def close_with(self, response: bytes) -> None:
        """Send ``response`` (a complete one), then close lingering."""
        if self._closing:
            return
        self._closing = True
        self._cancel_deadline()
        self.setTimeout(None)
        transport: Any = self.transport
        if transport is None:
            return
        transport.write(response)
        if isinstance(transport, TLSMemoryBIOProtocol) or not hasattr(
            transport, "loseWriteConnection"
        ):
            transport.loseConnection()  # TLS ends with its own close alert
        else:
            transport.loseWriteConnection()
        self._linger = self.callLater(LINGER_SECONDS, self._abort)

    def _maybe_time_headers(self) -> None:
        if self._deadline is None and not self._handlingRequest and self.line_mode:
            self._start_deadline(self.header_timeout, _HEADERS_TOO_SLOW)

    def _start_deadline(self, seconds: float, message: str) -> None:
        self._cancel_deadline()
        self._deadline = self.callLater(seconds, lambda: self._too_slow(message))

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self, message: str) -> None:
        self._deadline = None
        if not self._heard:
            # Nothing was asked: no answer, which a client would take for its request's
            # (a browser opens connections ahead of need).
            self.close_with(b"")
            return
        self.close_with(raw_error(REQUEST_TIMEOUT(message)))

    def _headers_too_large(self) -> None:
        self.close_with(raw_error(HEADERS_TOO_LARGE(limit=self.totalHeadersSize)))

    def _drop(self, data: bytes) -> None:
        self._dropped += len(data)
        if self._dropped > LINGER_BYTES:
            self._abort()

    def _abort(self) -> None:
        self._linger = None
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]


_HEADERS_TOO_SLOW = "the request line and headers took too long to arrive"
_BODY_TOO_SLOW = "the request body took too long to arrive"


class _Refusal(Protocol):
    """Answers a connection over the limits with 503 and closes it."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._answer)
        self.transport.loseConnection()


class LimitedSite(Site):
    """A Site that holds at most ``max_connections`` client connections, and at most
    ``max_per_client`` from one address; a connection past either is answered 503 (with
    ``Retry-After``) and closed at once. Refusals are logged at most once a minute."""

    max_connections = DEFAULT_MAX_CONNECTIONS
    max_per_client = DEFAULT_MAX_CONNECTIONS_PER_CLIENT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_connections = 0
        self._per_client: dict[str, int] = {}
        self._refused = 0
        self._refusal_logged_at: float | None = None

    def buildProtocol(self, addr: Any) -> Any:
        client = getattr(addr, "host", None)
        if self.open_connections >= self.max_connections:
            return self._refuse(f"this server holds its most connections ({self.max_connections})")
        if client is not None and self._per_client.get(client, 0) >= self.max_per_client:
            return self._refuse(
                f"this server holds its most connections from one address ({self.max_per_client})"
            )
        protocol = super().buildProtocol(addr)
        self.open_connections += 1
        if client is not None:
            self._per_client[client] = self._per_client.get(client, 0) + 1
        protocol._channel.on_close = lambda: self._release(client)
        return protocol

    def _release(self, client: str | None) -> None:
        self.open_connections -= 1
        if client is not None:
            left = self._per_client.get(client, 0) - 1
            if left > 0:
                self._per_client[client] = left
            else:
                self._per_client.pop(client, None)

    def _refuse(self, why: str) -> Protocol:
        self._refused += 1
        now = self.reactor.seconds()
        if self._refusal_logged_at is None or now - self._refusal_logged_at >= 60:
            _log.warn(
                "refused {count} connection(s) over the limits: {why}",
                count=self._refused,
                why=why,
            )
            self._refused, self._refusal_logged_at = 0, now
        return _Refusal(raw_error(TOO_MANY_CONNECTIONS(why=why)))


def connection_budget(max_connections: int) -> int:
    """``max_connections``, lowered to leave :data:`FD_RESERVE` descriptors of the
    process's limit (``RLIMIT_NOFILE``) to its database, agents, files and runs."""
    soft, _ = getrlimit(RLIMIT_NOFILE)
    if soft == RLIM_INFINITY:
        return max_connections
    return max(1, min(max_connections, soft - FD_RESERVE))


def make_site(
    resource: Any,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    host_policy: HostPolicy | None = None,
    reactor: Any = None,
) -> LimitedSite:
    """A Site with limits, that logs nothing itself.

    A request whose Host, Origin or credential is refused on its headers (see
    :class:`LimitedRequest`), or whose body is over ``max_body_bytes``, is answered before
    its body is read; a connection idle for ``idle_timeout`` seconds is closed; a request
    whose line and headers take longer than ``header_timeout`` seconds from the accept,
    or whose body takes longer than ``body_timeout``, is answered 408 and closed;
    connections are capped (:class:`LimitedSite`, :func:`connection_budget`).
    twisted.web's access log would print full URLs; our own logging decides what is safe.
    """
    request_factory = type(
        "LimitedRequest",
        (LimitedRequest,),
        {"max_body_bytes": max_body_bytes, "host_policy": host_policy or HostPolicy()},
    )
    site = LimitedSite(
        resource, requestFactory=request_factory, timeout=idle_timeout, reactor=reactor
    )
    channel = type(
        "GuardedChannel",
        (GuardedChannel,),
        {"header_timeout": header_timeout, "body_timeout": body_timeout},
    )
    site.protocol = lambda: http._GenericHTTPChannelProtocol(channel())  # type: ignore[assignment]
    site.max_connections = connection_budget(max_connections)
    site.max_per_client = max_connections_per_client
    site.noisy = False
    site.log = lambda request: None  # type: ignore[assignment]
    return site
