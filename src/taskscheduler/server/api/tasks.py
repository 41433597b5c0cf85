"""The operators' task routes: create, list, read, change, pause, resume, run now, delete
(what the runs printed is :mod:`.executions`')."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from twisted.web import http
from twisted.web.iweb import IRequest

from taskscheduler import protocol
from taskscheduler.protocol import InvalidMessage, TaskSpec
from taskscheduler.protocol.options import (
    NULLABLE_OPTIONS,
    OPTION_FIELDS,
    parse_options,
)
from taskscheduler.schedule import InstantOutOfRange, format_instant, parse_instant
from taskscheduler.server.access import principal_of
from taskscheduler.server.api.base import Routes, routes
from taskscheduler.server.api.claims import online_since
from taskscheduler.server.api.targets import refuse_unknown_agents
from taskscheduler.server.api.views import task_json
from taskscheduler.server.ratelimit import retry_after
from taskscheduler.server.store.records import (
    ExecutionSummary,
    Task,
    TaskChange,
    TaskState,
    UnknownTask,
)
from taskscheduler.server.store.rules import (
    audited_options,
    manual_instant,
    upcoming_instants,
)
from taskscheduler.web.errors import (
    BAD_REQUEST,
    INVALID_CURSOR,
    NOTHING_TO_CHANGE,
    RATE_LIMITED,
    TASK_ALREADY_DELETED,
)
from taskscheduler.web.requests import (
    path_task_id,
    query_arg,
    query_int,
    read_json,
)
from taskscheduler.web.responses import json_response

_USEC = timedelta(microseconds=1)
#: Instants tried for a run-now, a microsecond apart, when others took the first ones.
_MANUAL_INSTANT_TRIES = 100
#: The fields of a task an operator sets (create) or changes (PATCH).
TASK_FIELDS = ("command", "frequency", "cron", "timezone", "time_limit_seconds", *OPTION_FIELDS)


def encode_cursor(task: Task) -> str:
    """The opaque cursor after ``task``: its sort key, URL-safe base64 of JSON."""
    key = json.dumps([format_instant(task.created_at), str(task.task_id)])
    return base64.urlsafe_b64encode(key.encode("ascii")).decode("ascii")


def decode_cursor(text: str) -> tuple[datetime, uuid.UUID]:
    """The sort key in a cursor, or 400 ``invalid_cursor``."""
    try:
        created_at, task_id = json.loads(base64.urlsafe_b64decode(text.encode("ascii")))
        return parse_instant(created_at), uuid.UUID(task_id)
    except (ValueError, TypeError, binascii.Error, UnicodeError, InstantOutOfRange):
        raise INVALID_CURSOR() from None


_BOTH_SCHEDULES = (
    "give either 'frequency' (e.g. 'every 5 minutes') or 'cron' (e.g. '*/5 * * * *', "
    "with an optional 'timezone'), not both"
)


def _one_schedule(body: dict[str, Any]) -> None:
    """400 unless a new task has exactly one schedule, and a zone only with cron."""
    frequency, cron = body.get("frequency") is not None, body.get("cron") is not None
    if frequency and cron:
        raise BAD_REQUEST(_BOTH_SCHEDULES)
    if not frequency and not cron:
        raise BAD_REQUEST(
            "'frequency' is required (e.g. 'every 5 minutes'), or 'cron' instead "
            "(e.g. '*/5 * * * *'): exactly one of them"
        )
    if frequency and body.get("timezone") is not None:
        raise BAD_REQUEST("'timezone' applies to a cron expression, not to 'frequency'")


def _object_body(request: IRequest) -> dict[str, Any]:
    body = read_json(request)
    if not isinstance(body, dict):
        raise BAD_REQUEST("the request body must be a JSON object")
    return body


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
        body = _object_body(request)
        protocol.refuse_unknown(body, TASK_FIELDS)  # 400 unknown_field
        _one_schedule(body)
        if body.get("command") is None:
            raise BAD_REQUEST("'command' is required")
        now = self._now()
        try:
            command = protocol.parse_command(body.get("command"))
            frequency, cron = None, None
            if body.get("cron") is not None:
                cron = protocol.parse_cron_fields(body["cron"], body.get("timezone"))
            else:
                frequency = protocol.parse_frequency_field(body.get("frequency"))
            options = parse_options(body)
            spec = TaskSpec(
                task_id=uuid.uuid4(),
                command=command,
                frequency=frequency,
                anchor=now,
                time_limit=timedelta(0),
                options=options,
                cron=cron,
            )
            limit = body.get("time_limit_seconds")
            time_limit = (
                protocol.default_time_limit(spec.interval)
                if limit is None
                else protocol.parse_time_limit(limit)
            )
            spec = dataclasses.replace(spec, time_limit=time_limit)
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        await refuse_unknown_agents(self._store, body)
        schedule = str(frequency) if cron is None else str(cron)
        principal = principal_of(request)
        audit = self._audit(
            request,
            principal,
            "task.created",
            str(spec.task_id),
            **protocol.schedule_to_json(spec),
            time_limit_seconds=time_limit.total_seconds(),
            options=audited_options(options),  # env by its names: values may be secrets
        )
        task = await self._store.create_task(spec, created_at=now, audit=audit)
        self.log.info(
            "{actor} created task {task_id} ({schedule})",
            actor=principal.actor,
            task_id=str(task.task_id),
            schedule=schedule,
        )
        self._on_task_created(task)
        request.setHeader(b"Location", f"/api/v1/tasks/{task.task_id}".encode("ascii"))
        # The next instants, so that an operator sees at once what a cron expression means.
        instants = [format_instant(at) for at in upcoming_instants(task, now)]
        body = {"command_id": str(task.task_id), "next_instants": instants}
        return json_response(request, body, http.CREATED)

    @routes.route("/api/v1/tasks", methods=["GET"])
    async def list_tasks(self, request: IRequest) -> bytes:
        """Tasks newest first: ``?limit=`` (1-500) ``&cursor=`` ``&state=`` ``&command=``."""
        limit = query_int(request, "limit", default=100, low=1, high=500)
        cursor = query_arg(request, "cursor")
        after = None if cursor is None else decode_cursor(cursor)
        state_text = query_arg(request, "state")
        try:
            state = None if state_text is None else TaskState(state_text)
        except ValueError:
            allowed = ", ".join(s.value for s in TaskState)
            raise BAD_REQUEST(f"query parameter 'state' must be one of: {allowed}") from None
        command = query_arg(request, "command")
        # One more than asked: whether there is a next page, without an empty last one.
        page = await self._store.list_tasks(limit + 1, after, state, command)
        more = len(page) > limit
        page = page[:limit]
        return json_response(
            request,
            {
                "tasks": await self._tasks_json(page),
                "next_cursor": encode_cursor(page[-1]) if more else None,
            },
        )

    @routes.route("/api/v1/tasks/<task_id>", methods=["GET"])
    async def get_task(self, request: IRequest, task_id: str) -> bytes:
        task = await self._store.get_task(path_task_id(task_id))
        if task is None:
            raise UnknownTask(task_id)
        return json_response(request, (await self._tasks_json([task]))[0])

    @routes.route("/api/v1/tasks/<task_id>", methods=["PATCH"])
    async def update_task(self, request: IRequest, task_id: str) -> bytes:
        """A new revision from now on: see the README's "Changing a task"."""
        parsed = path_task_id(task_id)
        body = _object_body(request)
        protocol.refuse_unknown(body, TASK_FIELDS)
        if not any(
            body.get(name) is not None or (name in NULLABLE_OPTIONS and name in body)
            for name in TASK_FIELDS
        ):
            raise NOTHING_TO_CHANGE()
        if body.get("frequency") is not None and body.get("cron") is not None:
            raise BAD_REQUEST(_BOTH_SCHEDULES)
        try:
            change = TaskChange(
                command=(
                    None if body.get("command") is None else protocol.parse_command(body["command"])
                ),
                frequency=(
                    None
                    if body.get("frequency") is None
                    else protocol.parse_frequency_field(body["frequency"])
                ),
                time_limit=(
                    None
                    if body.get("time_limit_seconds") is None
                    else protocol.parse_time_limit(body["time_limit_seconds"])
                ),
                options={name: body[name] for name in OPTION_FIELDS if name in body},
                cron=(
                    None
                    if body.get("cron") is None
                    else protocol.parse_cron_fields(body["cron"], body.get("timezone")).expression
                ),
                timezone=(
                    None
                    if body.get("timezone") is None
                    else protocol.parse_timezone_field(body["timezone"])
                ),
            )
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        await refuse_unknown_agents(self._store, body)
        principal = principal_of(request)
        audit = self._audit(request, principal, "task.updated", str(parsed))
        try:
            changed = await self._store.update_task(parsed, change, self._now(), audit)
        except InvalidMessage as e:  # an option malformed, or not fitting the task's
            raise BAD_REQUEST(str(e)) from None
        task = await self._changed(parsed, changed)
        if changed is not None and changed[1]:
            self.log.info(
                "{actor} changed task {task_id} (revision {revision})",
                actor=principal.actor,
                task_id=str(parsed),
                revision=task.spec.revision,
            )
            self._on_task_changed(task)
        return json_response(request, (await self._tasks_json([task]))[0])

    @routes.route("/api/v1/tasks/<task_id>/pause", methods=["POST"])
    async def pause_task(self, request: IRequest, task_id: str) -> bytes:
        """Stop running it everywhere, until resumed; idempotent."""
        parsed = path_task_id(task_id)
        principal = principal_of(request)
        audit = self._audit(request, principal, "task.paused", str(parsed))
        changed = await self._store.pause_task(parsed, self._now(), audit)
        task = await self._changed(parsed, changed)
        if changed is not None and changed[1]:
            self.log.info("{actor} paused task {task_id}", actor=principal.actor, task_id=task_id)
            self._on_task_changed(task)
        return json_response(request, (await self._tasks_json([task]))[0])

    @routes.route("/api/v1/tasks/<task_id>/resume", methods=["POST"])
    async def resume_task(self, request: IRequest, task_id: str) -> bytes:
        """Run it again on its grid, from the next instant; idempotent."""
        parsed = path_task_id(task_id)
        principal = principal_of(request)
        audit = self._audit(request, principal, "task.resumed", str(parsed))
        changed = await self._store.resume_task(parsed, self._now(), audit)
        task = await self._changed(parsed, changed)
        if changed is not None and changed[1]:
            self.log.info("{actor} resumed task {task_id}", actor=principal.actor, task_id=task_id)
            self._on_task_changed(task)
        return json_response(request, (await self._tasks_json([task]))[0])

    @routes.route("/api/v1/tasks/<task_id>/run", methods=["POST"])
    async def run_task(self, request: IRequest, task_id: str) -> bytes:
        """Run it now, once, on every agent of the task: a manual execution."""
        parsed = path_task_id(task_id)
        task = await self._store.get_task(parsed)
        if task is None:
            raise UnknownTask(task_id)
        if task.deleted:
            raise TASK_ALREADY_DELETED()
        at = manual_instant(self._now(), task.spec.schedule)
        principal = principal_of(request)
        audit = self._audit(
            request, principal, "task.run", str(parsed), scheduled_at=format_instant(at)
        )
        execution = None
        for _ in range(_MANUAL_INSTANT_TRIES):
            try:
                execution = await self._store.record_manual_execution(
                    parsed, at, audit, online_since(self._now(), self._heartbeat_interval)
                )
                break
            except ValueError:  # another run-now took this very microsecond
                at = manual_instant(at + _USEC, task.spec.schedule)
                audit = dataclasses.replace(audit, details={"scheduled_at": format_instant(at)})
        else:
            raise ValueError(f"no free instant for a run-now of task {task_id}")
        if execution is None:  # deleted meanwhile
            raise TASK_ALREADY_DELETED()
        self.log.info(
            "{actor} ran task {task_id} now ({scheduled_at})",
            actor=principal.actor,
            task_id=task_id,
            scheduled_at=format_instant(at),
        )
        self._on_task_changed(task)
        body = {"task_id": str(parsed), "scheduled_at": format_instant(at), "trigger": "manual"}
        return json_response(request, body, http.ACCEPTED)

    async def _changed(self, task_id: uuid.UUID, changed: tuple[Task, bool] | None) -> Task:
        """The task a change answered, or 404 (deleted or unknown)."""
        if changed is not None:
            return changed[0]
        if await self._store.get_task(task_id) is not None:
            raise TASK_ALREADY_DELETED()
        raise UnknownTask(str(task_id))

    async def _tasks_json(self, tasks: list[Task]) -> list[dict[str, Any]]:
        """Tasks as operators see them, each with its last execution (one look-up)."""
        now = self._now()
        last = await self._store.last_executions([t.task_id for t in tasks])
        return [
            task_json(
                task,
                now,
                last.get(task.task_id),
                self._summary_complete(task, last.get(task.task_id), now),
            )
            for task in tasks
        ]

    def _summary_complete(
        self, task: Task, summary: ExecutionSummary | None, now: datetime
    ) -> bool:
        if summary is None:
            return False
        return self._complete(task, summary.scheduled_at, summary.reported, summary.expected, now)

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
