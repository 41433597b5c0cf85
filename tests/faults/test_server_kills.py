"""Scenario 2: SIGKILL the server repeatedly while results stream in from the agents."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    agent_health,
    assert_sound,
    create_witnessed_task,
    cutoff_now,
    drain,
    report,
    seeded_random,
    start_fleet,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

KILLS = 5


def test_a_server_killed_during_a_stream_of_results_loses_and_doubles_nothing(
    tmp_path: Path, database_dsn: str
) -> None:
    rng, seed = seeded_random("server-sigkill")
    fleet = start_fleet(tmp_path, 2, database_dsn)
    try:
        task_id = create_witnessed_task(fleet)
        agent_ids = [str((agent_health(fleet, i) or {})["agent_id"]) for i in range(2)]
        started = time.monotonic()
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.5, 2.5))  # the fault's moment, not a wait for an event
            fleet.server.kill(signal.SIGKILL)
            fleet.server.start()
            fleet.wait_until_healthy()
        faults_took = time.monotonic() - started
        cutoff = cutoff_now()
        figures, drained = drain(fleet, task_id, agent_ids, cutoff, timeout=60)
        report(
            f"2 server SIGKILL x{KILLS}",
            seed,
            figures,
            drained,
            faults_seconds=f"{faults_took:.0f}",
        )
        assert_sound(fleet, figures, cutoff)
        assert figures.lost == 0, "the agents never died: no run was lost"
        # The task's first instant comes one interval after its creation, so the faults'
        # first second holds no run of it: 2 runs a second over the rest, 80% of them.
        expected = 2 * (faults_took - 1.0) * 0.8
        assert figures.witnessed >= expected, "the agents ran through it all"
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
