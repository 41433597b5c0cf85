"""The agent's HTTP API (Klein): what its server calls.

- ``POST /api/v1/tasks/schedule``: run a task here (idempotent). The same ``task_id``
  with a higher ``revision`` replaces it (runs under way finish as they were; its next
  instants, planned from now, are the new spec's); an equal or lower revision is
  answered ``scheduled`` and changes nothing. A body without ``revision`` (the seed's)
  with a different spec replaces it, as before revisions. The task is on disk before
  the answer. The body is one task, or a batch ``{"tasks": [...]}`` of up to
  :data:`MAX_BATCH_TASKS` (one signature for them all): each task is taken or refused
  on its own, and the answer's ``results`` say so, in the order asked.
- ``POST /api/v1/tasks/{task_id}/run`` ``{"scheduled_at", "revision"}``: run the task
  once now, as the manual run labelled ``scheduled_at`` (an operator's run-now), under
  the usual admission rules (:mod:`taskscheduler.agent.admission`). 202 ``accepted``, or
  ``duplicate`` when that run was accepted before (also before a restart): it is not
  run again; 404 ``unknown_task`` if the agent does not have the task.
- ``DELETE /api/v1/tasks/{task_id}``: run the task no more (it was deleted on the server).
  A run under way finishes and its result is reported. Idempotent: 200 whether the
  agent had the task or not, so that the server's retries converge.
- ``GET /api/v1/agent/tasks``: the ids of every task the agent runs (for reconciliation).
- ``POST /api/v1/agent/leave`` ``{"reason": "removed"|"revoked"}``: the agent left the
  fleet: drop every task (runs under way finish), and say so in the health
  (:class:`~taskscheduler.agent.heartbeat.Membership`).
- ``GET /api/v1/health``: liveness and a few counters (public; nothing secret).
- ``GET /metrics``: Prometheus metrics (:mod:`taskscheduler.agent.metrics`), for the
  token of ``--metrics-token-file`` (the ``OPERATOR`` level here), or anyone on a
  loopback listener or with ``--metrics-public`` (:meth:`AgentAPI.open_metrics`).

Every other route but the health check accepts only instructions signed by the agent's
server for this agent (:mod:`taskscheduler.signing`); anything else is 401.

The task files are written off the reactor thread (:class:`TaskStore`), so a change of a
task is answered, and applied to the scheduler, only once it is on disk. Changes of one
task are applied in the order they came: a request sees the changes asked before it,
even those still being written, and an identical one waits for them.

It runs past 400 lines because it is one Klein app: every route shares the signature
check, the body limits and the per-task change queue above, which a split would spread
over modules that each need all of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from taskscheduler import protocol
from taskscheduler.agent.heartbeat import MEMBER, REASONS, Membership
from taskscheduler.agent.metrics import AgentMetrics
from taskscheduler.agent.scheduler import Scheduler
from taskscheduler.agent.taskstore import TaskStore
from taskscheduler.metrics import MetricsToken, metrics_page
from taskscheduler.protocol import MAX_REVISION, InvalidMessage, TaskSpec
from taskscheduler.protocol.fields import parse_int, parse_time, require
from taskscheduler.protocol.labels import NO_LABELS
from taskscheduler.schedule import format_instant, utc_now_from
from taskscheduler.signing import SCHEME, BadSignature, InstructionVerifier
from taskscheduler.web.errors import (
    BAD_REQUEST,
    BATCH_ENTRY_FAILED,
    INVALID_TASK_ID,
    STORAGE_UNAVAILABLE,
    UNKNOWN_TASK,
    ApiError,
    unauthorized,
)
from taskscheduler.web.gate import Access, AuthGate
from taskscheduler.web.requests import read_json, request_body
from taskscheduler.web.responses import App, DomainError, install_error_handlers, json_response

#: Largest request body the agent accepts: a task spec is at most a 64 KiB command.
MAX_BODY_BYTES = 1024 * 1024
#: Most tasks in one batch (within MAX_BODY_BYTES, which bounds it first in practice).
MAX_BATCH_TASKS = 1000
_METRICS_CHALLENGE = b'Bearer realm="taskscheduler-agent-metrics"'


class StorageError(Exception):
    """The agent could not write its data folder; nothing was acknowledged."""


@dataclass
class _Change:
    """A change of one task being written: what later requests must see, and who waits."""

    spec: TaskSpec | None  # None: the task is being removed
    waiters: list[Deferred[None]] = field(default_factory=list)


class AgentAPI:
    """The HTTP API of ``twistd taskscheduler-agent``."""

    app = App()
    log = Logger()

    #: Who may call each route (by endpoint name). A route missing here is refused.
    ACCESS: dict[str, Access] = {
        "schedule": Access.SERVER,
        "unschedule": Access.SERVER,
        "run_now": Access.SERVER,
        "task_ids": Access.SERVER,
        "leave": Access.SERVER,
        "health": Access.PUBLIC,
        # Not the server's: the bearer token of --metrics-token-file (open on loopback).
        "metrics": Access.OPERATOR,
    }

    def __init__(
        self,
        agent_id: uuid.UUID,
        scheduler: Scheduler,
        task_store: TaskStore,
        clock: IReactorTime,
        counters: Callable[[], dict[str, Any]] = dict,
        verifier: InstructionVerifier | None = None,
        membership: Membership | None = None,
        *,
        labels: Mapping[str, str] = NO_LABELS,
        metrics: AgentMetrics | None = None,
        metrics_token: MetricsToken | None = None,
    ) -> None:
        self._agent_id = agent_id
        self._labels = labels
        self._scheduler = scheduler
        self._task_store = task_store
        self._clock = clock
        self._counters = counters
        # The last change asked for each task, until it is on disk and applied.
        self._changes: dict[uuid.UUID, _Change] = {}
        # Without a verifier nothing is accepted: no key, no instruction.
        self.verifier = verifier or InstructionVerifier(agent_id, clock)
        self.membership = membership or Membership()
        self.agent_metrics = metrics or AgentMetrics()
        #: Who may read /metrics when it is not open (None: nobody).
        self._metrics_token = metrics_token
        self._gate: AuthGate | None = None
        self._metrics_open = False

    def resource(self) -> Any:
        self._gate = AuthGate(
            self.app.resource(),
            self.app.url_map,
            self.ACCESS,
            self._authorize,
            self._check_headers,
            self.agent_metrics.http.observe,
        )
        if self._metrics_open:
            self._gate.open_route("metrics")
        return self._gate

    def open_metrics(self) -> None:
        """Let anyone read ``/metrics``: the agent listens on loopback only, or
        ``--metrics-public`` says so."""
        self._metrics_open = True
        if self._gate is not None:
            self._gate.open_route("metrics")

    def _check_headers(self, headers: Any, level: Access) -> ApiError | None:
        """Refuse, before its body is read, a request that carries no signature at all (the
        signature covers the body, so it is checked once the body is in)."""
        if level is Access.OPERATOR:
            return self._metrics_refusal(headers)
        values = headers.getRawHeaders(b"authorization") or []
        if len(values) == 1 and values[0].strip().startswith(SCHEME.encode("ascii") + b" "):
            return None
        return unauthorized(
            "this request needs a signature from the agent's server",
            f'{SCHEME} realm="taskscheduler-agent"'.encode(),
        )

    def _metrics_refusal(self, headers: Any) -> ApiError | None:
        if self._metrics_token is not None and self._metrics_token.accepts(headers):
            return None
        return unauthorized(
            "/metrics needs the token of the agent's --metrics-token-file"
            if self._metrics_token is not None
            else "/metrics is closed: give the agent --metrics-token-file or --metrics-public",
            _METRICS_CHALLENGE,
        )

    async def _authorize(self, request: IRequest, level: Access) -> None:
        if level is Access.OPERATOR:
            refusal = self._metrics_refusal(request.requestHeaders)
            if refusal is not None:
                raise refusal
            return
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
    async def schedule(self, request: IRequest) -> bytes:
        body = read_json(request)
        if isinstance(body, dict) and "tasks" in body:
            return json_response(request, await self._schedule_batch(body))
        try:
            spec = await self._schedule(body)
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        return json_response(
            request,
            {"agent_id": str(self._agent_id), "task_id": str(spec.task_id), "status": "scheduled"},
        )

    async def _schedule_batch(self, body: dict[str, Any]) -> dict[str, Any]:
        """Schedule each task of a batch on its own; what became of each, in order."""
        tasks = body["tasks"]
        if set(body) != {"tasks"} or not isinstance(tasks, list) or not tasks:
            raise BAD_REQUEST("a batch is an object whose only field 'tasks' is a non-empty list")
        if len(tasks) > MAX_BATCH_TASKS:
            raise BAD_REQUEST(f"a batch holds at most {MAX_BATCH_TASKS} tasks")
        # Started in order, so that a task twice in a batch ends as its last entry asks.
        pending = [Deferred.fromCoroutine(self._schedule(task)) for task in tasks]
        outcomes: list[tuple[bool, Any]] = await DeferredList(pending, consumeErrors=True)
        results: list[dict[str, Any]] = []
        storage_error: str | None = None
        for task, (ok, value) in zip(tasks, outcomes, strict=True):
            entry: dict[str, Any] = {}
            if isinstance(task, dict) and isinstance(task.get("task_id"), str):
                entry["task_id"] = task["task_id"][:64]
            if ok:
                entry.update(task_id=str(value.task_id), status="scheduled")
            elif value.check(InvalidMessage):
                entry["error"] = BAD_REQUEST(str(value.value)).json()
            elif value.check(StorageError):
                storage_error = value.getErrorMessage()
                entry["error"] = STORAGE_UNAVAILABLE().json()
            else:
                self.log.failure("could not schedule a task of a batch", value)
                entry["error"] = BATCH_ENTRY_FAILED().json()
            results.append(entry)
        if storage_error is not None:  # once a batch, not once a task
            self.log.error("could not write the data folder: {error}", error=storage_error)
        return {"agent_id": str(self._agent_id), "results": results}

    async def _schedule(self, body: Any) -> TaskSpec:
        """Store and apply one task (InvalidMessage if it is not one); the task."""
        spec = protocol.parse_task_spec(body, utc_now_from(self._clock.seconds()))
        current = self._wanted(spec.task_id)
        if current is not None and isinstance(body, dict):
            if body.get("revision") is not None and spec.revision <= current.revision:
                # A newer (or the same) revision is here already: a late delivery of an
                # older one must not undo it.
                if spec.revision < current.revision:
                    self.log.info(
                        "kept revision {current} of task {task_id} (was sent revision {sent})",
                        current=current.revision,
                        task_id=str(spec.task_id),
                        sent=spec.revision,
                    )
                await self._written(spec.task_id)
                return current
            if body.get("anchor") is None:
                # The seed's request carries no anchor: the same request sent again is the
                # same task, not a new one anchored at a new instant.
                spec = replace(spec, anchor=current.anchor)
        if spec != current:
            await self._change(spec.task_id, spec)
        else:
            await self._written(spec.task_id)
        return spec

    @app.route("/api/v1/tasks/<task_id>", methods=["DELETE"])
    async def unschedule(self, request: IRequest, task_id: str) -> bytes:
        try:
            parsed = protocol.parse_uuid(task_id, "task_id")
        except InvalidMessage as e:
            raise INVALID_TASK_ID(str(e)) from None
        # The file first: if it cannot go, nothing changed and the server retries (a task
        # still on disk would come back at the next restart).
        await self._change(parsed, None)
        return json_response(
            request,
            {"agent_id": str(self._agent_id), "task_id": str(parsed), "status": "removed"},
        )

    @app.route("/api/v1/tasks/<task_id>/run", methods=["POST"])
    async def run_now(self, request: IRequest, task_id: str) -> bytes:
        try:
            parsed = protocol.parse_uuid(task_id, "task_id")
        except InvalidMessage as e:
            raise INVALID_TASK_ID(str(e)) from None
        body = read_json(request)
        try:
            scheduled_at, revision = parse_run_now(body)
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        # The changes of the task asked before this request apply first (one that fails
        # is answered to its own request: the task stays as it was).
        await self._written(parsed).addErrback(lambda _: None)
        spec = self._scheduler.tasks.get(parsed)
        if spec is None and self.membership.state == MEMBER:
            # A task it does not hold (paused): the server sends it along, to run once.
            spec = _carried_spec(body, parsed, scheduled_at)
        if spec is None:
            raise UNKNOWN_TASK("this agent does not run this task")
        try:
            accepted = await self._scheduler.run_now(spec, scheduled_at)
        except OSError as e:
            raise StorageError(str(e)) from None
        if accepted:
            self.log.info(
                "task {task_id}: manual run {scheduled_at} (revision {revision}; the server "
                "asked for revision {asked})",
                task_id=str(parsed),
                scheduled_at=format_instant(scheduled_at),
                revision=spec.revision,
                asked="any" if revision is None else revision,
            )
        return json_response(
            request,
            {
                "agent_id": str(self._agent_id),
                "task_id": str(parsed),
                "scheduled_at": format_instant(scheduled_at),
                "status": "accepted" if accepted else "duplicate",
            },
            202,
        )

    def _wanted(self, task_id: uuid.UUID) -> TaskSpec | None:
        """The task as the requests so far asked for it (None: absent or being removed)."""
        change = self._changes.get(task_id)
        return change.spec if change is not None else self._scheduler.tasks.get(task_id)

    def _written(self, task_id: uuid.UUID) -> Deferred[None]:
        """Fires once the change of ``task_id`` being written, if any, is on disk."""
        change = self._changes.get(task_id)
        if change is None:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        change.waiters.append(waiter)
        return waiter

    def _change(self, task_id: uuid.UUID, spec: TaskSpec | None) -> Deferred[None]:
        """Store ``spec`` (None: remove the task), then apply it to the scheduler.

        Fires once both are done (StorageError if the disk refused: nothing changed).
        The write goes on, and is applied, even if the caller stops waiting: a request
        whose client went away must not leave the disk and the scheduler disagreeing.
        """
        change = _Change(spec)
        self._changes[task_id] = change
        waiter = self._written(task_id)
        if spec is None:
            writing = maybeDeferred(self._task_store.delete, task_id)
        else:
            writing = maybeDeferred(self._task_store.save, spec)
        writing.addBoth(self._stored, task_id, change)
        return waiter

    def _stored(self, outcome: object, task_id: uuid.UUID, change: _Change) -> None:
        # The store applies the changes in the order asked, so they arrive here in order.
        if self._changes.get(task_id) is change:
            del self._changes[task_id]
        if isinstance(outcome, Failure):
            failure = outcome
            if outcome.check(OSError):
                failure = Failure(StorageError(outcome.getErrorMessage()))
            for waiter in change.waiters:
                waiter.errback(failure)
            return
        try:
            self._apply(task_id, change.spec)
        except Exception:
            failure = Failure()
            self.log.failure(
                "could not apply a change of task {task_id}", failure, task_id=str(task_id)
            )
            for waiter in change.waiters:
                waiter.errback(failure)
            return
        for waiter in change.waiters:
            waiter.callback(None)

    def _apply(self, task_id: uuid.UUID, spec: TaskSpec | None) -> None:
        if spec is None:
            if self._scheduler.unschedule(task_id):
                self.log.info("removed task {task_id}", task_id=str(task_id))
            return
        replaced = task_id in self._scheduler.tasks
        self._scheduler.schedule(spec)
        self.log.info(
            "{verb} task {task_id} ({frequency}, revision {revision})",
            verb="replaced" if replaced else "scheduled",
            task_id=str(task_id),
            frequency=str(spec.frequency or spec.cron),
            revision=spec.revision,
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

    @app.route("/api/v1/agent/leave", methods=["POST"])
    async def leave(self, request: IRequest) -> bytes:
        """Drop every task: the server took this agent out of its fleet, or revoked it."""
        body = read_json(request)
        reason = body.get("reason") if isinstance(body, dict) else None
        if reason not in REASONS:
            raise BAD_REQUEST(f"'reason' must be one of {', '.join(REASONS)}")
        held = set(self._scheduler.tasks) | {
            task_id for task_id, change in self._changes.items() if change.spec is not None
        }
        # On disk first, as for a removal: if a file cannot go, the server asks again.
        for task_id in sorted(held):
            await self._change(task_id, None)
        self.membership.left(reason, len(held))
        return json_response(
            request, {"agent_id": str(self._agent_id), "status": "left", "reason": reason}
        )

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        return metrics_page(request, self.agent_metrics.registry)

    @app.route("/api/v1/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        body: dict[str, Any] = {
            "status": "ok",
            "agent_id": str(self._agent_id),
            "tasks": len(self._scheduler.tasks),
            "running": self._scheduler.running,
            # Whether the agent holds its server's key (has enrolled): no secret in it.
            "enrolled": self.verifier.public_key is not None,
            # What the server said: told to leave (removed, revoked), and in its fleet.
            "membership": self.membership.state,
            "in_fleet": self.membership.in_fleet,
            # What it tells the server it is: an operator checks a restart took them.
            "labels": dict(self._labels),
        }
        body.update(self._counters())
        return json_response(request, body)


def parse_run_now(body: object) -> tuple[datetime, int | None]:
    """``POST /api/v1/tasks/{task_id}/run``: the run's ``scheduled_at`` and the revision
    the server asked for (None if not said). Fields it does not know are ignored: a newer
    server may send more."""
    if not isinstance(body, Mapping):
        raise InvalidMessage("the request body must be a JSON object")
    scheduled_at = parse_time(require(body, "scheduled_at"), "scheduled_at")
    revision = body.get("revision")
    return scheduled_at, (
        None if revision is None else parse_int(revision, "revision", 1, MAX_REVISION)
    )


#: The agent's domain exceptions, as the error table answers them.
AGENT_ERRORS: dict[type[Exception], DomainError] = {
    StorageError: DomainError(
        STORAGE_UNAVAILABLE, "could not write the data folder: {error}", LogLevel.error
    ),
}
install_error_handlers(AgentAPI.app, AgentAPI.log, AGENT_ERRORS)


def _carried_spec(body: Any, task_id: uuid.UUID, received_at: datetime) -> TaskSpec | None:
    """The task a run-now carries (``"task"``, as the server sends a paused one), if it is
    readable and is ``task_id``; None otherwise (the run is then refused as unknown)."""
    carried = body.get("task") if isinstance(body, Mapping) else None
    if carried is None:
        return None
    try:
        spec = protocol.parse_task_spec(carried, received_at)
    except InvalidMessage:
        return None
    return spec if spec.task_id == task_id else None
