"""Issue 10's task verbs through StubTreq over the server's real Klein resource: list with a
cursor, PATCH, pause/resume, run-now, one execution, unknown fields, and the verdicts an
agent gets for a superseded or paused result."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import timedelta
from typing import Any

import pytest_twisted

from taskscheduler.protocol import Trigger, result_to_json
from taskscheduler.schedule import format_instant, parse_instant, utc_now_from
from tests.unit.test_server_api import AGENT_A, AGENT_B, START, Harness, started


async def harness_with_changes() -> tuple[Harness, list[Any]]:
    changed: list[Any] = []
    h = await started(Harness(on_task_changed=changed.append))
    return h, changed


async def audit_actions(h: Harness) -> list[str]:
    code, body = await h.request("GET", "/api/v1/audit")
    assert code == 200, body
    return [e["action"] for e in body["events"]]


@pytest_twisted.ensureDeferred
async def test_unknown_fields_are_refused_by_name_on_create_and_patch() -> None:
    h, _ = await harness_with_changes()
    code, body = await h.request(
        "POST",
        "/api/v1/tasks/create",
        {"command": "true", "frequency": "every 1 minutes", "timeout": 5},
    )
    assert code == 400 and body["error"]["code"] == "unknown_field"
    assert body["error"]["message"] == (
        'unknown field "timeout" (known: command, frequency, cron, timezone, '
        "time_limit_seconds, target, run_on, overlap, max_concurrent, retries, "
        "retry_delay_seconds, env, working_dir, notify)"
    )
    task_id = await h.create()
    code, body = await h.request("PATCH", f"/api/v1/tasks/{task_id}", {"comand": "x"})
    assert code == 400 and body["error"]["code"] == "unknown_field"
    assert '"comand"' in body["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_task_shows_its_state_revision_next_instant_and_last_execution() -> None:
    h, _ = await harness_with_changes()
    task_id = await h.create()
    h.clock.advance(31)
    code, body = await h.request("GET", f"/api/v1/tasks/{task_id}")
    assert code == 200
    assert (body["state"], body["paused_at"], body["revision"]) == ("active", None, 1)
    assert body["next_instant"] == format_instant(utc_now_from(START + 60))
    assert body["last_execution"] is None
    assert (await h.report(h.result(task_id, AGENT_A, 1)))[0] == 200
    code, body = await h.request("GET", f"/api/v1/tasks/{task_id}")
    assert body["last_execution"] == {
        "scheduled_at": format_instant(utc_now_from(START + 30)),
        "trigger": "schedule",
        "revision": 1,
        "expected_agents": 2,
        "reported": 1,
        "succeeded": 1,
        "failed": 0,
        "timed_out": 0,
        "skipped": 0,
        "lost": 0,
        "replaced": 0,
        "complete": False,
        "agents": [{"agent_id": str(AGENT_A), "status": "succeeded"}],
    }


@pytest_twisted.ensureDeferred
async def test_the_list_pages_with_a_cursor_and_filters() -> None:
    h, _ = await harness_with_changes()
    ids = []
    for i in range(5):
        ids.append(await h.create(command=f"echo {i}"))
        h.clock.advance(1)
    seen: list[str] = []
    cursor = None
    for _ in range(6):
        query = "?limit=2" + ("" if cursor is None else f"&cursor={cursor}")
        code, body = await h.request("GET", "/api/v1/tasks" + query)
        assert code == 200, body
        seen.extend(t["task_id"] for t in body["tasks"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    code, body = await h.request("GET", "/api/v1/tasks?limit=5")
    assert len(body["tasks"]) == 5 and body["next_cursor"] is None  # no empty last page
    code, body = await h.request("GET", "/api/v1/tasks?command=echo%203")
    assert [t["task_id"] for t in body["tasks"]] == [ids[3]] and body["next_cursor"] is None
    for bad in ("cursor=bm9wZQ", "cursor=%25%25", "state=sleeping", "limit=501", "limit=0"):
        code, body = await h.request("GET", f"/api/v1/tasks?{bad}")
        assert code == 400, bad
    code, body = await h.request("GET", "/api/v1/tasks?cursor=bm9wZQ")
    assert body["error"]["code"] == "invalid_cursor"


@pytest_twisted.ensureDeferred
async def test_patch_makes_a_revision_audits_old_and_new_and_a_no_op_makes_none() -> None:
    h, changed = await harness_with_changes()
    task_id = await h.create()
    path = f"/api/v1/tasks/{task_id}"
    code, body = await h.request("PATCH", path, {})
    assert code == 400 and body["error"]["code"] == "nothing_to_change"
    code, body = await h.request("PATCH", path, {"frequency": "every 0 seconds"})
    assert code == 400 and body["error"]["code"] == "invalid_request"
    h.clock.advance(45)
    code, body = await h.request("PATCH", path, {"command": "echo new", "time_limit_seconds": 5})
    assert code == 200, body
    assert (body["revision"], body["command"], body["time_limit_seconds"]) == (2, "echo new", 5)
    assert body["updated_at"] == format_instant(utc_now_from(START + 45))
    assert len(changed) == 1 and changed[0].spec.revision == 2
    code, body = await h.request("PATCH", path, {"command": "echo new"})
    assert code == 200 and body["revision"] == 2 and len(changed) == 1
    code, audit = await h.request("GET", "/api/v1/audit")
    updates = [e for e in audit["events"] if e["action"] == "task.updated"]
    assert [e["details"] for e in updates] == [
        {
            "old": {"command": "echo hello world", "time_limit_seconds": 30},
            "new": {"command": "echo new", "time_limit_seconds": 5},
            "revision": 2,
        }
    ]
    # An agent still on revision 1 is told its result is superseded.
    old = dataclasses.replace(h.result(task_id, AGENT_A, 2), revision=1)
    h.clock.advance(20)
    code, body = await h.report(old)
    assert code == 409 and body["error"]["code"] == "superseded"
    code, body = await h.report(dataclasses.replace(old, agent_id=AGENT_B, revision=2))
    assert code == 200, body
    await h.request("DELETE", path)
    code, body = await h.request("PATCH", path, {"command": "x"})
    assert code == 404 and body["error"]["code"] == "task_deleted"
    code, body = await h.request("PATCH", f"/api/v1/tasks/{uuid.uuid4()}", {"command": "x"})
    assert code == 404 and body["error"]["code"] == "unknown_task"


@pytest_twisted.ensureDeferred
async def test_pause_and_resume_are_idempotent_audited_and_refuse_paused_instants() -> None:
    h, changed = await harness_with_changes()
    task_id = await h.create()
    h.clock.advance(40)
    code, body = await h.request("POST", f"/api/v1/tasks/{task_id}/pause")
    assert code == 200 and body["state"] == "paused" and body["next_instant"] is None
    assert body["paused_at"] == format_instant(utc_now_from(START + 40))
    code, again = await h.request("POST", f"/api/v1/tasks/{task_id}/pause")
    assert code == 200 and again == body
    assert len(changed) == 1
    assert await h.store.pending_removals("http://agent-a:8081", 10) == [uuid.UUID(task_id)]
    h.clock.advance(60)  # instants 2 and 3 fall in the pause
    batch = [h.result(task_id, AGENT_A, k) for k in (1, 2, 3)]
    code, answer = await h.request(
        "POST",
        "/api/v1/results",
        {"results": [result_to_json(r) for r in batch]},
        headers=h.headers_for("/api/v1/results"),
    )
    assert code == 200
    assert [r["status"] for r in answer["results"]] == ["stored", "task_paused", "task_paused"]
    code, body = await h.report(h.result(task_id, AGENT_B, 2))
    assert code == 409 and body["error"]["code"] == "task_paused"
    code, body = await h.request("POST", f"/api/v1/tasks/{task_id}/resume")
    assert code == 200 and body["state"] == "active"
    assert body["next_instant"] == format_instant(utc_now_from(START + 120))  # the same grid
    code, _ = await h.request("POST", f"/api/v1/tasks/{task_id}/resume")
    assert code == 200 and len(changed) == 2
    assert (await audit_actions(h))[:2] == ["task.resumed", "task.paused"]
    h.clock.advance(25)
    assert (await h.report(h.result(task_id, AGENT_A, 4)))[0] == 200


@pytest_twisted.ensureDeferred
async def test_run_now_records_a_manual_execution_shown_alone_and_in_history() -> None:
    h, changed = await harness_with_changes()
    task_id = await h.create()
    await h.request("POST", f"/api/v1/tasks/{task_id}/pause")  # operators try a paused job
    h.clock.advance(12.5)
    code, body = await h.request("POST", f"/api/v1/tasks/{task_id}/run")
    assert code == 202, body
    at = utc_now_from(START + 12.5)
    assert body == {"task_id": task_id, "scheduled_at": format_instant(at), "trigger": "manual"}
    assert len(changed) == 2 and "task.run" in await audit_actions(h)
    manual = dataclasses.replace(
        h.result(task_id, AGENT_A, 1),
        scheduled_at=at,
        trigger=Trigger.MANUAL,
        started_at=at,
        finished_at=at + timedelta(milliseconds=5),
    )
    h.clock.advance(1)
    assert (await h.report(manual))[0] == 200
    assert (await h.report(dataclasses.replace(manual, agent_id=AGENT_B)))[0] == 200
    code, one = await h.request("GET", f"/api/v1/tasks/{task_id}/executions/{format_instant(at)}")
    assert code == 200, one
    assert (one["trigger"], one["revision"], one["complete"]) == ("manual", 1, True)
    assert [o["trigger"] for o in one["outputs"]] == ["manual", "manual"]
    code, history = await h.request("GET", f"/api/v1/tasks/{task_id}/executions")
    assert [e["trigger"] for e in history["executions"]] == ["manual"]
    code, latest = await h.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert latest["trigger"] == "manual" and len(latest["outputs"]) == 2
    # A manual result at an instant no run-now recorded is not the task's.
    stray = dataclasses.replace(manual, scheduled_at=at + timedelta(microseconds=1))
    code, body = await h.report(stray)
    assert code == 400 and body["error"]["code"] == "misaligned"
    elsewhere = format_instant(at + timedelta(seconds=1))
    code, body = await h.request("GET", f"/api/v1/tasks/{task_id}/executions/{elsewhere}")
    assert code == 404 and body["error"]["code"] == "unknown_execution"
    code, body = await h.request("GET", f"/api/v1/tasks/{task_id}/executions/yesterday")
    assert code == 400
    # Two run-nows in one microsecond (the clock stands still): two executions.
    code, first = await h.request("POST", f"/api/v1/tasks/{task_id}/run")
    code, second = await h.request("POST", f"/api/v1/tasks/{task_id}/run")
    assert code == 202 and second["scheduled_at"] != first["scheduled_at"]
    await h.request("DELETE", f"/api/v1/tasks/{task_id}")
    code, body = await h.request("POST", f"/api/v1/tasks/{task_id}/run")
    assert code == 404 and body["error"]["code"] == "task_deleted"


def test_a_cursor_is_opaque_base64_of_the_sort_key() -> None:
    from taskscheduler.server.api.tasks import decode_cursor, encode_cursor
    from taskscheduler.server.store.records import Task
    from tests.unit.test_store_contract import make_spec

    task = Task(make_spec(), utc_now_from(START))
    cursor = encode_cursor(task)
    assert "=" not in cursor.rstrip("=") and json.dumps(cursor)
    assert decode_cursor(cursor) == (task.created_at, task.task_id)
    assert parse_instant(format_instant(task.created_at)) == task.created_at
