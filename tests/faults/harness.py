"""What every fault scenario shares: a witnessed task, the ground truth, and the counts.

Each run of the witnessed command appends ``start <instant>`` to ``witness.txt`` in the
agent's working directory as it begins, and ``end <instant>`` once it has done its work:
a record the system under test cannot alter. A scenario injects its faults, then
compares, per agent, the instants the witness file holds with the results the server
stored (read through its history API), and prints one line of figures, also appended to
``tests/faults/last-run.txt``. Scenarios may also look for processes of their runs left
alive (:func:`run_processes`): a run must leave nothing behind.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg2
from psycopg2.extensions import make_dsn

from taskscheduler.agent.runjournal import RunJournal
from taskscheduler.schedule import format_instant
from tests.integration.daemons import Daemon, Fleet, http, listening_on_their_ports, wait_for

#: Takes a little time, so that some faults land in the middle of a run; says when it
#: starts and when it has done its work.
WITNESSED_COMMAND = (
    'echo "start $TASKSCHEDULER_SCHEDULED_AT" >> witness.txt; sleep 0.3; '
    'echo "end $TASKSCHEDULER_SCHEDULED_AT" >> witness.txt'
)

#: Where each scenario's figures are appended (ignored by git).
LAST_RUN = Path(__file__).with_name("last-run.txt")

#: Statuses of runs whose outcome is known: what a run that ended must be stored as.
RAN = frozenset({"succeeded", "failed", "timed_out"})

#: Executions per page when reading a history: small, so that every scenario's history
#: spans several pages and a paging bug shows (a result listed twice, or missing).
HISTORY_PAGE = 10

#: What the agent stores as a result's ``reason`` when it re-attached to the run.
REATTACHED = "re-attached"


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
    server_env: dict[str, str] | None = None,
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
        fleet.server.env.update(server_env or {})
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
            if not listening_on_their_ports(fleet, daemons):
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


def create_task(fleet: Fleet, body: dict[str, Any]) -> str:
    """Create a task from ``body``; its id, once every agent holds it."""
    held = [int((agent_health(fleet, i) or {}).get("tasks", 0)) for i in range(len(fleet.agents))]
    code, answer = fleet.api("POST", "/api/v1/tasks/create", body)
    assert code == 201, answer
    for i in range(len(fleet.agents)):
        wait_for(
            lambda i=i: (agent_health(fleet, i) or {}).get("tasks", 0) > held[i],
            30,
            f"agent {i} to receive the task",
        )
    return str(answer["command_id"])


def create_witnessed_task(fleet: Fleet, frequency: str = "every 1 second") -> str:
    return create_task(fleet, {"command": WITNESSED_COMMAND, "frequency": frequency})


def history(fleet: Fleet, task_id: str) -> list[dict[str, Any]]:
    """Every result the history API lists for the task, page by page, as
    ``{"agent_id", "scheduled_at", "status", "reason"}`` (``reason`` None when absent).

    Nothing is merged: a result the API lists twice (a join or paging bug) is here twice.
    """
    results: list[dict[str, Any]] = []
    before: str | None = None
    while True:
        path = f"/api/v1/tasks/{task_id}/executions?limit={HISTORY_PAGE}"
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
                        "reason": output.get("reason"),
                    }
                )
        before = body["next_before"]
        if before is None:
            return results


@dataclass
class Witness:
    """What one agent's runs of a task wrote to their witness file."""

    started: collections.Counter[str] = field(default_factory=collections.Counter)
    ended: collections.Counter[str] = field(default_factory=collections.Counter)
    ended_in_order: list[str] = field(default_factory=list)


def read_witness(fleet: Fleet, index: int, name: str = "witness.txt") -> Witness:
    """Parse ``start <instant>`` and ``end <instant>`` lines; a bare ``<instant>`` line
    (the single-line form some scenarios use, written once the work is done) counts as
    both."""
    witness = Witness()
    try:
        text = (fleet.agents[index].workdir / name).read_text()
    except FileNotFoundError:
        return witness
    for line in text.splitlines():
        words = line.split()
        if len(words) == 1:
            words = ["start", words[0], "end", words[0]]
        for kind, at in zip(words[::2], words[1::2], strict=True):
            if kind == "start":
                witness.started[at] += 1
            else:
                assert kind == "end", f"a witness line this harness did not write: {line!r}"
                witness.ended[at] += 1
                witness.ended_in_order.append(at)
    return witness


def witnessed(fleet: Fleet, index: int) -> list[str]:
    """The instants of the runs that did their work (their "end" lines), in file order."""
    return read_witness(fleet, index).ended_in_order


