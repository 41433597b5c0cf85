"""The OpenAPI document's results: what agents report (one result, a batch) and how
operators see a run's output, with the limits of the parsers that enforce them."""

from __future__ import annotations

from typing import Any

from taskscheduler.protocol.output import MAX_OUTPUT_SIZE
from taskscheduler.protocol.results import (
    MAX_ATTEMPT,
    MAX_BATCH,
    MAX_REASON_LENGTH,
    ResultStatus,
    Trigger,
)
from taskscheduler.protocol.tasks import MAX_REVISION
from taskscheduler.server.openapi.operations import (
    AGENT,
    INSTANT,
    answer,
    body,
    nullable,
    obj,
    operation,
    path_id,
    ref,
)
from taskscheduler.server.store.records import RecordOutcome

#: The statuses of one item of a batch answer that are not the store's outcomes.
BATCH_ONLY_STATUSES = ("forbidden", "too_early")
STATUSES = [status.value for status in ResultStatus]
TRIGGERS = [trigger.value for trigger in Trigger]
REVISION = {"type": "integer", "minimum": 1, "maximum": MAX_REVISION}
ATTEMPT = {"type": "integer", "minimum": 1, "maximum": MAX_ATTEMPT}


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


def schemas() -> dict[str, Any]:
    """The results' ``components.schemas``."""
    return {
        "Output": obj(
            ["agent_id", "status", "exit_code", "started_at", "finished_at"],
            {
                "agent_id": ref("Uuid"),
                "status": {"type": "string", "enum": STATUSES},
                "reason": {"type": "string", "maxLength": MAX_REASON_LENGTH},
                **_output_fields(),
                "exit_code": {"type": ["integer", "null"]},
                "signal": {"type": "integer", "minimum": 1, "maximum": 128},
                "started_at": nullable(INSTANT),
                "finished_at": nullable(INSTANT),
                "revision": {**REVISION, "type": ["integer", "null"]},
                "trigger": {"type": "string", "enum": TRIGGERS},
                "attempt": {
                    **ATTEMPT,
                    "description": "the agent's last attempt: 1 for the first run, n + 1 "
                    "for the retry of attempt n",
                },
                "final": {
                    "type": "boolean",
                    "description": "false while the agent will retry this attempt: the "
                    "execution does not count the agent as reported yet",
                },
                "attempts": {
                    "type": "array",
                    "description": "every attempt of the agent's run, first to last",
                    "items": ref("Attempt"),
                },
            },
        ),
        "Attempt": obj(
            ["attempt", "status", "exit_code", "started_at", "finished_at"],
            {
                "attempt": ATTEMPT,
                "status": {"type": "string", "enum": STATUSES},
                "reason": {"type": "string", "maxLength": MAX_REASON_LENGTH},
                "exit_code": {"type": ["integer", "null"]},
                "signal": {"type": "integer", "minimum": 1, "maximum": 128},
                "started_at": nullable(INSTANT),
                "finished_at": nullable(INSTANT),
                **_output_fields(),
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
                "status": {"type": "string", "enum": STATUSES},
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
                "revision": {
                    **REVISION,
                    "type": ["integer", "null"],
                    "description": "the revision it ran (absent: the one of its instant)",
                },
                "trigger": {"type": ["string", "null"], "enum": [*TRIGGERS, None]},
                "attempt": {
                    **ATTEMPT,
                    "description": "1 (the default) for the run of the instant, n + 1 for "
                    "the retry of attempt n; each attempt is a result of its own",
                },
                "final": {
                    "type": "boolean",
                    "description": "false when the agent will retry this attempt (default true)",
                },
            },
            description="fields a newer agent may add are ignored",
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
    }


def paths() -> dict[str, Any]:
    """The agents' result routes."""
    return {
        "/api/v1/tasks/{task_id}/complete": {
            "post": operation(
                "complete",
                "Report one result of the calling agent",
                AGENT,
                {"200": answer("stored (or already stored)", ref("ResultStored"))},
                (
                    "invalid_task_id",
                    "unknown_task",
                    "misaligned",
                    "impersonation",
                    "not_assigned",
                    "task_deleted",
                    "conflict",
                    "too_early",
                    "superseded",
                    "task_paused",
                ),
                tag="results",
                method="post",
                parameters=[path_id("task_id", "task")],
                request=body(ref("Result")),
            )
        },
        "/api/v1/results": {
            "post": operation(
                "complete_batch",
                "Report a batch of the calling agent's results, one outcome each",
                AGENT,
                {"200": answer("one outcome per result", ref("BatchOutcome"))},
                ("impersonation",),
                tag="results",
                method="post",
                request=body(ref("ResultBatch")),
            )
        },
    }
