"""The operators' route of a task's webhooks: every notification, newest first, with its
delivery (pending, delivered, failed), attempts and the receiver's last answer."""

from __future__ import annotations

from typing import Any

from twisted.web.iweb import IRequest

from taskscheduler.schedule import format_instant
from taskscheduler.server.api.base import Routes, routes
from taskscheduler.server.notify.rules import Notification
from taskscheduler.server.store.records import UnknownTask
from taskscheduler.web.errors import BAD_REQUEST
from taskscheduler.web.requests import path_task_id, query_arg, query_int
from taskscheduler.web.responses import json_response


def notification_json(n: Notification) -> dict[str, Any]:
    return {
        "notification_id": n.notification_id,
        "event": n.event.value,
        "agent_id": str(n.agent_id),
        "scheduled_at": format_instant(n.scheduled_at),
        "result_status": n.result_status.value,
        "exit_code": n.exit_code,
        "url": n.url,
        "status": n.status.value,
        "attempts": n.attempts,
        "response_code": n.response_code,
        "error": n.error,
        "created_at": format_instant(n.created_at),
        "updated_at": None if n.updated_at is None else format_instant(n.updated_at),
    }


class NotificationRoutes(Routes):
    @routes.route("/api/v1/tasks/<task_id>/notifications", methods=["GET"])
    async def notifications(self, request: IRequest, task_id: str) -> bytes:
        """``?limit=N`` (1-1000) ``&before=<notification id>``."""
        parsed_id = path_task_id(task_id)
        limit = query_int(request, "limit", default=50, low=1, high=1000)
        before_text = query_arg(request, "before")
        before = None
        if before_text is not None:
            if not before_text.isascii() or not before_text.isdigit() or len(before_text) > 18:
                raise BAD_REQUEST("query parameter 'before' must be a notification id")
            before = int(before_text)
        if await self._store.get_task(parsed_id) is None:
            raise UnknownTask(task_id)
        page = await self._store.list_notifications(parsed_id, limit, before)
        return json_response(
            request,
            {
                "task_id": str(parsed_id),
                "notifications": [notification_json(n) for n in page],
                "next_before": page[-1].notification_id if len(page) == limit else None,
            },
        )
