"""The rules that decide what the store answers, as pure functions (no I/O).

Both stores and the API call these; where the PostgreSQL store lets the database decide
(completeness, the deletion cut-off), its SQL states the same rule, and
``tests/unit/test_store_rules.py`` feeds the same cases to both and asserts equal answers.
Those of run on one (which agent runs an instant) are in :mod:`.claim_rules`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from taskscheduler.cron import DEFAULT_TIMEZONE, Cron
from taskscheduler.protocol import RunResult, TaskSpec, Trigger
from taskscheduler.protocol.fields import InvalidMessage, parse_cron_fields
from taskscheduler.protocol.options import TaskOptions, env_names, options_to_json, parse_options
from taskscheduler.schedule import CronTimes, Grid, Schedule, execution_index, next_instants
from taskscheduler.server.store.records import (
    AgentConflict,
    AgentRecord,
    RecordOutcome,
    Task,
    TaskChange,
)

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
    return replace(spec, anchor=utc(spec.anchor))


def utc_result(result: RunResult) -> RunResult:
    """The result as the store keeps it: every instant in UTC."""
    return replace(
        result,
        scheduled_at=utc(result.scheduled_at),
        started_at=utc_or_none(result.started_at),
        finished_at=utc_or_none(result.finished_at),
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


@dataclass(frozen=True)
class Revision:
    """When a revision of a task took effect, and its grid (or its cron expression)."""

    revision: int
    effective_at: datetime  # revision 1: the anchor; later ones: the PATCH's instant
    anchor: datetime
    interval: timedelta | None  # None for a cron revision
    cron: Cron | None = None

    @property
    def schedule(self) -> Schedule:
        if self.cron is not None:
            return CronTimes(self.cron, self.anchor)
        if self.interval is None:
            raise ValueError(f"revision {self.revision} has neither interval nor cron")
        return Grid(self.anchor, self.interval)

    @property
    def typical_interval(self) -> timedelta:
        return self.schedule.typical_interval()


def revision_of(spec: TaskSpec, effective_at: datetime) -> Revision:
    """The revision ``spec`` is, taking effect at ``effective_at``."""
    interval = None if spec.frequency is None else spec.frequency.interval
    return Revision(spec.revision, utc(effective_at), utc(spec.anchor), interval, spec.cron)


#: A pause: (paused_at, resumed_at), resumed_at None while it lasts.
Pause = tuple[datetime, datetime | None]


def revision_at(revisions: Sequence[Revision], scheduled_at: datetime) -> Revision | None:
    """The revision in effect at ``scheduled_at``: the latest whose effective instant is
    strictly before it (an instant at the very moment of a change is the old one's)."""
    current = None
    for revision in sorted(revisions, key=lambda r: r.revision):
        if revision.effective_at < scheduled_at:
            current = revision
    return current


def in_pause(pauses: Sequence[Pause], scheduled_at: datetime) -> bool:
    """Whether ``scheduled_at`` falls in a pause: after its start, up to and including
    its end (the instant of the resume was still paused), or after it while it lasts."""
    return any(
        paused_at < scheduled_at and (resumed_at is None or scheduled_at <= resumed_at)
        for paused_at, resumed_at in pauses
    )


def scheduled_verdict(
    revisions: Sequence[Revision],
    pauses: Sequence[Pause],
    deleted_at: datetime | None,
    scheduled_at: datetime,
    reported_revision: int | None,
) -> tuple[RecordOutcome | None, int]:
    """Whether a scheduled result is taken (None) or why not, and the revision it counts
    under (an older agent's result, ``reported_revision`` None, is the one in effect).

    It must be on the grid of the revision in effect at its instant and have run that
    revision, else SUPERSEDED (on the grid of another revision: an agent not yet told of
    the change) or MISALIGNED (on no grid of the task); then DELETED after the deletion,
    TASK_PAUSED inside a pause. So an execution never mixes revisions.
    """
    current = revision_at(revisions, scheduled_at)
    if current is not None and current.schedule.is_instant(scheduled_at):
        if reported_revision is not None and reported_revision != current.revision:
            return RecordOutcome.SUPERSEDED, current.revision
        if after_deletion(deleted_at, scheduled_at):
            return RecordOutcome.DELETED, current.revision
        if in_pause(pauses, scheduled_at):
            return RecordOutcome.TASK_PAUSED, current.revision
        return None, current.revision
    if any(r.schedule.is_instant(scheduled_at) for r in revisions):
        return RecordOutcome.SUPERSEDED, 0
    return RecordOutcome.MISALIGNED, 0


def manual_verdict(
    recorded: bool, deleted_at: datetime | None, scheduled_at: datetime
) -> RecordOutcome | None:
    """A manual result is taken iff a run-now of the task was recorded at its instant
    (else it is MISALIGNED, as any instant that is not the task's)."""
    if not recorded:
        return RecordOutcome.MISALIGNED
    if after_deletion(deleted_at, scheduled_at):
        return RecordOutcome.DELETED
    return None


def is_manual(result: RunResult) -> bool:
    return result.trigger is Trigger.MANUAL


# -- changing a task -------------------------------------------------------------------------


def revise(spec: TaskSpec, change: TaskChange, at: datetime) -> TaskSpec | None:
    """The task's next revision, effective at ``at``, or None if ``change`` changes nothing.

    A new frequency re-anchors at ``at`` (its first instant is ``at`` + interval); a new
    command or time limit keeps the anchor, so the task stays on its grid. A new cron
    expression or time zone, or a switch between frequency and cron, re-bases at ``at``
    too (its first instant is the first after ``at``). A ``cron`` without ``timezone`` keeps
    the task's zone (UTC if it had none); a ``timezone`` alone keeps its expression.
    """
    new = spec
    if change.command is not None and change.command != spec.command:
        new = replace(new, command=change.command)
    if change.time_limit is not None and change.time_limit != spec.time_limit:
        new = replace(new, time_limit=change.time_limit)
    if change.options:
        # InvalidMessage (a 400) if the fields do not fit the options in force.
        new = replace(new, options=parse_options(change.options, spec.options))
    if change.frequency is not None and (change.cron is not None or change.timezone is not None):
        raise InvalidMessage("give either 'frequency' or 'cron' (with 'timezone'), not both")
    if change.frequency is not None and change.frequency != spec.frequency:
        # "every 60 seconds" for "every 1 minute" is a new spelling, not a new grid.
        same_grid = (
            spec.frequency is not None and change.frequency.interval == spec.frequency.interval
        )
        new = replace(
            new,
            frequency=change.frequency,
            cron=None,
            anchor=new.anchor if same_grid else utc(at),
        )
    if change.cron is not None or change.timezone is not None:
        expression = change.cron if change.cron is not None else _expression(spec)
        timezone = change.timezone or (spec.cron.timezone if spec.cron else DEFAULT_TIMEZONE)
        cron = parse_cron_fields(expression, timezone)
        if cron != spec.cron:
            new = replace(new, frequency=None, cron=cron, anchor=utc(at))
    if new == spec:
        return None
    return replace(new, revision=spec.revision + 1)


def _expression(spec: TaskSpec) -> str:
    if spec.cron is None:
        raise InvalidMessage(
            "'timezone' applies to a cron expression: give 'cron' too (the task runs "
            f"{spec.frequency})"
        )
    return spec.cron.expression


def change_details(old: TaskSpec, new: TaskSpec) -> dict[str, Any]:
    """The audit details of a change: the fields that changed, before and after."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    if old.command != new.command:
        before["command"], after["command"] = old.command, new.command
    if old.frequency != new.frequency:
        before["frequency"] = None if old.frequency is None else str(old.frequency)
        after["frequency"] = None if new.frequency is None else str(new.frequency)
    if old.cron != new.cron:
        for side, cron in ((before, old.cron), (after, new.cron)):
            side["cron"] = None if cron is None else cron.expression
            side["timezone"] = None if cron is None else cron.timezone
    if old.time_limit != new.time_limit:
        before["time_limit_seconds"] = int(old.time_limit.total_seconds())
        after["time_limit_seconds"] = int(new.time_limit.total_seconds())
    old_options, new_options = audited_options(old.options), audited_options(new.options)
    for name, value in new_options.items():
        if old_options[name] != value:
            before[name], after[name] = old_options[name], value
    return {"old": before, "new": after, "revision": new.revision}


def audited_options(options: TaskOptions) -> dict[str, Any]:
    """The options as audit records keep them: the environment by its names only (its
    values may be secrets)."""
    shown = options_to_json(options)
    shown["env"] = env_names(options)
    return shown


def next_instant(task: Task, now: datetime) -> datetime | None:
    """The task's next instant strictly after ``now``; None when paused or deleted."""
    if task.deleted or task.paused:
        return None
    return task.spec.schedule.next_after(now)


#: How many instants GET shows in ``next_instants``.
NEXT_INSTANTS_SHOWN = 5


def upcoming_instants(task: Task, now: datetime, n: int = NEXT_INSTANTS_SHOWN) -> list[datetime]:
    """The task's next ``n`` instants strictly after ``now``; none when paused or deleted."""
    if task.deleted or task.paused:
        return []
    return next_instants(task.spec.schedule, now, n)


def manual_run_deadline(scheduled_at: datetime, interval: timedelta) -> datetime:
    """Until when a run-now is delivered: an agent's starting deadline is never longer
    than the task's interval (a cron task's typical one: the shortest gap between its
    times), so past it the agent would only skip it."""
    return scheduled_at + interval


def manual_instant(now: datetime, schedule: Schedule) -> datetime:
    """The instant of a run-now at ``now``: ``now``, moved one microsecond on if it falls
    exactly on one of the task's instants (an execution is keyed by its instant)."""
    at = utc(now)
    while schedule.is_instant(at):
        at += _USEC
    return at


def newest_kept(instants: Sequence[datetime], keep: int) -> set[datetime]:
    """Of one task's execution instants, the newest ``keep``: retention never deletes them."""
    return set(sorted(instants, reverse=True)[:keep]) if keep > 0 else set()


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
    if not result.final:
        # Only an attempt to be retried says so: a final one digests as before retries.
        fields.append({"final": False})
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


def last_attempts(attempts: Iterable[RunResult]) -> tuple[RunResult, ...]:
    """Each agent's result in an execution, by agent: its last attempt (the highest
    number it reported; an earlier one arriving late changes nothing)."""
    last: dict[uuid.UUID, RunResult] = {}
    for result in attempts:
        seen = last.get(result.agent_id)
        if seen is None or result.attempt > seen.attempt:
            last[result.agent_id] = result
    return tuple(last[agent] for agent in sorted(last))


def reported_agents(attempts: Iterable[RunResult]) -> int:
    """How many agents an execution counts as reported: those whose last attempt is
    final. An agent whose attempt will be retried counts once its final attempt comes
    (or never, and the reporting deadline completes the execution): never twice."""
    return sum(1 for result in last_attempts(attempts) if result.final)


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
