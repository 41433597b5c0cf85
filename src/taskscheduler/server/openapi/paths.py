"""The OpenAPI document's paths: every route of the server, who may call it, what it
reads, what it answers, and every error it can answer (by code, from the error table)."""

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
from taskscheduler.server.openapi.schemas import UUID_PATTERN, ref
from taskscheduler.web import errors

#: Security requirements, by who may call a route.
Security = list[dict[str, list[str]]]
OPERATOR: Security = [{"operatorToken": []}]
AGENT: Security = [{"agentCredential": []}]
JOIN: Security = [{"joinSecret": []}]
PUBLIC: Security = []


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
) -> dict[str, Any]:
    """One operation; its errors are ``codes`` plus those every route of its kind has."""
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
    if parameters:
        op["parameters"] = parameters
    if request is not None:
        op["requestBody"] = request
    op["responses"] = {**answers, **error_responses(*codes, *shared)}
    return op


TASK_ID = path_id("task_id", "task")
AGENT_ID = path_id("agent_id", "agent")
BEFORE_INSTANT = query(
    "before",
    {"type": "string", "format": "date-time"},
    "only executions scheduled before this RFC 3339 instant (a page's `next_before`)",
)


def paths() -> dict[str, Any]:
    """``paths``: every route of the server's Klein app, by path and method."""
    e = errors
    task_codes = (e.INVALID_TASK_ID.code, e.UNKNOWN_TASK.code)
    return {
        "/api/v1/tasks/create": {
            "post": operation(
                "create_task",
                "Create a task: every agent of the fleet runs it",
                OPERATOR,
                {
                    "201": answer(
                        "created",
                        ref("TaskCreated"),
                        Location={
                            "description": "the new task's path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    )
                },
                (e.RATE_LIMITED.code,),
                tag="tasks",
                method="post",
                request=body(ref("NewTask")),
            )
        },
        "/api/v1/tasks/{task_id}": {
            "get": operation(
                "get_task",
                "A task",
                OPERATOR,
                {"200": answer("the task", ref("Task"))},
                task_codes,
                tag="tasks",
                method="get",
                parameters=[TASK_ID],
            ),
            "delete": operation(
                "delete_task",
                "Delete a task: every agent stops it; its history stays",
                OPERATOR,
                {"200": answer("deleted", ref("TaskDeleted"))},
                (*task_codes, e.TASK_ALREADY_DELETED.code),
                tag="tasks",
                method="delete",
                parameters=[TASK_ID],
            ),
        },
        "/api/v1/tasks/{task_id}/latest_output": {
            "get": operation(
                "latest_output",
                "The newest complete execution of a task",
                OPERATOR,
                {"200": answer("its outputs", ref("LatestOutput"))},
                task_codes,
                tag="tasks",
                method="get",
                parameters=[TASK_ID],
            )
        },
        "/api/v1/tasks/{task_id}/executions": {
            "get": operation(
                "executions",
                "A task's executions, newest first, complete or not",
                OPERATOR,
                {"200": answer("a page of executions", ref("ExecutionPage"))},
                (*task_codes, e.BAD_REQUEST.code),
                tag="tasks",
                method="get",
                parameters=[
                    TASK_ID,
                    query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20},
                        "executions per page",
                    ),
                    BEFORE_INSTANT,
                ],
            )
        },
        "/api/v1/tasks/{task_id}/complete": {
            "post": operation(
                "complete",
                "Report one result of the calling agent",
                AGENT,
                {"200": answer("stored (or already stored)", ref("ResultStored"))},
                (
                    *task_codes,
                    e.MISALIGNED.code,
                    e.IMPERSONATION.code,
                    e.NOT_ASSIGNED.code,
                    e.RESULT_AFTER_DELETION.code,
                    e.RESULT_CONFLICT.code,
                    e.TOO_EARLY.code,
                ),
                tag="results",
                method="post",
                parameters=[TASK_ID],
                request=body(ref("Result")),
            )
        },
        "/api/v1/results": {
            "post": operation(
                "complete_batch",
                "Report a batch of the calling agent's results, one outcome each",
                AGENT,
                {"200": answer("one outcome per result", ref("BatchOutcome"))},
                (e.IMPERSONATION.code,),
                tag="results",
                method="post",
                request=body(ref("ResultBatch")),
            )
        },
        "/api/v1/agents": {
            "get": operation(
                "list_agents",
                "Every enrolled agent",
                OPERATOR,
                {"200": answer("the agents", ref("AgentList"))},
                tag="agents",
                method="get",
            )
        },
        "/api/v1/agents/enrol": {
            "post": operation(
                "enrol",
                "Enrol an agent with a join secret: its credential, once per agent id",
                JOIN,
                {"201": answer("enrolled", ref("Enrolled"))},
                ("agent_exists", "url_taken", "url_revoked"),
                tag="agents",
                method="post",
                request=body(ref("Enrolment")),
            )
        },
        "/api/v1/agents/{agent_id}": {
            "delete": operation(
                "revoke_agent",
                "Revoke an agent: its next request is refused",
                OPERATOR,
                {"200": answer("the revoked agent", ref("Agent"))},
                (e.INVALID_AGENT_ID.code, e.UNKNOWN_LIVE_AGENT.code),
                tag="agents",
                method="delete",
                parameters=[AGENT_ID],
            )
        },
        "/api/v1/agents/{agent_id}/release-url": {
            "post": operation(
                "release_agent_url",
                "Let another agent enrol at a revoked agent's URL",
                OPERATOR,
                {"200": answer("the agent", ref("Agent"))},
                (e.INVALID_AGENT_ID.code, e.UNKNOWN_AGENT.code, "agent_live"),
                tag="agents",
                method="post",
                parameters=[AGENT_ID],
            )
        },
        "/api/v1/audit": {
            "get": operation(
                "audit",
                "The audit log, newest first: who, what, when, from where",
                OPERATOR,
                {"200": answer("a page of events", ref("AuditPage"))},
                (e.BAD_REQUEST.code,),
                tag="audit",
                method="get",
                parameters=[
                    query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        "events per page",
                    ),
                    query(
                        "before",
                        {"type": "integer", "minimum": 0, "maximum": 10**18 - 1},
                        "only events older than this event id (a page's `next_before`)",
                    ),
                ],
            )
        },
        "/api/v1/health": {
            "get": operation(
                "health",
                "200 when the server and its database answer",
                PUBLIC,
                {"200": answer("healthy", ref("Health"))},
                (e.DATABASE_UNAVAILABLE.code,),
                tag="server",
                method="get",
            )
        },
        "/api/v1/openapi.json": {
            "get": operation(
                "openapi",
                "This document",
                PUBLIC,
                {
                    "200": answer(
                        "the OpenAPI 3.1 document", {"type": "object", "required": ["openapi"]}
                    )
                },
                tag="server",
                method="get",
            )
        },
    }
