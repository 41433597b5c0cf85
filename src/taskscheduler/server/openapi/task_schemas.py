"""The OpenAPI document's task schemas (a task, a new one, a change, executions and their
summaries), with the limits of the parsers that enforce them."""

from __future__ import annotations

from typing import Any

from taskscheduler.cron import MACROS, MAX_CRON_LENGTH, MAX_TIMEZONE_LENGTH
from taskscheduler.protocol.fields import MAX_COMMAND_BYTES, MAX_TIME_LIMIT_SECONDS
from taskscheduler.protocol.options import OPTION_FIELDS
from taskscheduler.protocol.results import Trigger
from taskscheduler.server.openapi.operations import (
    COUNT,
    INSTANT,
    nullable,
    obj,
    ref,
)
from taskscheduler.server.openapi.options import option_fields
from taskscheduler.server.openapi.results import REVISION, STATUSES, TRIGGERS
from taskscheduler.server.store.records import TaskState
from taskscheduler.server.store.rules import NEXT_INSTANTS_SHOWN

#: What ``schedule.parse_frequency`` takes: case, spaces and a singular unit are forgiven;
#: a count of 1 to 8 digits (a year is 31,622,400 s: longer counts are refused, as are
#: counts of 8 digits beyond a year, which a pattern cannot tell).
_SPACE = "[ \\t\\n\\r\\f\\v]"
FREQUENCY_PATTERN = (
    f"^{_SPACE}*[Ee][Vv][Ee][Rr][Yy]{_SPACE}+0*[1-9][0-9]{{0,7}}{_SPACE}+"
    "([Ss][Ee][Cc][Oo][Nn][Dd]|[Mm][Ii][Nn][Uu][Tt][Ee]|[Hh][Oo][Uu][Rr])[Ss]?"
    f"{_SPACE}*$"
)

#: What an operator sets when creating a task and may change with PATCH.
TASK_FIELDS: dict[str, Any] = {
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
    "cron": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_CRON_LENGTH,
        "description": "instead of `frequency`: a cron expression, five fields or six with "
        "a leading seconds field (`*/2 * * * * *`); names (`MON`, `JAN`), ranges, steps, "
        "lists, `L`, `#`, and the macros " + ", ".join(f"`{m}`" for m in sorted(MACROS)) + " "
        "(`@reboot` is refused). Matched on the wall clock of `timezone`: a time that does "
        "not exist (spring forward) runs once at the end of the gap; one that happens twice "
        "(fall back) runs once, the first time",
    },
    "timezone": {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_TIMEZONE_LENGTH,
        "description": "the IANA time zone of `cron` (default `UTC`), e.g. `Europe/Paris`; "
        "only with `cron`",
    },
    "time_limit_seconds": {
        "type": ["integer", "null"],
        "minimum": 1,
        "maximum": MAX_TIME_LIMIT_SECONDS,
        "description": "how long a run may take before it is killed (default: one "
        "interval, at least 1 s and at most a day)",
    },
}


NEXT_INSTANTS = {
    "type": "array",
    "items": INSTANT,
    "maxItems": NEXT_INSTANTS_SHOWN,
    "description": f"the next {NEXT_INSTANTS_SHOWN} instants (after now), to check a schedule "
    "before it fires; empty when paused or deleted",
}


def _execution_fields() -> dict[str, Any]:
    return {
        "scheduled_at": INSTANT,
        "trigger": {"type": "string", "enum": TRIGGERS},
        "revision": {**REVISION, "description": "the task revision it ran"},
        "complete": {"type": "boolean"},
        "expected_agents": COUNT,
        "missing_agents": {
            "type": "array",
            "description": "the agents expected that have not reported",
            "items": ref("MissingAgent"),
        },
        "completion_time": INSTANT,
        "outputs": {"type": "array", "items": ref("Output")},
    }


