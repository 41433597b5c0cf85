"""The error table: every error a client of either daemon sees, as (status, code, message,
headers), and the one place that turns an error into a response.

Every error body is ``{"error": {"code": "...", "message": "..."}}``. Routes raise an
:class:`ApiError` made from a kind of this table (``UNKNOWN_TASK()``, ``BAD_REQUEST(why)``);
exceptions of the domain are mapped to a kind once per app (``install_error_handlers`` in
:mod:`taskscheduler.web.responses`); answers given before twisted.web renders anything
(408, 413, 431, a refused connection) are built by :func:`raw_error` from the same table.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.web import http
from twisted.web.iweb import IRequest

from taskscheduler import protocol


class ApiError(Exception):
    """An error for the client: an HTTP status, a machine-readable code, a message, and
    the headers and extra body fields that go with it."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[bytes, bytes] | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})
        self.details = dict(details or {})

    def json(self) -> dict[str, Any]:
        """The ``{"code", "message", ...}`` object (a batch answer holds one per entry)."""
        return {"code": self.code, "message": self.message, **self.details}


@dataclass(frozen=True)
class ErrorKind:
    """One row of the table. ``message`` is a ``str.format`` template of the keyword
    fields given when the error is made; a kind without one takes the caller's text."""

    status: int
    code: str
    message: str = ""
    headers: Mapping[bytes, bytes] = field(default_factory=dict)

    def __call__(
        self,
        text: str | None = None,
        /,
        *,
        headers: Mapping[bytes, bytes] | None = None,
        details: Mapping[str, Any] | None = None,
        status: int | None = None,
        **fields: Any,
    ) -> ApiError:
        """The error to raise: ``text``, or the message with ``fields``; ``headers`` and
        ``details`` (extra body fields) beside the kind's; ``status`` for werkzeug's own."""
        message = text if text is not None else self.message.format(**fields)
        headers = {**self.headers, **(headers or {})}
        return ApiError(status or self.status, self.code, message, headers, details)


#: The error code of a body over the limit, which the agent's reporter recognises.
PAYLOAD_TOO_LARGE = "payload_too_large"
_RETRY_IN_5 = {b"Retry-After": b"5"}

