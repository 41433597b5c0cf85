"""What the server keeps, behind one interface: the :class:`Store` protocol, the records
it reads and writes, and its exceptions.

``postgres.PostgresStore`` (txpostgres) is the real store and ``memory.MemoryStore`` the
one unit tests use; both pass the same contract suite (``tests/unit/test_store_contract.py``),
the PostgreSQL one against a real server. What makes an execution complete, two results
the same, or a result misaligned or too late is decided in :mod:`.rules`.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from taskscheduler.protocol import ResultStatus, RunResult, TaskSpec, Trigger
from taskscheduler.schedule import Frequency


class StoreUnavailable(Exception):
    """The database cannot be reached right now; the caller should answer 503 and retry."""


class UnknownTask(LookupError):
    """No task has this id."""


class AgentConflict(Exception):
    """An agent change the store refuses: ``code`` is ``agent_exists``, ``url_taken``,
    ``url_revoked`` (enrolment) or ``agent_live`` (release)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Heartbeat:
    """What an agent said of itself in its last heartbeat."""

    version: str
    hostname: str
    started_at: datetime | None
    tasks: int
    running: int
    spooled: int
    dropped_results: int


@dataclass(frozen=True)
class AgentRecord:
    """An enrolled agent. Its credential is known only by its hash, which is not here."""

    agent_id: uuid.UUID
    url: str
    enrolled_at: datetime
    revoked_at: datetime | None = None
    #: When an operator let another agent enrol at this revoked agent's URL.
    url_released_at: datetime | None = None
    #: When its last heartbeat came, and what it said (None: none yet).
    last_seen_at: datetime | None = None
    heartbeat: Heartbeat | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class FleetMember:
    """An agent URL every active task runs on."""

    url: str
    added_at: datetime


@dataclass(frozen=True)
class Leave:
    """An agent told to drop all its tasks (``reason``: removed or revoked) that has not
    yet confirmed it did."""

    agent_id: uuid.UUID
    url: str
    reason: str


@dataclass(frozen=True)
class AuditEvent:
    """One line of the append-only audit log: who did what, when, from where."""

    at: datetime
    actor: str
    action: str
    target: str
    peer: str
    details: dict[str, Any] = field(default_factory=dict)
    event_id: int | None = None


class TaskState(enum.StrEnum):
    ACTIVE = "active"
    PAUSED = "paused"
    DELETED = "deleted"


@dataclass(frozen=True)
class Task:
    spec: TaskSpec
    created_at: datetime
    deleted_at: datetime | None = None
    paused_at: datetime | None = None  # None unless paused now
    updated_at: datetime | None = None  # the last change (PATCH, pause, resume), if any

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    @property
    def state(self) -> TaskState:
        if self.deleted:
            return TaskState.DELETED
        return TaskState.PAUSED if self.paused else TaskState.ACTIVE

    @property
    def task_id(self) -> uuid.UUID:
        return self.spec.task_id


class RecordOutcome(enum.StrEnum):
    """What happened to one reported result."""

    STORED = "stored"  # new, committed
    DUPLICATE = "duplicate"  # the identical result was already stored: a no-op
    CONFLICT = "conflict"  # a different result is stored under the same key
    UNKNOWN_TASK = "unknown_task"  # no such task
    MISALIGNED = "misaligned"  # scheduled_at is not one of the task's instants
    DELETED = "deleted"  # the task was deleted before this instant
    SUPERSEDED = "superseded"  # ran a revision other than the one in effect at its instant
    TASK_PAUSED = "task_paused"  # scheduled at an instant while the task was paused


@dataclass(frozen=True)
class Execution:
    """One scheduled instant of a task with the results reported for it."""

    task_id: uuid.UUID
    scheduled_at: datetime
    expected: int  # agents assigned when the execution was first reported (or run now)
    results: tuple[RunResult, ...]  # ordered by agent_id
    trigger: Trigger = Trigger.SCHEDULE
    revision: int = 1  # the task revision it ran
    #: The URLs of the agents expected, as assigned when the execution was created (None:
    #: recorded before the server kept them).
    expected_urls: tuple[str, ...] | None = None

    @property
    def completion_time(self) -> datetime:
        """When the last reported run finished (the scheduled instant if none ran)."""
        finished = [r.finished_at for r in self.results if r.finished_at is not None]
        return max(finished, default=self.scheduled_at)


@dataclass(frozen=True)
class ExecutionSummary:
    """An execution without its outputs: what a task list shows of its last one."""

    task_id: uuid.UUID
    scheduled_at: datetime
    trigger: Trigger
    revision: int
    expected: int
    statuses: tuple[ResultStatus, ...]  # one per reported result


@dataclass(frozen=True)
class TaskChange:
    """What a PATCH asks to change (None: unchanged)."""

    command: str | None = None
    frequency: Frequency | None = None
    time_limit: timedelta | None = None


@dataclass(frozen=True)
class ManualRun:
    """A run-now an agent has not yet acknowledged: ``spec`` is the task as it is now
    (so that an agent that does not hold it, the task being paused, can still run it)."""

    spec: TaskSpec
    scheduled_at: datetime
    revision: int
    deadline: datetime  # past it the agent would skip it: no point delivering it


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
        """Store a new task, assigned (undelivered) to every agent of the fleet, atomically,
        with ``audit`` written in the same transaction."""

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
        new values, :func:`rules.change_details`) in the same transaction. ``(task,
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
        self, task_id: uuid.UUID, scheduled_at: datetime, audit: AuditEvent
    ) -> Execution | None:
        """Record a run-now of the live task at ``scheduled_at`` (its current revision,
        expecting every agent assigned now, each due a delivery: :meth:`pending_manual_runs`),
        with ``audit``. None if no live task; ValueError if an execution of the task is
        already recorded at that instant (two run-nows in one microsecond)."""

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

    async def prune_history(self, before: datetime, limit: int, keep: int = 0) -> int:
        """Delete up to ``limit`` executions scheduled strictly before ``before``, oldest
        first and across every task, with their results; returns how many went. The
        newest ``keep`` executions of each task are never deleted.

        Each call is one short transaction: executions another transaction is recording
        results for are skipped (left for a later call), never waited on. Tasks, their
        assignments and the audit log are kept. Once every execution of a task is gone,
        :meth:`latest_complete_execution` answers None for it, as for a new task.
        """

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

    # -- agents and the audit log ------------------------------------------------------

    async def enrol_agent(
        self,
        agent_id: uuid.UUID,
        url: str,
        credential_hash: str,
        enrolled_at: datetime,
        audit: AuditEvent,
    ) -> AgentRecord:
        """Record a new agent with the hash of its credential, and ``audit``, atomically.

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
    ) -> None:
        """The agent sent ``heartbeat`` at ``seen_at``."""

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
