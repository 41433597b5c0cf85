"""The server's OpenAPI 3.1 document, served at ``GET /api/v1/openapi.json``.

Built by code rather than kept as a file (:mod:`.tasks`, :mod:`.results` and :mod:`.agents`
hold the routes and schemas by domain, as ``server/api`` does): its limits come from the
constants the parsers enforce, and its errors from the error table (a route names
codes; statuses, messages and headers are the table's), so a change there changes the
document too. What code cannot derive (routes, fields) is pinned by
``tests/unit/test_openapi.py`` against the Klein app and by the schemathesis run
against a live server.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from typing import Any

from taskscheduler.server.openapi import (
    agents,
    claims,
    notifications,
    options,
    results,
    task_schemas,
    tasks,
)
from taskscheduler.server.openapi.operations import UUID_PATTERN
from taskscheduler.server.openapi.responses import error_component

_DESCRIPTION = """\
Runs scheduled commands across a fleet of agents and collects their output.

All requests and responses are JSON (`Content-Type: application/json`, UTF-8). Every
error is `{"error": {"code": "...", "message": "..."}}`; the codes each route answers are
listed with its responses. HEAD is accepted wherever GET is, with the same credential.
Instants are RFC 3339 in UTC with microseconds.

Credentials go in `Authorization: Bearer <token>`: an operator token (`tso_...`), an
enrolled agent's credential (`tsa_...`) or a join secret (`tsj_...`). On a server
listening on loopback with no operator tokens configured (the playground), operator
routes need none.
"""


def _version() -> str:
    """The server's version: the document describes the API of this very build."""
    try:
        return importlib.metadata.version("taskscheduler")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def document() -> dict[str, Any]:
    """The OpenAPI document, as a fresh dict."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "taskscheduler server",
            "version": _version(),
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [
            {"name": "tasks", "description": "operators' tasks and their executions"},
            {"name": "results", "description": "what agents report"},
            {"name": "agents", "description": "enrolment, the agents' states, heartbeats"},
            {"name": "fleet", "description": "the agent URLs tasks are assigned to"},
            {"name": "audit", "description": "who changed what"},
            {"name": "server", "description": "health and this document"},
        ],
        "paths": {
            **tasks.paths(),
            **results.paths(),
            **claims.paths(),
            **agents.paths(),
            **notifications.paths(),
        },
        "components": {
            "schemas": {
                "Error": error_component(),
                "Uuid": {"type": "string", "pattern": UUID_PATTERN},
                **task_schemas.schemas(),
                **options.schemas(),
                **results.schemas(),
                **claims.schemas(),
                **agents.schemas(),
                **notifications.schemas(),
            },
            "securitySchemes": {
                "operatorToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "tso_...",
                    "description": "an operator's API token "
                    "(`TASKSCHEDULER_TOKENS`, `--tokens-file`)",
                },
                "agentCredential": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "tsa_...",
                    "description": "an enrolled agent's credential, given at enrolment",
                },
                "joinSecret": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "tsj_...",
                    "description": "a join secret agents enrol with "
                    "(`TASKSCHEDULER_JOIN_SECRETS`, `--join-secrets-file`)",
                },
            },
        },
    }


@functools.cache
def document_bytes() -> bytes:
    """The document as the route serves it (built once: it never changes while running)."""
    return json.dumps(document(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
