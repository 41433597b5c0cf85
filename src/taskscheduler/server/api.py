"""The server's REST API (Klein): the seed's endpoints plus what the protocol needs.

Routes only translate between HTTP and the domain; errors map to statuses in one place
(the ``handle_errors`` below and :func:`taskscheduler.web.install_error_handlers`).

Access is decided before a route runs, by :class:`taskscheduler.web.AuthGate` with
:data:`ServerAPI.ACCESS` (every route must be listed there, or it is refused) and
:class:`taskscheduler.server.access.ServerAccess`.
"""

from __future__ import annotations

import dataclasses
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
from taskscheduler.auth import AGENT_PREFIX, hash_token, new_token
from taskscheduler.protocol import InvalidMessage, RunResult, TaskSpec
from taskscheduler.schedule import (
    InstantOutOfRange,
    format_instant,
    parse_instant,
    utc_now_from,
)
from taskscheduler.server.access import Principal, ServerAccess, principal_of
from taskscheduler.server.ratelimit import RateLimiter, retry_after
from taskscheduler.server.store.interface import (
    AgentConflict,
    AgentRecord,
    AuditEvent,
    Execution,
    RecordOutcome,
    Store,
    StoreUnavailable,
    Task,
    UnknownTask,
)
from taskscheduler.server.store.rules import is_complete
from taskscheduler.web import (
    Access,
    ApiError,
    AuthGate,
    bad_request,
    forbidden,
    install_error_handlers,
    json_response,
    peer_address,
    read_json,
)

#: How long after an execution's time limit the server waits for missing agents
#: before calling the execution complete without them.
DEFAULT_REPORT_GRACE = timedelta(seconds=30)
#: Most bytes of each stream of a result stored (``--max-output-bytes``): the agents'
#: default ``--output-cap``. Past it the head and tail are kept, flagged truncated.
DEFAULT_MAX_OUTPUT_BYTES = 1024 * 1024


