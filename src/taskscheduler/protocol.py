"""The messages the server and the agents exchange, validated in one place.

Both daemons import this module; neither imports the other. Every ``parse_*`` function
takes already-decoded JSON and raises :class:`InvalidMessage` with a message a person
understands; every ``*_to_json`` function returns a JSON-ready dict.

Output is bytes end to end. On the wire a stream travels as ``stdout`` (UTF-8 text,
invalid bytes replaced, so any JSON client can read it) and, only when that text is
lossy, also as ``stdout_base64`` (the exact bytes). Empty streams are omitted, as the
seed asks.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from taskscheduler.schedule import (
    Frequency,
    InstantOutOfRange,
    InvalidFrequency,
    format_instant,
    parse_frequency,
    parse_instant,
)

#: Linux's limit on one argument of ``execve`` (``MAX_ARG_STRLEN``, 32 pages of 4 KiB),
#: terminating NUL included. The command is one argument of the agent's shell: a longer
#: one fails every run with E2BIG.
MAX_ARG_STRLEN = 128 * 1024
#: Longest command accepted, in bytes of UTF-8 (not characters: 32 Ki four-byte
#: characters are already 128 KiB). A page under ``MAX_ARG_STRLEN``: room for the NUL and
#: for a wrapper the runner may one day put around the command.
MAX_COMMAND_BYTES = MAX_ARG_STRLEN - 4096
#: Longest run time limit accepted.
MAX_TIME_LIMIT_SECONDS = 7 * 24 * 3600
#: Longest ``reason`` of a result accepted, in characters.
MAX_REASON_LENGTH = 500
#: Largest size a stream may declare (``stdout_bytes``): 2**53 - 1, the largest integer
#: every JSON client reads exactly, and more than a run writing 10 GB/s for the longest
#: time limit (a week: 6e15 bytes) could produce.
MAX_OUTPUT_SIZE = 2**53 - 1
#: How far ahead of the receiver's clock a result's instants may be by default (clocks
#: of hosts differ a little; the server's ``--clock-allowance``): see :func:`too_early`.
CLOCK_ALLOWANCE = timedelta(seconds=60)


class InvalidMessage(ValueError):
    """A message that does not follow the protocol; ``str()`` is for people."""


class ResultStatus(enum.StrEnum):
    SUCCEEDED = "succeeded"  # exit code 0
    FAILED = "failed"  # non-zero exit code, or killed by a signal we did not send
    TIMED_OUT = "timed_out"  # killed at its time limit
    SKIPPED = "skipped"  # the previous run of the task was still going
    LOST = "lost"  # the agent died during the run


# -- small validators -------------------------------------------------------------------


def _require(body: Mapping[str, Any], name: str) -> Any:
    if name not in body or body[name] is None:
        raise InvalidMessage(f"'{name}' is required")
    return body[name]


_UUID_RE = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def parse_uuid(value: object, name: str) -> uuid.UUID:
    """A UUID in its canonical text form (8-4-4-4-12 hex digits, either case, as RFC 9562
    reads them), or InvalidMessage naming the field. The other spellings ``uuid.UUID``
    takes (braces, ``urn:uuid:``, no hyphens) are refused, in paths and bodies alike."""
    if not isinstance(value, str):
        raise InvalidMessage(f"'{name}' must be a UUID string")
    if _UUID_RE.fullmatch(value) is None:
        raise InvalidMessage(
            f"'{name}' is not a valid UUID (8-4-4-4-12 hex digits): {value[:64]!r}"
        )
    return uuid.UUID(value)


def _parse_time(value: object, name: str) -> datetime:
    try:
        return parse_instant(value)
    except InstantOutOfRange as e:
        raise InvalidMessage(f"'{name}': {e}") from None
    except ValueError:
        raise InvalidMessage(
            f"'{name}' must be an RFC 3339 timestamp with a time zone, e.g. '2026-11-27T07:30:00Z'"
        ) from None


def utf8_of(value: str, name: str) -> bytes:
    """The text of field ``name`` in UTF-8, or InvalidMessage: JSON's ``\\ud800`` escape
    decodes to a lone surrogate, which no UTF-8 text (nor PostgreSQL, nor a shell) holds."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(
            f"'{name}' is not valid Unicode text: it holds a lone surrogate (like \\ud800)"
        ) from None


