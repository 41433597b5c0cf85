"""What the server keeps, behind one interface: the :class:`Store` protocol (its records
and exceptions are :mod:`.records`).

``postgres.PostgresStore`` (txpostgres) is the real store and ``memory.MemoryStore`` the
one unit tests use; both pass the same contract suite (``tests/unit/test_store_contract.py``),
the PostgreSQL one against a real server. What makes an execution complete, two results
the same, or a result misaligned or too late is decided in :mod:`.rules`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Protocol

from taskscheduler.protocol import RunResult, TaskSpec
from taskscheduler.protocol.labels import NO_LABELS
from taskscheduler.server.notify.rules import DeliveryStatus, Notification, Observed
from taskscheduler.server.store.leases import Claimant
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


class Store(Protocol):
    async def start(self) -> None:
        """Connect and apply schema migrations. Raises StoreUnavailable if it cannot."""

    async def stop(self) -> None:
        """Close connections."""

    async def set_fleet(
        self, agent_urls: Sequence[str], at: datetime | None = None, actor: str = ""
    ) -> tuple[list[str], list[str]]:
        """Make ``agent_urls`` the agents every task runs on; (added, removed) URLs.

        Every existing task is assigned (undelivered) to agents new to the list; agents no
        longer in the list lose their assignments, and the live agent enrolled at each is
        due to leave (:meth:`pending_leaves`, reason ``removed``). With ``actor``, each URL
        added or removed is audited (``fleet.added``/``fleet.removed``) at ``at``.
        Idempotent.
        """

    async def list_fleet(self) -> list[FleetMember]:
        """The fleet, in the order its members were added."""

    async def is_fleet_member(self, url: str) -> bool:
        """Whether ``url`` is in the fleet (one look-up: every heartbeat asks)."""

    async def add_fleet_member(
        self, url: str, added_at: datetime, audit: AuditEvent
    ) -> tuple[FleetMember, bool]:
        """Add ``url`` to the fleet (True) or find it there (False, nothing written).

        Every live task is assigned (undelivered) to it, a leave still pending for it with
        reason ``removed`` is called off, and ``audit`` is written, in one transaction.
        """

    async def remove_fleet_member(self, url: str, audit: AuditEvent) -> FleetMember | None:
        """Take ``url`` out of the fleet: its assignments go, the live agent enrolled at it
        is due to leave (reason ``removed``), ``audit`` is written; None if not a member."""

    async def pending_leaves(self, limit: int) -> list[Leave]:
        """Agents told to leave that have not confirmed it yet, oldest first."""

    async def mark_left(self, agent_id: uuid.UUID, reason: str) -> None:
        """The agent confirmed it dropped its tasks for ``reason``."""

    async def create_task(
        self, spec: TaskSpec, created_at: datetime, audit: AuditEvent | None = None
    ) -> Task:
        """Store a new task, assigned (undelivered) to every agent of the fleet its target
        matches (:mod:`.assignment`), atomically, with ``audit`` written in the same
        transaction."""

    async def get_task(self, task_id: uuid.UUID) -> Task | None:
        """The task, deleted or not."""

    async def delete_task(
        self, task_id: uuid.UUID, deleted_at: datetime, audit: AuditEvent
    ) -> Task | None:
        """Mark the task deleted at ``deleted_at``, writing ``audit`` in the same transaction,
        and make every agent assigned to it due for a removal (:meth:`pending_removals`).

        Its history stays readable, and its assignments stay (they say which results of
        it were due). None, and nothing written, if no live task has this id.
        """

    async def list_tasks(
        self,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None = None,
        state: TaskState | None = None,
        command: str | None = None,
    ) -> list[Task]:
        """Up to ``limit`` tasks, newest first (``created_at`` then ``task_id``, both
        descending), only those strictly after the key ``after`` in that order, in
        ``state`` if given, whose command contains ``command`` (literally) if given."""

    async def last_executions(
        self, task_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, ExecutionSummary]:
        """The newest execution (complete or not) of each of ``task_ids`` that has one."""

    async def update_task(
        self, task_id: uuid.UUID, change: TaskChange, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        """Apply ``change`` as a new revision effective at ``at`` (:func:`rules.revise`),
        re-delivered to every agent, with ``audit`` (its details filled with the old and
        new values, :func:`rules.change_details`) in the same transaction. A new target
        re-assigns it: members that no longer match are due to drop it. ``(task,
        False)`` and nothing written if it changes nothing; None if no live task."""

    async def pause_task(
        self, task_id: uuid.UUID, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        """Pause the task at ``at``: every agent is due to drop it (:meth:`pending_removals`).
        ``(task, False)`` and nothing written if already paused; None if no live task."""

    async def resume_task(
        self, task_id: uuid.UUID, at: datetime, audit: AuditEvent
    ) -> tuple[Task, bool] | None:
        """End the pause at ``at``: every agent is due the task again (same anchor).
        ``(task, False)`` and nothing written if not paused; None if no live task."""

    async def record_manual_execution(
        self,
        task_id: uuid.UUID,
        scheduled_at: datetime,
        audit: AuditEvent,
        online_since: datetime | None = None,
    ) -> Execution | None:
        """Record a run-now of the live task at ``scheduled_at`` (its current revision,
        expecting every agent assigned now, each due a delivery: :meth:`pending_manual_runs`),
        with ``audit``. None if no live task; ValueError if an execution of the task is
        already recorded at that instant (two run-nows in one microsecond).

        A run-on-one task's run-now expects, and is delivered to, one agent only
        (:func:`claim_rules.manual_choice` among those heard from since ``online_since``), which
        holds the instant's claim."""

    async def pending_manual_runs(
        self, agent_url: str, now: datetime, limit: int
    ) -> list[ManualRun]:
        """Run-nows of live tasks the agent at ``agent_url`` has not acknowledged, whose
        deadline is after ``now``, oldest first."""

    async def mark_manual_delivered(
        self, agent_url: str, runs: Sequence[tuple[uuid.UUID, datetime]]
    ) -> None:
        """The agent acknowledged these (task, scheduled_at) run-nows."""

    async def get_execution(self, task_id: uuid.UUID, scheduled_at: datetime) -> Execution | None:
        """One execution, or None. Raises UnknownTask."""

    async def record_results(
        self, results: Sequence[RunResult], received_at: datetime
    ) -> list[RecordOutcome]:
        """Store results, each at most once; one outcome per result, in order.

        Returns only after every STORED result is committed. A re-sent identical result is
        DUPLICATE; a different body under the same (task, agent, scheduled_at) is CONFLICT
        and changes nothing. A result of a deleted task is still taken if it was scheduled
        at or before the deletion (the run began before its agent could know), and is
        DELETED if scheduled after it. A scheduled result is judged by
        :func:`rules.scheduled_verdict` (SUPERSEDED, TASK_PAUSED), a manual one is taken
        only at an instant :meth:`record_manual_execution` recorded.
        """

    async def latest_complete_execution(
        self, task_id: uuid.UUID, now: datetime, report_grace: timedelta
    ) -> Execution | None:
        """The newest complete execution, or None. Raises UnknownTask.

        Its cost must not grow with the task's history.
        """

    async def list_executions(
        self, task_id: uuid.UUID, limit: int, before: datetime | None = None
    ) -> list[Execution]:
        """A task's history: up to ``limit`` executions, newest first, complete or not.

        Only executions scheduled strictly before ``before`` when it is given (paging).
        Raises UnknownTask. Its cost grows with ``limit``, not with the history.
        """

    async def recent_start_lateness(self, executions: int) -> list[tuple[uuid.UUID, float]]:
        """``(agent_id, seconds)`` from instant to process start of each first attempt that
        started, in the newest ``executions`` scheduled executions across every task (runs
        now have no schedule to be late on; retries start late on purpose). Its cost grows
        with ``executions``, not with the history (the dashboard's agents page)."""

    async def count_incomplete_executions(
        self, since: datetime, now: datetime, report_grace: timedelta
    ) -> int:
        """How many executions scheduled at or after ``since`` are past their reporting
        deadline at ``now`` (:func:`rules.completion_cutoff`) with fewer agents reported
        than they expect: the ones completed without some agent's result. Its cost grows
        with the executions since ``since``, not with the history (the server's metrics)."""

    async def prune_history(self, before: datetime, limit: int, keep: int = 0) -> int:
        """Delete up to ``limit`` executions scheduled strictly before ``before``, oldest
        first and across every task, with their results; returns how many went. The
        newest ``keep`` executions of each task are never deleted.

        Each call is one short transaction: executions another transaction is recording
        results for are skipped (left for a later call), never waited on. Tasks, their
        assignments and the audit log are kept. Once every execution of a task is gone,
        :meth:`latest_complete_execution` answers None for it, as for a new task.
        """

    async def ensure_partitions(self, now: datetime) -> int:
        """Make the history's partitions for the weeks until a few weeks past ``now``;
        returns how many weeks were added. Instants outside every week are stored all the
        same (in the partitions below and above them): this only keeps weeks apart."""

    async def drop_partitions(self, before: datetime, keep: int = 0) -> datetime:
        """Drop the history of the oldest week if it is wholly before ``before``, all but
        the newest ``keep`` executions of each task (kept, with their results); returns
        the instant before which the rest is to be pruned row by row
        (:meth:`prune_history`): the same again once no week is left to drop."""

    async def undelivered_tasks(self, agent_url: str, limit: int) -> list[Task]:
        """Active tasks assigned to this agent that it has not acknowledged (at their
        current revision), oldest first."""

    async def assigned_task_ids(self, agent_url: str) -> set[uuid.UUID]:
        """Every active (neither deleted nor paused) task assigned to this agent,
        delivered or not."""

    async def mark_delivered(
        self,
        agent_url: str,
        task_ids: Sequence[uuid.UUID],
        agent_id: uuid.UUID,
        revisions: Sequence[int] | None = None,
    ) -> None:
        """The agent at ``agent_url`` (whose identity is ``agent_id``) acknowledged these,
        at ``revisions`` (one per task; None: their current ones). A task changed since
        (a higher revision) stays undelivered."""

    async def mark_undelivered(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        """The agent lost these tasks (it was reset or its data folder wiped): resend them."""

    async def assigned_among(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Those of ``task_ids`` that are assigned to the agent at ``agent_url``, deleted
        tasks included (the results they were due before their deletion are accepted)."""

    async def pending_removals(self, agent_url: str, limit: int) -> list[uuid.UUID]:
        """Deleted or paused tasks the agent at ``agent_url`` has not yet confirmed it
        dropped."""

    async def mark_removed(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        """The agent at ``agent_url`` confirmed it dropped these deleted or paused tasks."""

    async def request_removal(
        self, agent_url: str, task_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        """The agent still has these tasks: make those that are deleted or paused (and
        assigned to it) due for removal again. Returns them."""

    async def claim_instant(
        self, claim: Claim, now: datetime, grace: timedelta, online_since: datetime
    ) -> ClaimAnswer:
        """Answer an agent's claim of an instant of a run-on-one task
        (:func:`claim_rules.claim_verdict`): at most one agent is ever GRANTED one (task,
        instant), and is granted it again if it asks again; ``online_since``: agents
        heard from since are online; ``grace``: ``--claim-grace``. Raises nothing for an
        unknown task: the answer says so."""

    # -- agents and the audit log ------------------------------------------------------

    async def enrol_agent(
        self,
        agent_id: uuid.UUID,
        url: str,
        credential_hash: str,
        enrolled_at: datetime,
        audit: AuditEvent,
        labels: Mapping[str, str] = NO_LABELS,
    ) -> AgentRecord:
        """Record a new agent with the hash of its credential and its ``labels``, and
        ``audit``, atomically.

        Raises AgentConflict ``agent_exists`` if ``agent_id`` was ever enrolled (revoked or
        not: a join secret never takes over an identity), ``url_taken`` if a live agent
        already holds ``url``, ``url_revoked`` if a revoked agent still holds it (its URL
        not released by :meth:`release_agent_url`): a join secret never takes over the
        place of an agent an operator revoked either.
        """

    async def agent_by_credential(self, credential_hash: str) -> AgentRecord | None:
        """The agent (live or revoked) whose credential has this hash."""

    async def agent_for_url(self, url: str) -> AgentRecord | None:
        """The live agent enrolled at ``url``."""

    async def get_agent(self, agent_id: uuid.UUID) -> AgentRecord | None:
        """The agent (live or revoked) with this id."""

    async def record_heartbeat(
        self, agent_id: uuid.UUID, seen_at: datetime, heartbeat: Heartbeat
    ) -> bool:
        """The agent sent ``heartbeat`` at ``seen_at``. True if it brought labels other
        than the agent's stored ones: they replace them, and the targeted tasks of its URL
        are re-assigned (:mod:`.assignment`) in the same transaction."""

    async def revoke_agent(
        self, agent_id: uuid.UUID, revoked_at: datetime, audit: AuditEvent
    ) -> AgentRecord | None:
        """Revoke a live agent, writing ``audit`` in the same transaction, and make it due
        to leave (reason ``revoked``); None if there is no live agent with this id.

        A revoked agent no longer counts in the ``expected`` of new executions
        (:func:`~taskscheduler.server.store.fleet.expected_urls`)."""

    async def release_agent_url(
        self, agent_id: uuid.UUID, released_at: datetime, audit: AuditEvent
    ) -> AgentRecord | None:
        """An operator lets a new agent enrol at the URL of the revoked agent ``agent_id``;
        ``audit`` is written in the same transaction. Returns the record (unchanged, with
        no audit, if its URL was already released), None if no agent has this id; raises
        AgentConflict ``agent_live`` if it is not revoked."""

    async def list_agents(self) -> list[AgentRecord]:
        """Every agent ever enrolled, oldest first."""

    async def audit_events(self, limit: int, before: int | None = None) -> list[AuditEvent]:
        """The audit log, newest first: up to ``limit`` events with ids below ``before``."""

    async def observe_results(
        self, observed: Sequence[Observed], at: datetime, claim: Claimant | None = None
    ) -> list[Notification]:
        """Move the webhook states of ``observed``, in order (:func:`notify.rules.judge`),
        and store the notifications that raises (pending, created ``at``, claimed by
        ``claim`` if given), returned oldest first; one transaction."""

    async def update_notification(
        self,
        notification_id: int,
        status: DeliveryStatus,
        attempts: int,
        response_code: int | None,
        error: str | None,
        at: datetime,
    ) -> None:
        """Record a delivery attempt of a notification (its last, as of ``at``)."""

    async def list_notifications(
        self, task_id: uuid.UUID, limit: int, before: int | None = None
    ) -> list[Notification]:
        """The task's notifications, newest first; only ids below ``before`` if given."""

    async def pending_notifications(self, limit: int) -> list[Notification]:
        """Notifications not delivered nor given up yet, oldest first (sent again after
        a restart)."""

    async def claim_notifications(
        self,
        claim: Claimant,
        renew: Sequence[int],
        limit: int,
        at: datetime,
        release: Sequence[int] = (),
    ) -> list[Notification]:
        """Renew ``claim`` on the pending notifications ``renew``, give up its claims on
        ``release``; claim (and return, oldest first) up to ``limit`` pending ones
        unclaimed or whose claim lapsed (``at``: now, for a store without a clock of
        its own)."""
