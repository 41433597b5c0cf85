"""The frequency grammar and a task's anchored instants; :class:`Schedule`, what both kinds
of schedule (every N, :class:`Grid`; cron, :class:`CronTimes`) answer.

Pure functions, no I/O. Execution ``k`` (``k >= 1``) of a task is due at
``anchor + k * interval`` on every agent alike, so one execution's results line up
across the fleet and ``(task_id, agent_id, scheduled_at)`` names a result uniquely.
All arithmetic is done on whole microseconds so that an instant computed on an agent
compares equal to the one the server computes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from taskscheduler.cron import Cron

_UNIT_SECONDS = {"second": 1, "minute": 60, "hour": 3600}

# Kind at the edges (case, surrounding and repeated whitespace, singular units),
# strict at the core (ASCII digits only: no sign, no fraction, no exponent).
_FREQUENCY = re.compile(
    r"\A\s*every\s+([0-9]+)\s+(second|minute|hour)s?\s*\Z", re.IGNORECASE | re.ASCII
)

#: Longest interval accepted: a year. Anything longer is almost certainly a typo.
MAX_INTERVAL_SECONDS = 366 * 24 * 3600

_USEC = timedelta(microseconds=1)

#: The instants accepted (:func:`parse_instant`): from the Unix epoch to the year 9000,
#: far enough from both ends of what Python and PostgreSQL can hold that adding an
#: interval, a time limit or a grace to one, or reading one back in any time zone,
#: cannot overflow.
EARLIEST_INSTANT = datetime(1970, 1, 1, tzinfo=UTC)
LATEST_INSTANT = datetime(9000, 1, 1, tzinfo=UTC)


class InstantOutOfRange(ValueError):
    """A well-formed timestamp outside ``EARLIEST_INSTANT`` .. ``LATEST_INSTANT``."""


class InvalidFrequency(ValueError):
    """The text is not ``every <integer> (seconds|minutes|hours)``; the message says why."""


@dataclass(frozen=True)
class Frequency:
    """A parsed frequency: ``count`` ``unit``s, i.e. ``seconds`` seconds."""

    count: int
    unit: str  # "second", "minute" or "hour"

    @property
    def seconds(self) -> int:
        return self.count * _UNIT_SECONDS[self.unit]

    @property
    def interval(self) -> timedelta:
        return timedelta(seconds=self.seconds)

    def __str__(self) -> str:
        return f"every {self.count} {self.unit}{'' if self.count == 1 else 's'}"


def parse_frequency(text: object) -> Frequency:
    """Parse ``every <integer> (seconds|minutes|hours)``.

    Raises :class:`InvalidFrequency` with a message a person understands for anything
    else: zero, negative or fractional counts, other units, or intervals over a year.
    """
    if not isinstance(text, str):
        raise InvalidFrequency("frequency must be a string like 'every 30 seconds'")
    match = _FREQUENCY.match(text)
    if match is None:
        raise InvalidFrequency(
            f"frequency {text[:100]!r} is not of the form "
            "'every <integer> (seconds|minutes|hours)', e.g. 'every 30 seconds'"
        )
    digits, unit = match.group(1), match.group(2).lower()
    # Compare lengths before converting so a million-digit number costs nothing.
    if len(digits.lstrip("0")) > 12:
        raise InvalidFrequency(f"frequency {text[:100]!r} is longer than a year")
    count = int(digits)
    if count == 0:
        raise InvalidFrequency("frequency must be at least 'every 1 second'")
    frequency = Frequency(count, unit)
    if frequency.seconds > MAX_INTERVAL_SECONDS:
        raise InvalidFrequency(f"frequency {text[:100]!r} is longer than a year")
    return frequency


def instant(anchor: datetime, interval: timedelta, k: int) -> datetime:
    """The instant execution ``k`` is due: ``anchor + k * interval``."""
    return anchor + k * interval


def next_execution(anchor: datetime, interval: timedelta, now: datetime) -> tuple[int, datetime]:
    """The first execution strictly after ``now``: ``(k, instant)`` with ``k >= 1``.

    Instants already past are not replayed (cron's rule).
    """
    elapsed = (now - anchor) // _USEC
    step = interval // _USEC
    k = max(1, elapsed // step + 1)
    return k, instant(anchor, interval, k)


def execution_index(anchor: datetime, interval: timedelta, scheduled_at: datetime) -> int | None:
    """``k`` if ``scheduled_at`` is exactly execution ``k >= 1`` of this schedule, else None."""
    elapsed = (scheduled_at - anchor) // _USEC
    step = interval // _USEC
    k, remainder = divmod(elapsed, step)
    if remainder != 0 or k < 1:
        return None
    return k


def utc_now_from(seconds_since_epoch: float) -> datetime:
    """An aware UTC datetime, truncated to whole microseconds, from a clock reading."""
    return datetime.fromtimestamp(seconds_since_epoch, UTC)


def format_instant(value: datetime) -> str:
    """RFC 3339 in UTC with microseconds: ``2026-11-27T07:30:00.000000Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_instant(text: object) -> datetime:
    """Parse an RFC 3339 timestamp with an explicit offset; return it in UTC.

    Raises ValueError for anything else (including naive timestamps, which would be
    ambiguous between hosts in different time zones, and instants outside
    ``EARLIEST_INSTANT`` .. ``LATEST_INSTANT``).
    """
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("timestamp must be an RFC 3339 string")
    value = datetime.fromisoformat(text.replace("z", "Z"))
    if value.tzinfo is None:
        raise ValueError(f"timestamp {text!r} has no time zone offset")
    utc: datetime | None
    try:
        # 9999-12-31T23:59:59-23:59 is a valid datetime whose UTC is not.
        utc = value.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is None or not EARLIEST_INSTANT <= utc < LATEST_INSTANT:
        raise InstantOutOfRange(
            f"timestamp {text!r} is out of range: instants from {EARLIEST_INSTANT:%Y-%m-%d} "
            f"to {LATEST_INSTANT:%Y-%m-%d} (UTC) are accepted"
        )
    return utc


# -- a task's schedule, whichever kind ---------------------------------------------------------


class Schedule(Protocol):
    """A task's instants, whichever kind of schedule names them (every N, or cron)."""

    def next_after(self, t: datetime) -> datetime:
        """The first instant strictly after ``t``, in UTC, in whole microseconds."""
        ...

    def is_instant(self, t: datetime) -> bool:
        """Whether ``t`` is one of the instants."""
        ...

    def typical_interval(self) -> timedelta:
        """The interval runs are sized by (default time limit, starting deadline): the
        interval itself, or for cron the shortest gap between its times."""
        ...


def next_instants(schedule: Schedule, t: datetime, n: int) -> list[datetime]:
    """The first ``n`` instants strictly after ``t``."""
    instants: list[datetime] = []
    for _ in range(n):
        t = schedule.next_after(t)
        instants.append(t)
    return instants


@dataclass(frozen=True)
class Grid:
    """Every ``interval`` from ``anchor``: instant ``k >= 1`` is ``anchor + k * interval``."""

    anchor: datetime
    interval: timedelta

    def next_after(self, t: datetime) -> datetime:
        return next_execution(self.anchor, self.interval, t)[1]

    def is_instant(self, t: datetime) -> bool:
        return execution_index(self.anchor, self.interval, t) is not None

    def typical_interval(self) -> timedelta:
        return self.interval


@dataclass(frozen=True)
class CronTimes:
    """A cron expression's instants (:mod:`taskscheduler.cron`) strictly after ``anchor``
    (the task's creation, or the change that gave it this expression)."""

    cron: Cron
    anchor: datetime

    def next_after(self, t: datetime) -> datetime:
        return self.cron.next_after(max(t, self.anchor))

    def instants_after(self, t: datetime) -> Iterator[datetime]:
        """The instants strictly after ``t``, in order (one parse for many instants)."""
        return self.cron.instants_after(max(t, self.anchor))

    def is_instant(self, t: datetime) -> bool:
        return t > self.anchor and self.cron.is_instant(t)

    def typical_interval(self) -> timedelta:
        return self.cron.typical_interval()


def schedule_of(frequency: Frequency | None, cron: Cron | None, anchor: datetime) -> Schedule:
    """The schedule of a task that has ``frequency`` or ``cron`` (exactly one)."""
    if cron is not None:
        return CronTimes(cron, anchor)
    if frequency is None:
        raise ValueError("a task has a frequency or a cron expression")
    return Grid(anchor, frequency.interval)
