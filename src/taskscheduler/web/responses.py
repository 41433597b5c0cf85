"""How both daemons answer: JSON bodies, and every error rendered from the error table
(:mod:`taskscheduler.web.errors`) by one handler per Klein app."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from taskscheduler.shield import uncancellable
from taskscheduler.web.errors import (
    HTTP_ERROR,
    INTERNAL_ERROR,
    NOT_FOUND,
    ApiError,
    ErrorKind,
    error_json,
    method_not_allowed,
)


def json_response(request: IRequest, body: Any, status: int = http.OK) -> bytes:
    """Set the status and JSON content type, and return the encoded body."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def render_error(request: IRequest, error: ApiError) -> bytes:
    """Set ``error``'s status and headers on ``request``; return its JSON body."""
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return json_response(request, error_json(error), error.status)


class App(Klein):
    """A Klein app whose routes run to their end when their client goes away.

    Klein cancels a route's Deferred when the connection is lost. A client giving up is
    normal (an agent failing over to another replica after its attempt timeout), and
    cancelling the route would cut its work short: roll back results the agent will send
    again, or (txpostgres, cancelled mid-query) raise ``_CancelInProgress`` out of the
    cancel into Klein, which logs it as critical. Here the work finishes, as it would
    have with the client still there; only its answer is dropped.
    """

    log = Logger()

    def execute_endpoint(self, endpoint: str, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        work = maybeDeferred(super().execute_endpoint, endpoint, request, *args, **kwargs)
        return uncancellable(work, lambda _: self._client_gone(request, work))

    def _client_gone(self, request: IRequest, work: Deferred[Any]) -> None:
        # Klein cancels the answer (it errbacks with CancelledError, which Klein drops);
        # the work goes on and its outcome is told only to the log.
        self.log.debug(
            "the client of {request} went away before the answer; finishing the work",
            request=described(request),
        )
        work.addErrback(self._failed_unheard, request)

    def _failed_unheard(self, failure: Failure, request: IRequest) -> None:
        if not failure.check(ApiError):
            self.log.warn(
                "{request} failed after its client went away: {error}",
                request=described(request),
                error=str(failure.value) or type(failure.value).__name__,
            )


def described(request: IRequest) -> str:
    """``METHOD /path`` of a request, for the log."""
    return f"{request.method.decode('ascii', 'replace')} {request.path.decode('utf-8', 'replace')}"


@dataclass(frozen=True)
class DomainError:
    """How an app answers one exception of its domain: the kind, and what it logs."""

    kind: ErrorKind
    log: str = ""  # a format with {error}; "" logs nothing
    level: LogLevel = LogLevel.warn


def install_error_handlers(
    app: Klein, log: Logger, domain: Mapping[type[Exception], DomainError] | None = None
) -> None:
    """Answer every error of ``app``'s routes: an :class:`ApiError` as it says, the
    exceptions of ``domain`` as their kinds, werkzeug's routing errors as 404/405, and
    anything else as 500 (its details go to the log, never to the client: they may hold
    secrets).

    Registered on the class's Klein app, so the handler receives the API instance first.
    """
    mapped = dict(domain or {})

    @app.handle_errors(Exception)
    def _answer(self: Any, request: IRequest, failure: Failure) -> bytes:
        return render_error(request, _api_error(request, failure, mapped, log))


def _api_error(
    request: IRequest, failure: Failure, domain: Mapping[type[Exception], DomainError], log: Logger
) -> ApiError:
    error = failure.value
    if isinstance(error, ApiError):
        return error
    for exception_type, answer in domain.items():
        if isinstance(error, exception_type):
            if answer.log:
                log.emit(answer.level, answer.log, error=str(error))
            # A kind without a message of its own says the exception's (unknown_field).
            return answer.kind() if answer.kind.message else answer.kind(str(error))
    if isinstance(error, NotFound):
        return NOT_FOUND()
    if isinstance(error, MethodNotAllowed):
        return method_not_allowed(request, error.valid_methods or [])
    if isinstance(error, HTTPException):
        status = error.code or http.INTERNAL_SERVER_ERROR
        return HTTP_ERROR(error.description or error.name, status=status)
    log.failure(
        "unexpected error serving {method} {path}",
        failure,
        method=request.method,
        path=request.path,
    )
    return INTERNAL_ERROR()
