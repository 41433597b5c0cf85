"""The OpenAPI document's agents and the rest: enrolment, the agents and the fleet as
operators see them, the heartbeat, the audit log, the health check and the document."""

from __future__ import annotations

from typing import Any

from taskscheduler.protocol.options import LABEL_KEY, LABEL_VALUE, MAX_LABELS
from taskscheduler.server.lateness import LATENESS_EXECUTIONS
from taskscheduler.server.openapi.operations import (
    AGENT,
    COUNT,
    INSTANT,
    JOIN,
    OPERATOR,
    PUBLIC,
    answer,
    body,
    nullable,
    obj,
    operation,
    path_id,
    query,
    ref,
)

#: An agent's base URL, as ``AVAILABLE_SERVERS`` lists them.
AGENT_URL = {
    "type": "string",
    "pattern": "^https?://[^\\s]+$",
    "maxLength": 2000,
    "description": "an agent's base URL, as in `AVAILABLE_SERVERS`: `http://host:8081`",
}
AGENT_STATES = ["online", "offline", "revoked", "not_in_fleet"]
#: An agent's labels (``--label k=v``), as the agent last said them.
AGENT_LABELS: dict[str, Any] = {
    "type": "object",
    "maxProperties": MAX_LABELS,
    "propertyNames": {"pattern": f"^{LABEL_KEY.pattern}$"},
    "additionalProperties": {"type": "string", "pattern": f"^{LABEL_VALUE.pattern}$"},
    "description": "the agent's labels (`--label role=web`), as it last said them: at "
    "enrolment, then in each heartbeat; `{}` when it has none",
    "examples": [{"role": "web", "dc": "eu"}],
}


def schemas() -> dict[str, Any]:
    """The agents', fleet's and audit log's ``components.schemas``."""
    heartbeat_counts = ("tasks", "running", "spooled", "dropped_results")
    return {
        "Agent": obj(
            [
                "agent_id",
                "url",
                "enrolled_at",
                "revoked_at",
                "url_released_at",
                "labels",
                "state",
                "last_seen_at",
                "version",
                "hostname",
                "started_at",
                *heartbeat_counts,
            ],
            {
                "agent_id": ref("Uuid"),
                "url": {"type": "string"},
                "enrolled_at": INSTANT,
                "revoked_at": nullable(INSTANT),
                "url_released_at": nullable(INSTANT),
                "labels": ref("AgentLabels"),
                "state": {
                    "type": "string",
                    "enum": AGENT_STATES,
                    "description": "`online`: heard from within 3 heartbeat intervals; "
                    "`revoked` wins over everything; `not_in_fleet`: its URL is not in "
                    "the fleet",
                },
                "last_seen_at": nullable(INSTANT),
                "version": {"type": ["string", "null"]},
                "hostname": {"type": ["string", "null"]},
                "started_at": nullable(INSTANT),
                **{name: {**COUNT, "type": ["integer", "null"]} for name in heartbeat_counts},
                "start_lateness": nullable(ref("StartLateness")),
            },
            description="the heartbeat's fields are null until the agent's first one; "
            "`start_lateness` is in the list of agents only",
        ),
        "StartLateness": obj(
            ["samples", "p50_seconds", "p99_seconds"],
            {
                "samples": COUNT,
                "p50_seconds": {"type": "number"},
                "p99_seconds": {"type": "number"},
            },
            description="seconds from a run's instant to its process start (nearest-rank "
            f"percentiles), over the first attempts of the fleet's newest "
            f"{LATENESS_EXECUTIONS} scheduled executions; null: no run among them",
            additionalProperties=False,
        ),
        "AgentList": obj(["agents"], {"agents": {"type": "array", "items": ref("Agent")}}),
        "AgentLabels": AGENT_LABELS,
        "Enrolment": obj(
            ["agent_id", "url"],
            {"agent_id": ref("Uuid"), "url": AGENT_URL, "labels": ref("AgentLabels")},
        ),
        "Enrolled": obj(
            ["agent_id", "credential", "server_public_key"],
            {
                "agent_id": ref("Uuid"),
                "credential": {
                    "type": "string",
                    "pattern": "^tsa_",
                    "description": "the agent's credential (shown once)",
                },
                "server_public_key": {
                    "type": "string",
                    "description": "the key the server signs its instructions with",
                },
            },
        ),
        "Heartbeat": {
            "type": "object",
            "properties": {
                "agent_id": {**ref("Uuid"), "description": "the credential's agent"},
                "version": {"type": "string"},
                "hostname": {"type": "string"},
                "started_at": nullable(INSTANT),
                **{name: COUNT for name in heartbeat_counts},
                "labels": {
                    **ref("AgentLabels"),
                    "description": "the agent's labels now; absent: none (an older agent)",
                },
            },
            "description": "fields a newer agent may add are ignored",
        },
        "HeartbeatAnswer": obj(
            ["state", "in_fleet", "interval_seconds"],
            {
                "state": {"type": "string", "enum": ["online", "not_in_fleet"]},
                "in_fleet": {"type": "boolean"},
                "interval_seconds": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "description": "seconds between heartbeats",
                },
            },
        ),
        "FleetMember": obj(
            ["url", "added_at", "agent_id", "state"],
            {
                "url": {"type": "string"},
                "added_at": INSTANT,
                "agent_id": {
                    **nullable(ref("Uuid")),
                    "description": "the agent enrolled at this URL",
                },
                "state": {"type": "string", "enum": [*AGENT_STATES, "not_enrolled"]},
            },
        ),
        "Fleet": obj(["members"], {"members": {"type": "array", "items": ref("FleetMember")}}),
        "NewMember": obj(
            ["url"],
            {"url": AGENT_URL},
            additionalProperties=False,
            examples=[{"url": "http://agent-1:8081"}],
        ),
        "AuditEvent": obj(
            ["id", "at", "actor", "action", "target", "peer", "details"],
            {
                "id": {"type": "integer", "minimum": 1},
                "at": INSTANT,
                "actor": {"type": "string", "description": "`operator:<name>`, `agent:<id>`..."},
                "action": {
                    "type": "string",
                    "description": "`task.created`, `task.updated`, `task.paused`, "
                    "`task.resumed`, `task.run`, `task.deleted`, `agent.enrolled`, "
                    "`agent.revoked`, `agent.url_released`, `fleet.added`, `fleet.removed`",
                },
                "target": {"type": "string"},
                "peer": {"type": "string", "description": "the client's address"},
                "details": {"type": "object"},
            },
        ),
        "AuditPage": obj(
            ["events", "next_before"],
            {
                "events": {"type": "array", "items": ref("AuditEvent")},
                "next_before": {
                    "type": ["integer", "null"],
                    "description": "pass as `?before=` for the next page; null on the last",
                },
            },
        ),
        "Health": obj(["status"], {"status": {"const": "ok"}}),
    }


