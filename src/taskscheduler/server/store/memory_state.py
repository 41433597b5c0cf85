"""The state of :class:`~taskscheduler.server.store.memory.MemoryStore`: its dictionaries,
the records they hold, and the helpers every domain mixin shares (audit, live task)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from taskscheduler.protocol import RunResult, Trigger
from taskscheduler.server.store.assignment import member_matches, rematch
from taskscheduler.server.store.fleet import missing_agents
from taskscheduler.server.store.records import (
    AgentRecord,
    AuditEvent,
    Execution,
    FleetMember,
    Leave,
    Task,
)
from taskscheduler.server.store.rules import Revision, utc


@dataclass
class Assignment:
    """One task's delivery state at one agent URL."""

    delivered: bool = False
    agent_id: uuid.UUID | None = None
    removal_pending: bool = False
    #: The agent at the URL matches the task's target (:mod:`.assignment`).
    matched: bool = True

    @property
    def live(self) -> bool:
        """The task runs at this URL (for an active task): ``LIVE_ASSIGNMENT_SQL``."""
        return self.matched and not self.removal_pending


@dataclass
class MemoryExecution:
    """One execution as stored: who it expects and the results in so far, by agent."""

    expected_urls: tuple[str, ...]
    trigger: Trigger = Trigger.SCHEDULE
    revision: int = 1
    results: dict[uuid.UUID, RunResult] = field(default_factory=dict)  # last attempts
    #: Every attempt, by (agent, attempt).
    attempts: dict[tuple[uuid.UUID, int], RunResult] = field(default_factory=dict)

    @property
    def expected(self) -> int:
        return len(self.expected_urls)

    def as_execution(
        self,
        task_id: uuid.UUID,
        scheduled_at: datetime,
        agents: Sequence[AgentRecord] | None = None,
    ) -> Execution:
        """The execution as the store reads it; ``agents`` (every agent, as
        ``list_agents`` orders them) name the missing ones (None: not asked)."""
        results = tuple(self.results[a] for a in sorted(self.results))
        return Execution(
            task_id=task_id,
            scheduled_at=scheduled_at,
            expected=len(self.expected_urls),
            results=results,
            trigger=self.trigger,
            revision=self.revision,
            expected_urls=self.expected_urls,
            attempts=tuple(self.attempts[k] for k in sorted(self.attempts)),
            missing=(
                () if agents is None else tuple(missing_agents(self.expected_urls, results, agents))
            ),
        )


@dataclass
class ManualDelivery:
    """A run-now to tell one agent of, until it acknowledges it or the deadline passes."""

    revision: int
    deadline: datetime
    delivered: bool = False


class MemoryState:
    """The dictionaries of the in-memory store, shared by its domain mixins."""

    def __init__(self) -> None:
        self._fleet: dict[str, FleetMember] = {}
        # agent_id -> the leave it has yet to confirm
        self._leaves: dict[uuid.UUID, Leave] = {}
        self._tasks: dict[uuid.UUID, Task] = {}
        # task_id -> agent_url -> delivery state
        self._assignments: dict[uuid.UUID, dict[str, Assignment]] = {}
        # task_id -> scheduled_at -> execution
        self._executions: dict[uuid.UUID, dict[datetime, MemoryExecution]] = {}
        self._revisions: dict[uuid.UUID, list[Revision]] = {}
        # task_id -> [paused_at, resumed_at or None]
        self._pauses: dict[uuid.UUID, list[tuple[datetime, datetime | None]]] = {}
        # (task_id, scheduled_at, agent_url) -> a run-now to deliver
        self._manual: dict[tuple[uuid.UUID, datetime, str], ManualDelivery] = {}
        # (task_id, scheduled_at) -> (holder's agent_id or None for a run-now's, its URL)
        self._claims: dict[tuple[uuid.UUID, datetime], tuple[uuid.UUID | None, str]] = {}
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

    def _rematch(self, task_ids: Iterable[uuid.UUID] | None = None, url: str | None = None) -> None:
        """Re-apply the targets of live tasks (``task_ids``, else every one) to their
        rows (at ``url``, else at every member): :mod:`.assignment`'s rule."""
        for task_id in self._assignments if task_ids is None else task_ids:
            task = self._tasks[task_id]
            if task.deleted:
                continue
            for at, assignment in self._assignments[task_id].items():
                if url is not None and at != url:
                    continue
                agent = next(
                    (a for a in self._agents.values() if a.url == at and not a.revoked), None
                )
                change = rematch(
                    assignment.matched,
                    member_matches(task.spec.options.target, agent),
                    not task.paused,
                    assignment.agent_id is not None,
                )
                if change is None:
                    continue
                assignment.matched = change.matched
                if change.removal_pending is not None:
                    assignment.removal_pending = change.removal_pending
                if change.undelivered:
                    assignment.delivered = False

    def _by_enrolment(self) -> list[AgentRecord]:
        """Every agent, in ``list_agents``' order."""
        return sorted(self._agents.values(), key=lambda a: (a.enrolled_at, a.agent_id))

    def _matched_urls(self, task_id: uuid.UUID) -> list[str]:
        """The members whose agent matches the task's target (what executions expect)."""
        return [url for url, a in self._assignments[task_id].items() if a.matched]

    def _live(self, task_id: uuid.UUID) -> Task | None:
        task = self._tasks.get(task_id)
        return None if task is None or task.deleted else task

    def _claimed_url(self, task_id: uuid.UUID, scheduled_at: datetime) -> str | None:
        """The URL of the agent holding the instant's claim (run on one), if claimed."""
        held = self._claims.get((task_id, scheduled_at))
        return None if held is None else held[1]
