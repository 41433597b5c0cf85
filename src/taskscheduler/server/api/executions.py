"""The operators' routes of what a task's runs printed: its latest complete execution,
its history, and one execution by its instant."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from twisted.web.iweb import IRequest

from taskscheduler.schedule import format_instant, parse_instant
from taskscheduler.server.api.base import Routes, routes
from taskscheduler.server.api.fleet import missing_agents_json
from taskscheduler.server.api.views import execution_json, latest_output_json
from taskscheduler.server.store.records import Execution, Task, UnknownTask
from taskscheduler.web.errors import BAD_REQUEST, UNKNOWN_EXECUTION
from taskscheduler.web.requests import path_task_id, query_instant, query_int
from taskscheduler.web.responses import json_response


class ExecutionRoutes(Routes):
    """Executions, as operators see them."""

    @routes.route("/api/v1/tasks/<task_id>/latest_output", methods=["GET"])
    async def latest_output(self, request: IRequest, task_id: str) -> bytes:
        execution = await self._store.latest_complete_execution(
            path_task_id(task_id), self._now(), self._report_grace
        )
        body = latest_output_json(execution)
        if execution is not None:
            body["missing_agents"] = missing_agents_json(execution)
        return json_response(request, body)

    @routes.route("/api/v1/tasks/<task_id>/executions", methods=["GET"])
    async def executions(self, request: IRequest, task_id: str) -> bytes:
        """The task's history, newest first: ``?limit=N`` (1-1000) ``&before=<instant>``."""
        parsed_id = path_task_id(task_id)
        limit = query_int(request, "limit", default=20, low=1, high=1000)
        before = query_instant(request, "before")
        task = await self._store.get_task(parsed_id)
        if task is None:
            raise UnknownTask(task_id)
        page = await self._store.list_executions(parsed_id, limit, before)
        now = self._now()
        return json_response(
            request,
            {
                "task_id": str(parsed_id),
                "executions": [self._execution_view(task, e, now) for e in page],
                # Pass as ?before= for the next page; null on the last one.
                "next_before": (
                    format_instant(page[-1].scheduled_at) if len(page) == limit else None
                ),
            },
        )

    @routes.route("/api/v1/tasks/<task_id>/executions/<scheduled_at>", methods=["GET"])
    async def execution(self, request: IRequest, task_id: str, scheduled_at: str) -> bytes:
        """One execution of the task, by its instant."""
        parsed_id = path_task_id(task_id)
        try:
            at = parse_instant(scheduled_at)
        except ValueError as e:
            raise BAD_REQUEST(f"'scheduled_at' in the path: {e}") from None
        task = await self._store.get_task(parsed_id)
        if task is None:
            raise UnknownTask(task_id)
        execution = await self._store.get_execution(parsed_id, at)
        if execution is None:
            raise UNKNOWN_EXECUTION()
        body = {"task_id": str(parsed_id)}
        body.update(self._execution_view(task, execution, self._now()))
        return json_response(request, body)

    def _execution_view(self, task: Task, execution: Execution, now: datetime) -> dict[str, Any]:
        """One execution as history and ``/executions/{scheduled_at}`` show it."""
        complete = self._complete(
            task, execution.scheduled_at, execution.reported, execution.expected, now
        )
        body = execution_json(execution, complete)
        body["missing_agents"] = missing_agents_json(execution)
        return body