AGENT_ID = path_id("agent_id", "agent")


def paths() -> dict[str, Any]:
    """The agent, fleet, audit and server routes."""
    member = {"200": answer("the member", ref("FleetMember"))}
    return {
        "/api/v1/agents": {
            "get": operation(
                "list_agents",
                "Every enrolled agent, with its state",
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
        "/api/v1/agents/heartbeat": {
            "post": operation(
                "heartbeat",
                "An agent says it is alive, and learns whether it is in the fleet",
                AGENT,
                {"200": answer("its state", ref("HeartbeatAnswer"))},
                tag="agents",
                method="post",
                request=body(ref("Heartbeat")),
            )
        },
        "/api/v1/agents/{agent_id}": {
            "get": operation(
                "get_agent",
                "An agent, with its state",
                OPERATOR,
                {"200": answer("the agent", ref("Agent"))},
                ("invalid_agent_id", "unknown_agent"),
                tag="agents",
                method="get",
                parameters=[AGENT_ID],
            ),
            "delete": operation(
                "revoke_agent",
                "Revoke an agent: its next request is refused; it is told to drop its tasks",
                OPERATOR,
                {"200": answer("the revoked agent", ref("Agent"))},
                ("invalid_agent_id", "unknown_agent"),
                tag="agents",
                method="delete",
                parameters=[AGENT_ID],
            ),
        },
        "/api/v1/agents/{agent_id}/release-url": {
            "post": operation(
                "release_agent_url",
                "Let another agent enrol at a revoked agent's URL",
                OPERATOR,
                {"200": answer("the agent", ref("Agent"))},
                ("invalid_agent_id", "unknown_agent", "agent_live"),
                tag="agents",
                method="post",
                parameters=[AGENT_ID],
            )
        },
        "/api/v1/fleet": {
            "get": operation(
                "list_fleet",
                "The fleet: the agent URLs tasks are assigned to",
                OPERATOR,
                {"200": answer("its members", ref("Fleet"))},
                tag="fleet",
                method="get",
            ),
            "post": operation(
                "add_fleet_member",
                "Add an agent URL to the fleet: every active task is assigned to it",
                OPERATOR,
                {"201": answer("added", ref("FleetMember")), **member},
                ("invalid_url", "unknown_field"),
                tag="fleet",
                method="post",
                request=body(ref("NewMember")),
                description="200 if it already was a member. Audited as `fleet.added`.",
            ),
        },
        "/api/v1/fleet/{url}": {
            "delete": operation(
                "remove_fleet_member",
                "Take an agent URL out of the fleet: the agent there drops every task",
                OPERATOR,
                member,
                ("not_in_fleet",),
                tag="fleet",
                method="delete",
                parameters=[
                    {
                        "name": "url",
                        "in": "path",
                        "required": True,
                        "description": "the member's URL, percent-encoded",
                        "schema": {"type": "string", "minLength": 1},
                    }
                ],
                description="Audited as `fleet.removed`.",
            )
        },
        "/api/v1/audit": {
            "get": operation(
                "audit",
                "The audit log, newest first: who, what, when, from where",
                OPERATOR,
                {"200": answer("a page of events", ref("AuditPage"))},
                ("invalid_request",),
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
                ("database_unavailable",),
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
