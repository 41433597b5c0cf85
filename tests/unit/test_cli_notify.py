"""The command's webhook flags (``tasks create/edit --notify-url --notify-on``,
``edit --notify-default``) and ``tasks notifications``, against a stub API."""

from __future__ import annotations

import json

from tests.unit.cli_stub import AGENT_1, A, StubApi, answer, run, task

HOOK = "https://hooks.example.com/x"


def sent(api: StubApi) -> dict[str, object]:
    return dict(json.loads(api.requests[-1].content))


def test_create_sends_the_webhook() -> None:
    api = StubApi()
    api.route("POST", "/api/v1/tasks/create", lambda r: answer({"command_id": A}, 201))
    result = run(
        api,
        "tasks",
        "create",
        "--every",
        "1 minute",
        "--notify-url",
        HOOK,
        "--notify-on",
        "failed, recovered",
        "--",
        "./check",
    )
    assert result.exit_code == 0, result.output
    assert sent(api)["notify"] == {"url": HOOK, "on": ["failed", "recovered"]}


def test_edit_sets_or_drops_the_webhook() -> None:
    api = StubApi()
    api.tasks = [task(A)]
    api.route("PATCH", f"/api/v1/tasks/{A}", lambda r: answer(task(A)))
    assert run(api, "tasks", "edit", A, "--notify-url", HOOK).exit_code == 0
    assert sent(api) == {"notify": {"url": HOOK}}
    assert run(api, "tasks", "edit", A, "--notify-default").exit_code == 0
    assert sent(api) == {"notify": None}
    refused = run(api, "tasks", "edit", A, "--notify-on", "failed")
    assert refused.exit_code == 2 and "--notify-on needs --notify-url" in refused.output


def test_show_prints_the_webhook() -> None:
    api = StubApi()
    api.tasks = [task(A)]
    shown = task(A, notify={"url": HOOK, "on": ["failed", "recovered"]})
    api.route("GET", f"/api/v1/tasks/{A}", lambda r: answer(shown))
    result = run(api, "tasks", "show", A)
    assert result.exit_code == 0, result.output
    assert f"{HOOK} on failed, recovered" in result.output


def test_notifications_lists_each_webhook_and_its_delivery() -> None:
    api = StubApi()
    api.tasks = [task(A)]
    page = {
        "task_id": A,
        "notifications": [
            {
                "notification_id": 2,
                "event": "recovered",
                "agent_id": AGENT_1,
                "scheduled_at": "2026-11-30T15:59:00.000000Z",
                "status": "pending",
                "attempts": 2,
                "response_code": 503,
                "error": "the receiver answered 503",
                "updated_at": "2026-11-30T15:59:30.000000Z",
            },
            {
                "notification_id": 1,
                "event": "failed",
                "agent_id": AGENT_1,
                "scheduled_at": "2026-11-30T15:58:00.000000Z",
                "status": "delivered",
                "attempts": 1,
                "response_code": 200,
                "error": None,
                "updated_at": "2026-11-30T15:58:01.000000Z",
            },
        ],
        "next_before": 1,
    }
    api.route("GET", f"/api/v1/tasks/{A}/notifications", lambda r: answer(page))
    result = run(api, "tasks", "notifications", A[:4], "--limit", "2")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "EVENT", "AGENT"]
    assert "recovered" in lines[1] and "pending" in lines[1] and "503" in lines[1]
    assert "failed" in lines[2] and "delivered" in lines[2] and "200" in lines[2]
    assert "older notifications: --before 1" in result.stderr
    assert api.requests[-1].url.params["limit"] == "2"
