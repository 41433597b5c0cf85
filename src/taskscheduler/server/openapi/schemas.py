"""The OpenAPI document's schemas (``components.schemas``): what the server's routes read
and answer, with the limits taken from the code that enforces them."""

from __future__ import annotations

from typing import Any

from taskscheduler.protocol.fields import MAX_COMMAND_BYTES, MAX_TIME_LIMIT_SECONDS
from taskscheduler.protocol.output import MAX_OUTPUT_SIZE
from taskscheduler.protocol.results import MAX_BATCH, MAX_REASON_LENGTH, ResultStatus
from taskscheduler.server.openapi.responses import error_component
from taskscheduler.server.store.interface import RecordOutcome

#: A UUID as the server reads one: 8-4-4-4-12 hex digits, either case, nothing else.
UUID_PATTERN = "^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$"
#: What ``schedule.parse_frequency`` takes: case, spaces and a singular unit are forgiven;
#: a count of 1 to 8 digits (a year is 31,622,400 s: longer counts are refused, as are
#: counts of 8 digits beyond a year, which a pattern cannot tell).
_SPACE = "[ \\t\\n\\r\\f\\v]"
FREQUENCY_PATTERN = (
    f"^{_SPACE}*[Ee][Vv][Ee][Rr][Yy]{_SPACE}+0*[1-9][0-9]{{0,7}}{_SPACE}+"
    "([Ss][Ee][Cc][Oo][Nn][Dd]|[Mm][Ii][Nn][Uu][Tt][Ee]|[Hh][Oo][Uu][Rr])[Ss]?"
    f"{_SPACE}*$"
)
#: The statuses of one item of a batch answer that are not the store's outcomes.
BATCH_ONLY_STATUSES = ("forbidden", "too_early")


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def obj(required: list[str], properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties, **extra}


INSTANT = {
    "type": "string",
    "format": "date-time",
    "description": "RFC 3339 in UTC with microseconds, e.g. `2026-11-27T07:30:00.000000Z`",
}
COUNT = {"type": "integer", "minimum": 0}


def _output_fields() -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("stdout", "stderr"):
        fields[name] = {
            "type": "string",
            "description": f"what the run wrote on {name}, as UTF-8 text (invalid bytes "
            "replaced); omitted when it wrote nothing",
        }
        fields[f"{name}_bytes"] = {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_OUTPUT_SIZE,
            "description": "bytes the run wrote, before any truncation",
        }
        fields[f"{name}_truncated"] = {
            "type": "boolean",
            "description": "true when only the head and tail were kept",
        }
        fields[f"{name}_base64"] = {
            "type": "string",
            "contentEncoding": "base64",
            "description": "the exact bytes, when they are not valid UTF-8",
        }
    return fields


def _task_fields() -> dict[str, Any]:
    return {
        "command": {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_COMMAND_BYTES,
            "pattern": "^[^\\u0000]*[^\\s\\u0000][^\\u0000]*$",
            "description": f"a shell command line: not blank, no NUL, at most "
            f"{MAX_COMMAND_BYTES} bytes of UTF-8",
        },
        "frequency": {
            "type": "string",
            "pattern": FREQUENCY_PATTERN,
            "description": "`every <integer> (seconds|minutes|hours)`, at least a second and "
            "at most a year (case, spaces and a singular unit are accepted)",
        },
        "time_limit_seconds": {
            "type": ["integer", "null"],
            "minimum": 1,
            "maximum": MAX_TIME_LIMIT_SECONDS,
            "description": "how long a run may take before it is killed (default: one "
            "interval, at least 1 s and at most a day)",
        },
    }


