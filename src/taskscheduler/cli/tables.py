"""What people read: aligned tables, key/value details, instants and execution summaries.

Instants: in tables, UTC time of day when within a day of now (``16:20:05Z``), else date
and minute (``2026-11-28 16:20Z``), each followed by how far from now (``3m ago``,
``in 12s``); in details, the server's full RFC 3339 instant with the same hint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

JSON = dict[str, Any]

SHORT_ID = 8
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def cell(value: object) -> str:
    """One table cell: None as ``-``, control characters (a newline in a command, an
    escape sequence) shown escaped so that they can neither break rows nor drive the
    terminal."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def shorten(text: str, width: int | None) -> str:
    if width is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


def short_id(value: object, full: bool = False) -> str:
    text = cell(value)
    return text if full else text[:SHORT_ID]


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns aligned two spaces apart; the last column is not padded."""
    lines = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in lines]) for i, h in enumerate(headers)]
    out = []
    for row in [list(headers), *lines]:
        padded = [v.ljust(w) for v, w in zip(row[:-1], widths, strict=False)]
        out.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(out)


def details(pairs: Iterable[tuple[str, object]]) -> str:
    """``key  value`` lines, keys aligned; a None value leaves its line out."""
    kept = [(k, cell(v)) for k, v in pairs if v is not None]
    width = max((len(k) for k, _ in kept), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in kept)


def parse(text: object) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        value = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return None
    return value.astimezone(UTC) if value.tzinfo else None


def relative(value: datetime, now: datetime) -> str:
    """``12s ago``, ``in 3m``, ``now``: the largest unit, rounded down."""
    seconds = (value - now).total_seconds()
    span = abs(seconds)
    if span < 1:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if span >= size:
            amount = f"{int(span // size)}{unit}"
            break
    return f"in {amount}" if seconds > 0 else f"{amount} ago"


def when(text: object, now: datetime) -> str | None:
    """An instant for a table cell (see the module's docstring); None stays None."""
    value = parse(text)
    if value is None:
        return None if text is None else str(text)
    if abs(value - now) < timedelta(days=1):
        absolute = value.strftime("%H:%M:%SZ")
    else:
        absolute = value.strftime("%Y-%m-%d %H:%MZ")
    return f"{absolute} ({relative(value, now)})"


def instant(text: object, now: datetime) -> str | None:
    """An instant for a details view: the server's text and how far from now."""
    value = parse(text)
    if value is None:
        return None if text is None else str(text)
    return f"{text} ({relative(value, now)})"


def duration(started: object, finished: object) -> str | None:
    start, end = parse(started), parse(finished)
    if start is None or end is None:
        return None
    seconds = (end - start).total_seconds()
    return f"{seconds:.3f}s" if seconds < 10 else f"{seconds:.0f}s"


STATUSES = ("succeeded", "failed", "timed_out", "skipped", "lost", "replaced")


def execution_summary(execution: JSON | None) -> str | None:
    """A last-execution summary: ``2 succeeded``, ``1 succeeded, 1 failed, 1/3 to come``."""
    if not execution:
        return None
    counts = [f"{execution.get(s)} {s.replace('_', ' ')}" for s in STATUSES if execution.get(s)]
    expected, reported = execution.get("expected_agents"), execution.get("reported")
    if not execution.get("complete") and isinstance(expected, int):
        counts.append(f"{reported or 0}/{expected} reported")
    if not counts:
        counts.append("no agent")
    if execution.get("trigger") == "manual":
        counts.append("manual")
    return ", ".join(counts)


def compact_json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
