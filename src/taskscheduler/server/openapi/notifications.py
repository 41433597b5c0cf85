"""The OpenAPI document's webhook history: ``GET /api/v1/tasks/{task_id}/notifications``."""

from __future__ import annotations

from typing import Any

from taskscheduler.protocol.notify import NotifyEvent
from taskscheduler.protocol.results import ResultStatus
from taskscheduler.server.notify.rules import DeliveryStatus
from taskscheduler.server.openapi.operations import (
    INSTANT,
    OPERATOR,
    answer,
    nullable,
    obj,
    operation,
    path_id,
    query,
    ref,
)


def paths() -> dict[str, Any]:
    return {
        "/api/v1/tasks/{task_id}/notifications": {
            "get": operation(
                "notifications",
                "A task's webhook notifications, newest first, with their delivery",
                OPERATOR,
                {"200": answer("a page of notifications", ref("NotificationPage"))},
                ("invalid_task_id", "unknown_task", "invalid_request"),
                tag="tasks",
                method="get",
                parameters=[
                    path_id("task_id", "task"),
                    query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                        "notifications per page",
                    ),
                    query(
                        "before",
                        {"type": "string", "pattern": "^[0-9]{1,18}$"},
                        "only notifications older than this id (`next_before`)",
                    ),
                ],
            )
        }
    }


def schemas() -> dict[str, Any]:
    return {
        "Notification": obj(
            [
                "notification_id",
                "event",
                "agent_id",
                "scheduled_at",
                "result_status",
                "exit_code",
                "url",
                "status",
                "attempts",
                "response_code",
                "error",
                "created_at",
                "updated_at",
            ],
            {
                "notification_id": {"type": "integer", "minimum": 1},
                "event": {"type": "string", "enum": [e.value for e in NotifyEvent]},
                "agent_id": ref("Uuid"),
                "scheduled_at": INSTANT,
                "result_status": {"type": "string", "enum": [s.value for s in ResultStatus]},
                "exit_code": {"type": ["integer", "null"]},
                "url": {"type": "string"},
                "status": {
                    "type": "string",
                    "enum": [s.value for s in DeliveryStatus],
                    "description": "pending (being tried, or waiting to be retried), "
                    "delivered (the receiver answered 2xx) or failed (given up)",
                },
                "attempts": {"type": "integer", "minimum": 0},
                "response_code": {
                    "type": ["integer", "null"],
                    "description": "the receiver's last HTTP status (null: no answer yet)",
                },
                "error": {"type": ["string", "null"], "description": "why the last attempt failed"},
                "created_at": INSTANT,
                "updated_at": nullable(INSTANT),
            },
        ),
        "NotificationPage": obj(
            ["task_id", "notifications", "next_before"],
            {
                "task_id": ref("Uuid"),
                "notifications": {"type": "array", "items": ref("Notification")},
                "next_before": {
                    "type": ["integer", "null"],
                    "description": "pass as `?before=` for the next page; null on the last",
                },
            },
        ),
    }