# -- the table -------------------------------------------------------------------------------
# Requests either daemon refuses (the caller gives the message where there is none here).
BAD_REQUEST = ErrorKind(http.BAD_REQUEST, "invalid_request")
INVALID_JSON = ErrorKind(http.BAD_REQUEST, "invalid_json")
INVALID_TASK_ID = ErrorKind(http.BAD_REQUEST, "invalid_task_id")
INVALID_AGENT_ID = ErrorKind(http.BAD_REQUEST, "invalid_agent_id")
BAD_HTTP_REQUEST = ErrorKind(
    http.BAD_REQUEST, "bad_http_request", "the request is not valid HTTP/1.1"
)
UNAUTHORIZED = ErrorKind(http.UNAUTHORIZED, "unauthorized")  # + WWW-Authenticate
FORBIDDEN = ErrorKind(http.FORBIDDEN, "forbidden")
UNCLASSIFIED_ROUTE = ErrorKind(http.FORBIDDEN, "forbidden", "this route is not open to anyone")
HOST_NOT_ALLOWED = ErrorKind(
    http.FORBIDDEN,
    "host_not_allowed",
    "this server does not answer to the host name in this request's Host header; it "
    "answers to {hosts} (set by {option})",
)
ORIGIN_NOT_ALLOWED = ErrorKind(
    http.FORBIDDEN,
    "origin_not_allowed",
    "a request from another site's page (its Origin header is not this server's own) "
    "cannot change anything here",
)
NOT_FOUND = ErrorKind(http.NOT_FOUND, "not_found", "no such endpoint")
METHOD_NOT_ALLOWED = ErrorKind(http.NOT_ALLOWED, "method_not_allowed")  # + Allow
UNSUPPORTED_MEDIA_TYPE = ErrorKind(
    http.UNSUPPORTED_MEDIA_TYPE,
    "unsupported_media_type",
    "send the request body as JSON with 'Content-Type: application/json'",
)
HTTP_ERROR = ErrorKind(http.INTERNAL_SERVER_ERROR, "http_error")  # werkzeug's own status
INTERNAL_ERROR = ErrorKind(
    http.INTERNAL_SERVER_ERROR, "internal_error", "the server hit an unexpected error; see its log"
)
# Connections and requests over the limits (answered before anything is rendered).
REQUEST_TIMEOUT = ErrorKind(http.REQUEST_TIMEOUT, "request_timeout")
TOO_LARGE = ErrorKind(
    http.REQUEST_ENTITY_TOO_LARGE,
    PAYLOAD_TOO_LARGE,
    "the request body is larger than {max_body_bytes} bytes",
)
HEADERS_TOO_LARGE = ErrorKind(
    431,  # Request Header Fields Too Large (RFC 6585)
    "headers_too_large",
    "the request line and headers are larger than {limit} bytes",
)
TOO_MANY_CONNECTIONS = ErrorKind(
    http.SERVICE_UNAVAILABLE, "too_many_connections", "{why}; retry later", {b"Retry-After": b"1"}
)
RATE_LIMITED = ErrorKind(
    429,  # twisted.web.http has no name for it; + Retry-After
    "rate_limited",
    "this token may create {rate:g} tasks a second ({burst} at once); retry later",
)
# The server's domain.
DATABASE_UNAVAILABLE = ErrorKind(
    http.SERVICE_UNAVAILABLE,
    "database_unavailable",
    "the database is unavailable; nothing was changed, retry later",
    _RETRY_IN_5,
)
#: A database failover in the middle of a commit: the same code (clients retry alike).
DATABASE_COMMIT_IN_DOUBT = ErrorKind(
    http.SERVICE_UNAVAILABLE,
    "database_unavailable",
    "the database went away while the change was being committed: it may or may not have "
    "been made; check before making it again",
    _RETRY_IN_5,
)
UNKNOWN_TASK = ErrorKind(http.NOT_FOUND, "unknown_task", "no task has this id")
#: A field of an operator's body the route does not know (protocol.UnknownFields: its
#: message names them and the known ones).
UNKNOWN_FIELD = ErrorKind(http.BAD_REQUEST, "unknown_field")
INVALID_CURSOR = ErrorKind(
    http.BAD_REQUEST, "invalid_cursor", "'cursor' is not one this server gave (pass next_cursor)"
)
NOTHING_TO_CHANGE = ErrorKind(
    http.BAD_REQUEST,
    "nothing_to_change",
    "give at least one of command, frequency, time_limit_seconds to change",
)
UNKNOWN_EXECUTION = ErrorKind(
    http.NOT_FOUND, "unknown_execution", "nothing is recorded for this task at this instant"
)
RESULT_SUPERSEDED = ErrorKind(
    protocol.FINAL_RESULT_ERRORS["superseded"],
    "superseded",
    "this result ran a revision of the task other than the one in effect at its instant",
)
RESULT_TASK_PAUSED = ErrorKind(
    protocol.FINAL_RESULT_ERRORS["task_paused"],
    "task_paused",
    "this result's instant fell while the task was paused",
)
TASK_ALREADY_DELETED = ErrorKind(http.NOT_FOUND, "task_deleted", "this task is already deleted")
RESULT_AFTER_DELETION = ErrorKind(
    http.NOT_FOUND, "task_deleted", "this task was deleted before this result's scheduled instant"
)
RESULT_CONFLICT = ErrorKind(
    http.CONFLICT,
    "conflict",
    "a different result is already stored for this task, agent and scheduled_at; "
    "results are immutable",
)
MISALIGNED = ErrorKind(
    http.BAD_REQUEST, "misaligned", "'scheduled_at' is not one of this task's scheduled instants"
)
NOT_ASSIGNED = ErrorKind(http.FORBIDDEN, "not_assigned", "this task is not assigned to this agent")
IMPERSONATION = ErrorKind(
    http.FORBIDDEN,
    "impersonation",
    "'server_id' must be the id of the agent whose credential is used",
)
#: Refused for now, not for good: the agent keeps the result and sends it again.
TOO_EARLY = ErrorKind(
    protocol.RETRY_LATER_RESULT_ERRORS["too_early"], "too_early", "{why}; send it again later"
)
# Claims of instants of run-on-one tasks (agents, before they start one).
CLAIM_SUPERSEDED = ErrorKind(
    http.CONFLICT,
    "superseded",
    "this claim names a revision of the task other than the one in effect at its instant",
)
CLAIM_TASK_PAUSED = ErrorKind(
    http.CONFLICT, "task_paused", "this claim's instant falls while the task is paused"
)
CLAIM_AFTER_DELETION = ErrorKind(
    http.NOT_FOUND, "task_deleted", "this task was deleted before this claim's instant"
)
NOT_RUN_ON_ONE = ErrorKind(
    http.CONFLICT,
    "not_run_on_one",
    "this task runs on every agent (run_on all): its instants are not claimed",
)
UNKNOWN_AGENT = ErrorKind(http.NOT_FOUND, "unknown_agent", "no agent has this id")
UNKNOWN_LIVE_AGENT = ErrorKind(http.NOT_FOUND, "unknown_agent", "no live agent has this id")
NOT_IN_FLEET = ErrorKind(http.NOT_FOUND, "not_in_fleet", "this URL is not in the fleet")
INVALID_URL = ErrorKind(
    http.BAD_REQUEST, "invalid_url", "'url' must be an agent's base URL, like http://host:8081"
)
#: What the store's ``AgentConflict`` codes answer, by code.
AGENT_CONFLICTS = {
    kind.code: kind
    for kind in (
        ErrorKind(
            http.CONFLICT,
            "agent_exists",
            "this agent id is already enrolled; a join secret cannot enrol it again",
        ),
        ErrorKind(
            http.CONFLICT,
            "url_taken",
            "another live agent is enrolled at this URL; an operator must revoke it first",
        ),
        ErrorKind(
            http.CONFLICT,
            "url_revoked",
            "the agent at this URL was revoked; an operator must release its URL "
            "(POST /api/v1/agents/<agent_id>/release-url) before another agent enrols there",
        ),
        ErrorKind(
            http.CONFLICT,
            "agent_live",
            "this agent is not revoked: revoke it before releasing its URL",
        ),
    )
}
# The agent's domain.
STORAGE_UNAVAILABLE = ErrorKind(
    http.SERVICE_UNAVAILABLE,
    "storage_unavailable",
    "the agent could not store the task; nothing changed, retry later",
    _RETRY_IN_5,
)
#: A task of a batch that failed for a reason of ours (the batch itself is answered 200).
BATCH_ENTRY_FAILED = ErrorKind(http.INTERNAL_SERVER_ERROR, "internal_error", "internal error")


