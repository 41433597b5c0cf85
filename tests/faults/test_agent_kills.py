"""Scenario 1: SIGKILL an agent at random moments, before, during and after a run and
while it reports, and restart it each time.

Two tasks run on both agents: the witnessed task (every second, 0.3 s of work) and a
time-limited one, killed at its limit every time, whose runs start a child that leaves
their process group on purpose (``setsid sleep 1000 &``). Every fourth kill lands while
a run of the time-limited task is going.

What a kill may not cost: a run that did its work is stored with its outcome, never as
``lost``; a run killed at its limit is stored ``timed_out``; nothing of any run outlives
its time limit, whether its agent was alive or not, nor is anything left alive once the
scenario is over.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from taskscheduler.schedule import parse_instant
from tests.faults.harness import (
    Figures,
    RunProcess,
    agent_health,
    create_task,
    create_witnessed_task,
    cutoff_now,
    drain,
    history,
    kill_processes,
    processes_left,
    read_witness,
    report,
    run_processes,
    seeded_random,
    soundness_problems,
    start_fleet,
    summary_fields,
    wait_agent_up,
)
from tests.integration.daemons import Fleet

pytestmark = [pytest.mark.integration, pytest.mark.faults]

KILLS = 20

#: Where in the witnessed task's second to strike, relative to its instant (the command
#: sleeps 0.3 s, then writes its "end" line; the result is spooled and reported right after).
MOMENTS = {
    "before a run": (-0.12, -0.01),
    "during a run": (0.03, 0.28),
    "while reporting": (0.30, 0.40),
    "after a run": (0.45, 0.85),
}
#: Every fourth kill strikes this far into a run of the time-limited task instead.
DURING_LIMITED_RUN = "during a time-limited run"
LIMITED_MOMENT = (0.1, 0.8)

#: The time-limited task: killed at its limit every time (its ``sleep 6`` never ends in
#: time, so an "end" line shows a run that outlived its limit), and starting a child that
#: leaves the run's process group, as a daemonising command would.
LIMIT = 1
LIMITED_EVERY = 3
LIMITED_WITNESS = "limited.txt"
LIMITED_COMMAND = (
    f'echo "start $TASKSCHEDULER_SCHEDULED_AT" >> {LIMITED_WITNESS}; setsid sleep 1000 & '
    f'sleep 6; echo "end $TASKSCHEDULER_SCHEDULED_AT" >> {LIMITED_WITNESS}'
)

#: The agent's default SIGTERM-to-SIGKILL grace at a time limit.
KILL_GRACE = 5
#: A process of a run scheduled longer ago than this has outlived the run's limit (1 s
#: for both tasks), its kill grace, and a margin for a loaded machine.
OUTLIVED_AFTER = LIMIT + KILL_GRACE + 4
#: Longest wait, once the fleet has stopped, for the processes of its runs to be gone.
GONE_WITHIN = LIMIT + KILL_GRACE + 4


def _next(phase: float, period: float, offset: tuple[float, float], rng_value: float) -> float:
    """The next wall-clock time at ``offset`` into a period that starts at ``phase``."""
    now = time.time()
    target = now - (now - phase) % period + period + offset[0]
    target += rng_value * (offset[1] - offset[0])
    while target - now < 0.05:
        target += period
    return target


def _daemon_pids(fleet: Fleet) -> list[int]:
    daemons = [fleet.server, *fleet.agents]
    return [d.process.pid for d in daemons if d.process is not None]


def _outlived(processes: list[RunProcess]) -> list[RunProcess]:
    """The processes of runs scheduled more than ``OUTLIVED_AFTER`` seconds ago (or of no
    run this process can tell: they have wiped their environment)."""
    now = time.time()
    return [
        p
        for p in processes
        if p.scheduled_at is None
        or parse_instant(p.scheduled_at).timestamp() < now - OUTLIVED_AFTER
    ]


def _not_timed_out(
    fleet: Fleet, task_id: str, agent_ids: list[str], cutoff: str
) -> list[tuple[str, str, str]]:
    """Runs of the time-limited task that began, yet are not stored as ``timed_out``."""
    stored = {
        (r["agent_id"], r["scheduled_at"]): r["status"]
        for r in history(fleet, task_id)
        if r["scheduled_at"] <= cutoff
    }
    wrong = []
    for index, agent_id in enumerate(agent_ids):
        for at in sorted(read_witness(fleet, index, LIMITED_WITNESS).started):
            status = stored.get((agent_id, at), "none")
            if at <= cutoff and status != "timed_out":
                wrong.append((agent_id, at, status))
    return wrong


def _table(rows: dict[str, tuple[Figures, int, int]]) -> str:
    """Scenario 1's figures per task: what ran, how it was stored, and what survived."""
    header = (
        "began",
        "ended",
        "stored",
        "succeeded",
        "re-attached",
        "killed-at-limit",
        "truly-lost",
        "skipped",
        "ended-as-lost",
        "outlived",
        "left-alive",
    )
    lines = [f"{'task':<34}" + "".join(f"{h:>16}" for h in header)]
    for name, (f, outlived, left) in rows.items():
        cells = (
            f.started,
            f.witnessed,
            f.stored,
            f.statuses["succeeded"],
            f.reattached,
            f.statuses["timed_out"],
            f.lost,
            f.skipped,
            len(f.ended_unknown),
            outlived,
            left,
        )
        lines.append(f"{name:<34}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)


def test_an_agent_killed_at_random_moments_loses_doubles_and_leaves_nothing(
    tmp_path: Path, database_dsn: str
) -> None:
    rng, seed = seeded_random("agent-sigkill")
    fleet = start_fleet(tmp_path, 2, database_dsn)
    task_ids: list[str] = []
    try:
        task_id = create_witnessed_task(fleet)
        task_ids.append(task_id)
        limited_id = create_task(
            fleet,
            {
                "command": LIMITED_COMMAND,
                "frequency": f"every {LIMITED_EVERY} seconds",
                "time_limit_seconds": LIMIT,
            },
        )
        task_ids.append(limited_id)
        agent_ids = [str((agent_health(fleet, i) or {})["agent_id"]) for i in range(2)]
        phases = {}
        for tid in task_ids:
            code, task = fleet.api("GET", f"/api/v1/tasks/{tid}")
            assert code == 200, task
            phases[tid] = parse_instant(task["anchor"]).timestamp()
        struck: dict[str, int] = dict.fromkeys([*MOMENTS, DURING_LIMITED_RUN], 0)
        started = time.monotonic()
        for kill in range(KILLS):
            if kill % 4 == 3:
                moment = DURING_LIMITED_RUN
                target = _next(phases[limited_id], LIMITED_EVERY, LIMITED_MOMENT, rng.random())
            else:
                moment = rng.choice(list(MOMENTS))
                target = _next(phases[task_id] % 1.0, 1.0, MOMENTS[moment], rng.random())
            index = rng.randrange(len(fleet.agents))
            time.sleep(target - time.time())  # the fault's moment, not a wait for an event
            fleet.agents[index].kill(signal.SIGKILL)
            struck[moment] += 1
            fleet.agents[index].start()
            wait_agent_up(fleet, index)
        faults_took = time.monotonic() - started
        cutoff = cutoff_now()
        figures, drained = drain(fleet, task_id, agent_ids, cutoff, timeout=60)
        limited, _ = drain(fleet, limited_id, agent_ids, cutoff, 60, LIMITED_WITNESS)
        not_timed_out = _not_timed_out(fleet, limited_id, agent_ids, cutoff)
        problems = soundness_problems(fleet, figures, cutoff)
        problems += [
            f"time-limited task: {problem}"
            for problem in soundness_problems(
                fleet, limited, cutoff, frozenset({"timed_out", "skipped", "lost"})
            )
        ]

        # While the fleet runs: nothing of a run scheduled long ago may be alive.
        outlived = _outlived(run_processes(task_ids, fleet.root, _daemon_pids(fleet)))
        fleet.stop()
        # Once the scenario is over: nothing of any run may be alive (a run cut short by
        # the shutdown gets its limit and kill grace to go).
        left = processes_left(task_ids, fleet.root, GONE_WITHIN)
        kill_processes(left)

        def per_task(processes: list[RunProcess], tid: str) -> int:
            return sum(1 for p in processes if p.task_id == tid)

        print(
            _table(
                {
                    "witnessed (every 1 s, 0.3 s)": (
                        figures,
                        per_task(outlived, task_id),
                        per_task(left, task_id),
                    ),
                    f"time-limited ({LIMIT} s, escaping child)": (
                        limited,
                        per_task(outlived, limited_id),
                        per_task(left, limited_id),
                    ),
                }
            )
        )
        report(
            f"1 agent SIGKILL x{KILLS}",
            seed,
            figures,
            drained,
            faults_seconds=f"{faults_took:.0f}",
            moments="/".join(f"{v}" for v in struck.values()),
            limited=f"[{summary_fields(limited)}]",
            both_tasks=(
                f"[re-attached={figures.reattached + limited.reattached} "
                f"killed-at-limit={figures.statuses['timed_out'] + limited.statuses['timed_out']} "
                f"truly-lost={figures.lost + limited.lost} outlived={len(outlived)} "
                f"left-alive={len(left)}]"
            ),
        )
        if not_timed_out:
            problems.append(
                f"{len(not_timed_out)} runs of the time-limited task began, yet are not "
                f"stored as timed_out: {not_timed_out[:10]}"
            )
        if limited.witnessed:
            problems.append(
                f"{limited.witnessed} runs of the time-limited task ran to their end, "
                f"past their {LIMIT} s limit"
            )
        if outlived:
            problems.append(
                f"{len(outlived)} processes outlived their run's limit by more than "
                f"{OUTLIVED_AFTER - LIMIT} s: {outlived[:5]}"
            )
        if left:
            problems.append(f"{len(left)} processes left alive after the scenario: {left[:5]}")
        if figures.lost > KILLS:
            problems.append("more witnessed runs lost than kills (one under way per kill)")
        if figures.witnessed < KILLS:
            problems.append("the agents did not keep running between the kills")
        assert not problems, "\n".join(problems)
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
        kill_processes(run_processes(task_ids, fleet.root))
