"""SIGTERM stops both daemons cleanly: runs under way get their grace and their results
are kept; and an execution whose agent never reports does not hold the history back."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from taskscheduler.schedule import format_instant, parse_instant
from tests.faults.harness import (
    agent_health,
    assert_sound,
    create_witnessed_task,
    cutoff_now,
    drain,
    history,
    marker_instant,
    markers_left,
    report,
    start_fleet,
    wait_agent_up,
    witnessed,
)
from tests.integration.daemons import Daemon, Fleet, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def _terminate(daemon: Daemon, timeout: float) -> float:
    """SIGTERM a daemon and check it shut down cleanly; how long it took to exit."""
    process = daemon.process
    assert process is not None
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=timeout)
    took = time.monotonic() - started
    # twistd shuts down, then ends itself with the signal it received.
    assert code in (0, -signal.SIGTERM), daemon.log()
    assert daemon.log().rstrip().endswith("Server Shut Down."), daemon.log()
    return took


def _run_under_way(fleet: Fleet) -> str:
    """Wait for the agent to be in the middle of a run; that run's scheduled instant."""
    names = wait_for(lambda: markers_left(fleet, 0), 20, "a run to start", interval=0.05)
    return marker_instant(names[0])


def _stored(fleet: Fleet, task_id: str, at: str) -> list[str]:
    return [r["status"] for r in history(fleet, task_id) if r["scheduled_at"] == at]


def _task(fleet: Fleet, command: str, frequency: str) -> str:
    code, body = fleet.api(
        "POST", "/api/v1/tasks/create", {"command": command, "frequency": frequency}
    )
    assert code == 201, body
    wait_for(lambda: (agent_health(fleet, 0) or {}).get("tasks"), 30, "the task to arrive")
    return str(body["command_id"])


def test_sigterm_lets_a_run_finish_and_keeps_its_result(tmp_path: Path, database_dsn: str) -> None:
    fleet = start_fleet(tmp_path, 1, database_dsn)
    try:
        task_id = _task(
            fleet, 'sleep 2; echo "$TASKSCHEDULER_SCHEDULED_AT" >> witness.txt', "every 5 seconds"
        )
        at = _run_under_way(fleet)
        took = _terminate(fleet.agents[0], timeout=30)
        assert witnessed(fleet, 0) == [at], "the run was let finish"
        assert took > 1, "the agent waited for the run"
        fleet.agents[0].start()
        wait_agent_up(fleet, 0)
        wait_for(lambda: _stored(fleet, task_id, at), 20, "the run's result to be stored")
        assert _stored(fleet, task_id, at) == ["succeeded"]
        print(f"agent SIGTERM mid-run: exited cleanly after {took:.1f}s, result succeeded")
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()


def test_sigterm_past_the_grace_ends_the_run_and_records_it_lost(
    tmp_path: Path, database_dsn: str
) -> None:
    fleet = start_fleet(
        tmp_path, 1, database_dsn, agent_env={"TASKSCHEDULER_AGENT_SHUTDOWN_GRACE": "0.5"}
    )
    try:
        task_id = _task(
            fleet, 'sleep 8; echo "$TASKSCHEDULER_SCHEDULED_AT" >> witness.txt', "every 10 seconds"
        )
        at = _run_under_way(fleet)
        took = _terminate(fleet.agents[0], timeout=30)
        assert took < 6, "the run was ended after the grace, not awaited"
        fleet.agents[0].start()
        wait_agent_up(fleet, 0)
        wait_for(lambda: _stored(fleet, task_id, at), 20, "the run's result to be stored")
        assert _stored(fleet, task_id, at) == ["lost"]
        assert witnessed(fleet, 0) == [], "the run was ended with its process group"
        print(f"agent SIGTERM past a 0.5 s grace: exited cleanly after {took:.1f}s, result lost")
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()


def test_the_server_stops_cleanly_on_sigterm_and_loses_nothing(
    tmp_path: Path, database_dsn: str
) -> None:
    fleet = start_fleet(tmp_path, 1, database_dsn)
    try:
        task_id = create_witnessed_task(fleet)
        agent_ids = [str((agent_health(fleet, 0) or {})["agent_id"])]
        wait_for(lambda: len(witnessed(fleet, 0)) >= 3, 20, "a stream of results")
        took = _terminate(fleet.server, timeout=30)
        fleet.server.start()
        fleet.wait_until_healthy()
        cutoff = cutoff_now()
        figures, drained = drain(fleet, task_id, agent_ids, cutoff, timeout=60)
        report("server SIGTERM", None, figures, drained, exited_after=f"{took:.1f}s")
        assert_sound(fleet, figures, cutoff)
        assert figures.lost == 0
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()


def test_executions_an_agent_never_reports_close_at_their_deadline(
    tmp_path: Path, database_dsn: str
) -> None:
    fleet = start_fleet(tmp_path, 2, database_dsn)
    try:
        task_id = create_witnessed_task(fleet)
        survivor = str((agent_health(fleet, 0) or {})["agent_id"])
        fleet.agents[1].kill(signal.SIGKILL)  # and never comes back
        gone = format_instant(parse_instant(cutoff_now()))

        def moved_on() -> dict | None:
            code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/latest_output")
            assert code == 200, body
            if body["scheduled_at"] is None or body["scheduled_at"] <= gone:
                return None
            return dict(body)

        # Time limit 1 s + the fleet's report grace of 5 s: closed within ten seconds.
        latest = wait_for(moved_on, 20, "latest_output to move past the missing agent")
        assert [o["agent_id"] for o in latest["outputs"]] == [survivor]
        assert latest["expected_agents"] == 2
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