class ServerAPI:
    """The HTTP API of ``twistd taskscheduler-server``."""

    app = Klein()
    log = Logger()

    #: Who may call each route (by endpoint name). A route missing here is refused.
    ACCESS: dict[str, Access] = {
        "create_task": Access.OPERATOR,
        "get_task": Access.OPERATOR,
        "delete_task": Access.OPERATOR,
        "latest_output": Access.OPERATOR,
        "executions": Access.OPERATOR,
        "list_agents": Access.OPERATOR,
        "revoke_agent": Access.OPERATOR,
        "release_agent_url": Access.OPERATOR,
        "audit": Access.OPERATOR,
        "complete": Access.AGENT,
        "complete_batch": Access.AGENT,
        "enrol": Access.JOIN,
        "health": Access.PUBLIC,
    }

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        access: ServerAccess,
        on_task_created: Callable[[Task], None] = lambda task: None,
        report_grace: timedelta = DEFAULT_REPORT_GRACE,
        *,
        server_public_key: str = "",
        on_agent_enrolled: Callable[[AgentRecord], None] = lambda agent: None,
        on_task_deleted: Callable[[Task], None] = lambda task: None,
        create_limiter: RateLimiter | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        clock_allowance: timedelta = protocol.CLOCK_ALLOWANCE,
    ) -> None:
        self._store = store
        self._clock = clock
        self._access = access
        self._on_task_created = on_task_created
        self._report_grace = report_grace
        self._server_public_key = server_public_key
        self._on_agent_enrolled = on_agent_enrolled
        self._on_task_deleted = on_task_deleted
        self._max_output_bytes = max_output_bytes
        self._clock_allowance = clock_allowance
        self._assignments: set[tuple[str, uuid.UUID]] = set()
        # Per operator token: one client's burst must not hold back everyone's tasks.
        self._create_limiter = create_limiter or RateLimiter(clock)

    def resource(self) -> Any:
        access = self._access
        return AuthGate(
            self.app.resource(),
            self.app.url_map,
            self.ACCESS,
            access.authorize,
            access.check_headers,
        )

    def _now(self) -> datetime:
        return utc_now_from(self._clock.seconds())

    def _audit(
        self, request: IRequest, principal: Principal, action: str, target: str, **details: Any
    ) -> AuditEvent:
        return AuditEvent(
            at=self._now(),
            actor=principal.actor,
            action=action,
            target=target,
            peer=peer_address(request),
            details=details,
        )

    # -- operators ---------------------------------------------------------------------

    @app.route("/api/v1/tasks/create", methods=["POST"])
    async def create_task(self, request: IRequest) -> bytes:
        wait = self._create_limiter.take(principal_of(request).actor)
        if wait:
            raise ApiError(
                429,  # twisted.web.http has no name for it
                "rate_limited",
                f"this token may create {self._create_limiter.rate:g} tasks a second "
                f"({self._create_limiter.burst} at once); retry later",
                {b"Retry-After": retry_after(wait)},
            )
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

    @app.route("/api/v1/tasks/<task_id>", methods=["GET"])
    async def get_task(self, request: IRequest, task_id: str) -> bytes:
        task = await self._store.get_task(_path_uuid(task_id))
        if task is None:
            raise UnknownTask(task_id)
        return json_response(request, _task_json(task))

    @app.route("/api/v1/tasks/<task_id>", methods=["DELETE"])
    async def delete_task(self, request: IRequest, task_id: str) -> bytes:
        """Stop a task everywhere: its agents are told to drop it; its history stays."""
        parsed = _path_uuid(task_id)
        principal = principal_of(request)
        audit = self._audit(request, principal, "task.deleted", str(parsed))
        task = await self._store.delete_task(parsed, self._now(), audit)
        if task is None:
            if await self._store.get_task(parsed) is not None:
                raise ApiError(http.NOT_FOUND, "task_deleted", "this task is already deleted")
            raise UnknownTask(task_id)
        self.log.info("{actor} deleted task {task_id}", actor=principal.actor, task_id=str(parsed))
        self._on_task_deleted(task)
        return json_response(request, {"task_id": str(parsed), "status": "deleted"})

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
            result = self._capped(protocol.parse_result(read_json(request), parsed_id))
        except InvalidMessage as e:
            raise bad_request(str(e)) from None
        agent = self._reporting_agent(request, [result])
        if not await self._assigned(agent.url, [result.task_id]):
            self._log_not_assigned(agent, [result.task_id])
            raise forbidden("this task is not assigned to this agent", "not_assigned")
        [early] = await self._too_early(agent, [result])
        if early is not None:
            status = protocol.RETRY_LATER_RESULT_ERRORS["too_early"]
            raise ApiError(status, "too_early", f"{early}; send it again later")
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
        if outcome is RecordOutcome.DELETED:
            raise ApiError(
                http.NOT_FOUND,
                "task_deleted",
                "this task was deleted before this result's scheduled instant",
            )
        if outcome is RecordOutcome.MISALIGNED:
            raise bad_request(
                "'scheduled_at' is not one of this task's scheduled instants", "misaligned"
            )
        return json_response(request, {"status": outcome.value})

    @app.route("/api/v1/results", methods=["POST"])
    async def complete_batch(self, request: IRequest) -> bytes:
        try:
            results = [self._capped(r) for r in protocol.parse_result_batch(read_json(request))]
        except InvalidMessage as e:
            raise bad_request(str(e)) from None
        agent = self._reporting_agent(request, results)
        assigned = await self._assigned(agent.url, [r.task_id for r in results])
        # Only the agent's own tasks are looked at (and looked up).
        checked = iter(await self._too_early(agent, [r for r in results if r.task_id in assigned]))
        early = [next(checked) if r.task_id in assigned else None for r in results]
        mine = [r for r, e in zip(results, early, strict=True) if r.task_id in assigned and not e]
        if any(r.task_id not in assigned for r in results):
            self._log_not_assigned(agent, [r.task_id for r in results if r.task_id not in assigned])
        recorded = iter(await self._store.record_results(mine, self._now()) if mine else [])
        statuses = []
        for result, too_early in zip(results, early, strict=True):
            if result.task_id not in assigned:
                statuses.append({"status": "forbidden"})
                continue
            if too_early:
                statuses.append({"status": "too_early"})
                continue
            outcome = next(recorded)
            self._log_outcome(result, outcome)
            statuses.append({"status": outcome.value})
        return json_response(request, {"results": statuses})

    async def _assigned(self, url: str, task_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        """Those of ``task_ids`` assigned to the agent at ``url``.

        Assignments are made when a task is created and when the server starts with a new
        fleet, and never taken back while it runs, so a positive answer is remembered:
        a busy agent's reports cost no extra round trip. Negative answers are not.

        Deleting a task does not take its assignments back either: the results its agents
        ran at or before the deletion are still due. Whether a result comes too late (it
        is scheduled after the deletion) is decided by the store, against the task's
        ``deleted_at``, in the very statement that would insert it, so neither this cache
        nor another server's can let one in.
        """
        known = {t for t in task_ids if (url, t) in self._assignments}
        unknown = [t for t in dict.fromkeys(task_ids) if t not in known]
        if unknown:
            found = await self._store.assigned_among(url, unknown)
            if len(self._assignments) > _ASSIGNMENT_CACHE_SIZE:
                self._assignments.clear()
            self._assignments.update((url, t) for t in found)
            known |= found
        return known

    def _capped(self, result: RunResult) -> RunResult:
        """``result`` with each stream over ``--max-output-bytes`` trimmed as the agent
        trims: head and tail kept, flagged truncated, the size it declared kept. The
        same result sent twice is trimmed alike, so it is still a duplicate."""
        cap = self._max_output_bytes
        if len(result.stdout.data) <= cap and len(result.stderr.data) <= cap:
            return result
        return dataclasses.replace(
            result, stdout=result.stdout.trimmed(cap), stderr=result.stderr.trimmed(cap)
        )

    async def _too_early(self, agent: AgentRecord, results: list[RunResult]) -> list[str | None]:
        """For each of ``results``, why it is dated later than it can have been produced
        (:func:`protocol.too_early`), or None. Refused for now, not for good."""
        now = self._now()
        early: list[str | None] = []
        limits: dict[uuid.UUID, timedelta | None] = {}
        for result in results:
            # First as if the time limit were 0: an honest result passes with no look-up.
            why = protocol.too_early(result, now, timedelta(0), self._clock_allowance)
            if why is not None:
                if result.task_id not in limits:
                    task = await self._store.get_task(result.task_id)
                    limits[result.task_id] = None if task is None else task.spec.time_limit
                limit = limits[result.task_id]
                # (an unknown task is the store's to answer)
                if limit is not None:
                    why = protocol.too_early(result, now, limit, self._clock_allowance)
                else:
                    why = None
            early.append(why)
        refused = [why for why in early if why is not None]
        if refused:
            self.log.warn(
                "agent {agent_id} reported {count} result(s) dated ahead of this server's "
                "clock (first: {why}): refused until the clock reaches them",
                agent_id=str(agent.agent_id),
                count=len(refused),
                why=refused[0],
            )
        return early

    def _reporting_agent(self, request: IRequest, results: list[RunResult]) -> AgentRecord:
        """The agent whose credential the request carries; it may report only as itself."""
        agent = principal_of(request).agent
        assert agent is not None
        others = {r.agent_id for r in results} - {agent.agent_id}
        if others:
            self.log.warn(
                "agent {agent_id} ({peer}) tried to report results as {others}: refused",
                agent_id=str(agent.agent_id),
                peer=peer_address(request),
                others=", ".join(sorted(str(o) for o in others)),
            )
            raise forbidden(
                "'server_id' must be the id of the agent whose credential is used",
                "impersonation",
            )
        return agent

    def _log_not_assigned(self, agent: AgentRecord, task_ids: list[uuid.UUID]) -> None:
        self.log.warn(
            "agent {agent_id} reported results of {count} task(s) not assigned to it "
            "(first: {task_id}): refused",
            agent_id=str(agent.agent_id),
            count=len(task_ids),
            task_id=str(task_ids[0]),
        )

    # -- enrolment and the fleet's identities ------------------------------------------

    @app.route("/api/v1/agents/enrol", methods=["POST"])
    async def enrol(self, request: IRequest) -> bytes:
        """An agent with a join secret enrols: ``{"agent_id", "url"}`` -> its credential."""
        body = read_json(request)
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        try:
            agent_id = protocol.parse_uuid(body.get("agent_id"), "agent_id")
        except InvalidMessage as e:
            raise bad_request(str(e)) from None
        url = body.get("url")
        if (
            not isinstance(url, str)
            or not url.startswith(("http://", "https://"))
            or len(url) > 2000
            or any(c.isspace() for c in url)
        ):
            raise bad_request("'url' must be the agent's base URL, like http://host:8081")
        try:
            protocol.utf8_of(url, "url")
        except InvalidMessage as e:
            raise bad_request(str(e)) from None
        url = url.rstrip("/")
        principal = principal_of(request)
        credential = new_token(AGENT_PREFIX)
        audit = self._audit(request, principal, "agent.enrolled", str(agent_id), url=url)
        try:
            record = await self._store.enrol_agent(
                agent_id, url, hash_token(credential), self._now(), audit
            )
        except AgentConflict as e:
            self.log.warn(
                "refused to enrol agent {agent_id} at {url} ({peer}): {error}",
                agent_id=str(agent_id),
                url=url,
                peer=peer_address(request),
                error=e.message,
            )
            raise ApiError(http.CONFLICT, e.code, _CONFLICT_MESSAGES[e.code]) from None
        self.log.info(
            "enrolled agent {agent_id} at {url} with join secret {name}",
            agent_id=str(agent_id),
            url=url,
            name=principal.name,
        )
        self._on_agent_enrolled(record)
        return json_response(
            request,
            {
                "agent_id": str(agent_id),
                "credential": credential,
                "server_public_key": self._server_public_key,
            },
            http.CREATED,
        )

    @app.route("/api/v1/agents", methods=["GET"])
    async def list_agents(self, request: IRequest) -> bytes:
        agents = await self._store.list_agents()
        return json_response(request, {"agents": [_agent_json(a) for a in agents]})

    @app.route("/api/v1/agents/<agent_id>", methods=["DELETE"])
    async def revoke_agent(self, request: IRequest, agent_id: str) -> bytes:
        """Revoke an agent's credential: its next request is refused."""
        try:
            parsed = protocol.parse_uuid(agent_id, "agent_id")
        except InvalidMessage as e:
            raise bad_request(str(e), "invalid_agent_id") from None
        principal = principal_of(request)
        audit = self._audit(request, principal, "agent.revoked", str(parsed))
        record = await self._store.revoke_agent(parsed, self._now(), audit)
        self._access.forget_agents()
        if record is None:
            raise ApiError(http.NOT_FOUND, "unknown_agent", "no live agent has this id")
        self.log.info(
            "{actor} revoked agent {agent_id} at {url}",
            actor=principal.actor,
            agent_id=str(parsed),
            url=record.url,
        )
        return json_response(request, _agent_json(record))

    @app.route("/api/v1/agents/<agent_id>/release-url", methods=["POST"])
    async def release_agent_url(self, request: IRequest, agent_id: str) -> bytes:
        """Let a new agent enrol at the URL of a revoked one: an operator's decision, audited.

        Until then a join secret cannot enrol there (409 ``url_revoked``), so that whoever
        holds it cannot take the revoked agent's place and have its results stored.
        """
        try:
            parsed = protocol.parse_uuid(agent_id, "agent_id")
        except InvalidMessage as e:
            raise bad_request(str(e), "invalid_agent_id") from None
        principal = principal_of(request)
        audit = self._audit(request, principal, "agent.url_released", str(parsed))
        try:
            record = await self._store.release_agent_url(parsed, self._now(), audit)
        except AgentConflict as e:
            raise ApiError(http.CONFLICT, e.code, _CONFLICT_MESSAGES[e.code]) from None
        if record is None:
            raise ApiError(http.NOT_FOUND, "unknown_agent", "no agent has this id")
        self.log.info(
            "{actor} released the URL {url} of revoked agent {agent_id}",
            actor=principal.actor,
            agent_id=str(parsed),
            url=record.url,
        )
        return json_response(request, _agent_json(record))

    @app.route("/api/v1/audit", methods=["GET"])
    async def audit(self, request: IRequest) -> bytes:
        """The audit log, newest first: ``?limit=N`` (1-1000) ``&before=<event id>``."""
        limit = _query_int(request, "limit", default=100, low=1, high=1000)
        before_text = _query_arg(request, "before")
        before = None
        if before_text is not None:
            if not before_text.isascii() or not before_text.isdigit() or len(before_text) > 18:
                raise bad_request("query parameter 'before' must be an event id")
            before = int(before_text)
        events = await self._store.audit_events(limit, before)
        return json_response(
            request,
            {
                "events": [
                    {
                        "id": e.event_id,
                        "at": format_instant(e.at),
                        "actor": e.actor,
                        "action": e.action,
                        "target": e.target,
                        "peer": e.peer,
                        "details": e.details,
                    }
                    for e in events
                ],
                "next_before": events[-1].event_id if len(events) == limit else None,
            },
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


#: (agent URL, task) assignments remembered before the cache is emptied and refilled.
_ASSIGNMENT_CACHE_SIZE = 1_000_000

_CONFLICT_MESSAGES = {
    "agent_exists": "this agent id is already enrolled; a join secret cannot enrol it again",
    "url_taken": "another live agent is enrolled at this URL; an operator must revoke it first",
    "url_revoked": "the agent at this URL was revoked; an operator must release its URL "
    "(POST /api/v1/agents/<agent_id>/release-url) before another agent enrols there",
    "agent_live": "this agent is not revoked: revoke it before releasing its URL",
}


def _agent_json(agent: AgentRecord) -> dict[str, Any]:
    return {
        "agent_id": str(agent.agent_id),
        "url": agent.url,
        "enrolled_at": format_instant(agent.enrolled_at),
        "revoked_at": None if agent.revoked_at is None else format_instant(agent.revoked_at),
        "url_released_at": (
            None if agent.url_released_at is None else format_instant(agent.url_released_at)
        ),
    }


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
    # Its length first: Python refuses to convert more than 4300 digits (a ValueError).
    if (
        not text.isascii()
        or not text.isdigit()
        or len(text) > len(str(high))
        or not low <= int(text) <= high
    ):
        raise bad_request(f"query parameter '{name}' must be an integer from {low} to {high}")
    return int(text)


def _query_instant(request: IRequest, name: str) -> datetime | None:
    text = _query_arg(request, name)
    if text is None:
        return None
    try:
        return parse_instant(text)
    except InstantOutOfRange as e:
        raise bad_request(f"query parameter '{name}': {e}") from None
    except ValueError:
        raise bad_request(
            f"query parameter '{name}' must be an RFC 3339 timestamp with a time zone"
        ) from None


def _task_json(task: Task) -> dict[str, Any]:
    body = protocol.task_spec_to_json(task.spec)
    body["created_at"] = format_instant(task.created_at)
    body["deleted_at"] = None if task.deleted_at is None else format_instant(task.deleted_at)
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
    if result.reason is not None:
        body["reason"] = result.reason
    body.update(protocol.output_to_json("stdout", result.stdout))
    body.update(protocol.output_to_json("stderr", result.stderr))
    body["exit_code"] = result.exit_code
    if result.signal is not None:
        body["signal"] = result.signal
    body["started_at"] = None if result.started_at is None else format_instant(result.started_at)
    body["finished_at"] = None if result.finished_at is None else format_instant(result.finished_at)
    return body
