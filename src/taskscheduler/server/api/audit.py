"""The operators' audit log route."""

from __future__ import annotations

from twisted.web.iweb import IRequest

from taskscheduler.server.api.base import Routes, routes
from taskscheduler.server.api.views import audit_event_json
from taskscheduler.web.errors import BAD_REQUEST
from taskscheduler.web.requests import query_arg, query_int
from taskscheduler.web.responses import json_response


class AuditRoutes(Routes):
    """The audit log, newest first."""

    @routes.route("/api/v1/audit", methods=["GET"])
    async def audit(self, request: IRequest) -> bytes:
        """The audit log, newest first: ``?limit=N`` (1-1000) ``&before=<event id>``."""
        limit = query_int(request, "limit", default=100, low=1, high=1000)
        before_text = query_arg(request, "before")
        before = None
        if before_text is not None:
            if not before_text.isascii() or not before_text.isdigit() or len(before_text) > 18:
                raise BAD_REQUEST("query parameter 'before' must be an event id")
            before = int(before_text)
        events = await self._store.audit_events(limit, before)
        return json_response(
            request,
            {
                "events": [audit_event_json(e) for e in events],
                "next_before": events[-1].event_id if len(events) == limit else None,
            },
        )
