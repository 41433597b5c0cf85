"""What the server keeps, behind one interface.

:class:`Store` is the contract; ``pgstore.PostgresStore`` (txpostgres) is the real one
and ``memstore.MemoryStore`` the fake used by unit tests. Both pass the same contract
suite (``tests/unit/test_store_contract.py``), the PostgreSQL one against a real server.

Meaning of an execution's completeness: an execution (one scheduled instant of a task)
is *complete* when every agent assigned to the task at the time has reported for it, or
when its reporting deadline ``scheduled_at + time_limit + report_grace`` has passed.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from taskscheduler.protocol import RunResult, TaskSpec


class StoreUnavailable(Exception):
    """The database cannot be reached right now; the caller should answer 503 and retry."""


class UnknownTask(LookupError):
    """No task has this id."""


@dataclass(frozen=True)
class Task:
    spec: TaskSpec
    created_at: datetime

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


@dataclass(frozen=True)
class Execution:
    """One scheduled instant of a task with the results reported for it."""

    task_id: uuid.UUID
    scheduled_at: datetime
    expected: int  # agents assigned when the execution was first reported
    results: tuple[RunResult, ...]  # ordered by agent_id

    @property
    def completion_time(self) -> datetime:
        """When the last reported run finished (the scheduled instant if none ran)."""
        finished = [r.finished_at for r in self.results if r.finished_at is not None]
        return max(finished, default=self.scheduled_at)


class Store(Protocol):
    async def start(self) -> None:
        """Connect and apply schema migrations. Raises StoreUnavailable if it cannot."""

    async def stop(self) -> None:
        """Close connections."""

    async def set_fleet(self, agent_urls: Sequence[str]) -> None:
        """Make ``agent_urls`` the agents every task runs on.

        Every existing task is assigned (undelivered) to agents new to the list; agents no
        longer in the list lose their assignments. Idempotent.
        """

    async def create_task(self, spec: TaskSpec, created_at: datetime) -> Task:
        """Store a new task, assigned (undelivered) to every agent of the fleet, atomically."""

    async def get_task(self, task_id: uuid.UUID) -> Task | None: ...

    async def record_results(
        self, results: Sequence[RunResult], received_at: datetime
    ) -> list[RecordOutcome]:
        """Store results, each at most once; one outcome per result, in order.

        Returns only after every STORED result is committed. A re-sent identical result is
        DUPLICATE; a different body under the same (task, agent, scheduled_at) is CONFLICT
        and changes nothing.
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

    async def undelivered_tasks(self, agent_url: str, limit: int) -> list[Task]:
        """Tasks assigned to this agent that it has not acknowledged, oldest first."""

    async def assigned_task_ids(self, agent_url: str) -> set[uuid.UUID]:
        """Every task assigned to this agent, delivered or not."""

    async def mark_delivered(
        self, agent_url: str, task_ids: Sequence[uuid.UUID], agent_id: uuid.UUID
    ) -> None:
        """The agent at ``agent_url`` (whose identity is ``agent_id``) acknowledged these."""

    async def mark_undelivered(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        """The agent lost these tasks (it was reset or its data folder wiped): resend them."""
