"""The agents' result routes: one result, a batch, and the checks before one is stored
(the reporting agent is itself, the task is assigned to it, the result is not dated ahead
of this server's clock)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta

from twisted.web.iweb import IRequest

from taskscheduler import protocol
from taskscheduler.protocol import InvalidMessage, RunResult
from taskscheduler.schedule import format_instant
from taskscheduler.server.access import principal_of
from taskscheduler.server.api.base import routes
from taskscheduler.server.api.metrics import MetricsRoutes
from taskscheduler.server.store.records import AgentRecord, RecordOutcome, UnknownTask
from taskscheduler.web.errors import (
    BAD_REQUEST,
    IMPERSONATION,
    MISALIGNED,
    NOT_ASSIGNED,
    RESULT_AFTER_DELETION,
    RESULT_CONFLICT,
    RESULT_SUPERSEDED,
    RESULT_TASK_PAUSED,
    TOO_EARLY,
)
from taskscheduler.web.requests import path_task_id, peer_address, read_json
from taskscheduler.web.responses import json_response

#: (agent URL, task) assignments remembered before the cache is emptied and refilled.
_ASSIGNMENT_CACHE_SIZE = 1_000_000


class ResultRoutes(MetricsRoutes):
    """Results, as agents report them."""

    @routes.route("/api/v1/tasks/<task_id>/complete", methods=["POST"])
    async def complete(self, request: IRequest, task_id: str) -> bytes:
        parsed_id = path_task_id(task_id)
        try:
            result = self._capped(protocol.parse_result(read_json(request), parsed_id))
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        agent = self._reporting_agent(request, [result])
        if not await self._assigned(agent.url, [result.task_id]):
            self._log_not_assigned(agent, [result.task_id])
            raise NOT_ASSIGNED()
        [early] = await self._too_early(agent, [result])
        if early is not None:
            raise TOO_EARLY(why=early)
        now = self._now()
        [outcome] = await self._store.record_results([result], now)
        self._count_recorded([result], [outcome], now)
        self._log_outcome(result, outcome)
        self._notify_stored([result], [outcome])
        if outcome is RecordOutcome.CONFLICT:
            raise RESULT_CONFLICT()
        if outcome is RecordOutcome.UNKNOWN_TASK:
            raise UnknownTask(task_id)
        if outcome is RecordOutcome.DELETED:
            raise RESULT_AFTER_DELETION()
        if outcome is RecordOutcome.MISALIGNED:
            raise MISALIGNED()
        if outcome is RecordOutcome.SUPERSEDED:
            raise RESULT_SUPERSEDED()
        if outcome is RecordOutcome.TASK_PAUSED:
            raise RESULT_TASK_PAUSED()
        return json_response(request, {"status": outcome.value})

    @routes.route("/api/v1/results", methods=["POST"])
    async def complete_batch(self, request: IRequest) -> bytes:
        try:
            results = [self._capped(r) for r in protocol.parse_result_batch(read_json(request))]
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        agent = self._reporting_agent(request, results)
        assigned = await self._assigned(agent.url, [r.task_id for r in results])
        # Only the agent's own tasks are looked at (and looked up).
        checked = iter(await self._too_early(agent, [r for r in results if r.task_id in assigned]))
        early = [next(checked) if r.task_id in assigned else None for r in results]
        mine = [r for r, e in zip(results, early, strict=True) if r.task_id in assigned and not e]
        if any(r.task_id not in assigned for r in results):
            self._log_not_assigned(agent, [r.task_id for r in results if r.task_id not in assigned])
        now = self._now()
        outcomes = await self._store.record_results(mine, now) if mine else []
        self._count_recorded(mine, outcomes, now)
        self._notify_stored(mine, outcomes)
        recorded = iter(outcomes)
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
            raise IMPERSONATION()
        return agent

    def _notify_stored(self, results: list[RunResult], outcomes: list[RecordOutcome]) -> None:
        """Hand the results just stored to the webhooks (queued: no I/O here, and a
        failure there never fails the report)."""
        stored = [r for r, o in zip(results, outcomes, strict=True) if o is RecordOutcome.STORED]
        if not stored:
            return
        try:
            self._on_results_stored(stored)
        except Exception:
            self.log.failure("queueing results for webhooks")

    def _log_not_assigned(self, agent: AgentRecord, task_ids: list[uuid.UUID]) -> None:
        self.log.warn(
            "agent {agent_id} reported results of {count} task(s) not assigned to it "
            "(first: {task_id}): refused",
            agent_id=str(agent.agent_id),
            count=len(task_ids),
            task_id=str(task_ids[0]),
        )

    def _log_outcome(self, result: RunResult, outcome: RecordOutcome) -> None:
        if outcome in (RecordOutcome.STORED, RecordOutcome.DUPLICATE):
            # One per run: debug (--log-level debug shows it).
            self.log.debug(
                "task {task_id}: agent {agent_id} reported its run of {scheduled_at}: "
                "{status} ({outcome})",
                task_id=str(result.task_id),
                agent_id=str(result.agent_id),
                scheduled_at=format_instant(result.scheduled_at),
                status=result.status.value,
                outcome=outcome.value,
            )
            return
        self.log.warn(
            "rejected result of task {task_id} from agent {agent_id} at {scheduled_at}: {outcome}",
            task_id=str(result.task_id),
            agent_id=str(result.agent_id),
            scheduled_at=format_instant(result.scheduled_at),
            outcome=outcome.value,
        )