def markers_left(fleet: Fleet, index: int) -> list[str]:
    """The runs the agent's run journal holds (runs whose result is not yet safe in its
    spool: going, or just ended), as ``<instant>_<task id>``."""
    return RunJournal.replayed(fleet.agents[index].workdir / "data" / "runs").leftovers()


def marker_instant(name: str) -> str:
    """The scheduled instant a run record's file name encodes, as the API writes it."""
    stamp = name.partition("_")[0]
    return format_instant(datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC))


@dataclass
class Figures:
    """The ground truth compared with what was stored, up to a cut-off instant."""

    started: int = 0  # runs that wrote their "start" line
    witnessed: int = 0  # runs that wrote their "end" line: they did their work
    stored: int = 0
    lost: int = 0
    skipped: int = 0
    reattached: int = 0  # results whose reason says the agent re-attached to the run
    ran_twice: list[tuple[str, str]] = field(default_factory=list)  # one instant started twice
    listed_twice: list[tuple[str, str]] = field(default_factory=list)  # the API's pages
    missing: list[tuple[str, str]] = field(default_factory=list)  # started, not stored
    unwitnessed: list[tuple[str, str, str]] = field(default_factory=list)  # stored, not run
    ended_unknown: list[tuple[str, str, str]] = field(default_factory=list)  # ended, yet lost
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)


def compare(
    fleet: Fleet, task_id: str, agent_ids: list[str], cutoff: str, witness: str = "witness.txt"
) -> Figures:
    """Witness lines and stored results of instants up to ``cutoff`` (an RFC 3339 string)."""
    figures = Figures()
    stored = [r for r in history(fleet, task_id) if r["scheduled_at"] <= cutoff]
    figures.stored = len(stored)
    figures.statuses.update(r["status"] for r in stored)
    figures.lost = figures.statuses["lost"]
    figures.skipped = figures.statuses["skipped"]
    figures.reattached = sum(1 for r in stored if (r["reason"] or "").startswith(REATTACHED))
    listed = collections.Counter((r["agent_id"], r["scheduled_at"]) for r in stored)
    figures.listed_twice = sorted(key for key, n in listed.items() if n > 1)
    by_key = {(r["agent_id"], r["scheduled_at"]): r["status"] for r in stored}
    for index, agent_id in enumerate(agent_ids):
        seen = read_witness(fleet, index, witness)
        started = {at: n for at, n in seen.started.items() if at <= cutoff}
        ended = {at for at in seen.ended if at <= cutoff}
        figures.started += len(started)
        figures.witnessed += len(ended)
        figures.ran_twice += [(agent_id, at) for at, n in started.items() if n > 1]
        figures.missing += [
            (agent_id, at) for at in sorted(started.keys() | ended) if (agent_id, at) not in by_key
        ]
        for (owner, at), status in by_key.items():
            if owner != agent_id:
                continue
            # A result that says the command ran needs a run that began; one that says it
            # succeeded needs a run that did its work.
            if (status in RAN and at not in started) or (status == "succeeded" and at not in ended):
                figures.unwitnessed.append((agent_id, at, status))
            # A run that did its work has a knowable outcome: it is never "lost".
            if at in ended and status not in RAN:
                figures.ended_unknown.append((agent_id, at, status))
    return figures


