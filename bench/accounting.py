"""Accounting of a load scenario's window: the instants due, the results stored for them,
and the witness lines their commands wrote (the truth of what ran)."""

from __future__ import annotations

import collections
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.loadapi import query
from bench.loadkit import EPOCH, MICRO, US, fraction, micros, spread

NOT_RUN = frozenset({"skipped", "lost"})

# -- accounting ------------------------------------------------------------------------------


def due_instants(
    tasks: Sequence[tuple[str, int, int]], start: int, end: int
) -> dict[str, list[int]]:
    """Each task's instants ``anchor + k * interval`` (k >= 1) in ``[start, end)`` (µs)."""
    out: dict[str, list[int]] = {}
    for task_id, anchor, interval in tasks:
        first = max(1, -(-(start - anchor) // interval))
        last = -(-(end - anchor) // interval) - 1
        out[task_id] = [anchor + k * interval for k in range(first, last + 1)]
    return out


@dataclass
class Stored:
    task_id: str
    agent_id: str
    scheduled_at: int
    status: str
    started_at: int | None
    received_at: int
    reason: str | None


def stored_results(dsn: str, task_ids: Sequence[str], start: int, end: int) -> list[Stored]:
    columns = {
        row[0]
        for row in query(
            dsn, "SELECT column_name FROM information_schema.columns WHERE table_name = 'results'"
        )
    }
    reason = "reason" if "reason" in columns else "NULL"
    rows = query(
        dsn,
        f"""SELECT task_id::text, agent_id::text, scheduled_at, status, started_at,
                   received_at, {reason}, substring(stderr from 1 for 300)
            FROM results
            WHERE task_id = ANY(%s::uuid[]) AND scheduled_at >= %s AND scheduled_at < %s""",
        (list(task_ids), EPOCH + start * MICRO, EPOCH + end * MICRO),
    )
    out = []
    for task_id, agent_id, scheduled, status, started, received, why, stderr in rows:
        if why is None and status != "succeeded" and stderr:
            why = bytes(stderr).decode("utf-8", "replace").strip().splitlines()[0][:120]
        out.append(
            Stored(
                task_id,
                agent_id,
                micros(scheduled),
                status,
                None if started is None else micros(started),
                micros(received),
                why,
            )
        )
    return out


def account(results: Sequence[Stored], due: int, start: int, end: int) -> dict[str, Any]:
    """The window's figures from the stored results of its instants."""
    statuses = collections.Counter(r.status for r in results)
    reasons = collections.Counter(
        f"{r.status}: {r.reason or '(no reason given)'}" for r in results if r.status != "succeeded"
    )
    lags = [(r.received_at - r.scheduled_at) / US for r in results]
    lateness = [(r.started_at - r.scheduled_at) / US for r in results if r.started_at is not None]
    ran_lags = [(r.received_at - r.scheduled_at) / US for r in results if r.status not in NOT_RUN]
    window = (end - start) / US
    within_1s = sum(lag <= 1.0 for lag in lags)
    ran_within_1s = sum(lag <= 1.0 for lag in ran_lags)
    return {
        "due": due,
        "stored": len(results),
        "stored_ratio": fraction(len(results), due),
        "stored_by_window_end": sum(r.received_at < end for r in results),
        "statuses": dict(statuses),
        "reasons": dict(reasons.most_common(10)),
        "within_1s": fraction(within_1s, due),
        "within_5s": fraction(sum(lag <= 5.0 for lag in lags), due),
        "ran_within_1s": fraction(ran_within_1s, due),
        "on_time_per_s": round(within_1s / window, 1),
        "ran_on_time_per_s": round(ran_within_1s / window, 1),
        "lateness_s": spread(lateness),
    }


def due_shape(instants: dict[str, list[int]], agents: int, start: int, end: int) -> dict[str, Any]:
    """Due instants per second of the window: mean and max (the load's burstiness)."""
    buckets = collections.Counter((at - start) // US for ats in instants.values() for at in ats)
    window = (end - start) / US
    total = sum(buckets.values()) * agents
    return {
        "due_per_s_mean": round(total / window, 1),
        "due_per_s_max": max(buckets.values(), default=0) * agents,
    }


def read_witness(path: Path, task_ids: set[str], start: int, end: int) -> list[float]:
    """Start lateness (s) of each witnessed run of those tasks at instants in the window."""
    lateness: dict[tuple[str, int], float] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        parts = line.split()
        if len(parts) != 3 or parts[0] not in task_ids:
            continue
        try:
            at = micros(datetime.fromisoformat(parts[1]))
            began = float(parts[2])
        except ValueError:
            continue
        if start <= at < end:
            lateness.setdefault((parts[0], at), began - at / US)
    return list(lateness.values())
