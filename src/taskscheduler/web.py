"""What both daemons' HTTP APIs need: JSON errors, JSON bodies, limits, and access control.

Every error a client sees is ``{"error": {"code": "...", "message": "..."}}`` with the
right status. Domain errors are mapped to statuses once, in :func:`install_error_handlers`,
never in each route.

Access control is deny by default: :class:`AuthGate` stands in front of a Klein app, looks
up which route a request is for, and lets it through only after the check that route's
:class:`Access` level calls for. A route missing from the table is refused (and the route
sweep test fails), so a new route is closed until someone classifies it.
"""

from __future__ import annotations

import enum
import errno
import io
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from resource import RLIM_INFINITY, RLIMIT_NOFILE, getrlimit
from typing import Any
from urllib.parse import unquote_to_bytes as unquote

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound
from werkzeug.routing import Map, RequestRedirect

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
#: Seconds accepting pauses when the process is out of descriptors.
ACCEPT_PAUSE = 0.5

_log = Logger(namespace="taskscheduler.web")


class ApiError(Exception):
    """An error for the client: an HTTP status, a machine-readable code, a message."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[bytes, bytes] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def unauthorized(message: str, challenge: bytes) -> ApiError:
    """401 with the ``WWW-Authenticate`` challenge of the credential the route wants."""
    return ApiError(http.UNAUTHORIZED, "unauthorized", message, {b"WWW-Authenticate": challenge})


def forbidden(message: str, code: str = "forbidden") -> ApiError:
    return ApiError(http.FORBIDDEN, code, message)


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(http.BAD_REQUEST, code, message)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode("utf-8")


#: The error code of a body over the limit (413).
PAYLOAD_TOO_LARGE = "payload_too_large"


def too_large_body(max_body_bytes: int) -> bytes:
    """The 413 answer's body. It names the limit, so that a client can shrink what it
    sends to fit (the agent trims a result's output) instead of giving up."""
    error = {
        "code": PAYLOAD_TOO_LARGE,
        "message": f"the request body is larger than {max_body_bytes} bytes",
        "max_body_bytes": max_body_bytes,
    }
    return json.dumps({"error": error}).encode("utf-8")


def json_response(request: IRequest, body: Any, status: int = http.OK) -> bytes:
    """Set the status and JSON content type, and return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def read_json(request: IRequest) -> Any:
    """The request body as JSON, or ApiError 415 / 400 with a clear message."""
    content_type = request.getHeader(b"Content-Type") or b""
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type != b"application/json":
        raise ApiError(
            http.UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the request body as JSON with 'Content-Type: application/json'",
        )
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        raise bad_request("the request body is empty; a JSON object is required", "invalid_json")
    try:
        # Decoded here: json.loads would take UTF-16 and UTF-32 bytes too (RFC 8259: JSON
        # exchanged between systems is UTF-8).
        return json.loads(bytes(raw).decode("utf-8"))
    except UnicodeDecodeError:
        raise bad_request(
            "the request body is not valid UTF-8: send JSON encoded as UTF-8", "invalid_json"
        ) from None
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}", "invalid_json") from None
    except ValueError:
        # Python refuses to convert an integer of over 4300 digits (a ValueError that is
        # no JSONDecodeError): no field needs one.
        raise bad_request(
            "the request body holds a number with too many digits", "invalid_json"
        ) from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply", "invalid_json") from None


def install_error_handlers(app: Klein, log: Logger) -> None:
    """Map errors to JSON responses for every route of ``app``.

    Registered on the class's Klein app, so handlers receive the API instance first.
    """

    @app.handle_errors(ApiError)
    def _api_error(self: Any, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        for name, value in error.headers.items():
            request.setHeader(name, value)
        return json_response(request, _error_json(error.code, error.message), error.status)

    @app.handle_errors(NotFound)
    def _not_found(self: Any, request: IRequest, failure: Failure) -> bytes:
        return json_response(request, _error_json("not_found", "no such endpoint"), http.NOT_FOUND)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self: Any, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        return _error_now(request, method_not_allowed(request, error.valid_methods or []))

    @app.handle_errors(HTTPException)
    def _http_exception(self: Any, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, HTTPException)
        status = error.code or http.INTERNAL_SERVER_ERROR
        return json_response(
            request, _error_json("http_error", error.description or error.name), status
        )

    @app.handle_errors(Exception)
    def _unexpected(self: Any, request: IRequest, failure: Failure) -> bytes:
        # The details go to the log, never to the client (they may hold secrets).
        log.failure(
            "unexpected error serving {method} {path}",
            failure,
            method=request.method,
            path=request.path,
        )
        return json_response(
            request,
            _error_json("internal_error", "the server hit an unexpected error; see its log"),
            http.INTERNAL_SERVER_ERROR,
        )


def _error_json(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def method_not_allowed(request: IRequest, allowed: Iterable[str]) -> ApiError:
    """405 naming the methods the path accepts, in ``Allow`` and in the message."""
    methods = sorted(allowed)
    method = request.method.decode("ascii", "replace")
    return ApiError(
        http.NOT_ALLOWED,
        "method_not_allowed",
        f"this endpoint does not accept {method}"
        + (f"; use {', '.join(methods)}" if methods else ""),
        {b"Allow": ", ".join(methods).encode("ascii")} if methods else None,
    )


def raw_response(status: int, body: bytes, headers: Mapping[bytes, bytes] | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, for answers given before
    (or instead of) twisted.web's request handling: nothing is rendered."""
    reason = _REASONS.get(status) or http.RESPONSES.get(status, b"Error")
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"Content-Type: application/json"]
    lines += [name + b": " + value for name, value in (headers or {}).items()]
    lines += [b"Connection: close", b"Content-Length: %d" % len(body), b"", body]
    return b"\r\n".join(lines)