def cutoff_now() -> str:
    """Now, as the API writes instants; runs scheduled up to now end within a second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())


def drain(
    fleet: Fleet,
    task_id: str,
    agent_ids: list[str],
    cutoff: str,
    timeout: float,
    witness: str = "witness.txt",
) -> tuple[Figures, float]:
    """Wait until every run up to ``cutoff`` is accounted for; the figures and seconds it took.

    Runs scheduled up to the cut-off have written their "start" line within a second and
    a half of it; from then on a run that began and has no stored result is one still
    going, or whose result is still on its way from the agent.
    """
    started = time.monotonic()
    settled = time.monotonic() + 1.5

    def accounted() -> Figures | None:
        if time.monotonic() < settled:
            return None
        figures = compare(fleet, task_id, agent_ids, cutoff, witness)
        return figures if not figures.missing else None

    try:
        figures = wait_for(accounted, timeout, "every witnessed run to be stored", interval=0.25)
    except AssertionError:
        figures = compare(fleet, task_id, agent_ids, cutoff, witness)
        raise AssertionError(f"not drained in {timeout}s: {summary_fields(figures)}") from None
    return figures, max(0.0, time.monotonic() - started)


def summary_fields(figures: Figures) -> str:
    statuses = ",".join(f"{k}={v}" for k, v in sorted(figures.statuses.items()))
    return (
        f"started={figures.started} witnessed={figures.witnessed} stored={figures.stored} "
        f"lost={figures.lost} skipped={figures.skipped} reattached={figures.reattached} "
        f"ended_as_lost={len(figures.ended_unknown)} ran_twice={len(figures.ran_twice)} "
        f"listed_twice={len(figures.listed_twice)} missing={len(figures.missing)} "
        f"unwitnessed={len(figures.unwitnessed)} statuses[{statuses}]"
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


def soundness_problems(
    fleet: Fleet,
    figures: Figures,
    cutoff: str,
    statuses: frozenset[str] = frozenset({"succeeded", "lost", "skipped"}),
) -> list[str]:
    """Every pass criterion the figures break, each as a sentence (none: sound)."""
    problems = []
    if figures.ran_twice:
        problems.append(f"instants run twice on one agent: {figures.ran_twice[:10]}")
    if figures.listed_twice:
        problems.append(f"results the history API lists twice: {figures.listed_twice[:10]}")
    if figures.missing:
        problems.append(f"runs that began with no stored result: {figures.missing[:10]}")
    if figures.unwitnessed:
        problems.append(f"stored results no run bears out: {figures.unwitnessed[:10]}")
    if figures.ended_unknown:
        problems.append(
            f"{len(figures.ended_unknown)} runs wrote their end line, yet are stored without "
            f"their outcome: {figures.ended_unknown[:10]}"
        )
    if not set(figures.statuses) <= statuses:
        problems.append(f"statuses beyond {sorted(statuses)}: {dict(figures.statuses)}")
    # No run is left "running": every marker left in an agent's data folder is of a run
    # scheduled after the cut-off (one under way now).
    stamp = cutoff.replace("-", "").replace(":", "")
    for index in range(len(fleet.agents)):
        stale = [name for name in markers_left(fleet, index) if name[:23] <= stamp[:23]]
        if stale:
            problems.append(f"agent {index} still counts runs as going: {stale}")
    return problems


def assert_sound(fleet: Fleet, figures: Figures, cutoff: str) -> None:
    """The pass criteria: nothing lost, nothing doubled, nothing stored that did not run,
    no run that ended stored as ``lost``; every criterion broken is named at once."""
    problems = soundness_problems(fleet, figures, cutoff)
    assert not problems, "\n".join([summary_fields(figures), *problems])


@dataclass(frozen=True)
class RunProcess:
    """A live process that belongs to a run of the scenario."""

    pid: int
    task_id: str | None
    scheduled_at: str | None
    command: str


def run_processes(
    task_ids: Collection[str], root: Path, daemons: Collection[int] = ()
) -> list[RunProcess]:
    """Every live process of the scenario's runs.

    A process belongs to a run if its environment names one of ``task_ids`` (every run,
    and whatever it starts, inherits ``TASKSCHEDULER_TASK_ID``), or if its working folder
    lies under ``root`` (runs start in their agent's folder) and it is not one of the
    ``daemons``. Zombies are dead already; processes of other users cannot be read, and
    are none of ours.
    """
    wanted = {f"TASKSCHEDULER_TASK_ID={task_id}".encode() for task_id in task_ids}
    inside = str(root.resolve()) + os.sep
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in (os.getpid(), *daemons):
            continue
        try:
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
            environ = (entry / "environ").read_bytes().split(b"\0")
            cwd = os.readlink(entry / "cwd") + os.sep
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if state == "Z":
            continue
        if not wanted.intersection(environ) and not cwd.startswith(inside):
            continue
        env = dict(item.partition(b"=")[::2] for item in environ)
        task_id = env.get(b"TASKSCHEDULER_TASK_ID")
        scheduled_at = env.get(b"TASKSCHEDULER_SCHEDULED_AT")
        found.append(
            RunProcess(
                int(entry.name),
                None if task_id is None else task_id.decode(errors="replace"),
                None if scheduled_at is None else scheduled_at.decode(errors="replace"),
                command.strip(),
            )
        )
    return found


def processes_left(task_ids: Collection[str], root: Path, within: float) -> list[RunProcess]:
    """The processes of the scenario's runs still alive ``within`` seconds from now (at once
    if none is left): the processes left alive after a scenario whose fleet has stopped."""
    deadline = time.monotonic() + within
    while True:
        left = run_processes(task_ids, root)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)  # polling for the processes to end, with a deadline


def kill_processes(processes: Collection[RunProcess]) -> None:
    """SIGKILL the given processes (by pid), so that a failing scenario leaves none behind."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(process.pid, signal.SIGKILL)
