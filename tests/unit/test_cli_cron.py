"""``taskscheduler tasks create|edit|show`` with a cron expression and a time zone."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.unit.cli_stub import A, StubApi, answer, run, task

NEXT = [
    "2026-11-30T16:00:02.000000Z",
    "2026-11-30T16:00:04.000000Z",
    "2026-11-30T16:00:06.000000Z",
]


@pytest.fixture
def api() -> StubApi:
    return StubApi()


def test_create_with_cron_sends_it_and_prints_the_id_then_the_next_instants(
    api: StubApi,
) -> None:
    bodies: list[Any] = []

    def created(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return answer({"command_id": A, "next_instants": NEXT}, 201)

    api.route("POST", "/api/v1/tasks/create", created)
    args = ["--cron", "*/2 * * * * *", "--timezone", "Europe/Paris", "--", "date"]
    result = run(api, "tasks", "create", *args)
    assert result.exit_code == 0, result.output
    assert bodies[-1] == {"command": "date", "cron": "*/2 * * * * *", "timezone": "Europe/Paris"}
    assert result.stdout == A + "\n", "scripts still read the id alone"
    assert result.stderr.splitlines() == [
        "next: 2026-11-30T16:00:02.000000Z (in 2s)",
        "next: 2026-11-30T16:00:04.000000Z (in 4s)",
        "next: 2026-11-30T16:00:06.000000Z (in 6s)",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--every", "1 minute", "--cron", "* * * * *"], "--every or --cron, not both"),
        (["--every", "1 minute", "--timezone", "UTC"], "--timezone goes with --cron"),
        ([], "give --every INTERVAL or --cron EXPRESSION"),
    ],
)
def test_create_wants_exactly_one_schedule(api: StubApi, args: list[str], message: str) -> None:
    result = run(api, "tasks", "create", *args, "--", "true")
    assert result.exit_code == 2 and message in result.stderr
    assert api.paths() == []


def test_show_prints_the_cron_its_zone_and_the_next_instants(api: StubApi) -> None:
    shown = task(
        A,
        frequency=None,
        cron="*/2 * * * * *",
        timezone="Europe/Paris",
        next_instant=NEXT[0],
        next_instants=NEXT,
    )
    api.route("GET", f"/api/v1/tasks/{A}", shown)
    result = run(api, "tasks", "show", A)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.split() == ["cron", "*/2", "*", "*", "*", "*", "*"] for line in lines)
    assert any(line.split() == ["timezone", "Europe/Paris"] for line in lines)
    assert not any(line.startswith("frequency") for line in lines)
    at = lines.index(next(line for line in lines if line.startswith("next ")))
    assert [line.split()[-3] for line in lines[at : at + 3]] == NEXT


def test_edit_switches_to_cron(api: StubApi) -> None:
    bodies: list[Any] = []

    def patched(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return answer(task(A, frequency=None, cron="@hourly", timezone="UTC"))

    api.route("PATCH", f"/api/v1/tasks/{A}", patched)
    result = run(api, "tasks", "edit", A, "--cron", "@hourly")
    assert result.exit_code == 0, result.output
    assert bodies == [{"cron": "@hourly"}]
    result = run(api, "tasks", "edit", A, "--timezone", "Asia/Tokyo")
    assert bodies[-1] == {"timezone": "Asia/Tokyo"}


def test_ls_shows_a_cron_task_by_its_expression_and_zone(api: StubApi) -> None:
    api.tasks = [task(A, frequency=None, cron="*/5 * * * *", timezone="Europe/Paris")]
    result = run(api, "tasks", "ls")
    assert result.exit_code == 0, result.output
    assert "cron */5 * * * * Europe/Paris" in result.stdout.splitlines()[1]
