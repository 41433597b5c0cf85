"""The task verbs of the taskscheduler command against a real server and real agents:
ls, show and every verb by id prefix, edit, pause, resume, run, and an ambiguous prefix."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from taskscheduler.cli.main import cli
from tests.integration.daemons import Fleet, running_fleet, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(private_folder: Callable[[], Path]) -> Iterator[Fleet]:
    with running_fleet(private_folder()) as started:
        yield started


def run(fleet: Fleet, *args: str) -> Result:
    env = {"TASKSCHEDULER_URL": fleet.server_url, "TASKSCHEDULER_TOKEN": fleet.operator_token}
    return CliRunner().invoke(cli, list(args), env=env)


def ok(fleet: Fleet, *args: str) -> str:
    result = run(fleet, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def fields(text: str) -> dict[str, str]:
    """A details view (``key  value`` lines) as a dict."""
    pairs = (line.partition("  ") for line in text.splitlines())
    return {key: value.strip() for key, _, value in pairs}


def unique_prefix(task_id: str, others: list[str]) -> str:
    size = next(n for n in range(1, 37) if not any(o.startswith(task_id[:n]) for o in others))
    return task_id[: max(size, 4)]


def every_id(fleet: Fleet) -> list[str]:
    listed = json.loads(ok(fleet, "--json", "tasks", "ls"))
    return [t["task_id"] for t in listed["tasks"]]


def test_ls_show_edit_pause_resume_by_prefix(fleet: Fleet) -> None:
    marker = uuid.uuid4().hex
    first = ok(fleet, "tasks", "create", "--every", "1 hour", "--", f"echo {marker} one").strip()
    second = ok(fleet, "tasks", "create", "--every", "2 hours", "--", f"echo {marker} two")
    second = second.strip()

    table = ok(fleet, "tasks", "ls", "--command", marker).splitlines()
    assert table[0].split()[:4] == ["ID", "STATE", "FREQUENCY", "NEXT"]
    # Newest first; next instant an hour (two) ahead.
    assert [row[:8] for row in table[1:]] == [second[:8], first[:8]]
    assert table[2].split()[1:4] == ["active", "1", "hour"]
    assert re.search(r"\(in 5\dm\)", table[2]) and table[2].endswith(f"echo {marker} one")

    ids = every_id(fleet)
    prefix = unique_prefix(first, [i for i in ids if i != first])
    shown = fields(ok(fleet, "tasks", "show", prefix))
    assert shown["task"] == first and shown["state"] == "active"
    assert shown["revision"] == "1"

    edited = fields(
        ok(fleet, "tasks", "edit", prefix, "--every", "3 hours", "--", "echo", marker, "edited")
    )
    assert edited["command"] == f"echo {marker} edited"
    assert edited["frequency"] == "every 3 hours"
    assert edited["revision"] == "2"
    task = fleet.api("GET", f"/api/v1/tasks/{first}")[1]
    assert task["revision"] == 2 and task["command"] == f"echo {marker} edited"

    assert fields(ok(fleet, "tasks", "pause", prefix))["state"] == "paused"
    paused = ok(fleet, "tasks", "ls", "--state", "paused", "--command", marker).splitlines()
    assert [row[:8] for row in paused[1:]] == [first[:8]]
    assert paused[1].split()[1:3] == ["paused", "3"] and " - " in paused[1]
    resumed = fields(ok(fleet, "tasks", "resume", prefix))
    assert resumed["state"] == "active" and "next" in resumed
    actions = [e["action"] for e in fleet.api("GET", "/api/v1/audit?limit=3")[1]["events"]]
    assert actions == ["task.resumed", "task.paused", "task.updated"]

    ok(fleet, "tasks", "rm", unique_prefix(second, [i for i in ids if i != second]))
    deleted = ok(fleet, "tasks", "ls", "--state", "deleted", "--command", marker).splitlines()
    assert [row[:8] for row in deleted[1:]] == [second[:8]]
    # Paused, edited, deleted: nothing more to change.
    result = run(fleet, "tasks", "pause", second)
    assert result.exit_code == 1 and "(404 task_deleted)" in result.stderr
    result = run(fleet, "tasks", "edit", first, "--every", "never")
    assert result.exit_code == 1 and "(400 " in result.stderr


def test_run_now_is_a_manual_execution(fleet: Fleet) -> None:
    marker = uuid.uuid4().hex
    task_id = ok(fleet, "tasks", "create", "--every", "1 hour", "--", f"echo {marker}").strip()
    lines = ok(fleet, "tasks", "run", task_id[:13]).splitlines()
    assert lines[0].startswith(f"running {task_id} now, as its manual execution at ")
    at = lines[0].rsplit(" ", 1)[1]
    assert lines[1] == f"its output: taskscheduler tasks output {task_id} --at {at}"

    def both_ran() -> dict[str, Any] | None:
        body = json.loads(ok(fleet, "--json", "tasks", "output", task_id, "--at", at))
        return body if len(body["outputs"]) == 2 else None

    body = wait_for(both_ran, 60, "both agents' manual run")
    assert body["trigger"] == "manual" and body["scheduled_at"] == at
    execution = ok(fleet, "tasks", "output", task_id[:13], "--at", at)
    assert execution.startswith(f"execution {at} (")
    assert ", manual, revision 1, 2 of 2 agents reported" in execution.splitlines()[0]
    assert execution.count(f"--- stdout\n{marker}\n") == 2

    # --wait: run, then print the execution once it is complete.
    waited = run(fleet, "tasks", "run", task_id[:13], "--wait")
    assert waited.exit_code == 0, waited.output
    assert waited.stderr.startswith(f"running {task_id} now, as its manual execution at ")
    header = waited.stdout.splitlines()[0]
    assert ", manual, revision 1, 2 of 2 agents reported, complete" in header
    assert waited.stdout.count(f"--- stdout\n{marker}\n") == 2
    listed = ok(fleet, "tasks", "ls", "--command", marker).splitlines()
    assert "manual" in listed[1]


def test_an_ambiguous_prefix_lists_the_candidates(fleet: Fleet) -> None:
    # Seventeen tasks: two of them share their first hex digit.
    for _ in range(17):
        code, body = fleet.api(
            "POST", "/api/v1/tasks/create", {"command": "true", "frequency": "every 1 hour"}
        )
        assert code == 201, body
    ids = every_id(fleet)
    digit = next(d for d in "0123456789abcdef" if sum(i.startswith(d) for i in ids) > 1)
    sharing = sorted(i for i in ids if i.startswith(digit))

    result = run(fleet, "tasks", "show", digit)
    assert result.exit_code == 6
    lines = result.stderr.splitlines()
    assert lines[0] == (
        f"{len(sharing)} tasks have an id starting with '{digit}'; give more of it:"
    )
    assert sorted(line.split()[0] for line in lines[1:]) == sharing
    nobody = next(
        p
        for p in (uuid.uuid4().hex[:8] for _ in range(100))
        if not any(i.startswith(p) for i in ids)
    )
    result = run(fleet, "tasks", "show", nobody)
    assert result.exit_code == 5
    assert result.stderr == f"no task has an id starting with '{nobody}'\n"
