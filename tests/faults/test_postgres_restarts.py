"""Scenario 3: restart PostgreSQL under load; the server answers 503 meanwhile, never
crashes or hangs, and resumes by itself."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from tests.conftest import RestartablePostgres
from tests.faults.harness import (
    agent_health,
    assert_sound,
    create_database,
    create_witnessed_task,
    cutoff_now,
    drain,
    report,
    seeded_random,
    start_fleet,
)
from tests.integration.daemons import Fleet, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

RESTARTS = 3


def _health(fleet: Fleet) -> tuple[int, Any, float]:
    """The server's health answer and how long it took; a hang fails the test."""
    started = time.monotonic()
    code, body = fleet.api("GET", "/api/v1/health")  # times out (an error) after 5 s
    return code, body, time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_postgres_restarts_under_load_lose_and_double_nothing(
    tmp_path: Path, restartable_postgres: RestartablePostgres
) -> None:
    rng, seed = seeded_random("postgres-restart")
    dsn = create_database(restartable_postgres.server_dsn)
    fleet = start_fleet(tmp_path, 2, dsn)
    try:
        server_pid = fleet.server.process.pid if fleet.server.process else None
        task_id = create_witnessed_task(fleet)
        agent_ids = [str((agent_health(fleet, i) or {})["agent_id"]) for i in range(2)]
        unavailable = 0
        slowest = 0.0
        recoveries: list[float] = []
        started = time.monotonic()
        for _ in range(RESTARTS):
            time.sleep(rng.uniform(1.0, 2.5))  # the fault's moment, not a wait for an event
            await restartable_postgres.stop()
            # Down for a while: every answer is a prompt 503, and the server stays up.
            down_until = time.monotonic() + rng.uniform(2.0, 4.0)
            while time.monotonic() < down_until:
                code, body, took = _health(fleet)
                assert code == 503, (code, body)
                assert body["error"]["code"] == "database_unavailable", body
                slowest = max(slowest, took)
                unavailable += 1
                fleet.server.assert_running()
                time.sleep(0.2)  # pacing the probes, not waiting for an event
            await restartable_postgres.start()
            back = time.monotonic()
            wait_for(lambda: _health(fleet)[0] == 200, 30, "the server to reconnect by itself")
            recoveries.append(time.monotonic() - back)
        faults_took = time.monotonic() - started
        assert fleet.server.process is not None and fleet.server.process.pid == server_pid, (
            "the server resumed without a restart"
        )
        cutoff = cutoff_now()
        figures, drained = drain(fleet, task_id, agent_ids, cutoff, timeout=60)
        report(
            f"3 PostgreSQL restart x{RESTARTS}",
            seed,
            figures,
            drained,
            faults_seconds=f"{faults_took:.0f}",
            answers_503=unavailable,
            slowest_503=f"{slowest:.2f}s",
            reconnect=",".join(f"{r:.1f}s" for r in recoveries),
        )
        assert_sound(fleet, figures, cutoff)
        assert figures.lost == 0, "the agents never died: no run was lost"
        assert slowest < 5, "answers while the database is down are prompt"
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
