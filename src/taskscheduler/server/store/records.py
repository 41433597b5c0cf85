"""The records the store reads and writes (tasks, executions, agents, the fleet, audit
events) and its exceptions; the :class:`~taskscheduler.server.store.interface.Store`
protocol that takes and returns them is :mod:`~taskscheduler.server.store.interface`.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from taskscheduler.protocol import ResultStatus, RunResult, TaskSpec, Trigger
from taskscheduler.protocol.labels import NO_LABELS
from taskscheduler.schedule import Frequency


class StoreUnavailable(Exception):
    """The database cannot be reached right now; the caller should answer 503 and retry."""


class CommitInDoubt(StoreUnavailable):
    """The connection broke while a change was being committed: it may or may not have
    been made (the caller should say so, and not claim that nothing changed)."""


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
    #: The agent's labels (``--label``); none from an agent that predates them.
    labels: Mapping[str, str] = field(default_factory=lambda: NO_LABELS)


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
    #: Its labels as it last said them (at enrolment, then in each heartbeat).
    labels: Mapping[str, str] = field(default_factory=lambda: NO_LABELS)

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
    #: Every attempt of every agent, by agent then attempt (``results`` holds each
    #: agent's last); empty when the store read only the last ones.
    attempts: tuple[RunResult, ...] = ()
    #: The expected agents with no result: (URL, the agent answering there or None), as
    #: :func:`fleet.missing_agents` names them, read with the execution by
    #: ``latest_complete_execution``, ``list_executions`` and ``get_execution`` (at the
    #: cost of the execution's expected URLs, not of the fleet); empty elsewhere.
    missing: tuple[tuple[str, uuid.UUID | None], ...] = ()

    @property
    def reported(self) -> int:
        """The agents counted as reported (:func:`rules.reported_agents`)."""
        return sum(1 for result in self.results if result.final)

    def attempts_of(self, agent_id: uuid.UUID) -> tuple[RunResult, ...]:
        """The attempts of ``agent_id``'s run, first to last."""
        return tuple(r for r in self.attempts if r.agent_id == agent_id)

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
    statuses: tuple[ResultStatus, ...]  # one per agent reported: its last attempt's
    #: Agents whose last attempt is final (None: every one of ``statuses``).
    final_count: int | None = None
    #: The agent of each of ``statuses``, in the same order (by agent id).
    agent_ids: tuple[uuid.UUID, ...] = ()

    @property
    def reported(self) -> int:
        """The agents counted as reported (:func:`rules.reported_agents`)."""
        return len(self.statuses) if self.final_count is None else self.final_count


@dataclass(frozen=True)
class TaskChange:
    """What a PATCH asks to change (None: unchanged)."""

    command: str | None = None
    frequency: Frequency | None = None
    time_limit: timedelta | None = None
    #: A cron expression and its zone, as given (checked, and completed from the task's
    #: own, inside the change's transaction: ``rules.revise``).
    cron: str | None = None
    timezone: str | None = None
    #: The option fields the PATCH gave, as sent: parsed against the task's own options
    #: inside the change's transaction (``max_concurrent`` needs the overlap in force).
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ManualRun:
    """A run-now an agent has not yet acknowledged: ``spec`` is the task as it is now
    (so that an agent that does not hold it, the task being paused, can still run it)."""

    spec: TaskSpec
    scheduled_at: datetime
    revision: int
    deadline: datetime  # past it the agent would skip it: no point delivering it


class ClaimStatus(enum.StrEnum):
    """The answer to an agent's claim of an instant of a run-on-one task."""

    GRANTED = "granted"  # this agent runs the instant (it holds the claim)
    HELD = "held"  # another agent holds it: this one records nothing for the instant
    WAIT = "wait"  # another agent is preferred: ask again at ``retry_at``


@dataclass(frozen=True)
class Claim:
    """An agent asks to run the instant ``scheduled_at`` of a run-on-one task, at the
    task's ``revision`` (the one it holds)."""

    task_id: uuid.UUID
    scheduled_at: datetime
    agent_id: uuid.UUID
    agent_url: str
    revision: int


@dataclass(frozen=True)
class ClaimAnswer:
    """The store's answer to a :class:`Claim`: a status (``holder``: the agent that
    holds it, if any; ``retry_at``: when to ask again, for WAIT), or ``refused`` with the
    reason the instant cannot be claimed by anyone (or not by this agent)."""

    status: ClaimStatus | None
    holder: uuid.UUID | None = None
    retry_at: datetime | None = None
    refused: ClaimRefusal | None = None


class ClaimRefusal(enum.StrEnum):
    """Why a claim is refused: the result rules (:func:`rules.scheduled_verdict`), or the
    claimer, or the task's way of running."""

    UNKNOWN_TASK = "unknown_task"
    MISALIGNED = "misaligned"
    SUPERSEDED = "superseded"
    DELETED = "deleted"
    TASK_PAUSED = "task_paused"
    NOT_ASSIGNED = "not_assigned"  # the claimer is not one of the task's agents
    NOT_RUN_ON_ONE = "not_run_on_one"  # every agent runs this task: nothing to claim
