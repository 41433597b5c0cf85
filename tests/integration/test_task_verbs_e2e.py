"""Issue 10's task verbs end to end: a real server (embedded PostgreSQL) and two real
agents, changed (PATCH), paused and resumed, and run now through the operators' API."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from taskscheduler.schedule import format_instant, parse_instant
from tests.integration.daemons import Fleet, running_fleet, wait_for

WITNESS = "verbs-witness.txt"


def witness(root: Path, agent: int) -> list[str]:
    """The instants the agent's runs noted (the runs' working folder is its own)."""
    path = root / f"agent-{agent}" / WITNESS
    return path.read_text().split() if path.exists() else []


def history(fleet: Fleet, task_id: str) -> list[dict[str, Any]]:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?limit=1000")
    assert code == 200, body
    return list(body["executions"])


def complete_with(fleet: Fleet, task_id: str, revision: int, stdout: str) -> dict | None:
    """The newest complete execution of ``revision`` with both agents' ``stdout``, if any."""
    for e in history(fleet, task_id):
        outs = e["outputs"]
        same = all(o["stdout"] == stdout and o["revision"] == revision for o in outs)
        if e["revision"] == revision and e["complete"] and len(outs) == 2 and same:
            return e
    return None


def test_patch_pause_resume_and_run_now_on_two_agents(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        code, body = fleet.api(
            "POST", "/api/v1/tasks/create", {"command": "echo one", "frequency": "every 1 second"}
        )
        assert code == 201, body
        task_id = body["command_id"]
        wait_for(lambda: complete_with(fleet, task_id, 1, "one\n"), 30, "revision 1 on both")

        # PATCH: the next executions run the new command, revision 2, on both agents.
        # Each run of revision 2 also notes its instant in a witness file of its agent.
        two = f'echo two; echo "$TASKSCHEDULER_SCHEDULED_AT" >> {WITNESS}'
        code, task = fleet.api("PATCH", f"/api/v1/tasks/{task_id}", {"command": two})
        assert code == 200 and task["revision"] == 2, task
        changed_at = parse_instant(task["updated_at"])
        wait_for(lambda: complete_with(fleet, task_id, 2, "two\n"), 30, "revision 2 on both")
        for e in history(fleet, task_id):
            revisions = {o["revision"] for o in e["outputs"]}
            assert revisions <= {e["revision"]}, f"an execution mixes revisions: {e}"
            expected = 2 if parse_instant(e["scheduled_at"]) > changed_at else 1
            assert e["revision"] == expected, e
            ran = {o["stdout"] for o in e["outputs"] if o["status"] == "succeeded"}
            assert ran <= {"two\n" if expected == 2 else "one\n"}, e

        # Pause: nothing runs, nothing is recorded for the paused instants.
        code, task = fleet.api("POST", f"/api/v1/tasks/{task_id}/pause")
        assert code == 200 and task["state"] == "paused" and task["next_instant"] is None
        paused_at = parse_instant(task["paused_at"])
        time.sleep(3.5)  # three instants and more of the task pass paused
        code, task = fleet.api("POST", f"/api/v1/tasks/{task_id}/resume")
        assert code == 200 and task["state"] == "active", task
        resumed_at = parse_instant(task["updated_at"])
        anchor = parse_instant(task["anchor"])

        def ran_after_resume() -> dict | None:
            newer = [
                e
                for e in history(fleet, task_id)
                if parse_instant(e["scheduled_at"]) > resumed_at and e["complete"]
            ]
            return newer[-1] if newer else None

        first = wait_for(ran_after_resume, 30, "an execution after the resume")
        assert (parse_instant(first["scheduled_at"]) - anchor) % timedelta(seconds=1) == (
            timedelta(0)
        ), "the resumed task left its grid"
        during = [
            e
            for e in history(fleet, task_id)
            if paused_at < parse_instant(e["scheduled_at"]) <= resumed_at
        ]
        assert during == [], f"executions recorded during the pause: {during}"
        skipped = [
            o for e in history(fleet, task_id) for o in e["outputs"] if o["status"] == "skipped"
        ]
        assert skipped == []
        for i in range(2):
            ran = [t for t in witness(tmp_path, i) if paused_at < parse_instant(t) <= resumed_at]
            assert ran == [], f"agent {i} ran {ran} while the task was paused"

        # Run now: one manual execution with both agents' output, in history and latest.
        code, task = fleet.api("PATCH", f"/api/v1/tasks/{task_id}", {"frequency": "every 1 hours"})
        assert code == 200 and task["revision"] == 3, task
        code, run = fleet.api("POST", f"/api/v1/tasks/{task_id}/run")
        assert code == 202 and run["trigger"] == "manual", run
        at = run["scheduled_at"]

        def manual_done(at: str) -> dict | None:
            code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions/{at}")
            ok = code == 200 and body["complete"] and len(body["outputs"]) == 2
            return body if ok else None

        one = wait_for(lambda: manual_done(at), 30, "the manual execution on both agents")
        assert one["trigger"] == "manual"
        assert {o["trigger"] for o in one["outputs"]} == {"manual"}
        assert [e["scheduled_at"] for e in history(fleet, task_id) if e["trigger"] == "manual"] == [
            at
        ]
        code, latest = fleet.api("GET", f"/api/v1/tasks/{task_id}/latest_output")
        assert code == 200 and latest["scheduled_at"] == at and latest["trigger"] == "manual"
        assert len(latest["outputs"]) == 2
        code, listed = fleet.api("GET", "/api/v1/tasks?state=active")
        assert [t["task_id"] for t in listed["tasks"]] == [task_id]
        assert listed["tasks"][0]["last_execution"]["scheduled_at"] == at
        assert format_instant(parse_instant(at)) == at

        # A paused task runs now too (the agents, which dropped it, run the task sent along).
        code, task = fleet.api("POST", f"/api/v1/tasks/{task_id}/pause")
        assert code == 200 and task["state"] == "paused"
        code, run = fleet.api("POST", f"/api/v1/tasks/{task_id}/run")
        assert code == 202, run
        wait_for(lambda: manual_done(run["scheduled_at"]), 30, "a paused task's run-now")
