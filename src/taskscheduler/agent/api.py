"""The agent's HTTP API (Klein): what its server calls.

- ``POST /api/v1/tasks/schedule``: run a task here (idempotent; the same ``task_id`` with
  a different spec replaces it). The task is on disk before the answer.
- ``DELETE /api/v1/tasks/{task_id}``: run the task no more (it was deleted on the server).
  A run under way finishes and its result is reported. Idempotent: 200 whether the
  agent had the task or not, so that the server's retries converge.
- ``GET /api/v1/agent/tasks``: the ids of every task the agent runs (for reconciliation).
- ``GET /api/v1/health``: liveness and a few counters (public; nothing secret).

Every route but the health check accepts only instructions signed by the agent's server
for this agent (:mod:`taskscheduler.signing`); anything else is 401.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.iweb import IRequest

from taskscheduler import protocol
from taskscheduler.agent.scheduler import Scheduler
from taskscheduler.agent.taskstore import TaskStore
from taskscheduler.protocol import InvalidMessage
from taskscheduler.schedule import utc_now_from
from taskscheduler.signing import SCHEME, BadSignature, InstructionVerifier
from taskscheduler.web import (
    Access,
    AuthGate,
    bad_request,
    install_error_handlers,
    json_response,
    read_json,
    request_body,
    unauthorized,
)

#: Largest request body the agent accepts: a task spec is at most a 64 KiB command.
MAX_BODY_BYTES = 1024 * 1024


class StorageError(Exception):
    """The agent could not write its data folder; nothing was acknowledged."""


class AgentAPI:
    """The HTTP API of ``twistd taskscheduler-agent``."""

    app = Klein()
    log = Logger()

    #: Who may call each route (by endpoint name). A route missing here is refused.
    ACCESS: dict[str, Access] = {
        "schedule": Access.SERVER,
        "unschedule": Access.SERVER,
        "task_ids": Access.SERVER,
        "health": Access.PUBLIC,
    }

    def __init__(
        self,
        agent_id: uuid.UUID,
        scheduler: Scheduler,
        task_store: TaskStore,
        clock: IReactorTime,
        counters: Callable[[], dict[str, int]] = dict,
        verifier: InstructionVerifier | None = None,
    ) -> None:
        self._agent_id = agent_id
        self._scheduler = scheduler
        self._task_store = task_store
        self._clock = clock
        self._counters = counters
        # Without a verifier nothing is accepted: no key, no instruction.
        self.verifier = verifier or InstructionVerifier(agent_id, clock)

    def resource(self) -> Any:
        return AuthGate(self.app.resource(), self.app.url_map, self.ACCESS, self._authorize)

    async def _authorize(self, request: IRequest, level: Access) -> None:
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        try:
            self.verifier.verify(
                request.method.decode("ascii"),
                request.uri.decode("utf-8", "replace"),
                values[0] if len(values) == 1 else None,
                request_body(request),
            )
        except BadSignature as e:
            self.log.warn(
                "refused an instruction from {peer}: {reason}",
                peer=str(request.getClientAddress()),
                reason=str(e),
            )
            raise unauthorized(str(e), f'{SCHEME} realm="taskscheduler-agent"'.encode()) from None

    @app.route("/api/v1/tasks/schedule", methods=["POST"])
    def schedule(self, request: IRequest) -> bytes:
        body = read_json(request)
        try:
            spec = protocol.parse_task_spec(body, utc_now_from(self._clock.seconds()))
        except InvalidMessage as e:
            raise bad_request(str(e)) from None
        current = self._scheduler.tasks.get(spec.task_id)
        if current is not None and isinstance(body, dict) and body.get("anchor") is None:
            # The seed's request carries no anchor: the same request sent again is the same
            # task, not a new one anchored at a new instant.
            spec = replace(spec, anchor=current.anchor)
        if spec != current:
            try:
                self._task_store.save(spec)
            except OSError as e:
                raise StorageError(str(e)) from e
            self._scheduler.schedule(spec)
            self.log.info(
                "{verb} task {task_id} ({frequency})",
                verb="scheduled" if current is None else "replaced",
                task_id=str(spec.task_id),
                frequency=str(spec.frequency),
            )
        return json_response(
            request,
            {"agent_id": str(self._agent_id), "task_id": str(spec.task_id), "status": "scheduled"},
        )

    @app.route("/api/v1/tasks/<task_id>", methods=["DELETE"])
    def unschedule(self, request: IRequest, task_id: str) -> bytes:
        try:
            parsed = protocol.parse_uuid(task_id, "task_id")
        except InvalidMessage as e:
            raise bad_request(str(e), "invalid_task_id") from None
        # The file first: if it cannot go, nothing changed and the server retries (a task
        # still on disk would come back at the next restart).
        try:
            self._task_store.delete(parsed)
        except OSError as e:
            raise StorageError(str(e)) from e
        if self._scheduler.unschedule(parsed):
            self.log.info("removed task {task_id}", task_id=str(parsed))
        return json_response(
            request,
            {"agent_id": str(self._agent_id), "task_id": str(parsed), "status": "removed"},
        )

    @app.route("/api/v1/agent/tasks", methods=["GET"])
    def task_ids(self, request: IRequest) -> bytes:
        return json_response(
            request,
            {
                "agent_id": str(self._agent_id),
                "task_ids": sorted(str(task_id) for task_id in self._scheduler.tasks),
            },
        )

    @app.route("/api/v1/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        body: dict[str, Any] = {
            "status": "ok",
            "agent_id": str(self._agent_id),
            "tasks": len(self._scheduler.tasks),
            "running": self._scheduler.running,
            # Whether the agent holds its server's key (has enrolled): no secret in it.
            "enrolled": self.verifier.public_key is not None,
        }
        body.update(self._counters())
        return json_response(request, body)

    @app.handle_errors(StorageError)
    def _storage_error(self, request: IRequest, failure: Failure) -> bytes:
        self.log.error("could not write the data folder: {error}", error=str(failure.value))
        request.setHeader(b"Retry-After", b"5")
        return json_response(
            request,
            {
                "error": {
                    "code": "storage_unavailable",
                    "message": "the agent could not store the task; nothing changed, retry later",
                }
            },
            http.SERVICE_UNAVAILABLE,
        )

    install_error_handlers(app, log)