def unauthorized(message: str, challenge: bytes) -> ApiError:
    """401 with the ``WWW-Authenticate`` challenge of the credential the route wants."""
    return UNAUTHORIZED(message, headers={b"WWW-Authenticate": challenge})


def method_not_allowed(request: IRequest, allowed: Iterable[str]) -> ApiError:
    """405 naming the methods the path accepts, in ``Allow`` and in the message."""
    methods = sorted(allowed)
    method = request.method.decode("ascii", "replace")
    return METHOD_NOT_ALLOWED(
        f"this endpoint does not accept {method}"
        + (f"; use {', '.join(methods)}" if methods else ""),
        headers={b"Allow": ", ".join(methods).encode("ascii")} if methods else None,
    )


def error_json(error: ApiError) -> dict[str, Any]:
    """The body of every error answer."""
    return {"error": error.json()}


def error_body(error: ApiError) -> bytes:
    """The JSON body of an answer given before twisted.web renders anything."""
    return json.dumps(error_json(error)).encode("utf-8")


def raw_error(error: ApiError) -> bytes:
    """A complete HTTP/1.1 response for ``error`` that closes the connection, for answers
    given before (or instead of) twisted.web's request handling: nothing is rendered."""
    body = error_body(error)
    reason = _REASONS.get(error.status) or http.RESPONSES.get(error.status, b"Error")
    lines = [b"HTTP/1.1 %d %s" % (error.status, reason), b"Content-Type: application/json"]
    lines += [name + b": " + value for name, value in error.headers.items()]
    lines += [b"Connection: close", b"Content-Length: %d" % len(body), b"", body]
    return b"\r\n".join(lines)


#: Reason phrases twisted.web lacks or spells the old way.
_REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
}


def too_large(max_body_bytes: int) -> ApiError:
    """The 413 answer. It names the limit, so that a client can shrink what it sends to
    fit (the agent trims a result's output) instead of giving up."""
    return TOO_LARGE(max_body_bytes=max_body_bytes, details={"max_body_bytes": max_body_bytes})
