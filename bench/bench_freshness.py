"""Scenario 3, freshness: from a task's instant to its output visible in ``latest_output``.

    .venv/bin/python bench/bench_freshness.py [--quick] [--ceilings FILE] [--json-out FILE]
        [--tasks 100] [--agents 2] [--window 60] [--probes 10] [--poll-gap 0.005] [--keep]

Real daemons as ``bench_agent_load.py`` starts them (``twistd`` server and agents, an
embedded PostgreSQL in a temporary folder, operator token and join secret): ``--tasks``
tasks ``every 1 seconds`` created at a steady pace over one second (so that their
instants spread over the second), each run by every one of ``--agents`` agents, i.e.
tasks x agents results a second (200). The command prints its instant.

Then, for ``--window`` seconds, ``--probes`` threads poll the REST API as a user would
(``GET /api/v1/tasks/{id}/latest_output``, the operator's token, a kept-alive
connection): each takes its tasks in turn, and from the next instant of one polls every
``--poll-gap`` seconds until ``scheduled_at`` reaches that instant; the freshness of that
instant is the moment the answer showing it arrived, minus the instant. ``latest_output``
shows complete executions only, so an instant is visible once every agent's result is
stored. Figures: p50/p99 of that (targets 50 ms / 250 ms), instants never seen within
``--give-up`` s, and where the time went, from what the server stored for the probed
instants: the start (``started_at``), the run (``finished_at``), the report (the last
agent's ``received_at``) and what is left (the query and the poll's own gap).

No ceiling applies (the figures are latencies); ``--ceilings`` is accepted and unused.
``--quick``: a 15 s window. Prints a table; ``--json-out`` appends one JSON object per
figure (the suite contract, :mod:`bench.contract`). Exits non-zero only if it
could not measure.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.contract import Figure, add_arguments, emit
from bench.loadapi import (
    Operator,
    Postgres,
    create_tasks,
    holding,
    live_tasks,
    query,
    wait_agents,
)
from bench.loadkit import (
    EPOCH,
    MICRO,
    US,
    Window,
    environment,
    run_in_folder,
    spread,
    start_fleet,
    stop_daemons,
)
from tests.integration.daemons import Daemon

SCENARIO = "3-freshness"
COMMAND = 'echo "$TASKSCHEDULER_SCHEDULED_AT"'
P50_TARGET_MS = 50.0
P99_TARGET_MS = 250.0


@dataclass
class Probe:
    """One instant of one task, polled until ``latest_output`` showed it."""

    task_id: str
    instant: int  # µs since the epoch
    seen: float | None = None  # seconds from the instant to the answer showing it
    polls: int = 0


@dataclass
class Prober:
    """Probes ``tasks`` in turn from ``start`` to ``end`` (wall clock, s), each at its next
    instant, on its own kept-alive connection."""

    api: Operator
    tasks: Sequence[tuple[str, int, int]]  # (id, anchor µs, interval µs)
    start: float
    end: float
    gap: float
    give_up: float
    probes: list[Probe] = field(default_factory=list)
    errors: int = 0

    def run(self) -> None:
        turn = 0
        while True:
            task_id, anchor, interval = self.tasks[turn % len(self.tasks)]
            turn += 1
            now = max(time.time(), self.start)
            k = -(-(int(now * US) - anchor) // interval)
            instant = anchor + k * interval
            if instant / US >= self.end:
                return
            time.sleep(max(0.0, instant / US - time.time()))
            self.probes.append(self._poll(task_id, instant))

    def _poll(self, task_id: str, instant: int) -> Probe:
        probe = Probe(task_id, instant)
        path = f"/api/v1/tasks/{task_id}/latest_output"
        at = instant / US
        while time.time() - at < self.give_up:
            probe.polls += 1
            try:
                code, body = self.api.request("GET", path)
            except Exception:
                self.errors += 1
                code, body = 0, None
            answered = time.time()
            if code == 200 and body.get("scheduled_at") is not None:
                shown = datetime.fromisoformat(body["scheduled_at"].replace("Z", "+00:00"))
                if (shown - EPOCH) // MICRO >= instant:
                    probe.seen = answered - at
                    return probe
            time.sleep(self.gap)
        return probe


def breakdown(dsn: str, probes: Sequence[Probe]) -> dict[str, Any]:
    """Where the time of the probed instants went (ms), from what the server stored: the
    latest start, finish and receipt of their agents' results."""
    seen = [p for p in probes if p.seen is not None]
    if not seen:
        return {}
    rows = query(
        dsn,
        """SELECT r.task_id::text, r.scheduled_at, max(r.started_at), max(r.finished_at),
                  max(r.received_at), count(*)
           FROM results r
           JOIN unnest(%s::uuid[], %s::timestamptz[]) AS v (task_id, scheduled_at)
             ON r.task_id = v.task_id AND r.scheduled_at = v.scheduled_at
           GROUP BY 1, 2""",
        ([p.task_id for p in seen], [EPOCH + p.instant * MICRO for p in seen]),
    )
    stored = {(t, (at - EPOCH) // MICRO): (s, f, r) for t, at, s, f, r, _ in rows}
    parts: dict[str, list[float]] = {"start": [], "run": [], "report": [], "query": []}
    for probe in seen:
        times = stored.get((probe.task_id, probe.instant))
        if times is None or None in times:
            continue
        started, finished, received = ((t - EPOCH) / MICRO / US for t in times)
        at = probe.instant / US
        assert probe.seen is not None
        parts["start"].append(1000 * (started - at))
        parts["run"].append(1000 * (finished - started))
        parts["report"].append(1000 * (received - finished))
        parts["query"].append(1000 * (at + probe.seen - received))
    return {name: spread(values) for name, values in parts.items()}


def measure(args: argparse.Namespace, root: Path, daemons: list[Daemon]) -> dict[str, Any]:
    pg = Postgres(None, root / "postgres")
    try:
        dsn = pg.create_database()
        fleet = start_fleet(root, args.agents, dsn, daemons)
        api = Operator(fleet)
        creation = create_tasks(api, args.tasks, COMMAND, 1, True, 8)
        tasks = sorted(live_tasks(dsn), key=lambda t: t[1] % t[2])
        delivery, _ = wait_agents(
            fleet, f"the agents to hold {len(tasks)} tasks", holding(len(tasks)), 300
        )
        print(
            f"  {len(tasks)} tasks x {args.agents} agents every 1 s "
            f"({len(tasks) * args.agents} results/s), created in {creation.seconds:.1f} s, "
            f"delivered {delivery:.1f} s later; warming up {args.warmup:g} s"
        )
        start = time.time() + args.warmup
        end = start + args.window
        # Thread i takes every probes-th task by phase: its instants spread over the second.
        probers = [
            Prober(
                Operator(fleet), tasks[i :: args.probes], start, end, args.poll_gap, args.give_up
            )
            for i in range(min(args.probes, len(tasks)))
        ]
        threads = [threading.Thread(target=p.run, daemon=True) for p in probers]
        for thread in threads:
            thread.start()
        time.sleep(max(0.0, start - time.time()))
        window = Window(fleet, 1.0)
        try:
            for thread in threads:
                thread.join()
        finally:
            window.close()
        probes = [p for prober in probers for p in prober.probes]
        parts = breakdown(dsn, probes)
        stored = query(
            dsn,
            "SELECT count(*) FROM results WHERE scheduled_at >= %s AND scheduled_at < %s",
            (datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(end, UTC)),
        )[0][0]
        stop_daemons([fleet.server, *fleet.agents])
        return {
            "tasks": len(tasks),
            "agents": args.agents,
            "results_per_s_due": len(tasks) * args.agents,
            "results_per_s_stored": round(stored / args.window, 1),
            "window_s": args.window,
            "poll_gap_s": args.poll_gap,
            "probes": len(probes),
            "unseen": sum(p.seen is None for p in probes),
            "poll_errors": sum(p.errors for p in probers),
            "polls_per_probe": spread(p.polls for p in probes),
            "visible_ms": spread(1000 * p.seen for p in probes if p.seen is not None),
            "breakdown_ms": parts,
            **window.figures(),
            **environment(),
        }
    finally:
        stop_daemons(daemons)
        pg.close(drop=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)  # --quick: a 15 s window; --ceilings: unused (no ratio applies)
    parser.add_argument("--tasks", type=int, default=100, help="tasks, each every 1 s")
    parser.add_argument("--agents", type=int, default=2, help="agents, each runs every task")
    parser.add_argument("--window", type=float, default=None, help="seconds probed (60)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the window")
    parser.add_argument("--probes", type=int, default=10, help="polling threads")
    parser.add_argument("--poll-gap", type=float, default=0.005, help="seconds between polls")
    parser.add_argument("--give-up", type=float, default=5.0, help="seconds before unseen")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.window is None:
        args.window = 15.0 if args.quick else 60.0
    return args


def main() -> int:
    args = parse_args()
    record = run_in_folder(
        SCENARIO, "bench-freshness-", args.keep, lambda root, daemons: measure(args, root, daemons)
    )
    if record is None:
        return 1
    visible = record["visible_ms"]
    parts = record["breakdown_ms"]
    rows = [
        (
            "results/s due / stored",
            f"{record['results_per_s_due']} / {record['results_per_s_stored']}",
        ),
        ("instants probed / unseen", f"{record['probes']} / {record['unseen']}"),
        ("visible p50 / p99 / max", f"{visible['p50']} / {visible['p99']} / {visible['max']} ms"),
        *((f"  {name} p50 / p99", f"{s['p50']} / {s['p99']} ms") for name, s in parts.items()),
        (
            "server / agent-0 CPU",
            f"{record['server']['cpu_share']} / {record['agent-0']['cpu_share']}",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    detail = {k: v for k, v in record.items() if k != "visible_ms"}
    for q, target in (("p50", P50_TARGET_MS), ("p99", P99_TARGET_MS)):
        value = visible[q]
        emit(
            args.json_out,
            Figure(
                SCENARIO,
                f"instant to visible in latest_output {q}",
                value,
                "ms",
                target=f"< {target:g} ms",
                met=value is not None and value < target and record["unseen"] == 0,
                detail=detail,
            ),
        )
    print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
