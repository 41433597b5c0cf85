"""The taskscheduler command against a stub of the REST API (httpx.MockTransport): what
it sends, what it prints, and its exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.daemons import free_port
from tests.unit.cli_stub import (
    AGENT_1,
    AGENT_2,
    URL,
    A,
    B,
    C,
    StubApi,
    answer,
    error,
    run,
    task,
)


def fields(text: str) -> dict[str, str]:
    """A details view as a dict: key, two spaces or more, value."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.splitlines())  # type: ignore[misc]


@pytest.fixture
def api() -> StubApi:
    return StubApi()


# -- create and the global options -------------------------------------------------------


def test_create_reads_like_the_seed_and_prints_the_id(api: StubApi) -> None:
    bodies: list[Any] = []

    def created(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return answer({"command_id": A}, 201)

    api.route("POST", "/api/v1/tasks/create", created)
    result = run(api, "tasks", "create", "--every", "30 seconds", "--", "echo", "hello")
    assert result.exit_code == 0, result.output
    assert result.stdout == A + "\n"
    assert bodies[-1] == {"command": "echo hello", "frequency": "every 30 seconds"}

    # One quoted argument, a time limit, "every" already said, options of the command kept.
    args = ["--every", "every 2 minutes", "--time-limit", "5", "--", "ls -l | wc -l"]
    assert run(api, "tasks", "create", *args).exit_code == 0
    assert bodies[-1] == {
        "command": "ls -l | wc -l",
        "frequency": "every 2 minutes",
        "time_limit_seconds": 5,
    }
    assert run(api, "tasks", "create", "--every", "1 hour", "grep", "-v", "x").exit_code == 0
    assert bodies[-1]["command"] == "grep -v x"

    # --json prints the server's JSON.
    result = run(api, "--json", "tasks", "create", "--every", "1 hour", "--", "true")
    assert json.loads(result.stdout) == {"command_id": A}


def test_create_without_a_command_or_frequency_is_a_usage_error(api: StubApi) -> None:
    assert run(api, "tasks", "create", "--every", "1 hour").exit_code == 2
    assert run(api, "tasks", "create", "--", "echo").exit_code == 2
    assert api.requests == []


def test_url_and_token_from_the_environment_or_options(api: StubApi) -> None:
    api.route("GET", f"/api/v1/tasks/{A}", task(A))
    env = {"TASKSCHEDULER_TOKEN": "tso_secret"}
    assert run(api, "tasks", "show", A, env=env).exit_code == 0
    request = api.requests[-1]
    assert request.headers["Authorization"] == "Bearer tso_secret"
    assert str(request.url) == f"{URL}/api/v1/tasks/{A}"

    other = "https://elsewhere.test:9443"
    assert run(api, "--url", other, "--token", "tso_other", "tasks", "show", A).exit_code == 0
    request = api.requests[-1]
    assert request.headers["Authorization"] == "Bearer tso_other"
    assert str(request.url) == f"{other}/api/v1/tasks/{A}"

    # A token read from a terminal may end with a carriage return.
    assert run(api, "tasks", "show", A, env={"TASKSCHEDULER_TOKEN": "tso_cr\r\n"}).exit_code == 0
    assert api.requests[-1].headers["Authorization"] == "Bearer tso_cr"
    result = run(api, "tasks", "show", A, env={"TASKSCHEDULER_TOKEN": "tsó_x"})
    assert result.exit_code == 2 and "a token is printable ASCII" in result.stderr

    # No token at all: no Authorization header (a loopback server without tokens).
    assert run(api, "tasks", "show", A).exit_code == 0
    assert "Authorization" not in api.requests[-1].headers


def test_a_url_that_is_not_http_is_a_usage_error(api: StubApi) -> None:
    result = run(api, "--url", "localhost:8080", "tasks", "show", A)
    assert result.exit_code == 2 and "not an http:// or https:// URL" in result.stderr
    assert api.requests == []


# -- exit codes --------------------------------------------------------------------------


def test_unreachable_server_is_exit_3_in_one_line(api: StubApi) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    api.route("GET", f"/api/v1/tasks/{A}", refuse)
    result = run(api, "tasks", "show", A)
    assert result.exit_code == 3
    assert result.stderr.splitlines() == [
        f"cannot reach the server at {URL}: [Errno 111] Connection refused"
    ]

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    api.route("GET", f"/api/v1/tasks/{A}", slow)
    result = run(api, "--timeout", "2.5", "tasks", "show", A)
    assert result.exit_code == 3
    assert result.stderr == f"cannot reach the server at {URL}: no answer within 2.5 seconds\n"


def test_the_real_command_against_a_closed_port() -> None:
    """The installed console script, as a user runs it."""
    command = Path(sys.executable).with_name("taskscheduler")
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [str(command), "--url", url, "tasks", "ls"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr == f"cannot reach the server at {url}: connection refused\n"


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_credential_is_exit_4(api: StubApi, status: int) -> None:
    api.route("GET", f"/api/v1/tasks/{A}", lambda r: answer(error("unauthorized", "no"), status))
    result = run(api, "tasks", "show", A)
    assert result.exit_code == 4
    assert result.stderr == (
        f"the server refused the request: no ({status} unauthorized); "
        "no token given (--token or TASKSCHEDULER_TOKEN)\n"
    )
    result = run(api, "--token", "tso_x", "tasks", "show", A)
    assert result.exit_code == 4 and "no token given" not in result.stderr


def test_an_unknown_id_is_exit_5_and_other_refusals_exit_1(api: StubApi) -> None:
    api.route(
        "GET",
        f"/api/v1/tasks/{A}",
        lambda r: answer(error("unknown_task", "no task has this id"), 404),
    )
    result = run(api, "tasks", "show", A)
    assert result.exit_code == 5
    assert result.stderr == "no task has this id (404 unknown_task)\n"

    api.route(
        "DELETE",
        f"/api/v1/tasks/{A}",
        lambda r: answer(error("task_deleted", "this task is already deleted"), 404),
    )
    result = run(api, "tasks", "rm", A)
    assert result.exit_code == 1
    assert result.stderr == "this task is already deleted (404 task_deleted)\n"

    api.route(
        "POST",
        "/api/v1/tasks/create",
        lambda r: answer(error("rate_limited", "slow down"), 429, {"Retry-After": "3"}),
    )
    result = run(api, "tasks", "create", "--every", "1 second", "--", "true")
    assert result.exit_code == 1
    assert result.stderr == "slow down (429 rate_limited); retry after 3 seconds\n"


def test_a_route_the_server_lacks_and_a_foreign_answer_are_exit_1(api: StubApi) -> None:
    result = run(api, "tasks", "pause", A)
    assert result.exit_code == 1
    assert f"does not serve POST /api/v1/tasks/{A}/pause (404 not_found)" in result.stderr

    api.route("GET", f"/api/v1/tasks/{A}", lambda r: httpx.Response(502, text="<html>Bad gateway"))
    result = run(api, "tasks", "show", A)
    assert result.exit_code == 1
    assert result.stderr == (
        f"unexpected answer from {URL} to GET /api/v1/tasks/{A}: "
        "502 Bad Gateway, not taskscheduler's JSON\n"
    )


# -- id prefixes -------------------------------------------------------------------------


def test_a_unique_prefix_names_the_task_following_the_list_pages(api: StubApi) -> None:
    api.tasks = [task(C), task(B), task(A)]  # A is on the second page
    api.route("DELETE", f"/api/v1/tasks/{A}", {"task_id": A, "status": "deleted"})
    result = run(api, "tasks", "rm", "3F1E")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"deleted {A}\n"
    assert api.paths() == [
        "GET /api/v1/tasks?limit=500",
        "GET /api/v1/tasks?limit=500&cursor=2",
        f"DELETE /api/v1/tasks/{A}",
    ]


def test_an_ambiguous_prefix_is_exit_6_listing_the_candidates(api: StubApi) -> None:
    api.tasks = [task(A, "echo one"), task(B, "echo two"), task(C)]
    result = run(api, "tasks", "show", "3f")
    assert result.exit_code == 6
    assert result.stderr.splitlines() == [
        "2 tasks have an id starting with '3f'; give more of it:",
        f"  {A}  active  echo one",
        f"  {B}  active  echo two",
    ]
    assert not any("DELETE" in p or p.endswith(A) for p in api.paths())


def test_an_unknown_prefix_is_exit_5(api: StubApi) -> None:
    api.tasks = [task(A), task(B)]
    result = run(api, "tasks", "show", "9")
    assert result.exit_code == 5
    assert result.stderr == "no task has an id starting with '9'\n"
    # Not a prefix of any UUID: nothing to list.
    api.requests.clear()
    result = run(api, "tasks", "show", "hello")
    assert result.exit_code == 5 and api.requests == []
    # An empty id is a mistake of usage, not an unknown task.
    result = run(api, "tasks", "show", "")
    assert result.exit_code == 2 and "give the task's id, or a prefix of it" in result.stderr
    assert api.requests == []


def test_a_whole_id_is_not_looked_up_in_the_list(api: StubApi) -> None:
    api.route("GET", f"/api/v1/tasks/{A.upper()}", task(A))
    assert run(api, "tasks", "show", A.upper()).exit_code == 0
    assert api.paths() == [f"GET /api/v1/tasks/{A.upper()}"]


def test_agent_prefixes_resolve_through_the_agents_list(api: StubApi) -> None:
    api.agents = [
        {"agent_id": AGENT_1, "url": "http://127.0.0.1:8081", "state": "online"},
        {"agent_id": AGENT_2, "url": "http://127.0.0.1:8082", "state": "offline"},
    ]
    revoked = {"agent_id": AGENT_2, "url": "http://127.0.0.1:8082", "revoked_at": "x"}
    api.route("DELETE", f"/api/v1/agents/{AGENT_2}", revoked)
    result = run(api, "agents", "revoke", "bb")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"revoked {AGENT_2} at http://127.0.0.1:8082\n"
    assert run(api, "agents", "show", "cc").exit_code == 5
    api.agents.append({"agent_id": "bb290000-0000-4000-8000-000000000009", "url": "u"})
    result = run(api, "agents", "revoke", "bb2")
    assert result.exit_code == 6 and AGENT_2 in result.stderr


# -- tables and details ------------------------------------------------------------------


def test_tasks_ls_is_an_aligned_table_with_instants_relative_and_absolute(api: StubApi) -> None:
    last = {
        "scheduled_at": "2026-11-30T15:59:30.000000Z",
        "trigger": "schedule",
        "expected_agents": 2,
        "reported": 2,
        "succeeded": 1,
        "failed": 1,
        "complete": True,
    }
    api.tasks = [
        task(
            A, "echo one\necho two", next_instant="2026-11-30T16:00:12.000000Z", last_execution=last
        ),
        task(B, "sleep 1", state="paused", frequency="every 2 hours", next_instant=None),
    ]
    result = run(api, "tasks", "ls")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "ID", "STATE", "FREQUENCY", "NEXT", "LAST", "EXECUTION", "LAST", "RESULTS", "COMMAND"
    ]  # fmt: skip
    assert lines[1].split("  ")[0] == A[:8]
    # Every column starts at the same offset on every line.
    for header in ("STATE", "NEXT", "COMMAND"):
        column = lines[0].index(header)
        assert lines[1][column - 2 : column] == "  " and lines[1][column] != " "
        assert lines[2][column - 2 : column] == "  " and lines[2][column] != " "
    assert "16:00:12Z (in 12s)" in lines[1]
    assert "15:59:30Z (30s ago)" in lines[1]
    assert "1 succeeded, 1 failed" in lines[1]
    # A newline in a command cannot break the row.
    assert lines[1].endswith("echo one\\necho two")
    assert "paused" in lines[2] and "2 hours" in lines[2]
    assert len(lines) == 3

    result = run(api, "--json", "tasks", "ls", "--state", "paused", "--command", "sl")
    assert json.loads(result.stdout) == {"tasks": api.tasks, "next_cursor": None}
    assert api.paths()[-1] == "GET /api/v1/tasks?limit=500&state=paused&command=sl"
    # --json after the verb too.
    result = run(api, "tasks", "ls", "--json", "--state", "paused", "--command", "sl")
    assert json.loads(result.stdout) == {"tasks": api.tasks, "next_cursor": None}


def test_tasks_ls_limit_stops_paging(api: StubApi) -> None:
    api.tasks = [task(A), task(B), task(C)]
    result = run(api, "--json", "tasks", "ls", "--limit", "2")
    assert [t["task_id"] for t in json.loads(result.stdout)["tasks"]] == [A, B]
    assert api.paths() == ["GET /api/v1/tasks?limit=2"]


def test_show_prints_the_task_details(api: StubApi) -> None:
    api.route(
        "GET",
        f"/api/v1/tasks/{A}",
        task(A, revision=2, paused_at=None, next_instant="2026-11-30T16:00:30.000000Z"),
    )
    result = run(api, "tasks", "show", A)
    assert result.exit_code == 0
    shown = fields(result.stdout)
    assert shown["task"] == A
    assert shown["next"] == "2026-11-30T16:00:30.000000Z (in 30s)"
    assert shown["created"] == "2026-11-30T15:00:00.000000Z (1h ago)"
    assert shown["revision"] == "2"
    assert shown["time limit"] == "30 seconds"
    assert "paused" not in shown  # null fields are left out
    # Values start in one column.
    assert (
        len(
            {
                line.index(value)
                for line, value in zip(result.stdout.splitlines(), shown.values(), strict=True)
            }
        )
        == 1
    )


def test_edit_sends_only_what_changes(api: StubApi) -> None:
    bodies: list[Any] = []

    def patched(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return answer(task(A, revision=2))

    api.route("PATCH", f"/api/v1/tasks/{A}", patched)
    assert run(api, "tasks", "edit", A, "--every", "1 minute").exit_code == 0
    assert run(api, "tasks", "edit", A, "--time-limit", "9", "--", "echo", "bye").exit_code == 0
    assert bodies == [
        {"frequency": "every 1 minute"},
        {"command": "echo bye", "time_limit_seconds": 9},
    ]
    result = run(api, "tasks", "edit", A)
    assert result.exit_code == 2 and "nothing to change" in result.stderr
    assert len(api.requests) == 2


def test_pause_resume_run(api: StubApi) -> None:
    api.route("POST", f"/api/v1/tasks/{A}/pause", task(A, state="paused"))
    api.route("POST", f"/api/v1/tasks/{A}/resume", task(A, state="active"))
    at = "2026-11-30T16:00:00.123456Z"
    api.route(
        "POST",
        f"/api/v1/tasks/{A}/run",
        lambda r: answer({"task_id": A, "scheduled_at": at, "trigger": "manual"}, 202),
    )
    assert fields(run(api, "tasks", "pause", A).stdout)["state"] == "paused"
    assert fields(run(api, "tasks", "resume", A).stdout)["state"] == "active"
    result = run(api, "tasks", "run", A)
    assert result.exit_code == 0
    assert f"taskscheduler tasks output {A} --at {at}" in result.stdout


def test_run_wait_polls_until_the_execution_is_complete(api: StubApi) -> None:
    at = "2026-11-30T16:00:00.123456Z"
    api.route(
        "POST",
        f"/api/v1/tasks/{A}/run",
        lambda r: answer({"task_id": A, "scheduled_at": at, "trigger": "manual"}, 202),
    )
    answers = iter([False, False, True])

    def execution(request: httpx.Request) -> httpx.Response:
        return answer({**EXECUTION, "scheduled_at": at, "complete": next(answers)})

    path = f"/api/v1/tasks/{A}/executions/2026-11-30T16%3A00%3A00.123456Z"
    api.route("GET", path, execution)
    result = run(api, "tasks", "run", A, "--wait")
    assert result.exit_code == 0, result.output
    assert api.sleeps == [0.5, 0.5]
    assert [p for p in api.paths() if p.startswith("GET /api/v1/tasks")] == [f"GET {path}"] * 3
    assert result.stderr == f"running {A} now, as its manual execution at {at}\n"
    assert result.stdout.startswith(f"execution {at} (now), 2 of 3 agents reported, complete\n")
    assert "--- stdout\nhello\n" in result.stdout

    answers = iter([True])
    result = run(api, "--json", "tasks", "run", A, "--wait")
    assert json.loads(result.stdout)["complete"] is True and result.stderr == ""


# -- output ------------------------------------------------------------------------------

EXECUTION = {
    "completion_time": "2026-11-30T15:59:31.000000Z",
    "scheduled_at": "2026-11-30T15:59:30.000000Z",
    "expected_agents": 3,
    "missing_agents": [{"url": "http://127.0.0.1:8083", "agent_id": None}],
    "outputs": [
        {
            "agent_id": AGENT_1,
            "status": "succeeded",
            "exit_code": 0,
            "stdout": "hello\n",
            "started_at": "2026-11-30T15:59:30.000000Z",
            "finished_at": "2026-11-30T15:59:30.250000Z",
        },
        {
            "agent_id": AGENT_2,
            "status": "failed",
            "exit_code": 2,
            "stdout": "a\ufffdb",
            "stdout_base64": "YYBi",
            "stderr": "oops\n",
            "stderr_truncated": True,
            "stderr_bytes": 2000000,
            "started_at": None,
            "finished_at": None,
        },
    ],
}


def test_output_shows_each_agents_stdout_and_stderr(api: StubApi) -> None:
    api.agents = [{"agent_id": AGENT_1, "url": "http://127.0.0.1:8081"}]
    api.route("GET", f"/api/v1/tasks/{A}/latest_output", EXECUTION)
    result = run(api, "tasks", "output", A)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        "execution 2026-11-30T15:59:30.000000Z (30s ago), 2 of 3 agents reported\n"
        "missing: http://127.0.0.1:8083 (agent -)\n"
        "==> agent aa110000 http://127.0.0.1:8081: succeeded, exit 0, 0.250s <==\n"
        "--- stdout\n"
        "hello\n"
        "==> agent bb220000: failed, exit 2 <==\n"
        "--- stdout (not UTF-8: --json has the exact bytes)\n"
        "a\ufffdb\n"
        "--- stderr (truncated, 2000000 bytes in all)\n"
        "oops\n"
    )
    assert json.loads(run(api, "--json", "tasks", "output", A).stdout) == EXECUTION


def test_output_shows_the_attempt_when_a_run_was_retried(api: StubApi) -> None:
    retried = {
        **EXECUTION["outputs"][0],  # type: ignore[index]
        "attempt": 3,
        "final": True,
        "attempts": [
            {"attempt": 1, "status": "failed", "exit_code": 1},
            {"attempt": 2, "status": "timed_out", "exit_code": None},
            {"attempt": 3, "status": "succeeded", "exit_code": 0},
        ],
    }
    pending = {**EXECUTION["outputs"][1], "attempt": 1, "final": False}  # type: ignore[index]
    api.route(
        "GET",
        f"/api/v1/tasks/{A}/latest_output",
        {**EXECUTION, "outputs": [retried, pending]},
    )
    result = run(api, "tasks", "output", A)
    assert result.exit_code == 0, result.output
    assert (
        "==> agent aa110000: succeeded, exit 0, 0.250s, attempt 3 <==\n"
        "earlier attempts: 1 failed (exit 1); 2 timed_out\n"
    ) in result.stdout
    assert "==> agent bb220000: failed, exit 2, to be retried <==\n" in result.stdout


def test_output_before_any_execution(api: StubApi) -> None:
    api.route(
        "GET",
        f"/api/v1/tasks/{A}/latest_output",
        {"completion_time": None, "scheduled_at": None, "outputs": []},
    )
    result = run(api, "tasks", "output", A)
    assert result.exit_code == 0 and result.stdout == "no complete execution yet\n"


def test_output_history_and_one_execution(api: StubApi) -> None:
    older = {**EXECUTION, "scheduled_at": "2026-11-30T15:59:00.000000Z", "complete": True}
    api.route(
        "GET",
        f"/api/v1/tasks/{A}/executions",
        {"task_id": A, "executions": [EXECUTION, older], "next_before": None},
    )
    result = run(api, "tasks", "output", A, "--history", "--limit", "2")
    assert result.exit_code == 0, result.output
    assert api.paths()[0] == f"GET /api/v1/tasks/{A}/executions?limit=2"
    assert result.stdout.count("==> agent aa110000") == 2
    assert "execution 2026-11-30T15:59:00.000000Z (1m ago), 2 of 3 agents reported, complete" in (
        result.stdout
    )

    at = "2026-11-30T15:59:30.000000+00:00"
    one = {**EXECUTION, "trigger": "manual", "revision": 3}
    api.route("GET", f"/api/v1/tasks/{A}/executions/2026-11-30T15%3A59%3A30.000000%2B00%3A00", one)
    result = run(api, "tasks", "output", A, "--at", at)
    assert result.exit_code == 0, result.output
    assert "(30s ago), manual, revision 3, 2 of 3 agents reported" in result.stdout
    assert run(api, "tasks", "output", A, "--at", at, "--history").exit_code == 2


# -- agents, fleet, audit ----------------------------------------------------------------


def test_agents_ls_from_an_older_server_without_states(api: StubApi) -> None:
    api.agents = [
        {"agent_id": AGENT_1, "url": "http://a:1", "enrolled_at": "x", "revoked_at": None},
        {"agent_id": AGENT_2, "url": "http://b:2", "enrolled_at": "x", "revoked_at": "y"},
    ]
    lines = run(api, "agents", "ls").stdout.splitlines()
    assert lines[1].split()[:3] == ["aa110000", "enrolled", "http://a:1"]
    assert lines[2].split()[:3] == ["bb220000", "revoked", "http://b:2"]


def test_fleet_rm_sends_the_url_as_one_path_segment(api: StubApi) -> None:
    member = {"url": "http://127.0.0.1:8081", "agent_id": AGENT_1, "state": "online"}
    api.route("DELETE", "/api/v1/fleet/http%3A%2F%2F127.0.0.1%3A8081", member)
    result = run(api, "fleet", "rm", "http://127.0.0.1:8081")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"removed http://127.0.0.1:8081 (agent {AGENT_1}, online)\n"

    bodies: list[Any] = []

    def added(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return answer({**member, "agent_id": None, "state": "not_enrolled"}, 201)

    api.route("POST", "/api/v1/fleet", added)
    result = run(api, "fleet", "add", "http://127.0.0.1:8081")
    assert bodies == [{"url": "http://127.0.0.1:8081"}]
    assert (
        result.stdout == "added http://127.0.0.1:8081 (no agent enrolled there yet, not_enrolled)\n"
    )
    api.route("POST", "/api/v1/fleet", lambda r: answer(member, 200))
    result = run(api, "fleet", "add", "http://127.0.0.1:8081")
    assert result.stdout.startswith("already in the fleet: http://127.0.0.1:8081 (agent ")


def test_audit_table_and_the_next_page_hint(api: StubApi) -> None:
    events = [
        {
            "id": 7,
            "at": "2026-11-30T15:58:00.000000Z",
            "actor": "alice",
            "action": "task.created",
            "target": A,
            "peer": "127.0.0.1",
            "details": {"frequency": "every 30 seconds"},
        }
    ]
    api.route("GET", "/api/v1/audit", {"events": events, "next_before": 7})
    result = run(api, "audit", "--limit", "1")
    assert result.exit_code == 0
    assert api.paths() == ["GET /api/v1/audit?limit=1"]
    row = result.stdout.splitlines()[1]
    assert row.split()[:4] == ["7", "15:58:00Z", "(2m", "ago)"]
    assert "alice  task.created  " + A in row and '{"frequency":"every 30 seconds"}' in row
    assert result.stderr == "older events: --before 7\n"


# -- tokens ------------------------------------------------------------------------------


def test_tokens_new_and_hash(api: StubApi) -> None:
    from taskscheduler.auth import JOIN_PREFIX, hash_token

    result = run(api, "tokens", "new", "fleet", "--kind", "join")
    assert result.exit_code == 0
    token = result.stdout.strip()
    assert result.stdout == token + "\n" and token.startswith(JOIN_PREFIX)
    assert result.stderr.splitlines()[-1] == f"fleet {hash_token(token)}"
    result = run(api, "tokens", "hash", "--name", "fleet", stdin=token + "\n")
    assert result.stdout == f"fleet {hash_token(token)}\n"
    assert run(api, "tokens", "new", "bad name!").exit_code == 2
    assert api.requests == []
