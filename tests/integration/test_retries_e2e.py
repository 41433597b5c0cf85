"""Retries on real parts: a command that fails twice then succeeds, retried by a real
agent; the server keeps every attempt and the execution's result is the last."""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from taskscheduler.schedule import parse_instant
from tests.integration.daemons import Fleet, running_fleet, wait_for

pytestmark = pytest.mark.integration


def failing_twice(counter: Path) -> str:
    """A command that fails its first two runs and succeeds from the third on."""
    return (
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {counter}; "
        'echo "try $n"; test $n -ge 3'
    )


def retried_execution(fleet: Fleet, task_id: str) -> dict[str, Any] | None:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?limit=10")
    assert code == 200, body
    for execution in body["executions"]:
        outputs = execution["outputs"]
        if execution["complete"] and outputs and outputs[0]["attempt"] == 3:
            return execution
    return None


def test_a_failing_command_is_retried_until_it_succeeds(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    with running_fleet(tmp_path, agents=1) as fleet:
        code, body = fleet.api(
            "POST",
            "/api/v1/tasks/create",
            {
                "command": failing_twice(counter),
                "frequency": "every 10 seconds",
                "retries": 3,
                "retry_delay_seconds": 1,
            },
        )
        assert code == 201, body
        task_id = body["command_id"]
        execution = wait_for(
            lambda: retried_execution(fleet, task_id), 60, "the third attempt's success"
        )
        [output] = execution["outputs"]
        assert (output["status"], output["exit_code"], output["final"]) == ("succeeded", 0, True)
        assert output["stdout"] == "try 3\n"
        assert [
            (a["attempt"], a["status"], a["exit_code"], a["stdout"]) for a in output["attempts"]
        ] == [
            (1, "failed", 1, "try 1\n"),
            (2, "failed", 1, "try 2\n"),
            (3, "succeeded", 0, "try 3\n"),
        ]
        # Each retry waited its delay (1 s) after the attempt before it ended.
        attempts = output["attempts"]
        for before, after in itertools.pairwise(attempts):
            waited = parse_instant(after["started_at"]) - parse_instant(before["finished_at"])
            assert waited >= timedelta(seconds=1)
