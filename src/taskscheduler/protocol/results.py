"""Agent -> server: one run's result (:class:`RunResult`), a batch of them, and the
server's answers to them (which refuse a result for good, which for now).
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from taskscheduler.protocol.fields import (
    InvalidMessage,
    parse_int,
    parse_time,
    parse_uuid,
    require,
    utf8_of,
)
from taskscheduler.protocol.options import MAX_RETRIES
from taskscheduler.protocol.output import Output, output_to_json, parse_output
from taskscheduler.protocol.tasks import MAX_REVISION
from taskscheduler.schedule import format_instant

#: Highest attempt number of a result: the first run and at most MAX_RETRIES retries.
MAX_ATTEMPT = MAX_RETRIES + 1
#: Longest ``reason`` of a result accepted, in characters.
MAX_REASON_LENGTH = 500
#: How far ahead of the receiver's clock a result's instants may be by default (clocks
#: of hosts differ a little; the server's ``--clock-allowance``): see :func:`too_early`.
CLOCK_ALLOWANCE = timedelta(seconds=60)


class ResultStatus(enum.StrEnum):
    SUCCEEDED = "succeeded"  # exit code 0
    FAILED = "failed"  # non-zero exit code, or killed by a signal we did not send
    TIMED_OUT = "timed_out"  # killed at its time limit
    SKIPPED = "skipped"  # the previous run of the task was still going
    LOST = "lost"  # the agent died during the run
    REPLACED = "replaced"  # terminated for a newer instant of the task (overlap: replace)


class Trigger(enum.StrEnum):
    """What started an execution."""

    SCHEDULE = "schedule"  # an instant of the task's schedule
    MANUAL = "manual"  # an operator's run-now (``POST /api/v1/tasks/{id}/run``)


@dataclass(frozen=True)
class RunResult:
    """One agent's run within one execution of a task."""

    task_id: uuid.UUID
    agent_id: uuid.UUID
    scheduled_at: datetime
    status: ResultStatus
    exit_code: int | None = None  # set when the process exited by itself
    signal: int | None = None  # set when the process was ended by a signal
    started_at: datetime | None = None  # None for a skipped run
    finished_at: datetime | None = None
    stdout: Output = field(default_factory=Output)
    stderr: Output = field(default_factory=Output)
    #: Why a run was skipped or lost, for people ("the previous run was still going").
    reason: str | None = None
    #: The task revision the run ran (None: an agent older than revisions sent it; the
    #: server then takes the revision in effect at ``scheduled_at``).
    revision: int | None = None
    trigger: Trigger = Trigger.SCHEDULE
    #: 1 for the run of an instant, n + 1 for the retry of attempt n (same instant).
    attempt: int = 1
    #: False when the agent will retry this attempt: the execution does not count the
    #: agent as reported until a final attempt comes (or its reporting deadline passes).
    final: bool = True

    @property
    def key(self) -> tuple[uuid.UUID, uuid.UUID, datetime]:
        return (self.task_id, self.agent_id, self.scheduled_at)


def result_to_json(result: RunResult) -> dict[str, Any]:
    """The body of ``POST /api/v1/tasks/{task_id}/complete`` (and one item of a batch)."""
    body: dict[str, Any] = {
        "task_id": str(result.task_id),
        "server_id": str(result.agent_id),
        "scheduled_at": format_instant(result.scheduled_at),
        "status": result.status.value,
        "exit_code": result.exit_code,
        "signal": result.signal,
        "started_at": None if result.started_at is None else format_instant(result.started_at),
        "finished_at": (None if result.finished_at is None else format_instant(result.finished_at)),
    }
    body.update(output_to_json("stdout", result.stdout, for_people=False))
    body.update(output_to_json("stderr", result.stderr, for_people=False))
    if result.reason is not None:
        body["reason"] = result.reason
    if result.revision is not None:
        body["revision"] = result.revision
    if result.trigger is not Trigger.SCHEDULE:
        body["trigger"] = result.trigger.value
    if result.attempt != 1:
        body["attempt"] = result.attempt
    if not result.final:
        body["final"] = False
    return body


