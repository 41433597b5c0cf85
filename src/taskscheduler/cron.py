"""Cron expressions in an IANA time zone: which instants they name (pure, no I/O).

The fields are parsed and matched by ``cronsim`` (five fields, or six with a leading
seconds field; names, ranges, steps, lists, ``L`` and ``#``), on the *wall clock* of the
zone, with no time zone attached: the library never sees a daylight-saving transition.
This module then maps each matching wall-clock time to one instant, by one rule:

- a wall time that happens once is that instant;
- a wall time that happens twice (fall back) is its FIRST occurrence only: ``30 2 * * *``
  in Europe/Paris runs once on the night clocks go back, and so does each minute of
  ``* * * * *`` in the repeated hour (those minutes ran in the first pass);
- a wall time that does not exist (spring forward) is the first valid instant after it,
  the end of the gap: ``30 2 * * *`` runs at 03:00 that night, once, however many of
  the expression's times fell in the gap (``*/15 2 * * *`` too).

So the instants strictly increase, and they are a pure function of the expression and the
zone (and of the tz database: every host should have the same one, which the ``tzdata``
dependency provides where the system has none). Every agent and the server compute the
same instants, in whole microseconds.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

#: Longest expression accepted: a long list of minutes fits; a pasted file does not.
MAX_CRON_LENGTH = 200
#: Longest zone name accepted (the longest IANA name is about 30 characters).
MAX_TIMEZONE_LENGTH = 64
#: The zone of a cron task that names none.
DEFAULT_TIMEZONE = "UTC"

#: The usual macros, as the five fields they stand for.
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

#: The typical interval is the shortest gap among this many wall-clock matches.
_TYPICAL_SAMPLE = 16
#: ... counted from this wall time (a fixed one, so every host finds the same).
_TYPICAL_FROM = datetime(2000, 1, 1)

_USEC = timedelta(microseconds=1)


class InvalidCron(ValueError):
    """The expression or the zone is not accepted; the message says why."""


def zone(name: object) -> tzinfo:
    """The IANA time zone ``name`` (InvalidCron if there is none by that name)."""
    # Checked before the cache: a JSON object or list is not even hashable.
    if not isinstance(name, str) or not name or len(name) > MAX_TIMEZONE_LENGTH:
        raise InvalidCron("'timezone' must be an IANA time zone name such as 'Europe/Paris'")
    return _zone(name)


@functools.lru_cache(maxsize=1024)
def _zone(name: str) -> tzinfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ValueError: a key that is a path ("../etc", "/abs"); OSError: a directory.
        raise InvalidCron(
            f"'timezone' {name[:MAX_TIMEZONE_LENGTH]!r} is not an IANA time zone name "
            "(such as 'UTC', 'Europe/Paris' or 'America/New_York')"
        ) from None


def canonical_expression(text: object) -> str:
    """The expression as stored and shown: surrounding and repeated spaces dropped, a macro
    in lower case. InvalidCron if it is not a string of acceptable length or is @reboot."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidCron("'cron' must be a cron expression such as '*/5 * * * *'")
    if len(text) > MAX_CRON_LENGTH:
        raise InvalidCron(f"'cron' is longer than {MAX_CRON_LENGTH} characters")
    expression = " ".join(text.split())
    if expression.startswith("@"):
        expression = expression.lower()
        if expression == "@reboot":
            raise InvalidCron(
                "'cron' '@reboot' is not supported: a task runs at instants shared by the "
                "whole fleet, not when an agent starts"
            )
        if expression not in MACROS:
            raise InvalidCron(
                f"'cron' macro {expression[:20]!r} is not one of {', '.join(sorted(MACROS))}"
            )
    return expression


