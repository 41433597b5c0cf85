"""The operators' task routes: create, read, delete, latest output, executions."""

from __future__ import annotations

import uuid

from twisted.web import http
from twisted.web.iweb import IRequest

from taskscheduler import protocol
from taskscheduler.protocol import InvalidMessage, TaskSpec
from taskscheduler.schedule import format_instant
from taskscheduler.server.access import principal_of
from taskscheduler.server.api.base import Routes, routes
from taskscheduler.server.api.fleet import missing_agents_json
from taskscheduler.server.api.views import latest_output_json, output_json, task_json
from taskscheduler.server.ratelimit import retry_after
from taskscheduler.server.store.interface import UnknownTask
from taskscheduler.server.store.rules import is_complete
from taskscheduler.web.errors import BAD_REQUEST, RATE_LIMITED, TASK_ALREADY_DELETED
from taskscheduler.web.requests import path_task_id, query_instant, query_int, read_json
from taskscheduler.web.responses import json_response


class TaskRoutes(Routes):
    """Tasks, as operators see them."""

    @routes.route("/api/v1/tasks/create", methods=["POST"])
    async def create_task(self, request: IRequest) -> bytes:
        wait = self._create_limiter.take(principal_of(request).actor)
        if wait:
            raise RATE_LIMITED(
                rate=self._create_limiter.rate,
                burst=self._create_limiter.burst,
                headers={b"Retry-After": retry_after(wait)},
            )
        body = read_json(request)
        if not isinstance(body, dict):
            raise BAD_REQUEST("the request body must be a JSON object")
        missing = [name for name in ("command", "frequency") if body.get(name) is None]
        if missing:
            raise BAD_REQUEST(" and ".join(f"'{name}'" for name in missing) + " is required")
        try:
            command = protocol.parse_command(body.get("command"))
            frequency = protocol.parse_frequency_field(body.get("frequency"))
            limit = body.get("time_limit_seconds")
            time_limit = (
                protocol.default_time_limit(frequency)
                if limit is None
                else protocol.parse_time_limit(limit)
            )
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        now = self._now()
        spec = TaskSpec(
            task_id=uuid.uuid4(),
            command=command,
            frequency=frequency,
            anchor=now,
            time_limit=time_limit,
        )
        principal = principal_of(request)
        audit = self._audit(
            request,
            principal,
            "task.created",
            str(spec.task_id),
            frequency=str(frequency),
            time_limit_seconds=time_limit.total_seconds(),
        )
        task = await self._store.create_task(spec, created_at=now, audit=audit)
        self.log.info(
            "{actor} created task {task_id} ({frequency})",
            actor=principal.actor,
            task_id=str(task.task_id),
            frequency=str(frequency),
        )
        self._on_task_created(task)
        request.setHeader(b"Location", f"/api/v1/tasks/{task.task_id}".encode("ascii"))
        return json_response(request, {"command_id": str(task.task_id)}, http.CREATED)

    @routes.route("/api/v1/tasks/<task_id>", methods=["GET"])
    async def get_task(self, request: IRequest, task_id: str) -> bytes:
        task = await self._store.get_task(path_task_id(task_id))
        if task is None:
            raise UnknownTask(task_id)
        return json_response(request, task_json(task))

    @routes.route("/api/v1/tasks/<task_id>", methods=["DELETE"])
    async def delete_task(self, request: IRequest, task_id: str) -> bytes:
        """Stop a task everywhere: its agents are told to drop it; its history stays."""
        parsed = path_task_id(task_id)
        principal = principal_of(request)
        audit = self._audit(request, principal, "task.deleted", str(parsed))
        task = await self._store.delete_task(parsed, self._now(), audit)
        if task is None:
            if await self._store.get_task(parsed) is not None:
                raise TASK_ALREADY_DELETED()
            raise UnknownTask(task_id)
        self.log.info("{actor} deleted task {task_id}", actor=principal.actor, task_id=str(parsed))
        self._on_task_deleted(task)
        return json_response(request, {"task_id": str(parsed), "status": "deleted"})

    @routes.route("/api/v1/tasks/<task_id>/latest_output", methods=["GET"])
    async def latest_output(self, request: IRequest, task_id: str) -> bytes:
        execution = await self._store.latest_complete_execution(
            path_task_id(task_id), self._now(), self._report_grace
        )
        body = latest_output_json(execution)
        if execution is not None:
            body["missing_agents"] = missing_agents_json(execution, await self._store.list_agents())
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
        agents = await self._store.list_agents() if page else []
        now = self._now()
        return json_response(
            request,
            {
                "task_id": str(parsed_id),
                "executions": [
                    {
                        "scheduled_at": format_instant(e.scheduled_at),
                        "complete": is_complete(
                            e.scheduled_at,
                            len(e.results),
                            e.expected,
                            now=now,
                            time_limit=task.spec.time_limit,
                            report_grace=self._report_grace,
                        ),
                        "expected_agents": e.expected,
                        "missing_agents": missing_agents_json(e, agents),
                        "completion_time": format_instant(e.completion_time),
                        "outputs": [output_json(r) for r in e.results],
                    }
                    for e in page
                ],
                # Pass as ?before= for the next page; null on the last one.
                "next_before": (
                    format_instant(page[-1].scheduled_at) if len(page) == limit else None
                ),
            },
        )
