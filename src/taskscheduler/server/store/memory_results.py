"""Executions and results of :class:`~taskscheduler.server.store.memory.MemoryStore`:
record (with the rules' verdicts), run-now executions, latest complete, history, prune;
the in-memory twin of :mod:`~taskscheduler.server.store.recording` and
:mod:`~taskscheduler.server.store.results`."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from taskscheduler.protocol import RunResult, Trigger
from taskscheduler.protocol.options import RunOn
from taskscheduler.server.store.claim_rules import claimed_expected, manual_choice, online_urls
from taskscheduler.server.store.fleet import expected_urls
from taskscheduler.server.store.memory_state import ManualDelivery, MemoryExecution, MemoryState
from taskscheduler.server.store.records import (
    AuditEvent,
    Execution,
    ExecutionSummary,
    RecordOutcome,
    UnknownTask,
)
from taskscheduler.server.store.rules import (
    completion_cutoff,
    is_complete,
    is_manual,
    last_attempts,
    manual_run_deadline,
    manual_verdict,
    newest_kept,
    reported_agents,
    reported_enough,
    same_result,
    scheduled_verdict,
    utc,
    utc_result,
)


class MemoryResults(MemoryState):
    """Records results into executions and reads them back, in dictionaries."""

    async def last_executions(
        self, task_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, ExecutionSummary]:
        found = {}
        for task_id in task_ids:
            executions = self._executions.get(task_id)
            if not executions:
                continue
            at = max(executions)
            e = executions[at]
            found[task_id] = ExecutionSummary(
                task_id,
                at,
                e.trigger,
                e.revision,
                e.expected,
                tuple(e.results[a].status for a in sorted(e.results)),
                final_count=reported_agents(e.results.values()),
                agent_ids=tuple(sorted(e.results)),
            )
        return found

    async def record_manual_execution(
        self,
        task_id: uuid.UUID,
        scheduled_at: datetime,
        audit: AuditEvent,
        online_since: datetime | None = None,
    ) -> Execution | None:
        task = self._live(task_id)
        if task is None:
            return None
        at = utc(scheduled_at)
        if at in self._executions[task_id]:
            raise ValueError(f"task {task_id} already has an execution at {at}")
        urls = expected_urls(self._matched_urls(task_id), self._agents.values())
        if task.spec.options.run_on is RunOn.ONE:
            # One agent runs it: claimed for it, so the execution expects it alone.
            online = online_urls(self._agents.values(), online_since or at)
            chosen = manual_choice(task_id, at, urls, online)
            if chosen is not None:
                self._claims.setdefault((task_id, at), (None, chosen))
            urls = claimed_expected(urls, self._claimed_url(task_id, at))
        execution = MemoryExecution(urls, Trigger.MANUAL, task.spec.revision)
        self._executions[task_id][at] = execution
        deadline = manual_run_deadline(at, task.spec.interval)
        for url in urls:
            self._manual[(task_id, at, url)] = ManualDelivery(task.spec.revision, deadline)
        self._append_audit(audit)
        return execution.as_execution(task_id, at)

    async def get_execution(self, task_id: uuid.UUID, scheduled_at: datetime) -> Execution | None:
        if task_id not in self._tasks:
            raise UnknownTask(str(task_id))
        at = utc(scheduled_at)
        execution = self._executions[task_id].get(at)
        return (
            None if execution is None else execution.as_execution(task_id, at, self._by_enrolment())
        )

    async def record_results(
        self, results: Sequence[RunResult], received_at: datetime
    ) -> list[RecordOutcome]:
        outcomes = []
        for result in results:
            outcomes.append(self._record(utc_result(result)))
        return outcomes

    def _record(self, result: RunResult) -> RecordOutcome:
        task = self._tasks.get(result.task_id)
        if task is None:
            return RecordOutcome.UNKNOWN_TASK
        executions = self._executions[result.task_id]
        execution = executions.get(result.scheduled_at)
        if is_manual(result):
            recorded = execution is not None and execution.trigger is Trigger.MANUAL
            verdict = manual_verdict(recorded, task.deleted_at, result.scheduled_at)
            if verdict is not None:
                return verdict
            assert execution is not None
            revision = execution.revision if result.revision is None else result.revision
        else:
            verdict, revision = scheduled_verdict(
                self._revisions[result.task_id],
                self._pauses[result.task_id],
                task.deleted_at,
                result.scheduled_at,
                result.revision,
            )
            if verdict is not None:
                return verdict
            if execution is not None and execution.trigger is Trigger.MANUAL:
                return RecordOutcome.MISALIGNED  # (a run-now is never on the grid)
        if execution is None:
            expected = claimed_expected(
                expected_urls(self._matched_urls(result.task_id), self._agents.values()),
                self._claimed_url(result.task_id, result.scheduled_at),
            )
            execution = MemoryExecution(expected, revision=revision)
            executions[result.scheduled_at] = execution
        # Each attempt is a result of its own; the agent's last one is its result.
        stored = execution.attempts.get((result.agent_id, result.attempt))
        if stored is not None:
            if same_result(stored, result):
                return RecordOutcome.DUPLICATE
            return RecordOutcome.CONFLICT
        # The revision it ran; an older agent's (None) is the one in effect.
        ran = revision if result.revision is None else result.revision
        stored = replace(result, revision=ran)
        execution.attempts[(result.agent_id, result.attempt)] = stored
        previous = execution.results.get(result.agent_id)
        (execution.results[result.agent_id],) = last_attempts(
            [stored] if previous is None else [previous, stored]
        )
        return RecordOutcome.STORED

    async def latest_complete_execution(
        self, task_id: uuid.UUID, now: datetime, report_grace: timedelta
    ) -> Execution | None:
        task = self._tasks.get(task_id)
        if task is None:
            raise UnknownTask(str(task_id))
        # A linear scan is fine for a fake; the PostgreSQL store walks an index.
        complete = [
            at
            for at, execution in self._executions[task_id].items()
            if is_complete(
                at,
                reported_agents(execution.results.values()),
                execution.expected,
                now=now,
                time_limit=task.spec.time_limit,
                report_grace=report_grace,
            )
        ]
        if not complete:
            return None
        scheduled_at = max(complete)
        return self._executions[task_id][scheduled_at].as_execution(
            task_id, scheduled_at, self._by_enrolment()
        )

    async def list_executions(
        self, task_id: uuid.UUID, limit: int, before: datetime | None = None
    ) -> list[Execution]:
        if task_id not in self._tasks:
            raise UnknownTask(str(task_id))
        executions = self._executions[task_id]
        instants = sorted((at for at in executions if before is None or at < before), reverse=True)[
            :limit
        ]
        agents = self._by_enrolment()
        return [executions[at].as_execution(task_id, at, agents) for at in instants]

    async def recent_start_lateness(self, executions: int) -> list[tuple[uuid.UUID, float]]:
        newest = sorted(
            (
                (at, task_id)
                for task_id, by_instant in self._executions.items()
                for at, e in by_instant.items()
                if e.trigger is Trigger.SCHEDULE
            ),
            reverse=True,
        )[:executions]
        return [
            (agent_id, (r.started_at - at).total_seconds())
            for at, task_id in newest
            for (agent_id, attempt), r in self._executions[task_id][at].attempts.items()
            if attempt == 1 and r.started_at is not None
        ]

    async def count_incomplete_executions(
        self, since: datetime, now: datetime, report_grace: timedelta
    ) -> int:
        count = 0
        for task_id, by_instant in self._executions.items():
            time_limit = self._tasks[task_id].spec.time_limit
            cutoff = completion_cutoff(utc(now), time_limit, report_grace)
            for at, execution in by_instant.items():
                reported = reported_agents(execution.results.values())
                if utc(since) <= at < cutoff and not reported_enough(reported, execution.expected):
                    count += 1
        return count

    async def ensure_partitions(self, now: datetime) -> int:
        return 0  # no partitions here: history is one collection

    async def drop_partitions(self, before: datetime, keep: int = 0) -> datetime:
        return before  # all by rows

    async def prune_history(self, before: datetime, limit: int, keep: int = 0) -> int:
        cutoff = utc(before)
        old = sorted(
            (at, task_id)
            for task_id, executions in self._executions.items()
            for at in set(executions) - newest_kept(list(executions), keep)
            if at < cutoff
        )[:limit]
        for at, task_id in old:
            del self._executions[task_id][at]
        gone = [
            key
            for key in self._claims
            if key[1] < cutoff and key[1] not in self._executions.get(key[0], {})
        ]
        for key in sorted(gone, key=lambda k: k[1])[:limit]:
            del self._claims[key]
        return len(old)