@dataclass(frozen=True)
class Cron:
    """A parsed cron expression in a time zone. Build with :func:`parse_cron`."""

    expression: str  # canonical (see canonical_expression)
    timezone: str = DEFAULT_TIMEZONE

    @property
    def _fields(self) -> str:
        return MACROS.get(self.expression, self.expression)

    @property
    def tz(self) -> tzinfo:
        return zone(self.timezone)

    def __str__(self) -> str:
        return f"cron {self.expression!r} in {self.timezone}"

    def _walls(self, after: datetime) -> Iterator[datetime]:
        """The wall times matching the fields, strictly after the naive wall time ``after``."""
        return CronSim(self._fields, after)

    def _instant(self, wall: datetime) -> datetime:
        """The instant a matching wall time names (see the module's rule), in UTC."""
        tz = self.tz
        first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
        if first.astimezone(tz).replace(tzinfo=None) == wall:
            return first  # it exists: once, or the first of two
        # In a gap: fold=1 reads it with the offset after the jump (an instant before the
        # transition), fold=0 with the one before (after it); the gap ends in between.
        return _transition(wall.replace(tzinfo=tz, fold=1).astimezone(UTC), first, tz)

    def instants_after(self, t: datetime) -> Iterator[datetime]:
        """The instants strictly after ``t``, in UTC, in increasing order (without end)."""
        tz = self.tz
        local = t.astimezone(tz)
        wall = local.replace(tzinfo=None, fold=0)
        if local.fold:
            # The second pass of a repeated hour: its wall times ran in the first pass.
            # Look from the first wall time after the repeat (the fold=0 reading of the
            # wall time is the first pass, the fold=1 one ``t`` itself).
            first = local.replace(fold=0)
            end = _transition(first.astimezone(UTC), t.astimezone(UTC), tz)
            offset = first.utcoffset()
            assert offset is not None
            # The repeat ends at the transition, read on the clock before it (03:00).
            wall = end.replace(tzinfo=None) + offset - _USEC
        last = t
        for candidate in self._walls(wall):
            at = self._instant(candidate)
            if at > last:  # several wall times in one gap name one instant
                last = at
                yield at

    def next_after(self, t: datetime) -> datetime:
        """The first instant strictly after ``t``, in UTC."""
        return next(self.instants_after(t))

    def is_instant(self, t: datetime) -> bool:
        """Whether ``t`` is one of the instants."""
        return self.next_after(t - _USEC) == t

    def typical_interval(self) -> timedelta:
        """The shortest gap between consecutive wall-clock matches among the first
        :data:`_TYPICAL_SAMPLE` after a fixed wall time: what the default time limit and
        the agent's starting deadline count on (a pure function of the expression)."""
        return _typical_interval(self._fields)


@functools.lru_cache(maxsize=1024)
def _typical_interval(fields: str) -> timedelta:
    it = CronSim(fields, _TYPICAL_FROM)
    walls = [next(it) for _ in range(_TYPICAL_SAMPLE)]
    return min(b - a for a, b in itertools.pairwise(walls))


def _transition(before: datetime, after: datetime, tz: tzinfo) -> datetime:
    """The first instant in ``(before, after]`` whose UTC offset in ``tz`` is that of
    ``after``: the instant of a transition known to lie there (bisection, in microseconds)."""
    target = after.astimezone(tz).utcoffset()
    lo, hi = before.astimezone(UTC), after.astimezone(UTC)
    while hi - lo > _USEC:
        mid = lo + ((hi - lo) // _USEC // 2) * _USEC
        if mid.astimezone(tz).utcoffset() == target:
            hi = mid
        else:
            lo = mid
    return hi


def parse_cron(expression: object, timezone: object = None) -> Cron:
    """Parse ``expression`` in the IANA zone ``timezone`` (UTC if None).

    Raises :class:`InvalidCron` with a message a person understands.
    """
    text = canonical_expression(expression)
    name = DEFAULT_TIMEZONE if timezone is None else timezone
    zone(name)  # validated before the expression: both errors are the operator's
    assert isinstance(name, str)
    fields = MACROS.get(text, text)
    try:
        # cronsim checks the fields when built (and refuses days that never exist,
        # such as 30 February).
        CronSim(fields, _TYPICAL_FROM)
    except CronSimError as e:
        raise InvalidCron(f"'cron' {text!r} is not a valid cron expression: {e}") from None
    except (ValueError, OverflowError):
        raise InvalidCron(f"'cron' {text!r} is not a valid cron expression") from None
    return Cron(text, name)
