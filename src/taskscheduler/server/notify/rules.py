"""When a webhook is due (pure: no I/O), and the records that say so.

De-duplication: one :class:`NotifyState` per (task, agent) for a task that runs on all
its agents (each host fails and recovers on its own: with one state per task, one
broken host among healthy ones would flap it every instant), and per task for a
``run_on: one`` task (whichever agent ran it, the task works or not; ``agent_key`` is
then the nil UUID). A state turns failing at the first final failed, timed-out or lost
result, and only that sends an alert; it turns back at the next success, which sends
``recovered``. Results older than the newest one the state has seen change nothing
(an agent's spool may report old ones late). Non-final attempts (the agent will retry)
and skipped or replaced runs change nothing either. Both stores apply :func:`judge`, to
a batch of results at a time (one transaction however many results a busy server has
queued).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from taskscheduler.protocol import ResultStatus, RunResult
from taskscheduler.protocol.notify import NotifyConfig, NotifyEvent
from taskscheduler.protocol.options import RunOn

#: The agent key of a run-on-one task's single state.
WHOLE_TASK = uuid.UUID(int=0)

_FAILURES = {
    ResultStatus.FAILED: NotifyEvent.FAILED,
    ResultStatus.TIMED_OUT: NotifyEvent.TIMED_OUT,
    ResultStatus.LOST: NotifyEvent.LOST,
}


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"  # not delivered yet (being tried, or waiting for a retry)
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # given up: refused (4xx), or no 2xx before the retries ran out


@dataclass(frozen=True)
class NotifyState:
    failing: bool
    #: The instant of the newest result this state has seen.
    last_at: datetime


@dataclass(frozen=True)
class Observed:
    """A final result of a task with a webhook, as the store judges it."""

    task_id: uuid.UUID
    agent_id: uuid.UUID
    agent_key: uuid.UUID
    scheduled_at: datetime
    status: ResultStatus
    exit_code: int | None
    config: NotifyConfig


@dataclass(frozen=True)
class Notification:
    """One webhook, from the transition that made it to its last delivery attempt."""

    notification_id: int
    task_id: uuid.UUID
    agent_id: uuid.UUID
    scheduled_at: datetime
    event: NotifyEvent
    result_status: ResultStatus
    exit_code: int | None
    url: str
    created_at: datetime
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: int = 0
    response_code: int | None = None
    error: str | None = None
    updated_at: datetime | None = None


def agent_key(run_on: RunOn, agent_id: uuid.UUID) -> uuid.UUID:
    """Whose state a result moves (see the module docstring)."""
    return WHOLE_TASK if run_on is RunOn.ONE else agent_id


def watched(result: RunResult) -> bool:
    """Whether a result can move a state at all (final, and a success or a failure)."""
    return result.final and (result.status is ResultStatus.SUCCEEDED or result.status in _FAILURES)


def transition(
    state: NotifyState | None, status: ResultStatus, at: datetime
) -> tuple[NotifyState | None, NotifyEvent | None]:
    """The new state (None: unchanged) and the event it raises, if any, for a final
    result of ``status`` at ``at`` (no state yet: the task worked until now)."""
    if state is not None and at <= state.last_at:
        return None, None  # late: a newer result already spoke
    failing = state is not None and state.failing
    if status is ResultStatus.SUCCEEDED:
        return NotifyState(False, at), NotifyEvent.RECOVERED if failing else None
    if status in _FAILURES:
        return NotifyState(True, at), None if failing else _FAILURES[status]
    return None, None


def due(event: NotifyEvent | None, config: NotifyConfig) -> bool:
    """Whether ``event`` is one the webhook asked for (the state moves regardless)."""
    return event is not None and event in config.on


Key = tuple[uuid.UUID, uuid.UUID]  # (task_id, agent_key)


def judge(
    states: Mapping[Key, NotifyState | None], observed: Sequence[Observed]
) -> tuple[dict[Key, NotifyState], list[tuple[Observed, NotifyEvent]]]:
    """:func:`transition` over ``observed`` in order, from ``states``: the states that
    changed, and the events due (each with the result that raised it)."""
    changed: dict[Key, NotifyState] = {}
    events: list[tuple[Observed, NotifyEvent]] = []
    for o in observed:
        key = (o.task_id, o.agent_key)
        new, event = transition(changed.get(key, states.get(key)), o.status, o.scheduled_at)
        if new is None:
            continue
        changed[key] = new
        if event is not None and due(event, o.config):
            events.append((o, event))
    return changed, events
