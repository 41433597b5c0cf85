"""How the OpenAPI document is written: schema shorthands, who may call an operation, and
:func:`operation`, which adds to each route the errors every route of its kind answers."""

from __future__ import annotations

from typing import Any

from taskscheduler.server.openapi.responses import (
    ANY_REQUEST,
    CHANGE,
    CREDENTIAL,
    JSON,
    JSON_BODY,
    PATH_VALUE,
    error_responses,
)

#: A UUID as the server reads one: 8-4-4-4-12 hex digits, either case, nothing else.
UUID_PATTERN = "^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$"

#: Security requirements, by who may call a route.
Security = list[dict[str, list[str]]]
OPERATOR: Security = [{"operatorToken": []}]
AGENT: Security = [{"agentCredential": []}]
JOIN: Security = [{"joinSecret": []}]
PUBLIC: Security = []

INSTANT = {
    "type": "string",
    "format": "date-time",
    "description": "RFC 3339 in UTC with microseconds, e.g. `2026-11-27T07:30:00.000000Z`",
}
COUNT = {"type": "integer", "minimum": 0}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: list[str], properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties, **extra}


def answer(description: str, schema: dict[str, Any], **headers: Any) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {JSON: {"schema": schema}}}


def path_id(name: str, what: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": f"the {what}'s id",
        "schema": {"type": "string", "pattern": UUID_PATTERN},
    }


def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def operation(
    operation_id: str,
    summary: str,
    security: Security,
    answers: dict[str, Any],
    codes: tuple[str, ...] = (),
    *,
    tag: str,
    method: str,
    parameters: list[dict[str, Any]] | None = None,
    request: dict[str, Any] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """One operation (``operation_id`` is its Klein endpoint's name); its errors are
    ``codes`` plus those every route of its kind answers."""
    shared: tuple[str, ...] = ANY_REQUEST
    if security is not PUBLIC:
        shared += CREDENTIAL
    if method in ("post", "put", "patch", "delete"):
        shared += CHANGE
    if request is not None:
        shared += JSON_BODY
    if any(p["in"] == "path" for p in parameters or []):
        shared += PATH_VALUE
    op: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "security": security,
    }
    if description:
        op["description"] = description
    if parameters:
        op["parameters"] = parameters
    if request is not None:
        op["requestBody"] = request
    op["responses"] = {**answers, **error_responses(*codes, *shared)}
    return op
