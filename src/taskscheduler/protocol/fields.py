"""The fields every message is made of, each validated in one place: ids, instants,
bounded integers, the command and its frequency and time limit; :class:`InvalidMessage`."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from taskscheduler.cron import Cron, InvalidCron, parse_cron, zone
from taskscheduler.schedule import (
    Frequency,
    InstantOutOfRange,
    InvalidFrequency,
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


class InvalidMessage(ValueError):
    """A message that does not follow the protocol; ``str()`` is for people."""


def require(body: Mapping[str, Any], name: str) -> Any:
    """The field ``name`` of ``body``, or InvalidMessage if it is missing or null."""
    if name not in body or body[name] is None:
        raise InvalidMessage(f"'{name}' is required")
    return body[name]


class UnknownFields(InvalidMessage):
    """A request body names fields its route does not know (a typo such as ``"timeout"``
    would otherwise silently mean the default)."""

    def __init__(self, unknown: list[str], known: list[str]) -> None:
        names = ", ".join(f'"{name}"' for name in unknown)
        word = "field" if len(unknown) == 1 else "fields"
        super().__init__(f"unknown {word} {names} (known: {', '.join(known)})")
        self.unknown = unknown


def refuse_unknown(body: Mapping[str, Any], known: Iterable[str]) -> None:
    """:class:`UnknownFields` if ``body`` has a field not in ``known``.

    Used on what operators send (a typo must not silently mean a default). Messages
    between the daemons are tolerant instead: a newer peer may add fields.
    """
    allowed = list(known)
    unknown = sorted(str(name) for name in body if name not in allowed)
    if unknown:
        raise UnknownFields(unknown, allowed)


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


def parse_time(value: object, name: str) -> datetime:
    """An RFC 3339 instant with a time zone, or InvalidMessage naming the field."""
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


def parse_int(value: object, name: str, low: int, high: int) -> int:
    """An integer from ``low`` to ``high``, or InvalidMessage naming the field."""
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
    return timedelta(seconds=parse_int(value, "time_limit_seconds", 1, MAX_TIME_LIMIT_SECONDS))


def parse_cron_fields(cron: object, timezone: object) -> Cron:
    """``cron`` with its optional ``timezone`` (UTC when None)."""
    try:
        return parse_cron(cron, timezone)
    except InvalidCron as e:
        raise InvalidMessage(str(e)) from None


def parse_timezone_field(value: object) -> str:
    """An IANA time zone name (for a cron expression)."""
    try:
        zone(value)
    except InvalidCron as e:
        raise InvalidMessage(str(e)) from None
    assert isinstance(value, str)
    return value


def default_time_limit(frequency: Frequency | timedelta) -> timedelta:
    """A run may take up to one interval (at least 1 s, at most a day) unless told; a cron
    task's interval is its typical one (the shortest gap between its times)."""
    interval = frequency if isinstance(frequency, timedelta) else frequency.interval
    return timedelta(seconds=min(max(int(interval.total_seconds()), 1), 24 * 3600))
