"""The contract between the scenario scripts and the suite (``bench/suite.py``).

Each scenario script takes ``--quick`` (small scale, for validation), ``--ceilings FILE``
(the JSON object ``bench/ceilings.py`` writes) and ``--json-out FILE``, to which it
APPENDS one JSON object per figure, one per line::

    {"scenario": "1-throughput", "figure": "on-time results/s at peak", "value": 612.0,
     "unit": "/s", "ceiling": "spawn:bash-echo", "ratio": 0.81,
     "target": ">= 0.75 of ceiling", "met": true, "detail": {...}}

``ceiling``/``ratio``/``target``/``met`` are null where they do not apply; ``met`` is the
script's own judgement against the issue's target. A script exits non-zero only when it
could not measure, never because a target was missed.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCENARIOS = (
    "1-throughput",
    "2-many-tasks",
    "3-freshness",
    "4-ingest",
    "5-query",
    "6-fanout",
    "7-server-memory",
    "8-replicas",
)
FIELDS = ("scenario", "figure", "value", "unit", "ceiling", "ratio", "target", "met", "detail")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The three flags every scenario script takes."""
    parser.add_argument("--quick", action="store_true", help="small scale, for validation")
    parser.add_argument("--ceilings", help="the ceilings' JSON (bench/ceilings.py)")
    parser.add_argument("--json-out", help="append one JSON line per figure to this file")


def load_ceilings(path: str | None) -> dict[str, Any]:
    return {} if path is None else dict(json.loads(Path(path).read_text()))


def ceiling_value(ceilings: dict[str, Any], name: str) -> float | None:
    """The value of the ceiling ``name``, or None if the file does not have it."""
    entry = ceilings.get(name)
    if isinstance(entry, dict) and isinstance(entry.get("value"), int | float):
        return float(entry["value"])
    return None


@dataclass
class Figure:
    scenario: str
    figure: str
    value: float | None
    unit: str
    ceiling: str | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return asdict(self)


def emit(path: str | None, figure: Figure) -> None:
    """Append ``figure`` to ``path`` as one JSON line (nothing without a path)."""
    if path is None:
        return
    with open(path, "a") as out:
        out.write(json.dumps(figure.record(), sort_keys=True, default=str) + "\n")


def ratio(value: float | None, of: float | None) -> float | None:
    if value is None or not of or math.isnan(value):
        return None
    return round(value / of, 4)


def problems(record: Any) -> list[str]:
    """What is wrong with one JSON line's object against the contract (empty: nothing)."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    out = [f"no {name!r}" for name in FIELDS if name not in record]
    if record.get("scenario") not in SCENARIOS:
        out.append(f"unknown scenario {record.get('scenario')!r}")
    if record.get("met") not in (True, False, None):
        out.append(f"met is {record.get('met')!r}, not true/false/null")
    value = record.get("value")
    if value is not None and not isinstance(value, int | float):
        out.append(f"value {value!r} is not a number")
    return out