def schemas() -> dict[str, Any]:
    """The tasks' and results' ``components.schemas``."""
    execution = _execution_fields()
    return {
        "NewTask": obj(
            ["command"],
            {
                **TASK_FIELDS,
                **{name: nullable(TASK_FIELDS[name]) for name in ("frequency", "cron", "timezone")},
                **option_fields(operator=True),
            },
            additionalProperties=False,
            # Exactly one schedule: a frequency (and no zone), or a cron expression.
            oneOf=[
                {
                    "required": ["frequency"],
                    "properties": {
                        "frequency": {"type": "string"},
                        "cron": {"type": "null"},
                        "timezone": {"type": "null"},
                    },
                },
                {
                    "required": ["cron"],
                    "properties": {"cron": {"type": "string"}, "frequency": {"type": "null"}},
                },
            ],
            description="exactly one of `frequency` and `cron` (null counts as absent); "
            "`time_limit_seconds` may be left out or null for the default; any other field "
            "is refused (`unknown_field`)",
            examples=[
                {"command": "echo hello", "frequency": "every 30 seconds"},
                {"command": "./report", "cron": "0 9 * * MON-FRI", "timezone": "Europe/Paris"},
            ],
        ),
        "TaskChange": {
            "type": "object",
            "properties": {
                name: {**schema, "type": [schema["type"], "null"]}
                if isinstance(schema["type"], str)
                else schema
                for name, schema in TASK_FIELDS.items()
            }
            | option_fields(operator=True),
            "minProperties": 1,
            "additionalProperties": False,
            "description": "what to change (null: unchanged); at least one, or "
            "`nothing_to_change`. `frequency` or `cron` switches the task to that kind (not "
            "both); `cron` alone keeps the task's zone, `timezone` alone its expression (a 400 "
            "on a task run by frequency). A new schedule re-bases at the change",
            "examples": [{"frequency": "every 5 minutes"}, {"cron": "*/10 * * * *"}],
        },
        "TaskCreated": obj(
            ["command_id", "next_instants"],
            {
                "command_id": {**ref("Uuid"), "description": "the new task's id"},
                "next_instants": NEXT_INSTANTS,
            },
        ),
        "Task": obj(
            [
                "task_id",
                "command",
                "frequency",
                "cron",
                "timezone",
                "anchor",
                "time_limit_seconds",
                "revision",
                "created_at",
                "updated_at",
                "deleted_at",
                "state",
                "paused_at",
                "next_instant",
                "next_instants",
                "last_execution",
                *OPTION_FIELDS,
            ],
            {
                "task_id": ref("Uuid"),
                "command": {"type": "string"},
                "frequency": {
                    "type": ["string", "null"],
                    "pattern": "^every [1-9][0-9]* (second|minute|hour)s?$",
                    "description": "as the server writes it: `every 30 seconds`; null for a "
                    "cron task",
                },
                "cron": {
                    "type": ["string", "null"],
                    "description": "the cron expression (spaces collapsed, a macro in lower "
                    "case); null for a task run by frequency",
                },
                "timezone": {
                    "type": ["string", "null"],
                    "description": "the IANA zone of `cron`; null for a task run by frequency",
                },
                "anchor": {
                    **INSTANT,
                    "description": "execution k is due at anchor + k x interval (a change "
                    "of frequency re-anchors at the change); a cron task's instants are those "
                    "after it (its creation, or the change that gave it its expression)",
                },
                "time_limit_seconds": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_TIME_LIMIT_SECONDS,
                },
                "revision": {**REVISION, "description": "1, and one more per change"},
                "created_at": INSTANT,
                "updated_at": INSTANT,
                "deleted_at": nullable(INSTANT),
                "state": {"type": "string", "enum": [s.value for s in TaskState]},
                "paused_at": nullable(INSTANT),
                "next_instant": {
                    **nullable(INSTANT),
                    "description": "the next instant of its grid; null when paused or deleted",
                },
                "next_instants": NEXT_INSTANTS,
                "last_execution": nullable(ref("ExecutionSummary")),
                **option_fields(operator=False),
            },
        ),
        "ExecutionSummary": obj(
            [
                "scheduled_at",
                "trigger",
                "revision",
                "expected_agents",
                "reported",
                *STATUSES,
                "complete",
            ],
            {
                "scheduled_at": INSTANT,
                "trigger": {"type": "string", "enum": TRIGGERS},
                "revision": REVISION,
                "expected_agents": COUNT,
                "reported": {
                    **COUNT,
                    "description": "agents whose final result is in (not one whose attempt "
                    "will be retried)",
                },
                **{status: COUNT for status in STATUSES},
                "complete": {"type": "boolean"},
                "agents": {
                    "type": "array",
                    "items": obj(
                        ["agent_id", "status"],
                        {"agent_id": ref("Uuid"), "status": {"type": "string", "enum": STATUSES}},
                    ),
                    "description": "each agent reported so far, with its last attempt's status",
                },
            },
        ),
        "TaskList": obj(
            ["tasks", "next_cursor"],
            {
                "tasks": {"type": "array", "items": ref("Task")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "pass as `?cursor=` for the next page; null on the last",
                },
            },
        ),
        "TaskDeleted": obj(
            ["task_id", "status"],
            {"task_id": ref("Uuid"), "status": {"const": "deleted"}},
        ),
        "ManualRun": obj(
            ["task_id", "scheduled_at", "trigger"],
            {
                "task_id": ref("Uuid"),
                "scheduled_at": {**INSTANT, "description": "the execution's instant: now"},
                "trigger": {"const": Trigger.MANUAL.value},
            },
        ),
        "MissingAgent": obj(
            ["url", "agent_id"],
            {"url": {"type": "string"}, "agent_id": nullable(ref("Uuid"))},
        ),
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
                    [
                        "completion_time",
                        "scheduled_at",
                        "trigger",
                        "revision",
                        "expected_agents",
                        "missing_agents",
                        "outputs",
                    ],
                    {k: v for k, v in execution.items() if k != "complete"},
                    description="the newest complete execution",
                ),
            ]
        },
        "Execution": obj(list(execution), execution),
        "TaskExecution": {
            "allOf": [ref("Execution"), obj(["task_id"], {"task_id": ref("Uuid")})],
        },
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
    }
