"""The rules that decide what the store answers, as pure functions (no I/O).

Both stores and the API call these; where the PostgreSQL store lets the database decide
(completeness, the deletion cut-off), its SQL states the same rule, and
``tests/unit/test_store_rules.py`` feeds the same cases to both and asserts equal answers.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from taskscheduler.protocol import RunResult, TaskSpec
from taskscheduler.schedule import execution_index
from taskscheduler.server.store.interface import AgentConflict, AgentRecord

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_USEC = timedelta(microseconds=1)

# -- time ------------------------------------------------------------------------------------


def utc(value: datetime) -> datetime:
    """Every instant the store gives back is in UTC, whatever zone it was given in."""
    return value.astimezone(UTC)


def utc_or_none(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def utc_spec(spec: TaskSpec) -> TaskSpec:
    """The task as the store keeps it: its anchor in UTC."""
    return TaskSpec(
        task_id=spec.task_id,
        command=spec.command,
        frequency=spec.frequency,
        anchor=utc(spec.anchor),
        time_limit=spec.time_limit,
    )


def utc_result(result: RunResult) -> RunResult:
    """The result as the store keeps it: every instant in UTC."""
    return RunResult(
        task_id=result.task_id,
        agent_id=result.agent_id,
        scheduled_at=utc(result.scheduled_at),
        status=result.status,
        exit_code=result.exit_code,
        signal=result.signal,
        started_at=utc_or_none(result.started_at),
        finished_at=utc_or_none(result.finished_at),
        stdout=result.stdout,
        stderr=result.stderr,
        reason=result.reason,
    )


# -- which results are taken ----------------------------------------------------------------


def on_schedule(anchor: datetime, interval: timedelta, scheduled_at: datetime) -> bool:
    """Whether ``scheduled_at`` is one of the task's instants (``anchor + k * interval``,
    ``k >= 1``). A result for any other instant is MISALIGNED."""
    return execution_index(anchor, interval, scheduled_at) is not None


def after_deletion(deleted_at: datetime | None, scheduled_at: datetime) -> bool:
    """Whether a result is DELETED: scheduled strictly after its task's deletion. One
    scheduled at or before it is taken (the run began before its agent could know)."""
    return deleted_at is not None and scheduled_at > deleted_at


def _micros(value: datetime | None) -> int | None:
    return None if value is None else (value - _EPOCH) // _USEC


def result_digest(result: RunResult) -> bytes:
    """SHA-256 of a result's body (everything but its key), in an unambiguous encoding.

    Instants count by their microseconds since the epoch, so the zone they were written
    in does not matter. A result without a reason digests as it did before reasons
    existed, so a result stored then and sent again now is still a duplicate.
    """
    fields: list[Any] = [
        result.status.value,
        result.exit_code,
        result.signal,
        _micros(result.started_at),
        _micros(result.finished_at),
        [result.stdout.size, result.stdout.truncated, len(result.stdout.data)],
        [result.stderr.size, result.stderr.truncated, len(result.stderr.data)],
    ]
    if result.reason is not None:
        fields.append(result.reason)
    head = json.dumps(fields).encode("ascii")
    digest = hashlib.sha256(head)
    digest.update(b"\n")
    digest.update(result.stdout.data)
    digest.update(result.stderr.data)
    return digest.digest()


def same_result(stored: RunResult, reported: RunResult) -> bool:
    """Whether ``reported``, under the key of ``stored``, is the same report (DUPLICATE)
    rather than a different one (CONFLICT): their digests match."""
    return result_digest(stored) == result_digest(reported)


# -- completeness ---------------------------------------------------------------------------


def reported_enough(reported: int, expected: int) -> bool:
    """Whether an execution has heard from every agent it expects."""
    return reported >= expected


def completion_cutoff(now: datetime, time_limit: timedelta, report_grace: timedelta) -> datetime:
    """Executions scheduled strictly before this instant are past their reporting
    deadline (``scheduled_at + time_limit + report_grace``) at ``now``."""
    return now - time_limit - report_grace


def is_complete(
    scheduled_at: datetime,
    reported: int,
    expected: int,
    *,
    now: datetime,
    time_limit: timedelta,
    report_grace: timedelta,
) -> bool:
    """An execution is complete when every agent it expects has reported, or when its
    reporting deadline has passed (the missing agents are given up on)."""
    return reported_enough(reported, expected) or scheduled_at < completion_cutoff(
        now, time_limit, report_grace
    )


# -- agents ---------------------------------------------------------------------------------


def enrolment_conflict(
    agent_id: uuid.UUID, url: str, *, identity_known: bool, url_holders_live: Sequence[bool]
) -> AgentConflict | None:
    """Why an agent may not enrol, or None.

    ``identity_known``: ``agent_id`` was ever enrolled (a join secret never takes over an
    identity, revoked or not). ``url_holders_live``: for each agent still holding ``url``
    (its URL not released), whether it is live; a revoked holder blocks the URL too, so a
    join secret never takes over the place of an agent an operator revoked.
    """
    if identity_known:
        return AgentConflict("agent_exists", f"agent {agent_id} is already enrolled")
    if any(url_holders_live):
        return AgentConflict("url_taken", f"a live agent is already enrolled at {url}")
    if url_holders_live:
        return AgentConflict("url_revoked", f"the revoked agent at {url} still holds it")
    return None


def release_conflict(record: AgentRecord) -> AgentConflict | None:
    """Why the URL of ``record`` may not be released, or None: only a revoked agent's."""
    if not record.revoked:
        return AgentConflict("agent_live", f"agent {record.agent_id} is not revoked")
    return None
