"""The real :class:`~taskscheduler.server.store.interface.Store`: PostgreSQL (txpostgres).

A facade, as Buildbot's ``DBConnector``: it owns the connection pool
(:mod:`~taskscheduler.server.store.pool`) and one component per domain, each with its
SQL and row mappers, and passes every call of the Store interface to its component. The
schema is created and upgraded at :meth:`PostgresStore.start`
(:mod:`~taskscheduler.server.store.migrations`), under an advisory lock.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from taskscheduler.protocol import RunResult, TaskSpec
from taskscheduler.protocol.labels import NO_LABELS
from taskscheduler.server.notify.rules import DeliveryStatus, Notification, Observed
from taskscheduler.server.store.agents import Agents
from taskscheduler.server.store.audit import Audit
from taskscheduler.server.store.claims import Claims
from taskscheduler.server.store.deliveries import Deliveries
from taskscheduler.server.store.fleet import Fleet
from taskscheduler.server.store.leases import Claimant, Leases
from taskscheduler.server.store.migrations import Migrator
from taskscheduler.server.store.notifications import Notifications
from taskscheduler.server.store.partitions import Partitions
from taskscheduler.server.store.pool import Database
from taskscheduler.server.store.recording import Recording
from taskscheduler.server.store.records import (
    AgentRecord,
    AuditEvent,
    Claim,
    ClaimAnswer,
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
)
from taskscheduler.server.store.results import Results
from taskscheduler.server.store.tasks import Tasks


class PostgresStore:
    """:class:`~taskscheduler.server.store.interface.Store` on PostgreSQL.

    ``dsn`` is a libpq connection string or URI. ``reactor`` must provide
    ``IReactorFDSet`` and ``IReactorTime``. ``connect_timeout`` bounds opening a
    connection and ``operation_timeout`` any single call; past either the call raises
    StoreUnavailable.
    """

    #: Connections kept open. Single-result reports are bound by commit latency, so
    #: a few more connections than cores let PostgreSQL group their commits.
    DEFAULT_POOL_SIZE = 8

    def __init__(
        self,
        dsn: str,
        reactor: Any = None,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout: float = 5.0,
        operation_timeout: float = 30.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.db = Database(
            dsn,
            reactor,
            pool_size=pool_size,
            connect_timeout=connect_timeout,
            operation_timeout=operation_timeout,
        )
        self.tasks = Tasks(self.db)
        # The replicas' leases (server/leases.py), on a connection of their own: a renewal
        # never waits behind a busy pool, past the time its leases may be acted on.
        self.lease_db = Database(
            dsn,
            reactor,
            pool_size=1,
            connect_timeout=connect_timeout,
            operation_timeout=operation_timeout,
        )
        self.leases = Leases(self.lease_db)
        self.deliveries = Deliveries(self.db)
        self.recording = Recording(self.db)
        self.results = Results(self.db)
        self.agents = Agents(self.db)
        self.fleet = Fleet(self.db)
        self.audit = Audit(self.db)
        self.claims = Claims(self.db)
        self.notifications = Notifications(self.db)
        self.partitions = Partitions(self.db)
        self._clock = reactor

    # -- lifecycle ----------------------------------------------------------------------

    def use_dsn(self, dsn: str) -> None:
        """Connect to ``dsn`` from the next :meth:`start` on: the embedded PostgreSQL's is
        known only once it runs, after the server's services are built."""
        self.db.use_dsn(dsn)
        self.lease_db.use_dsn(dsn)

    async def start(self) -> None:
        self.db.open()
        self.lease_db.open()
        await self.db.run(Migrator().migrate, transaction=False)
        # The weeks ahead exist even when no retention service runs (--retention-days 0).
        await self.partitions.ensure(datetime.fromtimestamp(self._clock.seconds(), UTC))

    async def stop(self) -> None:
        self.db.close()
        self.lease_db.close()

    # -- tasks and the fleet ------------------------------------------------------------

    async def set_fleet(
        self, agent_urls: Sequence[str], at: datetime | None = None, actor: str = ""
    ) -> tuple[list[str], list[str]]:
        return await self.fleet.set_fleet(agent_urls, at, actor)

    async def list_fleet(self) -> list[FleetMember]:
        return await self.fleet.list_fleet()

    async def is_fleet_member(self, url: str) -> bool:
        return await self.fleet.is_fleet_member(url)

    async def add_fleet_member(
        self, url: str, added_at: datetime, audit: AuditEvent
    ) -> tuple[FleetMember, bool]:
        return await self.fleet.add_fleet_member(url, added_at, audit)

    async def remove_fleet_member(self, url: str, audit: AuditEvent) -> FleetMember | None:
        return await self.fleet.remove_fleet_member(url, audit)

    async def pending_leaves(self, limit: int) -> list[Leave]:
        return await self.fleet.pending_leaves(limit)

    async def mark_left(self, agent_id: uuid.UUID, reason: str) -> None:
        await self.fleet.mark_left(agent_id, reason)

    async def create_task(
        self, spec: TaskSpec, created_at: datetime, audit: AuditEvent | None = None
    ) -> Task:
        return await self.tasks.create_task(spec, created_at, audit)

    async def get_task(self, task_id: uuid.UUID) -> Task | None:
        return await self.tasks.get_task(task_id)

    async def list_tasks(
        self,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None = None,
        state: TaskState | None = None,
        command: str | None = None,
    ) -> list[Task]:
        return await self.tasks.list_tasks(limit, after, state, command)

    async def last_executions(
        self, task_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, ExecutionSummary]:
        return await self.results.last_executions(task_ids)

    async def update_task(
        self, task_id: uuid.UUID, change: TaskChange, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        return await self.tasks.update_task(task_id, change, at, audit)

    async def pause_task(
        self, task_id: uuid.UUID, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        return await self.tasks.pause_task(task_id, at, audit)

    async def resume_task(
        self, task_id: uuid.UUID, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        return await self.tasks.resume_task(task_id, at, audit)

    async def record_manual_execution(
        self,
        task_id: uuid.UUID,
        scheduled_at: datetime,
        audit: AuditEvent,
        online_since: datetime | None = None,
    ) -> Execution | None:
        return await self.recording.record_manual_execution(
            task_id, scheduled_at, audit, online_since
        )

    async def claim_instant(
        self, claim: Claim, now: datetime, grace: timedelta, online_since: datetime
    ) -> ClaimAnswer:
        return await self.claims.claim_instant(claim, now, grace, online_since)

    async def pending_manual_runs(
        self, agent_url: str, now: datetime, limit: int
    ) -> list[ManualRun]:
        return await self.deliveries.pending_manual_runs(agent_url, now, limit)

    async def mark_manual_delivered(
        self, agent_url: str, runs: Sequence[tuple[uuid.UUID, datetime]]
    ) -> None:
        await self.deliveries.mark_manual_delivered(agent_url, runs)

    async def get_execution(self, task_id: uuid.UUID, scheduled_at: datetime) -> Execution | None:
        return await self.results.get_execution(task_id, scheduled_at)

    async def delete_task(
        self, task_id: uuid.UUID, deleted_at: datetime, audit: AuditEvent
    ) -> Task | None:
        return await self.tasks.delete_task(task_id, deleted_at, audit)

    # -- results ------------------------------------------------------------------------

    async def record_results(
        self, results: Sequence[RunResult], received_at: datetime
    ) -> list[RecordOutcome]:
        return await self.recording.record_results(results, received_at)

    async def latest_complete_execution(
        self, task_id: uuid.UUID, now: datetime, report_grace: timedelta
    ) -> Execution | None:
        return await self.results.latest_complete_execution(task_id, now, report_grace)

    async def list_executions(
        self, task_id: uuid.UUID, limit: int, before: datetime | None = None
    ) -> list[Execution]:
        return await self.results.list_executions(task_id, limit, before)

    async def recent_start_lateness(self, executions: int) -> list[tuple[uuid.UUID, float]]:
        return await self.results.recent_start_lateness(executions)

    async def count_incomplete_executions(
        self, since: datetime, now: datetime, report_grace: timedelta
    ) -> int:
        return await self.results.count_incomplete_executions(since, now, report_grace)

    async def prune_history(self, before: datetime, limit: int, keep: int = 0) -> int:
        return await self.results.prune_history(before, limit, keep)

    async def ensure_partitions(self, now: datetime) -> int:
        return await self.partitions.ensure(now)

    async def drop_partitions(self, before: datetime, keep: int = 0) -> datetime:
        return await self.partitions.drop(before, keep)

    # -- deliveries ---------------------------------------------------------------------

    async def undelivered_tasks(self, agent_url: str, limit: int) -> list[Task]:
        return await self.deliveries.undelivered_tasks(agent_url, limit)

    async def assigned_task_ids(self, agent_url: str) -> set[uuid.UUID]:
        return await self.deliveries.assigned_task_ids(agent_url)

    async def mark_delivered(
        self,
        agent_url: str,
        task_ids: Sequence[uuid.UUID],
        agent_id: uuid.UUID,
        revisions: Sequence[int] | None = None,
    ) -> None:
        await self.deliveries.mark_delivered(agent_url, task_ids, agent_id, revisions)

    async def mark_undelivered(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        await self.deliveries.mark_undelivered(agent_url, task_ids)

    async def assigned_among(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        return await self.deliveries.assigned_among(agent_url, task_ids)

    async def pending_removals(self, agent_url: str, limit: int) -> list[uuid.UUID]:
        return await self.deliveries.pending_removals(agent_url, limit)

    async def mark_removed(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        await self.deliveries.mark_removed(agent_url, task_ids)

    async def request_removal(
        self, agent_url: str, task_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        return await self.deliveries.request_removal(agent_url, task_ids)

    # -- agents and the audit log -------------------------------------------------------

    async def enrol_agent(
        self,
        agent_id: uuid.UUID,
        url: str,
        credential_hash: str,
        enrolled_at: datetime,
        audit: AuditEvent,
        labels: Mapping[str, str] = NO_LABELS,
    ) -> AgentRecord:
        return await self.agents.enrol_agent(
            agent_id, url, credential_hash, enrolled_at, audit, labels
        )

    async def agent_by_credential(self, credential_hash: str) -> AgentRecord | None:
        return await self.agents.agent_by_credential(credential_hash)

    async def agent_for_url(self, url: str) -> AgentRecord | None:
        return await self.agents.agent_for_url(url)

    async def get_agent(self, agent_id: uuid.UUID) -> AgentRecord | None:
        return await self.agents.get_agent(agent_id)

    async def record_heartbeat(
        self, agent_id: uuid.UUID, seen_at: datetime, heartbeat: Heartbeat
    ) -> bool:
        return await self.agents.record_heartbeat(agent_id, seen_at, heartbeat)

    async def revoke_agent(
        self, agent_id: uuid.UUID, revoked_at: datetime, audit: AuditEvent
    ) -> AgentRecord | None:
        return await self.agents.revoke_agent(agent_id, revoked_at, audit)

    async def release_agent_url(
        self, agent_id: uuid.UUID, released_at: datetime, audit: AuditEvent
    ) -> AgentRecord | None:
        return await self.agents.release_agent_url(agent_id, released_at, audit)

    async def list_agents(self) -> list[AgentRecord]:
        return await self.agents.list_agents()

    async def audit_events(self, limit: int, before: int | None = None) -> list[AuditEvent]:
        return await self.audit.audit_events(limit, before)

    # -- notifications ------------------------------------------------------------------

    async def observe_results(
        self, observed: Sequence[Observed], at: datetime, claim: Claimant | None = None
    ) -> list[Notification]:
        return await self.notifications.observe_results(observed, at, claim)

    async def update_notification(
        self,
        notification_id: int,
        status: DeliveryStatus,
        attempts: int,
        response_code: int | None,
        error: str | None,
        at: datetime,
    ) -> None:
        await self.notifications.update_notification(
            notification_id, status, attempts, response_code, error, at
        )

    async def list_notifications(
        self, task_id: uuid.UUID, limit: int, before: int | None = None
    ) -> list[Notification]:
        return await self.notifications.list_notifications(task_id, limit, before)

    async def pending_notifications(self, limit: int) -> list[Notification]:
        return await self.notifications.pending_notifications(limit)

    async def claim_notifications(
        self,
        claim: Claimant,
        renew: Sequence[int],
        limit: int,
        at: datetime,
        release: Sequence[int] = (),
    ) -> list[Notification]:
        return await self.notifications.claim_notifications(claim, renew, limit, at, release)
