"""An in-memory :class:`~taskscheduler.server.store.interface.Store`, for unit tests.

It earns its place beside the real store: the unit tests of the API, dispatch, the
reporter and retention drive time with ``task.Clock``, which a real database's I/O does
not follow, and they run by the hundred in a fraction of a second. It keeps exactly the
contract of :class:`~taskscheduler.server.store.postgres.PostgresStore`: both pass
``tests/unit/test_store_contract.py`` and ``test_store_rules.py``, and every outcome rule
comes from :mod:`~taskscheduler.server.store.rules`, never re-derived here. Nothing
survives the process, and it is never unavailable. Every method finishes its work before
its first ``await`` would matter, so concurrent callers see each call as atomic, as they
would see a transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from taskscheduler.protocol import RunResult, TaskSpec, Trigger
from taskscheduler.server.store.fleet import expected_urls, fleet_audit, now_utc
from taskscheduler.server.store.interface import (
    AgentConflict,
    AgentRecord,
    AuditEvent,
    Execution,
    ExecutionSummary,
    FleetMember,
    Heartbeat,
    Leave,
    ManualRun,
    RecordOutcome,
    Task,
    TaskChange,
    TaskState,
    UnknownTask,
)
from taskscheduler.server.store.rules import (
    Revision,
    change_details,
    enrolment_conflict,
    is_complete,
    is_manual,
    manual_run_deadline,
    manual_verdict,
    newest_kept,
    release_conflict,
    revise,
    same_result,
    scheduled_verdict,
    utc,
    utc_result,
    utc_spec,
)


@dataclass
class _Assignment:
    delivered: bool = False
    agent_id: uuid.UUID | None = None
    removal_pending: bool = False


@dataclass
class _Execution:
    expected_urls: tuple[str, ...]
    trigger: Trigger = Trigger.SCHEDULE
    revision: int = 1
    results: dict[uuid.UUID, RunResult] = field(default_factory=dict)

    @property
    def expected(self) -> int:
        return len(self.expected_urls)

    def as_execution(self, task_id: uuid.UUID, scheduled_at: datetime) -> Execution:
        return Execution(
            task_id=task_id,
            scheduled_at=scheduled_at,
            expected=len(self.expected_urls),
            results=tuple(self.results[a] for a in sorted(self.results)),
            trigger=self.trigger,
            revision=self.revision,
            expected_urls=self.expected_urls,
        )


@dataclass
class _ManualDelivery:
    revision: int
    deadline: datetime
    delivered: bool = False


class MemoryStore:
    """The whole Store contract, in dictionaries."""

    def __init__(self) -> None:
        self._fleet: dict[str, FleetMember] = {}
        # agent_id -> the leave it has yet to confirm
        self._leaves: dict[uuid.UUID, Leave] = {}
        self._tasks: dict[uuid.UUID, Task] = {}
        # task_id -> agent_url -> delivery state
        self._assignments: dict[uuid.UUID, dict[str, _Assignment]] = {}
        # task_id -> scheduled_at -> execution
        self._executions: dict[uuid.UUID, dict[datetime, _Execution]] = {}
        self._revisions: dict[uuid.UUID, list[Revision]] = {}
        # task_id -> [paused_at, resumed_at or None]
        self._pauses: dict[uuid.UUID, list[tuple[datetime, datetime | None]]] = {}
        # (task_id, scheduled_at, agent_url) -> a run-now to deliver
        self._manual: dict[tuple[uuid.UUID, datetime, str], _ManualDelivery] = {}
        self._agents: dict[uuid.UUID, AgentRecord] = {}
        self._credentials: dict[str, uuid.UUID] = {}
        self._audit: list[AuditEvent] = []

    def _append_audit(self, event: AuditEvent) -> None:
        self._audit.append(
            AuditEvent(
                at=utc(event.at),
                actor=event.actor,
                action=event.action,
                target=event.target,
                peer=event.peer,
                details=dict(event.details),
                event_id=len(self._audit) + 1,
            )
        )

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def set_fleet(
        self, agent_urls: Sequence[str], at: datetime | None = None, actor: str = ""
    ) -> tuple[list[str], list[str]]:
        urls = list(dict.fromkeys(agent_urls))
        when = utc(at or now_utc())
        removed = sorted(set(self._fleet) - set(urls))
        added = [url for url in urls if url not in self._fleet]
        for url in removed:
            self._remove(url, when)
            if actor:
                self._append_audit(fleet_audit("fleet.removed", url, when, actor))
        for url in added:
            self._add(url, when)
            if actor:
                self._append_audit(fleet_audit("fleet.added", url, when, actor))
        for url in self._fleet:
            self._assign_live_tasks(url)
        return added, removed

    def _assign_live_tasks(self, url: str) -> None:
        for task_id, assignments in self._assignments.items():
            if not self._tasks[task_id].deleted:  # a deleted task is never assigned again
                assignments.setdefault(url, _Assignment())

    def _add(self, url: str, at: datetime) -> FleetMember | None:
        if url in self._fleet:
            return None
        member = self._fleet[url] = FleetMember(url, at)
        self._assign_live_tasks(url)
        for agent_id, leave in list(self._leaves.items()):
            if leave.url == url and leave.reason == "removed":
                del self._leaves[agent_id]
        return member

    def _remove(self, url: str, at: datetime) -> FleetMember | None:
        member = self._fleet.pop(url, None)
        if member is None:
            return None
        for assignments in self._assignments.values():
            assignments.pop(url, None)
        live = next((a for a in self._agents.values() if a.url == url and not a.revoked), None)
        if live is not None:
            self._leaves.setdefault(live.agent_id, Leave(live.agent_id, url, "removed"))
        return member

    async def list_fleet(self) -> list[FleetMember]:
        return sorted(self._fleet.values(), key=lambda m: (m.added_at, m.url))

    async def add_fleet_member(
        self, url: str, added_at: datetime, audit: AuditEvent
    ) -> tuple[FleetMember, bool]:
        member = self._add(url, utc(added_at))
        if member is None:
            return self._fleet[url], False
        self._append_audit(audit)
        return member, True

    async def remove_fleet_member(self, url: str, audit: AuditEvent) -> FleetMember | None:
        member = self._remove(url, utc(audit.at))
        if member is not None:
            self._append_audit(audit)
        return member

    async def pending_leaves(self, limit: int) -> list[Leave]:
        return list(self._leaves.values())[:limit]

    async def mark_left(self, agent_id: uuid.UUID, reason: str) -> None:
        leave = self._leaves.get(agent_id)
        if leave is not None and leave.reason == reason:
            del self._leaves[agent_id]

    async def create_task(
        self, spec: TaskSpec, created_at: datetime, audit: AuditEvent | None = None
    ) -> Task:
        if spec.task_id in self._tasks:
            raise ValueError(f"task {spec.task_id} already exists")
        task = Task(utc_spec(spec), utc(created_at))
        self._tasks[spec.task_id] = task
        self._assignments[spec.task_id] = {url: _Assignment() for url in self._fleet}
        self._executions[spec.task_id] = {}
        self._revisions[spec.task_id] = [
            Revision(spec.revision, task.spec.anchor, task.spec.anchor, spec.frequency.interval)
        ]
        self._pauses[spec.task_id] = []
        if audit is not None:
            self._append_audit(audit)
        return task

    async def get_task(self, task_id: uuid.UUID) -> Task | None:
        return self._tasks.get(task_id)

    async def list_tasks(
        self,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None = None,
        state: TaskState | None = None,
        command: str | None = None,
    ) -> list[Task]:
        tasks = sorted(self._tasks.values(), key=lambda t: (t.created_at, t.task_id), reverse=True)
        return [
            task
            for task in tasks
            if (after is None or (task.created_at, task.task_id) < (utc(after[0]), after[1]))
            and (state is None or task.state is state)
            and (command is None or command in task.spec.command)
        ][:limit]

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
            )
        return found

    def _live(self, task_id: uuid.UUID) -> Task | None:
        task = self._tasks.get(task_id)
        return None if task is None or task.deleted else task

    async def update_task(
        self, task_id: uuid.UUID, change: TaskChange, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        task = self._live(task_id)
        if task is None:
            return None
        new = revise(task.spec, change, at)
        if new is None:
            return task, False
        updated = replace(task, spec=new, updated_at=utc(at))
        self._tasks[task_id] = updated
        self._revisions[task_id].append(
            Revision(new.revision, utc(at), new.anchor, new.frequency.interval)
        )
        for assignment in self._assignments[task_id].values():
            assignment.delivered = False
        self._append_audit(replace(audit, details=change_details(task.spec, new)))
        return updated, True

    async def pause_task(
        self, task_id: uuid.UUID, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        task = self._live(task_id)
        if task is None:
            return None
        if task.paused:
            return task, False
        paused = replace(task, paused_at=utc(at), updated_at=utc(at))
        self._tasks[task_id] = paused
        self._pauses[task_id].append((utc(at), None))
        for assignment in self._assignments[task_id].values():
            assignment.removal_pending = True
        self._append_audit(audit)
        return paused, True

    async def resume_task(
        self, task_id: uuid.UUID, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        task = self._live(task_id)
        if task is None:
            return None
        if not task.paused:
            return task, False
        resumed = replace(task, paused_at=None, updated_at=utc(at))
        self._tasks[task_id] = resumed
        pauses = self._pauses[task_id]
        pauses[-1] = (pauses[-1][0], utc(at))
        for assignment in self._assignments[task_id].values():
            assignment.removal_pending = False
            assignment.delivered = False
        self._append_audit(audit)
        return resumed, True

    async def record_manual_execution(
        self, task_id: uuid.UUID, scheduled_at: datetime, audit: AuditEvent
    ) -> Execution | None:
        task = self._live(task_id)
        if task is None:
            return None
        at = utc(scheduled_at)
        if at in self._executions[task_id]:
            raise ValueError(f"task {task_id} already has an execution at {at}")
        urls = expected_urls(self._assignments[task_id], self._agents.values())
        execution = _Execution(urls, Trigger.MANUAL, task.spec.revision)
        self._executions[task_id][at] = execution
        deadline = manual_run_deadline(at, task.spec.frequency.interval)
        for url in urls:
            self._manual[(task_id, at, url)] = _ManualDelivery(task.spec.revision, deadline)
        self._append_audit(audit)
        return execution.as_execution(task_id, at)

    async def pending_manual_runs(
        self, agent_url: str, now: datetime, limit: int
    ) -> list[ManualRun]:
        pending = sorted(
            (at, task_id, delivery)
            for (task_id, at, url), delivery in self._manual.items()
            if url == agent_url
            and not delivery.delivered
            and delivery.deadline > now
            and not self._tasks[task_id].deleted
        )[:limit]
        return [
            ManualRun(self._tasks[task_id].spec, at, delivery.revision, delivery.deadline)
            for at, task_id, delivery in pending
        ]

    async def mark_manual_delivered(
        self, agent_url: str, runs: Sequence[tuple[uuid.UUID, datetime]]
    ) -> None:
        for task_id, at in runs:
            delivery = self._manual.get((task_id, utc(at), agent_url))
            if delivery is not None:
                delivery.delivered = True

    async def get_execution(self, task_id: uuid.UUID, scheduled_at: datetime) -> Execution | None:
        if task_id not in self._tasks:
            raise UnknownTask(str(task_id))
        at = utc(scheduled_at)
        execution = self._executions[task_id].get(at)
        return None if execution is None else execution.as_execution(task_id, at)

    async def delete_task(
        self, task_id: uuid.UUID, deleted_at: datetime, audit: AuditEvent
    ) -> Task | None:
        task = self._tasks.get(task_id)
        if task is None or task.deleted:
            return None
        deleted = replace(task, deleted_at=utc(deleted_at))
        self._tasks[task_id] = deleted
        for assignment in self._assignments[task_id].values():
            assignment.removal_pending = True
        self._append_audit(audit)
        return deleted

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
            expected = expected_urls(self._assignments[result.task_id], self._agents.values())
            execution = _Execution(expected, revision=revision)
            executions[result.scheduled_at] = execution
        stored = execution.results.get(result.agent_id)
        if stored is not None:
            if same_result(stored, result):
                return RecordOutcome.DUPLICATE
            return RecordOutcome.CONFLICT
        # The revision it ran; an older agent's (None) is the one in effect.
        ran = revision if result.revision is None else result.revision
        execution.results[result.agent_id] = replace(result, revision=ran)
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
                len(execution.results),
                execution.expected,
                now=now,
                time_limit=task.spec.time_limit,
                report_grace=report_grace,
            )
        ]
        if not complete:
            return None
        scheduled_at = max(complete)
        return self._executions[task_id][scheduled_at].as_execution(task_id, scheduled_at)

    async def list_executions(
        self, task_id: uuid.UUID, limit: int, before: datetime | None = None
    ) -> list[Execution]:
        if task_id not in self._tasks:
            raise UnknownTask(str(task_id))
        executions = self._executions[task_id]
        instants = sorted((at for at in executions if before is None or at < before), reverse=True)[
            :limit
        ]
        return [executions[at].as_execution(task_id, at) for at in instants]

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
        return len(old)

    async def undelivered_tasks(self, agent_url: str, limit: int) -> list[Task]:
        pending = [
            task
            for task_id, task in self._tasks.items()
            if task.state is TaskState.ACTIVE
            and not self._assignments[task_id].get(agent_url, _Assignment(delivered=True)).delivered
        ]
        pending.sort(key=lambda task: (task.created_at, task.task_id))
        return pending[:limit]

    async def assigned_task_ids(self, agent_url: str) -> set[uuid.UUID]:
        return {
            task_id
            for task_id, assignments in self._assignments.items()
            if agent_url in assignments and self._tasks[task_id].state is TaskState.ACTIVE
        }

    async def mark_delivered(
        self,
        agent_url: str,
        task_ids: Sequence[uuid.UUID],
        agent_id: uuid.UUID,
        revisions: Sequence[int] | None = None,
    ) -> None:
        for i, task_id in enumerate(task_ids):
            assignment = self._assignments.get(task_id, {}).get(agent_url)
            if assignment is None:
                continue
            if revisions is not None and revisions[i] < self._tasks[task_id].spec.revision:
                continue  # an older revision: the new one is still due
            assignment.delivered = True
            assignment.agent_id = agent_id

    async def mark_undelivered(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        for task_id in task_ids:
            assignment = self._assignments.get(task_id, {}).get(agent_url)
            if assignment is not None:
                assignment.delivered = False

    async def assigned_among(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        return {t for t in task_ids if agent_url in self._assignments.get(t, {})}

    async def pending_removals(self, agent_url: str, limit: int) -> list[uuid.UUID]:
        pending = [
            task
            for task_id, task in self._tasks.items()
            if (assignment := self._assignments[task_id].get(agent_url)) is not None
            and assignment.removal_pending
        ]
        pending.sort(
            key=lambda task: (task.deleted_at or task.paused_at or task.created_at, task.task_id)
        )
        return [task.task_id for task in pending[:limit]]

    async def mark_removed(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        for task_id in task_ids:
            assignment = self._assignments.get(task_id, {}).get(agent_url)
            if assignment is not None:
                assignment.removal_pending = False

    async def request_removal(
        self, agent_url: str, task_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        marked = set()
        for task_id in task_ids:
            task = self._tasks.get(task_id)
            assignment = self._assignments.get(task_id, {}).get(agent_url)
            if task is not None and task.state is not TaskState.ACTIVE and assignment is not None:
                assignment.removal_pending = True
                marked.add(task_id)
        return marked

    async def enrol_agent(
        self,
        agent_id: uuid.UUID,
        url: str,
        credential_hash: str,
        enrolled_at: datetime,
        audit: AuditEvent,
    ) -> AgentRecord:
        holders = [a for a in self._agents.values() if a.url == url and a.url_released_at is None]
        conflict = enrolment_conflict(
            agent_id,
            url,
            identity_known=agent_id in self._agents,
            url_holders_live=[not a.revoked for a in holders],
        )
        if conflict is not None:
            raise conflict
        if credential_hash in self._credentials:
            raise AgentConflict("agent_exists", "this credential is already in use")
        record = AgentRecord(agent_id, url, utc(enrolled_at))
        self._agents[agent_id] = record
        self._credentials[credential_hash] = agent_id
        self._append_audit(audit)
        return record

    async def agent_by_credential(self, credential_hash: str) -> AgentRecord | None:
        agent_id = self._credentials.get(credential_hash)
        return None if agent_id is None else self._agents[agent_id]

    async def agent_for_url(self, url: str) -> AgentRecord | None:
        for record in self._agents.values():
            if record.url == url and not record.revoked:
                return record
        return None

    async def revoke_agent(
        self, agent_id: uuid.UUID, revoked_at: datetime, audit: AuditEvent
    ) -> AgentRecord | None:
        record = self._agents.get(agent_id)
        if record is None or record.revoked:
            return None
        revoked = replace(record, revoked_at=utc(revoked_at))
        self._agents[agent_id] = revoked
        self._leaves.pop(agent_id, None)  # the newest reason, last in line
        self._leaves[agent_id] = Leave(agent_id, record.url, "revoked")
        self._append_audit(audit)
        return revoked

    async def get_agent(self, agent_id: uuid.UUID) -> AgentRecord | None:
        return self._agents.get(agent_id)

    async def record_heartbeat(
        self, agent_id: uuid.UUID, seen_at: datetime, heartbeat: Heartbeat
    ) -> None:
        record = self._agents.get(agent_id)
        if record is not None:
            started = heartbeat.started_at
            heartbeat = replace(heartbeat, started_at=None if started is None else utc(started))
            self._agents[agent_id] = replace(record, last_seen_at=utc(seen_at), heartbeat=heartbeat)

    async def release_agent_url(
        self, agent_id: uuid.UUID, released_at: datetime, audit: AuditEvent
    ) -> AgentRecord | None:
        record = self._agents.get(agent_id)
        if record is None:
            return None
        conflict = release_conflict(record)
        if conflict is not None:
            raise conflict
        if record.url_released_at is not None:
            return record
        released = replace(record, url_released_at=utc(released_at))
        self._agents[agent_id] = released
        self._append_audit(audit)
        return released

    async def list_agents(self) -> list[AgentRecord]:
        return sorted(self._agents.values(), key=lambda a: (a.enrolled_at, a.agent_id))

    async def audit_events(self, limit: int, before: int | None = None) -> list[AuditEvent]:
        events = [e for e in reversed(self._audit) if before is None or (e.event_id or 0) < before]
        return events[:limit]
