"""What every fault scenario shares: a witnessed task, the ground truth, and the counts.

Each run of the witnessed command appends its scheduled instant to ``witness.txt`` in
the agent's working directory once it has done its work: a record the system under test
cannot alter. A scenario injects its faults, then compares, per agent, the instants the
witness file holds with the results the server stored (read through its history API),
and prints one line of figures, also appended to ``tests/faults/last-run.txt``.
"""

from __future__ import annotations

import collections
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2.extensions import make_dsn

from taskscheduler.schedule import format_instant
from tests.integration.daemons import Daemon, Fleet, http, wait_for

#: Takes a little time, so that some faults land in the middle of a run.
WITNESSED_COMMAND = 'sleep 0.3; echo "$TASKSCHEDULER_SCHEDULED_AT" >> witness.txt'

#: Where each scenario's figures are appended (ignored by git).
LAST_RUN = Path(__file__).with_name("last-run.txt")

#: Statuses of runs that did their work (and so wrote a witness line).
RAN = frozenset({"succeeded", "failed", "timed_out"})


def seeded_random(scenario: str) -> tuple[random.Random, int]:
    """A random source for fault timing; ``TASKSCHEDULER_FAULT_SEED`` replays a run."""
    seed = int(os.environ.get("TASKSCHEDULER_FAULT_SEED") or random.SystemRandom().randrange(10**6))
    print(f"[{scenario}] seed {seed} (TASKSCHEDULER_FAULT_SEED={seed} replays it)")
    return random.Random(f"{scenario}:{seed}"), seed


def create_database(server_dsn: str) -> str:
    """A new, empty database on the PostgreSQL server ``server_dsn``; its DSN."""
    name = f"ts_fault_{uuid.uuid4().hex[:16]}"
    conn = psycopg2.connect(server_dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    finally:
        conn.close()
    return make_dsn(server_dsn, dbname=name)


def start_fleet(
    root: Path,
    agents: int,
    database: str,
    agent_env: dict[str, str] | None = None,
    attempts: int = 3,
    steppable: Callable[[Daemon], Daemon] | None = None,
) -> Fleet:
    """A started fleet whose daemons really listen on their ports.

    ``free_port`` picks ports that another process (a concurrent test run) may take
    before our daemons bind them; a health check would then be answered by a stranger.
    Each daemon's log must say it listens on its own port; if not, start afresh.
    """
    for attempt in range(attempts):
        fleet = Fleet(root / f"fleet-{attempt}", agents, database)
        for agent in fleet.agents:
            agent.env.update(agent_env or {})
        if steppable is not None:
            fleet.agents[0] = steppable(fleet.agents[0])
        ports = [fleet.server_port, *fleet.agent_ports]
        if len(set(ports)) == len(ports):
            try:
                fleet.start()
            except BaseException:
                print(fleet.logs())
                fleet.stop()
                raise
            daemons = [
                (fleet.server, fleet.server_port),
                *zip(fleet.agents, fleet.agent_ports, strict=True),
            ]
            try:
                for daemon, port in daemons:
                    wait_for(
                        lambda d=daemon, p=port: f"Site starting on {p}" in d.log(),
                        10,
                        f"{daemon.name} to listen on its port {port}",
                    )
            except AssertionError:
                print(fleet.logs())
                fleet.stop()
                continue
            return fleet
    raise AssertionError(f"could not start a fleet on free ports in {attempts} attempts")


def agent_health(fleet: Fleet, index: int) -> dict[str, Any] | None:
    """The agent's ``/api/v1/health`` body, or None while it does not answer 200."""
    try:
        code, body = http(
            "GET",
            f"{fleet.agent_urls[index]}/api/v1/health",
            timeout=2,
            context=fleet.ssl_context,
        )
    except OSError:
        return None
    return body if code == 200 else None


def wait_agent_up(fleet: Fleet, index: int, timeout: float = 30) -> dict[str, Any]:
    def up() -> dict[str, Any] | None:
        fleet.agents[index].assert_running()
        return agent_health(fleet, index)

    return wait_for(up, timeout, f"agent {index} to answer", interval=0.05)


def create_witnessed_task(fleet: Fleet, frequency: str = "every 1 second") -> str:
    code, body = fleet.api(
        "POST", "/api/v1/tasks/create", {"command": WITNESSED_COMMAND, "frequency": frequency}
    )
    assert code == 201, body
    task_id = str(body["command_id"])
    for i in range(len(fleet.agents)):
        wait_for(
            lambda i=i: (agent_health(fleet, i) or {}).get("tasks", 0) >= 1,
            30,
            f"agent {i} to receive the task",
        )
    return task_id


def history(fleet: Fleet, task_id: str) -> list[dict[str, Any]]:
    """Every stored result of the task, as ``{"agent_id", "scheduled_at", "status"}``."""
    results: list[dict[str, Any]] = []
    before: str | None = None
    while True:
        path = f"/api/v1/tasks/{task_id}/executions?limit=1000"
        if before is not None:
            path += f"&before={before}"
        code, body = fleet.api("GET", path)
        assert code == 200, body
        for execution in body["executions"]:
            for output in execution["outputs"]:
                results.append(
                    {
                        "agent_id": output["agent_id"],
                        "scheduled_at": execution["scheduled_at"],
                        "status": output["status"],
                    }
                )
        before = body["next_before"]
        if before is None:
            return results


def witnessed(fleet: Fleet, index: int) -> list[str]:
    path = fleet.agents[index].workdir / "witness.txt"
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def markers_left(fleet: Fleet, index: int) -> list[str]:
    """Names of the run markers in the agent's data folder (runs it thinks are going)."""
    folder = fleet.agents[index].workdir / "data" / "running"
    return sorted(p.name for p in folder.glob("*.json")) if folder.exists() else []


def marker_instant(name: str) -> str:
    """The scheduled instant a run marker's file name encodes, as the API writes it."""
    stamp = name.partition("_")[0]
    return format_instant(datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC))