def _parse_int(value: object, name: str, low: int, high: int) -> int:
    # bool is an int in Python; true/false is never a count.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidMessage(f"'{name}' must be an integer from {low} to {high}")
    return value


def parse_command(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidMessage("'command' must be a non-empty string")
    # Characters first, so that a huge command costs no encoding.
    if len(value) > MAX_COMMAND_BYTES or len(utf8_of(value, "command")) > MAX_COMMAND_BYTES:
        raise InvalidMessage(
            f"'command' is longer than {MAX_COMMAND_BYTES} bytes in UTF-8 (what one "
            "argument of execve can hold, with room to spare); put a long script in a "
            "file on the agents and run that"
        )
    if "\x00" in value:
        raise InvalidMessage("'command' must not contain a NUL character")
    return value


def parse_frequency_field(value: object) -> Frequency:
    try:
        return parse_frequency(value)
    except InvalidFrequency as e:
        raise InvalidMessage(str(e)) from None


def parse_time_limit(value: object) -> timedelta:
    return timedelta(seconds=_parse_int(value, "time_limit_seconds", 1, MAX_TIME_LIMIT_SECONDS))


def default_time_limit(frequency: Frequency) -> timedelta:
    """A run may take up to one interval (at least 1 s, at most a day) unless told."""
    return timedelta(seconds=min(max(frequency.seconds, 1), 24 * 3600))


# -- output streams ----------------------------------------------------------------------


@dataclass(frozen=True)
class Output:
    """One captured stream: what was kept, and how big the original was."""

    data: bytes = b""
    size: int = 0  # bytes the process wrote, before any truncation
    truncated: bool = False  # True when head and tail were kept and the middle dropped

    @classmethod
    def of(cls, data: bytes) -> Output:
        return cls(data, len(data), False)

    def trimmed(self, keep: int) -> Output:
        """At most ``keep`` bytes of it: the first and the last halves, the middle dropped,
        flagged truncated, the original size kept. Cuts fall between UTF-8 characters, so
        that text stays text."""
        if len(self.data) <= keep:
            return self
        data = self.data
        head = keep // 2
        while 0 < head < len(data) and data[head] & 0xC0 == 0x80:
            head -= 1  # not inside a character: before it
        tail = len(data) - (keep - keep // 2)
        while tail < len(data) and data[tail] & 0xC0 == 0x80:
            tail += 1  # after it
        return Output(data[:head] + data[tail:], self.size, True)


def output_to_json(name: str, output: Output, *, for_people: bool = True) -> dict[str, Any]:
    """The JSON form of one stream: omitted entirely when the process wrote nothing.

    Bytes that are not valid UTF-8 travel exactly as ``<name>_base64``. For people (the
    API's answers) the text with replacement characters comes too; between the daemons
    it is left out, so a lossy result is not sent twice over (and stays under the
    server's body limit).
    """
    if output.size == 0 and not output.data:
        return {}
    text = output.data.decode("utf-8", errors="replace")
    lossy = text.encode("utf-8") != output.data
    body: dict[str, Any] = {name: text} if for_people or not lossy else {}
    body[f"{name}_bytes"] = output.size
    if output.truncated:
        body[f"{name}_truncated"] = True
    if lossy:
        body[f"{name}_base64"] = base64.b64encode(output.data).decode("ascii")
    return body


def parse_output(body: Mapping[str, Any], name: str) -> Output:
    encoded = body.get(f"{name}_base64")
    if encoded is not None:
        if not isinstance(encoded, str):
            raise InvalidMessage(f"'{name}_base64' must be a base64 string")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidMessage(f"'{name}_base64' is not valid base64") from None
    else:
        text = body.get(name, "")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise InvalidMessage(f"'{name}' must be a string")
        data = text.encode("utf-8", errors="replace")
    # The declared size is at least what is carried (more means the middle was dropped:
    # flagged truncated even if the flag is missing) and at most what a run can write.
    size = body.get(f"{name}_bytes", len(data))
    size = _parse_int(size, f"{name}_bytes", len(data), MAX_OUTPUT_SIZE)
    truncated = body.get(f"{name}_truncated", False)
    if not isinstance(truncated, bool):
        raise InvalidMessage(f"'{name}_truncated' must be true or false")
    return Output(data, size, truncated or size > len(data))


# -- server -> agent: schedule a task ------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    """A task as an agent runs it: the seed's fields plus the shared anchor and limit."""

    task_id: uuid.UUID
    command: str
    frequency: Frequency
    anchor: datetime  # execution k is due at anchor + k * frequency.interval
    time_limit: timedelta


def task_spec_to_json(spec: TaskSpec) -> dict[str, Any]:
    return {
        "task_id": str(spec.task_id),
        "command": spec.command,
        "frequency": str(spec.frequency),
        "anchor": format_instant(spec.anchor),
        "time_limit_seconds": int(spec.time_limit.total_seconds()),
    }


def parse_task_spec(body: object, received_at: datetime) -> TaskSpec:
    """Parse ``POST /api/v1/tasks/schedule``.

    ``anchor`` and ``time_limit_seconds`` are optional so that the seed's three-field
    request still works: the anchor is then the moment the agent received it.
    """
    if not isinstance(body, Mapping):
        raise InvalidMessage("the request body must be a JSON object")
    task_id = parse_uuid(_require(body, "task_id"), "task_id")
    command = parse_command(_require(body, "command"))
    frequency = parse_frequency_field(_require(body, "frequency"))
    anchor = body.get("anchor")
    limit = body.get("time_limit_seconds")
    return TaskSpec(
        task_id=task_id,
        command=command,
        frequency=frequency,
        anchor=received_at if anchor is None else _parse_time(anchor, "anchor"),
        time_limit=default_time_limit(frequency) if limit is None else parse_time_limit(limit),
    )


# -- agent -> server: one run's result -------------------------------------------------------


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
        task_id = parse_uuid(_require(body, "task_id"), "task_id")
    elif "task_id" in body and parse_uuid(body["task_id"], "task_id") != task_id:
        raise InvalidMessage("'task_id' in the body differs from the one in the path")
    agent_id = parse_uuid(_require(body, "server_id"), "server_id")
    scheduled_at = _parse_time(_require(body, "scheduled_at"), "scheduled_at")
    raw_status = body.get("status")
    exit_code = body.get("exit_code")
    signal = body.get("signal")
    if exit_code is not None:
        exit_code = _parse_int(exit_code, "exit_code", -(2**31), 2**31 - 1)
    if signal is not None:
        signal = _parse_int(signal, "signal", 1, 128)
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
    return RunResult(
        task_id=task_id,
        agent_id=agent_id,
        scheduled_at=scheduled_at,
        status=status,
        exit_code=exit_code,
        signal=signal,
        started_at=None if started_at is None else _parse_time(started_at, "started_at"),
        finished_at=None if finished_at is None else _parse_time(finished_at, "finished_at"),
        stdout=parse_output(body, "stdout"),
        stderr=parse_output(body, "stderr"),
        reason=parse_reason(body.get("reason")),
    )


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
}
#: The statuses of one item of a batch answer (``POST /api/v1/results``) that refuse it
#: for good; ``stored`` and ``duplicate`` acknowledge it.
FINAL_BATCH_STATUSES = frozenset({"conflict", "unknown_task", "misaligned", "deleted", "forbidden"})
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