_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
}


def raw_error(error: ApiError) -> bytes:
    """:func:`raw_response` for an :class:`ApiError`, with our JSON error body."""
    return raw_response(error.status, error_body(error.code, error.message), error.headers)


# -- which host names a daemon answers to ----------------------------------------------------

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
            return forbidden(
                "this server does not answer to the host name in this request's Host "
                f"header; it answers to {self.describe()} (set by {self._option})",
                "host_not_allowed",
            )
        if method.upper() in STATE_CHANGING_METHODS:
            origins = headers.getRawHeaders(b"origin")
            if origins is not None and not _same_origin(origins, host, secure):
                return forbidden(
                    "a request from another site's page (its Origin header is not this "
                    "server's own) cannot change anything here",
                    "origin_not_allowed",
                )
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


# -- connections -----------------------------------------------------------------------------


class LimitedRequest(Request):
    """A request refused on its headers alone, before its body is read, when (in order):

    - its declared length (or, for a chunked body, the bytes received so far) passes
      ``max_body_bytes``, 413;
    - its ``Host`` or ``Origin`` is not accepted (:class:`HostPolicy`), 403;
    - the route it is for needs a credential its headers do not carry (the resource's
      ``refuse_early``, :meth:`AuthGate.refuse_early`), 401 or 403.

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
        body = too_large_body(self.max_body_bytes)
        self._refuse(raw_response(http.REQUEST_ENTITY_TOO_LARGE, body))

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
        error = bad_request("the request is not valid HTTP/1.1", "bad_http_request")
        self.close_with(raw_error(error))

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
        error = ApiError(http.REQUEST_TIMEOUT, "request_timeout", message)
        self.close_with(raw_error(error))

    def _headers_too_large(self) -> None:
        error = ApiError(
            431,  # Request Header Fields Too Large (RFC 6585)
            "headers_too_large",
            f"the request line and headers are larger than {self.totalHeadersSize} bytes",
        )
        self.close_with(raw_error(error))

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
        error = ApiError(
            http.SERVICE_UNAVAILABLE,
            "too_many_connections",
            why + "; retry later",
            {b"Retry-After": b"1"},
        )
        return _Refusal(raw_error(error))


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


#: Accept errors that mean the process (or the system) is out of descriptors or buffers.
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class PausingListener:
    """A listening socket whose ``accept`` pauses its port for ``pause`` seconds when the
    process runs out of descriptors, instead of failing on every turn of the reactor.

    Twisted's port would otherwise find the socket readable again at once, fail again,
    and log each failure: a busy loop that starves the clients already connected. While
    paused, new connections wait in the kernel's backlog. One warning per minute at most.
    """

    log = Logger()

    def __init__(self, sock: Any, port: Any, clock: IReactorTime, pause: float) -> None:
        self._socket = sock
        self._port = port
        self._clock = clock
        self._pause = pause
        self._resume: IDelayedCall | None = None
        self._paused = 0
        self._logged_at: float | None = None

    def accept(self) -> Any:
        try:
            return self._socket.accept()
        except OSError as e:
            if e.errno not in _OUT_OF_DESCRIPTORS:
                raise
            self._pause_accepting(e)
            raise BlockingIOError(errno.EAGAIN, "accepting paused") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)

    def _pause_accepting(self, error: OSError) -> None:
        if self._resume is not None and self._resume.active():
            return
        self._port.stopReading()
        self._resume = self._clock.callLater(self._pause, self._resume_accepting)
        self._paused += 1
        now = self._clock.seconds()
        if self._logged_at is None or now - self._logged_at >= 60:
            self.log.warn(
                "out of descriptors ({error}): paused accepting connections {count} time(s) "
                "for {pause} s; connected clients are still served",
                error=errno.errorcode.get(error.errno or 0, str(error)),
                count=self._paused,
                pause=self._pause,
            )
            self._paused, self._logged_at = 0, now

    def _resume_accepting(self) -> None:
        self._resume = None
        port = self._port
        if getattr(port, "connected", False) and not getattr(port, "disconnecting", False):
            port.startReading()


def pause_accepting_when_out_of_descriptors(
    port: Any, clock: IReactorTime, pause: float = ACCEPT_PAUSE
) -> None:
    """Wrap a listening port's socket in a :class:`PausingListener` (a no-op for a port
    that is not a socket Twisted reads from)."""
    sock = getattr(port, "socket", None)
    if sock is None or not hasattr(port, "stopReading") or isinstance(sock, PausingListener):
        return
    port.socket = PausingListener(sock, port, clock, pause)


# -- access control ------------------------------------------------------------------------


class Access(enum.StrEnum):
    """Who may call a route."""

    PUBLIC = "public"  # anyone: health checks only
    OPERATOR = "operator"  # an operator's API token
    AGENT = "agent"  # an enrolled agent's credential
    JOIN = "join"  # a join secret (agent enrolment)
    SERVER = "server"  # on an agent: an instruction signed by its server


#: Checks a request against a route's access level: returns, or raises ApiError.
Authorize = Callable[[IRequest, Access], Awaitable[None]]
#: What can be refused on a request's headers (``Headers``) alone, for a route's level.
CheckHeaders = Callable[[Any, Access], "ApiError | None"]


def routing_path(request: IRequest) -> str | None:
    """The path Klein routes a request on, or None if it is not UTF-8 (Klein answers 400).

    Not ``request.path``: twisted.web splits the raw path on ``/`` and percent-decodes
    each segment, and Klein joins the segments again, so ``/api%2Fv1/agents`` reaches
    the route ``/api/v1/agents``. Access must be decided on that very path, or an
    encoded slash or letter would walk past the gate.
    """
    return _joined_path(getattr(request, "postpath", None) or [])


def _joined_path(postpath: list[bytes]) -> str | None:
    path = b"/".join(postpath)
    if not path.startswith(b"/"):
        path = b"/" + path
    try:
        return path.decode("utf-8")
    except UnicodeDecodeError:
        return None


def fixed_paths(url_map: Map) -> dict[str, frozenset[str]]:
    """The methods of each path that has no variable part (``/api/v1/tasks/create``).

    Such a path belongs to its routes for every method: ``GET /api/v1/tasks/create``
    must be a 405, not ``GET /api/v1/tasks/<task_id>`` with the id "create".
    """
    fixed: dict[str, set[str]] = {}
    for rule in url_map.iter_rules():
        if not rule.arguments:
            fixed.setdefault(rule.rule, set()).update(rule.methods or ())
    return {path: frozenset(methods) for path, methods in fixed.items()}


def route_endpoint(url_map: Map, request: IRequest) -> str | None:
    """The Klein endpoint (route function name) a request is for, or None if no route
    matches (Klein then answers 404 or 405 itself)."""
    return _match(url_map, routing_path(request), request.method)


def _match(url_map: Map, path: str | None, method_bytes: bytes) -> str | None:
    if path is None:
        return None
    method = method_bytes.decode("ascii", "replace")
    try:
        endpoint, _ = url_map.bind("localhost").match(path, method=method)
    except (NotFound, MethodNotAllowed, RequestRedirect):
        return None
    return str(endpoint)


class AuthGate(Resource):
    """Deny by default in front of a Klein resource.

    ``access`` classifies every route by endpoint name; a request for a route missing
    from it is refused with 403 and logged. Requests no route matches go through to Klein,
    which answers 404 or 405 without running anything; so are requests for a fixed path
    with a method it does not take (405 with ``Allow``).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        inner: Any,
        url_map: Map,
        access: Mapping[str, Access],
        authorize: Authorize,
        check_headers: CheckHeaders | None = None,
    ) -> None:
        super().__init__()
        self._inner = inner
        self._url_map = url_map
        self._access = dict(access)
        self._authorize = authorize
        self._check_headers = check_headers
        self._fixed = fixed_paths(url_map)

    def refuse_early(self, method: bytes, postpath: list[bytes], headers: Any) -> ApiError | None:
        """What ``check_headers`` refuses on a request's headers alone, before its body is
        read (:class:`LimitedRequest` asks); None lets the body in, and :meth:`render`
        then makes the full check. Only for a route that needs a credential."""
        if self._check_headers is None:
            return None
        endpoint = _match(self._url_map, _joined_path(postpath), method)
        level = self._access.get(endpoint) if endpoint is not None else None
        if level is None or level is Access.PUBLIC:
            return None  # render answers these (404, 405, 403 unclassified, public)
        return self._check_headers(headers, level)

    def render(self, request: IRequest) -> Any:
        path = routing_path(request)
        allowed = self._fixed.get(path) if path is not None else None
        if allowed is not None and request.method.decode("ascii", "replace") not in allowed:
            return _error_now(request, method_not_allowed(request, allowed))
        endpoint = route_endpoint(self._url_map, request)
        if endpoint is None:
            return self._inner.render(request)
        level = self._access.get(endpoint)
        if level is None:
            self.log.error("refused a request for unclassified route {endpoint}", endpoint=endpoint)
            return _error_now(request, forbidden("this route is not open to anyone"))
        if level is Access.PUBLIC:
            return self._inner.render(request)
        d = Deferred.fromCoroutine(self._check(request, level))
        d.addErrback(self._unexpected, request)
        return NOT_DONE_YET

    async def _check(self, request: IRequest, level: Access) -> None:
        try:
            await self._authorize(request, level)
        except ApiError as e:
            _finish(request, _error_now(request, e))
            return
        _finish(request, self._inner.render(request))

    def _unexpected(self, failure: Failure, request: IRequest) -> None:
        # The details go to the log, never to the client.
        self.log.failure("unexpected error checking access", failure)
        error = ApiError(
            http.INTERNAL_SERVER_ERROR,
            "internal_error",
            "the server hit an unexpected error; see its log",
        )
        _finish(request, _error_now(request, error))


def _error_now(request: IRequest, error: ApiError) -> bytes:
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return json_response(request, _error_json(error.code, error.message), error.status)


def _finish(request: IRequest, rendered: Any) -> None:
    if rendered is NOT_DONE_YET:
        return
    if getattr(request, "_disconnected", False):
        return
    request.write(rendered)
    request.finish()


def request_body(request: IRequest) -> bytes:
    """The whole request body, leaving the stream where a later reader expects it."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data = content.read()
    content.seek(0)
    return bytes(data)


def peer_address(request: IRequest) -> str:
    """The client's address, for the audit log."""
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return str(host) if host is not None else str(peer)
