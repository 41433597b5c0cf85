"""Agent -> server: the claim of an instant of a run-on-one task, before the agent starts
it (``POST /api/v1/tasks/{task_id}/claims``), and the server's answers.

The body is ``{"scheduled_at": "<instant>", "revision": <the task's revision it holds>}``.
The answer is 200 with ``{"status": "granted" | "held" | "wait", ...}``: ``granted``, the
agent runs the instant; ``held``, another agent does (this one records nothing);
``wait``, another agent is preferred for now: ask again in ``retry_after_seconds``.
Anything else is an error of the server's table; those in :data:`FINAL_CLAIM_ERRORS` are
verdicts (the instant is not this agent's to run); any other answer is the server being
unreachable for this purpose: the agent does not run the instant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from taskscheduler.protocol.fields import InvalidMessage, parse_int, parse_time
from taskscheduler.protocol.tasks import MAX_REVISION
from taskscheduler.schedule import format_instant

GRANTED = "granted"
HELD = "held"
WAIT = "wait"
CLAIM_STATUSES = (GRANTED, HELD, WAIT)
#: The errors a server gives a claim that refuse it for good (status by code).
FINAL_CLAIM_ERRORS: Mapping[str, int] = {
    "invalid_request": 400,
    "invalid_task_id": 400,
    "misaligned": 400,
    "not_assigned": 403,
    "unknown_task": 404,
    "task_deleted": 404,
    "superseded": 409,
    "task_paused": 409,
    "not_run_on_one": 409,
}


def claim_to_json(scheduled_at: datetime, revision: int) -> dict[str, Any]:
    return {"scheduled_at": format_instant(scheduled_at), "revision": revision}


def claim_body(scheduled_at: datetime, revision: int) -> bytes:
    return json.dumps(claim_to_json(scheduled_at, revision)).encode("utf-8")


def parse_claim(body: object) -> tuple[datetime, int]:
    """``(scheduled_at, revision)`` of a claim; fields it does not know are ignored."""
    if not isinstance(body, Mapping):
        raise InvalidMessage("the request body must be a JSON object")
    if "scheduled_at" not in body or "revision" not in body:
        raise InvalidMessage("a claim needs 'scheduled_at' and 'revision'")
    return (
        parse_time(body["scheduled_at"], "scheduled_at"),
        parse_int(body["revision"], "revision", 1, MAX_REVISION),
    )
