"""What both daemons' HTTP APIs need: JSON errors, JSON bodies, and a body-size limit.

Every error a client sees is ``{"error": {"code": "...", "message": "..."}}`` with the
right status. Domain errors are mapped to statuses once, in :func:`install_error_handlers`,
never in each route.
"""

from __future__ import annotations

import io
import json
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.server import Request, Site
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

#: Largest request body accepted by default. A result batch with capped outputs fits.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024

_log = Logger(namespace="taskscheduler.web")


class ApiError(Exception):
    """An error for the client: an HTTP status, a machine-readable code, a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(http.BAD_REQUEST, code, message)


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode("utf-8")


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
        return json_response(request, _error_json(error.code, error.message), error.status)

    @app.handle_errors(NotFound)
    def _not_found(self: Any, request: IRequest, failure: Failure) -> bytes:
        return json_response(request, _error_json("not_found", "no such endpoint"), http.NOT_FOUND)

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self: Any, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, MethodNotAllowed)
        allowed = sorted(error.valid_methods or [])
        if allowed:
            request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
        return json_response(
            request,
            _error_json(
                "method_not_allowed",
                f"this endpoint does not accept {request.method.decode('ascii', 'replace')}"
                + (f"; use {', '.join(allowed)}" if allowed else ""),
            ),
            http.NOT_ALLOWED,
        )

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
        body = error_body(
            "payload_too_large",
            f"the request body is larger than {self.max_body_bytes} bytes",
        )
        transport = self.channel.transport
        assert transport is not None
        transport.write(
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Connection: close\r\n"
            b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n\r\n" + body
        )
        transport.loseConnection()


def make_site(resource: Any, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Site:
    """A Site whose requests are limited to ``max_body_bytes`` and that logs nothing itself.

    twisted.web's access log would print full URLs; our own logging decides what is safe.
    """
    request_factory = type("LimitedRequest", (LimitedRequest,), {"max_body_bytes": max_body_bytes})
    site = Site(resource, requestFactory=request_factory)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
