"""Scenario 1: SIGKILL an agent at random moments, before, during and after a run and
while it reports, and restart it each time."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from taskscheduler.schedule import parse_instant
from tests.faults.harness import (
    agent_health,
    assert_sound,
    create_witnessed_task,
    cutoff_now,
    drain,
    report,
    seeded_random,
    start_fleet,
    wait_agent_up,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

KILLS = 20

#: Where in the task's second to strike, relative to its instant (the command sleeps
#: 0.3 s, then writes its witness line; the result is spooled and reported right after).
MOMENTS = {
    "before a run": (-0.12, -0.01),
    "during a run": (0.03, 0.28),
    "while reporting": (0.30, 0.40),
    "after a run": (0.45, 0.85),
}


def test_an_agent_killed_at_random_moments_loses_and_doubles_nothing(
    tmp_path: Path, database_dsn: str
) -> None:
    rng, seed = seeded_random("agent-sigkill")
    fleet = start_fleet(tmp_path, 2, database_dsn)
    try:
        task_id = create_witnessed_task(fleet)
        agent_ids = [str((agent_health(fleet, i) or {})["agent_id"]) for i in range(2)]
        code, task = fleet.api("GET", f"/api/v1/tasks/{task_id}")
        assert code == 200, task
        phase = parse_instant(task["anchor"]).timestamp() % 1.0
        struck: dict[str, int] = dict.fromkeys(MOMENTS, 0)
        started = time.monotonic()
        for _ in range(KILLS):
            moment = rng.choice(list(MOMENTS))
            low, high = MOMENTS[moment]
            # The next time that falls at the chosen moment of the task's second.
            now = time.time()
            target = now - (now - phase) % 1.0 + 1.0 + rng.uniform(low, high)
            while target - now < 0.05:
                target += 1.0
            index = rng.randrange(len(fleet.agents))
            time.sleep(target - time.time())  # the fault's moment, not a wait for an event
            fleet.agents[index].kill(signal.SIGKILL)
            struck[moment] += 1
            fleet.agents[index].start()
            wait_agent_up(fleet, index)
        faults_took = time.monotonic() - started
        cutoff = cutoff_now()
        figures, drained = drain(fleet, task_id, agent_ids, cutoff, timeout=60)
        report(
            f"1 agent SIGKILL x{KILLS}",
            seed,
            figures,
            drained,
            faults_seconds=f"{faults_took:.0f}",
            moments="/".join(f"{v}" for v in struck.values()),
        )
        assert_sound(fleet, figures, cutoff)
        assert figures.lost <= KILLS, "at most the one run under way is lost per kill"
        assert figures.witnessed >= KILLS, "the agents kept running between the kills"
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
