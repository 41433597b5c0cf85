"""A cron task with a seconds field on real parts (twistd server and two agents, embedded
PostgreSQL): GET shows its next instants, and both agents run the same instants."""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path

import pytest

from taskscheduler.cron import parse_cron
from taskscheduler.schedule import parse_instant
from tests.integration.daemons import Fleet, running_fleet, wait_for

pytestmark = pytest.mark.integration

# Each run appends its instant to a file in the agent's working directory: what ran.
WITNESSED = 'echo "$TASKSCHEDULER_SCHEDULED_AT" >> cron-witness.txt; echo tick'


def witnessed(root: Path, agents: int) -> list[list[str]]:
    files = [root / f"agent-{i}" / "cron-witness.txt" for i in range(agents)]
    return [f.read_text().split() if f.exists() else [] for f in files]


def both_ran(fleet: Fleet, task_id: str, after: str) -> dict | None:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200, body
    if body["completion_time"] is None or body["scheduled_at"] <= after:
        return None
    outputs = body["outputs"]
    if len(outputs) == 2 and all(o.get("stdout") == "tick\n" for o in outputs):
        return body
    return None


def test_a_cron_task_with_seconds_runs_on_the_same_instants_on_both_agents(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path) as fleet:
        code, body = fleet.api(
            "POST",
            "/api/v1/tasks/create",
            {"command": WITNESSED, "cron": "*/2 * * * * *", "timezone": "Europe/Paris"},
        )
        assert code == 201, body
        task_id = body["command_id"]
        cron = parse_cron("*/2 * * * * *", "Europe/Paris")
        created = [parse_instant(t) for t in body["next_instants"]]
        assert len(created) == 5 and all(cron.is_instant(t) for t in created)
        assert [b - a for a, b in itertools.pairwise(created)] == [timedelta(seconds=2)] * 4

        code, task = fleet.api("GET", f"/api/v1/tasks/{task_id}")
        assert code == 200, task
        assert (task["cron"], task["timezone"], task["frequency"]) == (
            "*/2 * * * * *",
            "Europe/Paris",
            None,
        )
        shown = [parse_instant(t) for t in task["next_instants"]]
        assert len(shown) == 5 and shown[0] == parse_instant(task["next_instant"])
        assert all(t.microsecond == 0 and t.second % 2 == 0 for t in shown)

        # Both agents report one execution together, labelled with a cron instant.
        first = wait_for(lambda: both_ran(fleet, task_id, ""), 40, "both agents' first tick")
        assert cron.is_instant(parse_instant(first["scheduled_at"]))
        wait_for(lambda: both_ran(fleet, task_id, first["scheduled_at"]), 20, "a second execution")

        # What each agent ran (outside the system's control): the same instants, every
        # one a cron instant, none twice.
        def three_in_common() -> set[str] | None:
            runs = witnessed(tmp_path, 2)
            common = set(runs[0]) & set(runs[1])
            return common if len(common) >= 3 else None

        common = wait_for(three_in_common, 30, "three instants run by both agents")
        runs = witnessed(tmp_path, 2)
        for lines in runs:
            assert len(lines) == len(set(lines)), "an instant ran twice"
            assert all(cron.is_instant(parse_instant(at)) for at in lines)
        assert all(cron.is_instant(parse_instant(at)) for at in common)

        # Paused: nothing to come.
        code, paused = fleet.api("POST", f"/api/v1/tasks/{task_id}/pause")
        assert code == 200 and paused["next_instants"] == [], paused