@dataclass
class Figures:
    """The ground truth compared with what was stored, up to a cut-off instant."""

    witnessed: int = 0
    stored: int = 0
    lost: int = 0
    skipped: int = 0
    duplicated: int = 0
    missing: list[tuple[str, str]] = field(default_factory=list)  # witnessed, not stored
    unwitnessed: list[tuple[str, str, str]] = field(default_factory=list)  # stored, not run
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)

    @property
    def consistent(self) -> bool:
        return not self.missing and not self.unwitnessed and not self.duplicated


def compare(fleet: Fleet, task_id: str, agent_ids: list[str], cutoff: str) -> Figures:
    """Witness lines and stored results of instants up to ``cutoff`` (an RFC 3339 string)."""
    figures = Figures()
    stored = [r for r in history(fleet, task_id) if r["scheduled_at"] <= cutoff]
    keys = collections.Counter((r["agent_id"], r["scheduled_at"]) for r in stored)
    figures.stored = len(stored)
    figures.duplicated = sum(n - 1 for n in keys.values())
    figures.statuses.update(r["status"] for r in stored)
    figures.lost = figures.statuses["lost"]
    figures.skipped = figures.statuses["skipped"]
    by_key = {(r["agent_id"], r["scheduled_at"]): r["status"] for r in stored}
    for index, agent_id in enumerate(agent_ids):
        lines = [line for line in witnessed(fleet, index) if line <= cutoff]
        figures.witnessed += len(lines)
        ran = collections.Counter(lines)
        figures.duplicated += sum(n - 1 for n in ran.values())  # an instant run twice
        figures.missing += [(agent_id, at) for at in ran if (agent_id, at) not in by_key]
        figures.unwitnessed += [
            (agent_id, at, status)
            for (owner, at), status in by_key.items()
            if owner == agent_id and status in RAN and at not in ran
        ]
    return figures


def cutoff_now() -> str:
    """Now, as the API writes instants; runs scheduled up to now end within a second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def drain(
    fleet: Fleet, task_id: str, agent_ids: list[str], cutoff: str, timeout: float
) -> tuple[Figures, float]:
    """Wait until every run up to ``cutoff`` is accounted for; the figures and seconds it took.

    Runs scheduled up to the cut-off have written their witness line within a second of
    it (they take 0.3 s); from then on a witnessed run with no stored result is one
    still on its way from the agent.
    """
    started = time.monotonic()
    settled = time.monotonic() + 1.5

    def accounted() -> Figures | None:
        if time.monotonic() < settled:
            return None
        figures = compare(fleet, task_id, agent_ids, cutoff)
        return figures if not figures.missing else None

    try:
        figures = wait_for(accounted, timeout, "every witnessed run to be stored", interval=0.25)
    except AssertionError:
        figures = compare(fleet, task_id, agent_ids, cutoff)
        raise AssertionError(f"not drained in {timeout}s: {summary_fields(figures)}") from None
    return figures, max(0.0, time.monotonic() - started)


def summary_fields(figures: Figures) -> str:
    statuses = ",".join(f"{k}={v}" for k, v in sorted(figures.statuses.items()))
    return (
        f"witnessed={figures.witnessed} stored={figures.stored} lost={figures.lost} "
        f"skipped={figures.skipped} duplicated={figures.duplicated} "
        f"missing={len(figures.missing)} unwitnessed={len(figures.unwitnessed)} "
        f"statuses[{statuses}]"
    )


def report(
    scenario: str, seed: int | None, figures: Figures, drain_seconds: float, **extra: Any
) -> str:
    """Print one line of figures and append it to ``last-run.txt``."""
    extras = " ".join(f"{k}={v}" for k, v in extra.items())
    line = (
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {scenario}: "
        f"{summary_fields(figures)} drain={drain_seconds:.1f}s {extras} seed={seed}"
    ).rstrip()
    print(line)
    with LAST_RUN.open("a") as out:
        out.write(line + "\n")
    return line


def assert_sound(fleet: Fleet, figures: Figures, cutoff: str) -> None:
    """The pass criteria: nothing lost, nothing doubled, nothing stored that did not run."""
    assert figures.duplicated == 0, f"doubled: {summary_fields(figures)}"
    assert not figures.missing, f"witnessed runs with no stored result: {figures.missing[:10]}"
    assert not figures.unwitnessed, f"stored results nobody ran: {figures.unwitnessed[:10]}"
    assert set(figures.statuses) <= {"succeeded", "lost", "skipped"}, figures.statuses
    # No run is left "running": every marker left in an agent's data folder is of a run
    # scheduled after the cut-off (one under way now).
    stamp = cutoff.replace("-", "").replace(":", "")
    for index in range(len(fleet.agents)):
        stale = [name for name in markers_left(fleet, index) if name[:23] <= stamp[:23]]
        assert not stale, f"agent {index} still counts runs as going: {stale}"
