"""The OpenAPI document's claims: how an agent asks to run an instant of a run-on-one
task (``run_on: one``), and the server's answers."""

from __future__ import annotations

from typing import Any

from taskscheduler.protocol.claims import CLAIM_STATUSES
from taskscheduler.protocol.tasks import MAX_REVISION
from taskscheduler.server.openapi.operations import (
    AGENT,
    INSTANT,
    answer,
    body,
    obj,
    operation,
    path_id,
    ref,
)

_DESCRIPTION = (
    "Before it starts an instant of a run-on-one task, each agent of the task claims it. "
    "The server grants each instant to one agent at most: the one it chose (rendezvous "
    "hashing of the task and instant over the task's online agents) at once; another "
    "agent is told to `wait` until the grace (`--claim-grace`, at most half the task's "
    "interval) after the instant is over, after which any agent of the task may take it. "
    "Once granted, the holder is granted it again if it asks again, and every other agent "
    "is told `held`: it records nothing for that instant."
)


def schemas() -> dict[str, Any]:
    """The claims' ``components.schemas``."""
    return {
        "Claim": obj(
            ["scheduled_at", "revision"],
            {
                "scheduled_at": {**INSTANT, "description": "the instant to run"},
                "revision": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": MAX_REVISION,
                    "description": "the task's revision the agent holds",
                },
            },
            description="fields a newer agent may add are ignored",
        ),
        "ClaimAnswer": obj(
            ["status"],
            {
                "status": {
                    "type": "string",
                    "enum": list(CLAIM_STATUSES),
                    "description": "`granted`: run it; `held`: another agent runs it; "
                    "`wait`: ask again in `retry_after_seconds`",
                },
                "agent_id": {**ref("Uuid"), "description": "the agent holding the claim"},
                "retry_at": {**INSTANT, "description": "(wait) when to ask again"},
                "retry_after_seconds": {
                    "type": "number",
                    "minimum": 0,
                    "description": "(wait) seconds from now to ask again",
                },
            },
        ),
    }


def paths() -> dict[str, Any]:
    """The agents' claim route."""
    return {
        "/api/v1/tasks/{task_id}/claims": {
            "post": operation(
                "claim_instant",
                "Claim an instant of a run-on-one task before running it",
                AGENT,
                {"200": answer("granted, held by another agent, or wait", ref("ClaimAnswer"))},
                (
                    "invalid_task_id",
                    "unknown_task",
                    "misaligned",
                    "not_assigned",
                    "task_deleted",
                    "superseded",
                    "task_paused",
                    "not_run_on_one",
                ),
                tag="results",
                method="post",
                parameters=[path_id("task_id", "task")],
                request=body(ref("Claim")),
                description=_DESCRIPTION,
            )
        },
    }
