"""How a run ended: what the runner reports, whether it saw the run end or found it after
a restart of the agent."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from taskscheduler.agent.spool import RunMarker, RunMarkers, Spool
from taskscheduler.protocol import Output, ResultStatus, RunResult, Trigger
from taskscheduler.schedule import format_instant

_log = Logger(namespace="taskscheduler.agent.outcome")

#: The reason a result carries when a restarted agent re-attached to its run.
REATTACHED = "re-attached after the agent restarted"


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended, and what it wrote."""

    status: ResultStatus  # SUCCEEDED, FAILED, TIMED_OUT, or LOST
    exit_code: int | None  # set when the shell exited by itself
    signal: int | None  # set when the shell was ended by a signal
    started_at: datetime  # aware UTC, from the wall clock
    finished_at: datetime
    duration: float  # seconds, from the monotonic clock when the agent saw it all
    stdout: Output
    stderr: Output
    pid: int | None = None  # the shell's pid (= its process group); None if it never started
    reason: str | None = None  # how the outcome came to be known, when it is not plain


@dataclass(frozen=True)
class RecoveredRun:
    """A run a previous life of the agent started, and how it ends."""

    task_id: uuid.UUID
    scheduled_at: datetime
    started_at: datetime | None
    outcome: Deferred[RunOutcome]
    still_running: bool
    #: What its journal line says (None: not known, as for a run it lacks).
    revision: int | None = None
    trigger: Trigger | None = None
    attempt: int = 1  # its number, from its run id (a retry's is above 1)


def status_of(exit_code: int | None, signum: int | None) -> ResultStatus:
    if exit_code == 0 and signum is None:
        return ResultStatus.SUCCEEDED
    return ResultStatus.FAILED


def spool_lost_runs(markers: RunMarkers, spool: Spool, agent_id: uuid.UUID) -> None:
    """Spool a ``lost`` result for each run an older version of the agent marked as
    started (``running/``) and never reported; each marker goes once its result is
    durable, not before."""
    for marker in markers.leftovers():
        if (marker.task_id, marker.scheduled_at, 1) in spool:
            markers.clear(marker.task_id, marker.scheduled_at)
            continue
        _log.warn(
            "task {task_id}: the run at {scheduled_at} was lost when the agent stopped",
            task_id=str(marker.task_id),
            scheduled_at=format_instant(marker.scheduled_at),
        )
        lost = lost_result(marker.task_id, agent_id, marker.scheduled_at, marker.started_at)
        spool.add(lost).addCallback(_clear_marker, markers, marker)


def _clear_marker(spooled: bool, markers: RunMarkers, marker: RunMarker) -> None:
    markers.clear(marker.task_id, marker.scheduled_at)


def lost_result(
    task_id: uuid.UUID, agent_id: uuid.UUID, scheduled_at: datetime, started_at: datetime | None
) -> RunResult:
    """The result of a run whose end nobody saw: a marker an older version of the agent
    (``running/``) left when it stopped."""
    return RunResult(
        task_id=task_id,
        agent_id=agent_id,
        scheduled_at=scheduled_at,
        status=ResultStatus.LOST,
        started_at=started_at,
    )
