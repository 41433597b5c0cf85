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
import io
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
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
#: Seconds a client has to send a request's line and headers once it has started.
DEFAULT_HEADER_TIMEOUT = 10.0

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
        return json.loads(raw)
    except UnicodeDecodeError:
        raise bad_request("the request body is not valid UTF-8", "invalid_json") from None
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


class LimitedRequest(Request):
    """A request that refuses a body over ``max_body_bytes`` before reading it all.

    twisted.web buffers any body it is sent; this answers 413 as soon as the declared
    length (or, for a chunked body, the bytes received so far) passes the limit, and
    closes the connection without rendering anything.
    """

    max_body_bytes = DEFAULT_MAX_BODY_BYTES
    _refused = False

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self.max_body_bytes:
            self.content = io.BytesIO()
            self._refuse_too_large()
            return
        super().gotLength(length)
        self._received = 0

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
        self._refused = True
        body = too_large_body(self.max_body_bytes)
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n\r\n" + body
        )
        transport.loseConnection()


class _DeadlineChannel(http.HTTPChannel):
    """An HTTP channel that gives a client ``header_timeout`` seconds, from the first byte
    of a request, to finish sending its request line and headers.

    The idle timeout alone would not do: every byte received resets it, so a client
    dribbling one header byte a minute would hold the connection forever. Headers over
    ``totalHeadersSize`` (16 KiB) are refused by twisted.web itself with 400.
    """

    header_timeout = DEFAULT_HEADER_TIMEOUT
    _header_deadline: IDelayedCall | None = None

    def lineReceived(self, line: bytes) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.callLater(self.header_timeout, self._headers_too_slow)
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._cancel_header_deadline()
        super().allHeadersReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_header_deadline()
        super().connectionLost(reason)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None and self._header_deadline.active():
            self._header_deadline.cancel()
        self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        transport = self.transport
        if transport is None:
            return
        body = error_body("request_timeout", "the request headers took too long to arrive")
        transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: "
            + str(len(body)).encode("ascii")
            + b"\r\n\r\n"
            + body
        )
        transport.abortConnection()  # type: ignore[attr-defined]


def make_site(
    resource: Any,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT,
) -> Site:
    """A Site with limits, that logs nothing itself.

    Bodies over ``max_body_bytes`` are refused with 413 before they are read; a connection
    idle for ``idle_timeout`` seconds is closed; a request whose line and headers take
    longer than ``header_timeout`` seconds is answered 408 and cut off. twisted.web's
    access log would print full URLs; our own logging decides what is safe.
    """
    request_factory = type("LimitedRequest", (LimitedRequest,), {"max_body_bytes": max_body_bytes})
    site = Site(resource, requestFactory=request_factory, timeout=idle_timeout)
    channel = type("DeadlineChannel", (_DeadlineChannel,), {"header_timeout": header_timeout})
    site.protocol = lambda: http._GenericHTTPChannelProtocol(channel())  # type: ignore[assignment]
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


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


def routing_path(request: IRequest) -> str | None:
    """The path Klein routes a request on, or None if it is not UTF-8 (Klein answers 400).

    Not ``request.path``: twisted.web splits the raw path on ``/`` and percent-decodes
    each segment, and Klein joins the segments again, so ``/api%2Fv1/agents`` reaches
    the route ``/api/v1/agents``. Access must be decided on that very path, or an
    encoded slash or letter would walk past the gate.
    """
    path = b"/".join(getattr(request, "postpath", None) or [])
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
    path = routing_path(request)
    if path is None:
        return None
    method = request.method.decode("ascii", "replace")
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
        self, inner: Any, url_map: Map, access: Mapping[str, Access], authorize: Authorize
    ) -> None:
        super().__init__()
        self._inner = inner
        self._url_map = url_map
        self._access = dict(access)
        self._authorize = authorize
        self._fixed = fixed_paths(url_map)

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
