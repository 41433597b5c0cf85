"""Overlap ``replace``, a task's env and working_dir end to end: a real server (embedded
PostgreSQL) and a real agent, driven through the operators' API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from taskscheduler.cli.main import cli
from taskscheduler.schedule import parse_instant
from tests.integration.daemons import Fleet, running_fleet, wait_for
from tests.integration.test_runner_processes import dies_within

pytestmark = pytest.mark.integration


def results(fleet: Fleet, task_id: str) -> list[dict[str, Any]]:
    """Every result of the task, oldest instant first."""
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?limit=1000")
    assert code == 200, body
    found = [{**o, "instant": e["scheduled_at"]} for e in body["executions"] for o in e["outputs"]]
    return sorted(found, key=lambda o: parse_instant(o["instant"]))


def create(fleet: Fleet, **fields: Any) -> str:
    code, body = fleet.api("POST", "/api/v1/tasks/create", fields)
    assert code == 201, body
    return str(body["command_id"])


def test_replace_ends_the_running_run_records_it_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path, agents=1) as fleet:
        # Each run starts a background sleeper (its pid on stdout) and outlives the interval.
        task_id = create(
            fleet,
            command="sleep 300 & echo $!; sleep 300",
            frequency="every 2 seconds",
            time_limit_seconds=600,
            overlap="replace",
        )
        code, task = fleet.api("GET", f"/api/v1/tasks/{task_id}")
        assert (task["overlap"], task["max_concurrent"]) == ("replace", 1), task

        def three_replaced() -> list[dict[str, Any]] | None:
            found = results(fleet, task_id)
            replaced = [o for o in found if o["status"] == "replaced"]
            return found if len(replaced) >= 3 else None

        wait_for(three_replaced, 60, "three runs replaced by newer ones")
        # A new revision that ends by itself: its first run replaces the last sleeper.
        code, body = fleet.api("PATCH", f"/api/v1/tasks/{task_id}", {"command": "echo done"})
        assert code == 200 and body["overlap"] == "replace", body

        def done() -> list[dict[str, Any]] | None:
            found = results(fleet, task_id)
            return found if any(o.get("stdout") == "done\n" for o in found) else None

        found = wait_for(done, 60, "a run of the new revision")
        statuses = [o["status"] for o in found]
        first, last = statuses.index("replaced"), statuses.index("succeeded")
        # Every sleeper was replaced by the next instant's run, up to the new revision's
        # (an instant the loaded machine made late is skipped, and replaces nothing).
        between = statuses[first:last]
        assert set(between) <= {"replaced", "skipped"}, statuses
        assert between.count("replaced") >= 3 and statuses[last - 1] == "replaced", statuses
        for output in [o for o in found[first:last] if o["status"] == "replaced"]:
            assert output["signal"] in (15, 9), output
            sleeper = int(output["stdout"])  # its output is kept
            assert dies_within(sleeper, 10), f"pid {sleeper} of a replaced run survived it"
        assert "is replaced by a newer run of its task" in fleet.agents[0].log()


def test_a_tasks_env_and_working_dir_reach_its_runs(tmp_path: Path) -> None:
    work = tmp_path / "work dir"
    work.mkdir()
    (work / "data.txt").write_text("read from the working dir\n")
    with running_fleet(tmp_path, agents=1) as fleet:
        # From the command line, as the README shows.
        created = CliRunner().invoke(
            cli,
            [
                *("tasks", "create", "--every", "1 second", "--env", "GREETING=hi-s3cr3t"),
                *("--working-dir", str(work), "--"),
                'pwd; cat data.txt; echo "$GREETING $TASKSCHEDULER_TASK_ID"',
            ],
            env={
                "TASKSCHEDULER_URL": fleet.server_url,
                "TASKSCHEDULER_TOKEN": fleet.operator_token,
            },
        )
        assert created.exit_code == 0, created.output
        task_id = created.stdout.split()[0]
        _, task = fleet.api("GET", f"/api/v1/tasks/{task_id}")
        assert (task["env"], task["working_dir"]) == ({"GREETING": "hi-s3cr3t"}, str(work)), task
        missing = create(
            fleet,
            command="echo never",
            frequency="every 1 second",
            working_dir=str(tmp_path / "missing"),
        )

        def first_of(task: str) -> dict[str, Any] | None:
            found = [o for o in results(fleet, task) if o["status"] != "skipped"]
            return found[0] if found else None

        ran = wait_for(lambda: first_of(task_id), 30, "a run in the working dir")
        assert ran["status"] == "succeeded", ran
        assert ran["stdout"] == f"{work}\nread from the working dir\nhi-s3cr3t {task_id}\n"
        failed = wait_for(lambda: first_of(missing), 30, "a run in a missing dir")
        assert (failed["status"], failed["exit_code"]) == ("failed", 126), failed
        assert "stdout" not in failed, failed  # the command never ran
        assert failed["stderr"] == (
            f"taskscheduler: cannot use the working directory {tmp_path / 'missing'}\n"
        )
        # The agent goes on running both.
        wait_for(lambda: len(results(fleet, missing)) >= 2, 30, "a second run")
        assert "s3cr3t" not in fleet.logs(), "an env value was logged"
