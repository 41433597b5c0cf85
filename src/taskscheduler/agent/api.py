"""The agent's HTTP API (Klein): what its server calls.

- ``POST /api/v1/tasks/schedule``: run a task here (idempotent; the same ``task_id`` with
  a different spec replaces it). The task is on disk before the answer.
- ``GET /api/v1/agent/tasks``: the ids of every task the agent runs (for reconciliation).
- ``GET /api/v1/health``: liveness and a few counters.
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
from taskscheduler.web import bad_request, install_error_handlers, json_response, read_json

#: Largest request body the agent accepts: a task spec is at most a 64 KiB command.
MAX_BODY_BYTES = 1024 * 1024


class StorageError(Exception):
    """The agent could not write its data folder; nothing was acknowledged."""


class AgentAPI:
    """The HTTP API of ``twistd taskscheduler-agent``."""

    app = Klein()
    log = Logger()

    def __init__(
        self,
        agent_id: uuid.UUID,
        scheduler: Scheduler,
        task_store: TaskStore,
        clock: IReactorTime,
        counters: Callable[[], dict[str, int]] = dict,
    ) -> None:
        self._agent_id = agent_id
        self._scheduler = scheduler
        self._task_store = task_store
        self._clock = clock
        self._counters = counters

    def resource(self) -> Any:
        return self.app.resource()

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
