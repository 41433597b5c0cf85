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


#: An instant of one agent: (task id, agent id, instant in µs).
Instant = tuple[str, str, int]


def read_witness(
    path: Path, task_ids: set[str], start: int, end: int
) -> dict[tuple[str, int], list[float]]:
    """Each witnessed (task, instant in µs) of the window: the start times (epoch s) of
    every line written for it (more than one: the instant ran more than once)."""
    found: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return {}
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
            found[(parts[0], at)].append(began)
    return dict(found)


def account_instants(
    instants: dict[str, list[int]],
    witnesses: dict[str, dict[tuple[str, int], list[float]]],
    results: Sequence[Stored],
) -> dict[str, Any]:
    """Every due instant of every agent (``witnesses`` is keyed by agent id) accounted for:
    ``ran`` if its command wrote a witness line, ``skipped`` if the agent recorded it
    skipped, else ``unaccounted`` (broken down by what the server holds for it). A run
    witnessed more than once is ``doubled``; a witnessed instant whose result says
    skipped/lost is a ``contradiction``. The witness's start time minus the result's
    ``started_at`` cross-checks the latter (it is the shell's own start-up: never < 0)."""
    stored: dict[Instant, list[Stored]] = collections.defaultdict(list)
    for result in results:
        stored[(result.task_id, result.agent_id, result.scheduled_at)].append(result)
    counts: collections.Counter[str] = collections.Counter()
    unaccounted: collections.Counter[str] = collections.Counter()
    witness_lateness: list[float] = []
    witness_after_start: list[float] = []
    for agent_id, witnessed in witnesses.items():
        for task_id, ats in instants.items():
            for at in ats:
                counts["due"] += 1
                lines = witnessed.get((task_id, at), [])
                mine = stored.get((task_id, agent_id, at), [])
                statuses = {r.status for r in mine}
                if lines:
                    counts["ran"] += 1
                    counts["doubled"] += len(lines) > 1
                    counts["contradictions"] += bool(statuses) and statuses <= NOT_RUN
                    witness_lateness.append(lines[0] - at / US)
                    started = [r.started_at for r in mine if r.started_at is not None]
                    if started:
                        witness_after_start.append(lines[0] - min(started) / US)
                elif "skipped" in statuses:
                    counts["skipped"] += 1
                else:
                    counts["unaccounted"] += 1
                    why = ",".join(sorted(statuses)) or "nothing"
                    unaccounted[f"{why} stored, no witness"] += 1
    return {
        "instants": counts["due"],
        "ran": counts["ran"],
        "skipped": counts["skipped"],
        "unaccounted": counts["unaccounted"],
        "unaccounted_by": dict(unaccounted),
        "doubled": counts["doubled"],
        "contradictions": counts["contradictions"],
        "witness_lateness_s": spread(witness_lateness),
        "witness_minus_started_at_s": spread(witness_after_start),
        "witness_before_started_at": sum(d < 0 for d in witness_after_start),
    }
