"""The server's REST API (Klein): the seed's endpoints plus what the protocol needs.

Routes only translate between HTTP and the domain; errors map to statuses in one place
(:meth:`ServerAPI._map_domain_errors` and :func:`taskscheduler.web.install_error_handlers`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest

from taskscheduler import protocol
from taskscheduler.protocol import InvalidMessage, RunResult, TaskSpec
from taskscheduler.schedule import format_instant, parse_instant, utc_now_from
from taskscheduler.server.store import (
    Execution,
    RecordOutcome,
    Store,
    StoreUnavailable,
    Task,
    UnknownTask,
)
from taskscheduler.web import (
    ApiError,
    bad_request,
    install_error_handlers,
    json_response,
    read_json,
)

#: How long after an execution's time limit the server waits for missing agents
#: before calling the execution complete without them.
DEFAULT_REPORT_GRACE = timedelta(seconds=30)


class ServerAPI:
    """The HTTP API of ``twistd taskscheduler-server``."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        on_task_created: Callable[[Task], None] = lambda task: None,
        report_grace: timedelta = DEFAULT_REPORT_GRACE,
    ) -> None:
        self._store = store
        self._clock = clock
        self._on_task_created = on_task_created
        self._report_grace = report_grace

    def resource(self) -> Any:
        return self.app.resource()

    def _now(self) -> datetime:
        return utc_now_from(self._clock.seconds())

    # -- operators ---------------------------------------------------------------------

    @app.route("/api/v1/tasks/create", methods=["POST"])
    async def create_task(self, request: IRequest) -> bytes:
        body = read_json(request)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        missing = [name for name in ("command", "frequency") if body.get(name) is None]
        if missing:
            raise bad_request(" and ".join(f"'{name}'" for name in missing) + " is required")
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
            raise bad_request(str(e)) from None
        now = self._now()
        spec = TaskSpec(
            task_id=uuid.uuid4(),
            command=command,
            frequency=frequency,
            anchor=now,
            time_limit=time_limit,
        )
        task = await self._store.create_task(spec, created_at=now)
        self.log.info(
            "created task {task_id} ({frequency})",
            task_id=str(task.task_id),
            frequency=str(frequency),
        )
        self._on_task_created(task)
        request.setHeader(b"Location", f"/api/v1/tasks/{task.task_id}".encode("ascii"))
        return json_response(request, {"command_id": str(task.task_id)}, http.CREATED)

    @app.route("/api/v1/tasks/<task_id>", methods=["GET"])
    async def get_task(self, request: IRequest, task_id: str) -> bytes:
        task = await self._store.get_task(_path_uuid(task_id))
        if task is None:
            raise UnknownTask(task_id)
        return json_response(request, _task_json(task))

    @app.route("/api/v1/tasks/<task_id>/latest_output", methods=["GET"])
    async def latest_output(self, request: IRequest, task_id: str) -> bytes:
        execution = await self._store.latest_complete_execution(
            _path_uuid(task_id), self._now(), self._report_grace
        )
        return json_response(request, _latest_output_json(execution))

    @app.route("/api/v1/tasks/<task_id>/executions", methods=["GET"])
    async def executions(self, request: IRequest, task_id: str) -> bytes:
        """The task's history, newest first: ``?limit=N`` (1-1000) ``&before=<instant>``."""
        parsed_id = _path_uuid(task_id)
        limit = _query_int(request, "limit", default=20, low=1, high=1000)
        before = _query_instant(request, "before")
        task = await self._store.get_task(parsed_id)
        if task is None:
            raise UnknownTask(task_id)
        page = await self._store.list_executions(parsed_id, limit, before)
        deadline = self._now() - task.spec.time_limit - self._report_grace
        return json_response(
            request,
            {
                "task_id": str(parsed_id),
                "executions": [
                    {
                        "scheduled_at": format_instant(e.scheduled_at),
                        "complete": len(e.results) >= e.expected or e.scheduled_at < deadline,
                        "expected_agents": e.expected,
                        "completion_time": format_instant(e.completion_time),
                        "outputs": [_output_json(r) for r in e.results],
                    }
                    for e in page
                ],
                # Pass as ?before= for the next page; null on the last one.
                "next_before": (
                    format_instant(page[-1].scheduled_at) if len(page) == limit else None
                ),
            },
        )

    # -- agents ------------------------------------------------------------------------

    @app.route("/api/v1/tasks/<task_id>/complete", methods=["POST"])
    async def complete(self, request: IRequest, task_id: str) -> bytes:
        parsed_id = _path_uuid(task_id)
        try:
            result = protocol.parse_result(read_json(request), parsed_id)
        except InvalidMessage as e:
            raise bad_request(str(e)) from None
        [outcome] = await self._store.record_results([result], self._now())
        self._log_outcome(result, outcome)
        if outcome is RecordOutcome.CONFLICT:
            raise ApiError(
                http.CONFLICT,
                "conflict",
                "a different result is already stored for this task, agent and "
                "scheduled_at; results are immutable",
            )
        if outcome is RecordOutcome.UNKNOWN_TASK:
            raise UnknownTask(task_id)
        if outcome is RecordOutcome.MISALIGNED:
            raise bad_request(
                "'scheduled_at' is not one of this task's scheduled instants", "misaligned"
            )
        return json_response(request, {"status": outcome.value})

    @app.route("/api/v1/results", methods=["POST"])
    async def complete_batch(self, request: IRequest) -> bytes:
        try:
            results = protocol.parse_result_batch(read_json(request))
        except InvalidMessage as e:
            raise bad_request(str(e)) from None
        outcomes = await self._store.record_results(results, self._now())
        for result, outcome in zip(results, outcomes, strict=True):
            self._log_outcome(result, outcome)
        return json_response(
            request, {"results": [{"status": outcome.value} for outcome in outcomes]}
        )

    def _log_outcome(self, result: RunResult, outcome: RecordOutcome) -> None:
        if outcome in (RecordOutcome.STORED, RecordOutcome.DUPLICATE):
            return
        self.log.warn(
            "rejected result of task {task_id} from agent {agent_id} at {scheduled_at}: {outcome}",
            task_id=str(result.task_id),
            agent_id=str(result.agent_id),
            scheduled_at=format_instant(result.scheduled_at),
            outcome=outcome.value,
        )

    # -- operations --------------------------------------------------------------------

    @app.route("/api/v1/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        # Touch the database so that a load balancer sees an outage as one.
        await self._store.get_task(uuid.UUID(int=0))
        return json_response(request, {"status": "ok"})

    # -- errors ------------------------------------------------------------------------
    # Registered before the generic handlers, which catch everything else.

    @app.handle_errors(UnknownTask)
    def _unknown_task(self, request: IRequest, failure: Failure) -> bytes:
        return json_response(
            request,
            {"error": {"code": "unknown_task", "message": "no task has this id"}},
            http.NOT_FOUND,
        )

    @app.handle_errors(StoreUnavailable)
    def _store_unavailable(self, request: IRequest, failure: Failure) -> bytes:
        self.log.warn("database unavailable: {error}", error=str(failure.value))
        request.setHeader(b"Retry-After", b"5")
        return json_response(
            request,
            {
                "error": {
                    "code": "database_unavailable",
                    "message": "the database is unavailable; nothing was changed, retry later",
                }
            },
            http.SERVICE_UNAVAILABLE,
        )

    install_error_handlers(app, log)


def _path_uuid(value: str) -> uuid.UUID:
    try:
        return protocol.parse_uuid(value, "task_id")
    except InvalidMessage as e:
        raise bad_request(str(e), "invalid_task_id") from None


def _query_arg(request: IRequest, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return bytes(values[-1]).decode("utf-8")
    except UnicodeDecodeError:
        raise bad_request(f"query parameter '{name}' is not valid UTF-8") from None


def _query_int(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    text = _query_arg(request, name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
        raise bad_request(f"query parameter '{name}' must be an integer from {low} to {high}")
    return int(text)


def _query_instant(request: IRequest, name: str) -> datetime | None:
    text = _query_arg(request, name)
    if text is None:
        return None
    try:
        return parse_instant(text)
    except ValueError:
        raise bad_request(
            f"query parameter '{name}' must be an RFC 3339 timestamp with a time zone"
        ) from None


def _task_json(task: Task) -> dict[str, Any]:
    body = protocol.task_spec_to_json(task.spec)
    body["created_at"] = format_instant(task.created_at)
    return body


def _latest_output_json(execution: Execution | None) -> dict[str, Any]:
    if execution is None:
        return {"completion_time": None, "scheduled_at": None, "outputs": []}
    return {
        "completion_time": format_instant(execution.completion_time),
        "scheduled_at": format_instant(execution.scheduled_at),
        "expected_agents": execution.expected,
        "outputs": [_output_json(result) for result in execution.results],
    }


def _output_json(result: RunResult) -> dict[str, Any]:
    body: dict[str, Any] = {"agent_id": str(result.agent_id), "status": result.status.value}
    body.update(protocol.output_to_json("stdout", result.stdout))
    body.update(protocol.output_to_json("stderr", result.stderr))
    body["exit_code"] = result.exit_code
    if result.signal is not None:
        body["signal"] = result.signal
    body["started_at"] = None if result.started_at is None else format_instant(result.started_at)
    body["finished_at"] = None if result.finished_at is None else format_instant(result.finished_at)
    return body