def schemas() -> dict[str, Any]:
    """``components.schemas``."""
    task_fields = _task_fields()
    result_statuses = [status.value for status in ResultStatus]
    output = obj(
        ["agent_id", "status", "exit_code", "started_at", "finished_at"],
        {
            "agent_id": ref("Uuid"),
            "status": {"type": "string", "enum": result_statuses},
            "reason": {"type": "string", "maxLength": MAX_REASON_LENGTH},
            **_output_fields(),
            "exit_code": {"type": ["integer", "null"]},
            "signal": {"type": "integer", "minimum": 1, "maximum": 128},
            "started_at": nullable(INSTANT),
            "finished_at": nullable(INSTANT),
        },
    )
    execution = obj(
        ["scheduled_at", "complete", "expected_agents", "completion_time", "outputs"],
        {
            "scheduled_at": INSTANT,
            "complete": {"type": "boolean"},
            "expected_agents": COUNT,
            "completion_time": INSTANT,
            "outputs": {"type": "array", "items": ref("Output")},
        },
    )
    return {
        "Error": error_component(),
        "Uuid": {"type": "string", "pattern": UUID_PATTERN},
        "NewTask": obj(
            ["command", "frequency"],
            task_fields,
            description="`time_limit_seconds` may be left out or null for the default",
        ),
        "TaskCreated": obj(
            ["command_id"],
            {"command_id": {**ref("Uuid"), "description": "the new task's id"}},
        ),
        "Task": obj(
            [
                "task_id",
                "command",
                "frequency",
                "anchor",
                "time_limit_seconds",
                "created_at",
                "deleted_at",
            ],
            {
                "task_id": ref("Uuid"),
                "command": {"type": "string"},
                "frequency": {
                    "type": "string",
                    "pattern": "^every [1-9][0-9]* (second|minute|hour)s?$",
                    "description": "as the server writes it: `every 30 seconds`",
                },
                "anchor": {
                    **INSTANT,
                    "description": "execution k is due at anchor + k x interval",
                },
                "time_limit_seconds": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_TIME_LIMIT_SECONDS,
                },
                "created_at": INSTANT,
                "deleted_at": nullable(INSTANT),
            },
        ),
        "TaskDeleted": obj(
            ["task_id", "status"],
            {"task_id": ref("Uuid"), "status": {"const": "deleted"}},
        ),
        "Output": output,
        "LatestOutput": {
            "oneOf": [
                obj(
                    ["completion_time", "scheduled_at", "outputs"],
                    {
                        "completion_time": {"type": "null"},
                        "scheduled_at": {"type": "null"},
                        "outputs": {"type": "array", "maxItems": 0},
                    },
                    description="no execution of the task is complete yet",
                ),
                obj(
                    ["completion_time", "scheduled_at", "expected_agents", "outputs"],
                    {
                        "completion_time": INSTANT,
                        "scheduled_at": INSTANT,
                        "expected_agents": COUNT,
                        "outputs": {"type": "array", "items": ref("Output")},
                    },
                    description="the newest complete execution",
                ),
            ]
        },
        "Execution": execution,
        "ExecutionPage": obj(
            ["task_id", "executions", "next_before"],
            {
                "task_id": ref("Uuid"),
                "executions": {"type": "array", "items": ref("Execution")},
                "next_before": {
                    **nullable(INSTANT),
                    "description": "pass as `?before=` for the next page; null on the last",
                },
            },
        ),
        "Agent": obj(
            ["agent_id", "url", "enrolled_at", "revoked_at", "url_released_at"],
            {
                "agent_id": ref("Uuid"),
                "url": {"type": "string"},
                "enrolled_at": INSTANT,
                "revoked_at": nullable(INSTANT),
                "url_released_at": nullable(INSTANT),
            },
        ),
        "AgentList": obj(["agents"], {"agents": {"type": "array", "items": ref("Agent")}}),
        "Enrolment": obj(
            ["agent_id", "url"],
            {
                "agent_id": ref("Uuid"),
                "url": {
                    "type": "string",
                    "pattern": "^https?://[^\\s]+$",
                    "maxLength": 2000,
                    "description": "the agent's base URL, as in `AVAILABLE_SERVERS`",
                },
            },
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
        "Result": obj(
            ["server_id", "scheduled_at"],
            {
                "task_id": {
                    **ref("Uuid"),
                    "description": "required in a batch; in the path otherwise",
                },
                "server_id": {**ref("Uuid"), "description": "the reporting agent's id"},
                "scheduled_at": INSTANT,
                "status": {"type": "string", "enum": result_statuses},
                "exit_code": {
                    "type": ["integer", "null"],
                    "minimum": -(2**31),
                    "maximum": 2**31 - 1,
                },
                "signal": {"type": ["integer", "null"], "minimum": 1, "maximum": 128},
                "started_at": nullable(INSTANT),
                "finished_at": nullable(INSTANT),
                **_output_fields(),
                "reason": {"type": ["string", "null"], "maxLength": MAX_REASON_LENGTH},
            },
        ),
        "ResultBatch": obj(
            ["results"],
            {
                "results": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": MAX_BATCH,
                    "items": {**ref("Result"), "required": ["task_id"]},
                }
            },
        ),
        "ResultStored": obj(
            ["status"],
            {
                "status": {
                    "type": "string",
                    "enum": [RecordOutcome.STORED.value, RecordOutcome.DUPLICATE.value],
                }
            },
        ),
        "BatchOutcome": obj(
            ["results"],
            {
                "results": {
                    "type": "array",
                    "description": "one outcome per result sent, in order",
                    "items": obj(
                        ["status"],
                        {
                            "status": {
                                "type": "string",
                                "enum": [o.value for o in RecordOutcome]
                                + list(BATCH_ONLY_STATUSES),
                            }
                        },
                    ),
                }
            },
        ),
        "AuditEvent": obj(
            ["id", "at", "actor", "action", "target", "peer", "details"],
            {
                "id": {"type": "integer", "minimum": 1},
                "at": INSTANT,
                "actor": {"type": "string", "description": "`operator:<name>`, `agent:<id>`..."},
                "action": {"type": "string", "description": "`task.created`, `agent.revoked`..."},
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