def parse_reason(value: object) -> str | None:
    """An optional short sentence saying why a run was skipped or lost."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_REASON_LENGTH:
        raise InvalidMessage(f"'reason' must be a string of at most {MAX_REASON_LENGTH} characters")
    if "\x00" in value:
        # PostgreSQL's text cannot hold it: refused here rather than failing the insert.
        raise InvalidMessage("'reason' must not contain a NUL character")
    utf8_of(value, "reason")
    return value


def parse_result(body: object, task_id: uuid.UUID | None = None) -> RunResult:
    """Parse one result; ``task_id`` comes from the URL path when there is one."""
    if not isinstance(body, Mapping):
        raise InvalidMessage("a result must be a JSON object")
    if task_id is None:
        task_id = parse_uuid(require(body, "task_id"), "task_id")
    elif "task_id" in body and parse_uuid(body["task_id"], "task_id") != task_id:
        raise InvalidMessage("'task_id' in the body differs from the one in the path")
    agent_id = parse_uuid(require(body, "server_id"), "server_id")
    scheduled_at = parse_time(require(body, "scheduled_at"), "scheduled_at")
    raw_status = body.get("status")
    exit_code = body.get("exit_code")
    signal = body.get("signal")
    if exit_code is not None:
        exit_code = parse_int(exit_code, "exit_code", -(2**31), 2**31 - 1)
    if signal is not None:
        signal = parse_int(signal, "signal", 1, 128)
    if raw_status is None:
        # The seed's minimal body (server_id, stdout, stderr): infer what we can.
        if exit_code is None and signal is None:
            status = ResultStatus.SUCCEEDED
        else:
            status = ResultStatus.SUCCEEDED if exit_code == 0 else ResultStatus.FAILED
    else:
        try:
            status = ResultStatus(raw_status)
        except ValueError:
            allowed = ", ".join(s.value for s in ResultStatus)
            raise InvalidMessage(f"'status' must be one of: {allowed}") from None
    started_at = body.get("started_at")
    finished_at = body.get("finished_at")
    revision = body.get("revision")
    attempt = body.get("attempt")
    return RunResult(
        task_id=task_id,
        agent_id=agent_id,
        scheduled_at=scheduled_at,
        status=status,
        exit_code=exit_code,
        signal=signal,
        started_at=None if started_at is None else parse_time(started_at, "started_at"),
        finished_at=None if finished_at is None else parse_time(finished_at, "finished_at"),
        stdout=parse_output(body, "stdout"),
        stderr=parse_output(body, "stderr"),
        reason=parse_reason(body.get("reason")),
        revision=None if revision is None else parse_int(revision, "revision", 1, MAX_REVISION),
        trigger=parse_trigger(body.get("trigger")),
        attempt=1 if attempt is None else parse_int(attempt, "attempt", 1, MAX_ATTEMPT),
        final=parse_final(body.get("final", True)),
    )


def parse_final(value: object) -> bool:
    """``final`` (default true): false when the agent will retry the attempt."""
    if not isinstance(value, bool):
        raise InvalidMessage("'final' must be true or false")
    return value


def parse_trigger(value: object) -> Trigger:
    """``schedule`` (the default, also for an agent older than run-now) or ``manual``."""
    if value is None:
        return Trigger.SCHEDULE
    if isinstance(value, str) and value in Trigger.__members__.values():
        return Trigger(value)
    allowed = ", ".join(t.value for t in Trigger)
    raise InvalidMessage(f"'trigger' must be one of: {allowed}")


#: The error codes with which the server refuses one result for good, with their status
#: (``POST /api/v1/tasks/{task_id}/complete``): the same result sent again would get the
#: same answer. Any other answer (401, 408, 5xx, or a 404 that is not one of these, from
#: a proxy or a wrong path) is no verdict on the result, which is kept and sent again.
FINAL_RESULT_ERRORS: Mapping[str, int] = {
    "invalid_json": 400,  # the body is not JSON
    "invalid_request": 400,  # a field is missing or malformed
    "invalid_task_id": 400,  # the task id in the path is not a UUID
    "misaligned": 400,  # scheduled_at is not one of the task's instants
    "impersonation": 403,  # server_id is not the agent whose credential is used
    "not_assigned": 403,  # the task is not assigned to this agent
    "unknown_task": 404,  # no task has this id
    "task_deleted": 404,  # scheduled after the task was deleted
    "conflict": 409,  # a different result is stored under the same key
    "superseded": 409,  # ran a revision of the task other than the one of its instant
    "task_paused": 409,  # scheduled while the task was paused
}
#: The statuses of one item of a batch answer (``POST /api/v1/results``) that refuse it
#: for good; ``stored`` and ``duplicate`` acknowledge it.
FINAL_BATCH_STATUSES = frozenset(
    {"conflict", "unknown_task", "misaligned", "deleted", "forbidden", "superseded", "task_paused"}
)
#: The error codes with which the server refuses one result for now, not for good: it is
#: dated ahead of the server's clock (:func:`too_early`), and the same result sent again
#: once the clock has reached it is taken. The agent keeps it and sends it again.
RETRY_LATER_RESULT_ERRORS: Mapping[str, int] = {"too_early": 409}
#: The statuses of one item of a batch answer that refuse it for now, as above.
RETRY_LATER_BATCH_STATUSES = frozenset({"too_early"})
#: The statuses of one item of a batch answer that acknowledge it.
ACKNOWLEDGED_STATUSES = frozenset({"stored", "duplicate"})


def too_early(
    result: RunResult,
    now: datetime,
    time_limit: timedelta,
    allowance: timedelta = CLOCK_ALLOWANCE,
) -> str | None:
    """Why ``result`` cannot have been produced by ``now`` (the receiver's clock), or
    None. ``time_limit`` is its task's; ``allowance`` how far clocks may differ.

    A run starts at its instant or later and is reported once it has ended, so an honest
    result is dated ahead of the server's clock only by as much as the two hosts' clocks
    differ (``allowance``), or, for its ``scheduled_at``, by its agent's *lead*:
    an agent whose wall clock stepped back labels its runs ahead of that clock. The task's
    time limit is allowed for the lead. One bound for all of a result's instants:
    ``started_at`` and ``finished_at`` are readings of the agent's wall clock, within it.

    This is no verdict on the result (an honest agent with a larger lead sends such
    results): the same result is taken once the clock has reached it, so the agent keeps
    it (:data:`RETRY_LATER_RESULT_ERRORS`). A forged one is never stored early.
    """
    latest = now + time_limit + allowance
    for name, value in (
        ("scheduled_at", result.scheduled_at),
        ("started_at", result.started_at),
        ("finished_at", result.finished_at),
    ):
        if value is not None and value > latest:
            return (
                f"'{name}' is {(value - now).total_seconds():.0f} s ahead of this server's "
                f"clock: more than the task's time limit ({time_limit.total_seconds():.0f} s) "
                f"and {allowance.total_seconds():.0f} s of clock difference allow"
            )
    return None


#: Most results accepted in one batch.
MAX_BATCH = 1000


def parse_result_batch(body: object) -> list[RunResult]:
    """Parse ``POST /api/v1/results``: ``{"results": [result, ...]}``."""
    if not isinstance(body, Mapping) or not isinstance(body.get("results"), list):
        raise InvalidMessage('the request body must be {"results": [...]}')
    items = body["results"]
    if not items:
        raise InvalidMessage("'results' must not be empty")
    if len(items) > MAX_BATCH:
        raise InvalidMessage(f"at most {MAX_BATCH} results may be sent at once")
    parsed = []
    for i, item in enumerate(items):
        try:
            parsed.append(parse_result(item))
        except InvalidMessage as e:
            raise InvalidMessage(f"results[{i}]: {e}") from None
    return parsed
