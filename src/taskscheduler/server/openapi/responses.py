"""The error answers of the OpenAPI document, made from the error table
(:mod:`taskscheduler.web.errors`): a route names the codes it can answer, and the table
gives their statuses, messages and headers, so the two cannot disagree."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from taskscheduler.web import errors
from taskscheduler.web.errors import ErrorKind

JSON = "application/json"

#: Rows of the table only the agent answers (the second shares its code with the
#: server's ``internal_error``, whose message it is not).
AGENT_ONLY = (errors.STORAGE_UNAVAILABLE, errors.BATCH_ENTRY_FAILED)

#: Codes whose status is not the table's: werkzeug's own (a path it redirects, 308).
_VARIABLE_STATUS = {errors.HTTP_ERROR.code}


def error_kinds() -> list[ErrorKind]:
    """Every row of the error table, in the order the module lists them."""
    kinds = [value for value in vars(errors).values() if isinstance(value, ErrorKind)]
    return kinds + list(errors.AGENT_CONFLICTS.values())


def server_kinds() -> list[ErrorKind]:
    """The rows of the table the server can answer."""
    return [kind for kind in error_kinds() if not any(kind is a for a in AGENT_ONLY)]


def server_codes() -> set[str]:
    """Every error code the server can answer."""
    return {kind.code for kind in server_kinds()}


def _kinds_by_code() -> dict[str, list[ErrorKind]]:
    by_code: dict[str, list[ErrorKind]] = {}
    for kind in server_kinds():
        by_code.setdefault(kind.code, []).append(kind)
    return by_code


def status_of(code: str) -> int:
    """The status the table gives ``code``; KeyError for a code it does not have."""
    statuses = {kind.status for kind in _kinds_by_code()[code]}
    if len(statuses) != 1:
        raise ValueError(f"error code {code!r} has several statuses: {sorted(statuses)}")
    return statuses.pop()


def _described(code: str) -> str:
    messages = [kind.message for kind in _kinds_by_code()[code] if kind.message]
    if not messages:
        return f"`{code}`"
    # A template's fields ({why}, {hosts}) stay as they are: they say what varies.
    return f"`{code}`: " + "; or ".join(dict.fromkeys(messages))


# -- the sets of codes routes share -----------------------------------------------------------
#: Any request: answered before (or whatever) the route, by the listener and the site.
ANY_REQUEST = (
    errors.BAD_HTTP_REQUEST.code,
    errors.HOST_NOT_ALLOWED.code,
    errors.REQUEST_TIMEOUT.code,
    errors.PAYLOAD_TOO_LARGE,
    errors.HEADERS_TOO_LARGE.code,
    errors.TOO_MANY_CONNECTIONS.code,
    errors.INTERNAL_ERROR.code,
)
#: A route with a variable part in its path: a value holding ``/`` (sent as ``%2F``)
#: reaches another path, which may be no route (404) or one for other methods (405); an
#: empty one makes ``//``, which werkzeug answers with a redirect (308 ``http_error``).
PATH_VALUE = (errors.NOT_FOUND.code, errors.METHOD_NOT_ALLOWED.code, errors.HTTP_ERROR.code)
#: A route that needs a credential (and may look it up in the database).
CREDENTIAL = (errors.UNAUTHORIZED.code, errors.FORBIDDEN.code, errors.DATABASE_UNAVAILABLE.code)
#: POST, PUT, PATCH and DELETE: refused when sent from another site's page.
CHANGE = (errors.ORIGIN_NOT_ALLOWED.code,)
#: A route that reads a JSON body.
JSON_BODY = (
    errors.UNSUPPORTED_MEDIA_TYPE.code,
    errors.INVALID_JSON.code,
    errors.BAD_REQUEST.code,
)

#: Headers some errors always carry, by status.
_HEADERS = {
    401: {
        "WWW-Authenticate": {
            "description": "the credential the route wants (`Bearer`), and why it was refused",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    405: {
        "Allow": {
            "description": "the methods the path accepts",
            "schema": {"type": "string"},
        }
    },
    429: {
        "Retry-After": {
            "description": "seconds to wait before creating another task",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    },
    503: {
        "Retry-After": {
            "description": "seconds to wait before trying again",
            "required": True,
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        }
    },
}


def error_schema(codes: Iterable[str]) -> dict[str, Any]:
    """The body of an error answer whose code is one of ``codes``."""
    return {
        "allOf": [
            {"$ref": "#/components/schemas/Error"},
            {
                "type": "object",
                "properties": {
                    "error": {"type": "object", "properties": {"code": {"enum": sorted(codes)}}}
                },
            },
        ]
    }


def error_responses(*codes: str) -> dict[str, Any]:
    """The OpenAPI ``responses`` entries for ``codes``, one per status."""
    by_status: dict[int, list[str]] = {}
    variable: list[str] = []
    for code in dict.fromkeys(codes):
        if code in _VARIABLE_STATUS:
            variable.append(code)
            continue
        by_status.setdefault(status_of(code), []).append(code)
    responses: dict[str, Any] = {}
    for status in sorted(by_status):
        listed = by_status[status]
        response: dict[str, Any] = {
            "description": "\n\n".join(_described(code) for code in listed),
            "content": {JSON: {"schema": error_schema(listed)}},
        }
        if status in _HEADERS:
            response["headers"] = _HEADERS[status]
        responses[str(status)] = response
    for code in variable:
        # werkzeug's own answers: a path with an empty segment (``//``) is redirected
        # (308) to the path without it, named in the message; the status is werkzeug's.
        responses["3XX"] = {
            "description": f"`{code}`: werkzeug's own answer, with its status: a path "
            "with an empty segment is redirected to the path without it (its message)",
            "content": {JSON: {"schema": error_schema([code])}},
        }
    return responses


def error_component() -> dict[str, Any]:
    """``components.schemas.Error``: the shape of every error answer."""
    return {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {
                        "type": "string",
                        "enum": sorted(server_codes()),
                        "description": "machine-readable; one of the error table's codes",
                    },
                    "message": {"type": "string", "description": "for people"},
                    "max_body_bytes": {
                        "type": "integer",
                        "description": "with `payload_too_large`: the largest body accepted",
                    },
                },
            }
        },
    }
