"""The fleet, deliveries and agents of :class:`~taskscheduler.server.store.memory.MemoryStore`:
the in-memory twin of :mod:`~taskscheduler.server.store.fleet`,
:mod:`~taskscheduler.server.store.deliveries` and :mod:`~taskscheduler.server.store.agents`."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from types import MappingProxyType

from taskscheduler.protocol.labels import NO_LABELS
from taskscheduler.server.store.fleet import fleet_audit, now_utc
from taskscheduler.server.store.memory_state import Assignment, MemoryState
from taskscheduler.server.store.records import (
    AgentConflict,
    AgentRecord,
    AuditEvent,
    FleetMember,
    Heartbeat,
    Leave,
    ManualRun,
    Task,
    TaskState,
)
from taskscheduler.server.store.rules import enrolment_conflict, release_conflict, utc


class MemoryFleet(MemoryState):
    """The fleet, what each agent is due (tasks, removals, run-nows), and agent identities."""

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
        self._rematch()
        return added, removed

    def _assign_live_tasks(self, url: str) -> None:
        for task_id, assignments in self._assignments.items():
            if not self._tasks[task_id].deleted:  # a deleted task is never assigned again
                assignments.setdefault(url, Assignment())

    def _add(self, url: str, at: datetime) -> FleetMember | None:
        if url in self._fleet:
            return None
        member = self._fleet[url] = FleetMember(url, at)
        self._assign_live_tasks(url)
        self._rematch(url=url)
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

    async def is_fleet_member(self, url: str) -> bool:
        return url in self._fleet

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

    async def undelivered_tasks(self, agent_url: str, limit: int) -> list[Task]:
        pending = [
            task
            for task_id, task in self._tasks.items()
            if task.state is TaskState.ACTIVE
            and (assignment := self._assignments[task_id].get(agent_url)) is not None
            and assignment.matched
            and not assignment.delivered
        ]
        pending.sort(key=lambda task: (task.created_at, task.task_id))
        return pending[:limit]

    async def assigned_task_ids(self, agent_url: str) -> set[uuid.UUID]:
        return {
            task_id
            for task_id, assignments in self._assignments.items()
            if agent_url in assignments
            and assignments[agent_url].matched
            and self._tasks[task_id].state is TaskState.ACTIVE
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
        # As in PostgreSQL: a member that matched (or took the task) may report it.
        return {
            t
            for t in task_ids
            if (assignment := self._assignments.get(t, {}).get(agent_url)) is not None
            and (assignment.matched or assignment.agent_id is not None)
        }

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
            if (
                task is not None
                and assignment is not None
                and (task.state is not TaskState.ACTIVE or not assignment.matched)
            ):
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
        labels: Mapping[str, str] = NO_LABELS,
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
        record = AgentRecord(agent_id, url, utc(enrolled_at), labels=MappingProxyType(dict(labels)))
        self._agents[agent_id] = record
        self._credentials[credential_hash] = agent_id
        self._rematch(url=url)
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
        self._rematch(url=record.url)
        self._append_audit(audit)
        return revoked

    async def get_agent(self, agent_id: uuid.UUID) -> AgentRecord | None:
        return self._agents.get(agent_id)

    async def record_heartbeat(
        self, agent_id: uuid.UUID, seen_at: datetime, heartbeat: Heartbeat
    ) -> bool:
        record = self._agents.get(agent_id)
        if record is None:
            return False
        started = heartbeat.started_at
        labels = MappingProxyType(dict(heartbeat.labels))
        heartbeat = replace(
            heartbeat, started_at=None if started is None else utc(started), labels=labels
        )
        self._agents[agent_id] = replace(
            record, last_seen_at=utc(seen_at), heartbeat=heartbeat, labels=labels
        )
        if dict(labels) == dict(record.labels):
            return False
        if not record.revoked:
            self._rematch(url=record.url)
        return True

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
        return self._by_enrolment()
