"""The fleet at run time on real parts: a twistd server (embedded PostgreSQL) and three
real agents, one of them enrolled outside the fleet; members added, removed and revoked
while tasks run, and a restart without AVAILABLE_SERVERS keeping the fleet."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.integration.daemons import Fleet, running_fleet, wait_for

pytestmark = pytest.mark.integration

# Each run appends its instant to a file in the agent's folder: what ran, for certain.
WITNESSED = 'echo "$TASKSCHEDULER_SCHEDULED_AT" >> witness.txt'


def witnessed(root: Path, index: int) -> list[str]:
    path = root / f"agent-{index}" / "witness.txt"
    return path.read_text().split() if path.exists() else []


def log_of(daemon: Any) -> str:
    return str(daemon.log_path.read_text(errors="replace"))


def agents_by_url(fleet: Fleet) -> dict[str, dict[str, Any]]:
    code, body = fleet.api("GET", "/api/v1/agents")
    assert code == 200, body
    return {a["url"]: a for a in body["agents"]}


def history(fleet: Fleet, task_id: str) -> list[dict[str, Any]]:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?limit=50")
    assert code == 200, body
    return list(body["executions"])


def executions_after(fleet: Fleet, task_id: str, after: str, count: int) -> list[dict[str, Any]]:
    """Wait for ``count`` complete executions scheduled after ``after``; them."""

    def done() -> list[dict[str, Any]] | None:
        later = [e for e in history(fleet, task_id) if e["scheduled_at"] > after and e["complete"]]
        return later if len(later) >= count else None

    return wait_for(done, 60, f"{count} executions after {after}")


def test_members_added_removed_and_revoked_at_run_time(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, agents=3)
    outside = fleet.agent_urls[2]
    fleet.server.env["AVAILABLE_SERVERS"] = ",".join(fleet.agent_urls[:2])
    fleet.server.env["TASKSCHEDULER_HEARTBEAT_INTERVAL"] = "1"
    for agent in fleet.agents:
        agent.args += ["--heartbeat-interval", "1"]
    with running_fleet(tmp_path, prepared=fleet):
        ids = [fleet.agent_health(i)["agent_id"] for i in range(3)]

        # An agent enrolled outside the fleet: listed as such, and warned about on both sides.
        wait_for(
            lambda: agents_by_url(fleet)[outside]["last_seen_at"] is not None, 30, "a heartbeat"
        )
        assert agents_by_url(fleet)[outside]["state"] == "not_in_fleet"
        wait_for(
            lambda: "not in its server's fleet" in log_of(fleet.agents[2]),
            30,
            "the agent's warning",
        )
        assert fleet.agent_health(2)["in_fleet"] is False
        assert f"at {outside} (enrolment) is not in the fleet" in log_of(fleet.server)
        states = {url: a["state"] for url, a in agents_by_url(fleet).items()}
        assert states == {
            fleet.agent_urls[0]: "online",
            fleet.agent_urls[1]: "online",
            outside: "not_in_fleet",
        }

        code, body = fleet.api(
            "POST", "/api/v1/tasks/create", {"command": WITNESSED, "frequency": "every 2 seconds"}
        )
        assert code == 201, body
        task_id = body["command_id"]
        first = executions_after(fleet, task_id, "", 1)[0]
        assert first["expected_agents"] == 2
        assert witnessed(tmp_path, 2) == []

        # Added at run time: it gets the task and runs it, and counts from then on.
        code, member = fleet.api("POST", "/api/v1/fleet", {"url": outside})
        assert code == 201, member
        assert member["agent_id"] == ids[2]
        wait_for(lambda: witnessed(tmp_path, 2), 30, "the added agent to run the task")
        wait_for(lambda: fleet.agent_health(2)["in_fleet"] is True, 30, "the agent to hear it")
        added_run = witnessed(tmp_path, 2)[0]
        [after_add] = executions_after(fleet, task_id, added_run, 1)[-1:]
        assert after_add["expected_agents"] == 3
        assert ids[2] in {o["agent_id"] for o in after_add["outputs"]}

        # Removed: told to leave, it drops the task, says so, and counts no more.
        code, body = fleet.api("DELETE", f"/api/v1/fleet/{quote(fleet.agent_urls[1], safe='')}")
        assert code == 200, body
        wait_for(lambda: fleet.agent_health(1)["membership"] == "removed", 30, "the removed agent")
        assert fleet.agent_health(1)["tasks"] == 0
        assert "told this agent to leave the fleet (removed)" in log_of(fleet.agents[1])
        removed_at = max(witnessed(tmp_path, 1))
        later = executions_after(fleet, task_id, removed_at, 3)
        assert all(e["expected_agents"] == 2 for e in later)
        assert all(ids[1] not in {o["agent_id"] for o in e["outputs"]} for e in later)
        assert max(witnessed(tmp_path, 1)) == removed_at, "the removed agent ran it again"
        assert agents_by_url(fleet)[fleet.agent_urls[1]]["state"] == "not_in_fleet"

        # Revoked: likewise, with its own reason.
        code, body = fleet.api("DELETE", f"/api/v1/agents/{ids[0]}")
        assert code == 200, body
        wait_for(lambda: fleet.agent_health(0)["membership"] == "revoked", 30, "the revoked agent")
        assert fleet.agent_health(0)["tasks"] == 0
        revoked_at = max(witnessed(tmp_path, 0))
        later = executions_after(fleet, task_id, revoked_at, 3)
        assert all(e["expected_agents"] == 1 for e in later)
        assert all([o["agent_id"] for o in e["outputs"]] == [ids[2]] for e in later)
        assert all(e["missing_agents"] == [] for e in later)
        assert max(witnessed(tmp_path, 0)) == revoked_at, "the revoked agent ran it again"
        assert agents_by_url(fleet)[fleet.agent_urls[0]]["state"] == "revoked"

        # Added back: it hears so, is a member again, and runs the task again.
        code, _ = fleet.api("POST", "/api/v1/fleet", {"url": fleet.agent_urls[1]})
        assert code == 201
        wait_for(
            lambda: fleet.agent_health(1)["membership"] == "member", 30, "the agent added back"
        )
        wait_for(
            lambda: max(witnessed(tmp_path, 1)) > removed_at, 30, "the agent added back to run"
        )

        # AVAILABLE_SERVERS unset at the next start: the fleet changed at run time stands.
        code, before = fleet.api("GET", "/api/v1/fleet")
        fleet.server.stop()
        del fleet.server.env["AVAILABLE_SERVERS"]
        fleet.server.start()
        wait_for(lambda: fleet.api("GET", "/api/v1/health")[0] == 200, 60, "the server")
        code, after = fleet.api("GET", "/api/v1/fleet")
        assert [m["url"] for m in after["members"]] == [m["url"] for m in before["members"]]
        assert [m["url"] for m in after["members"]] == [
            fleet.agent_urls[0],
            outside,
            fleet.agent_urls[1],
        ]
        restarted = fleet.api("GET", f"/api/v1/tasks/{task_id}/latest_output")[1]["scheduled_at"]
        executions_after(fleet, task_id, restarted, 2)
        events = fleet.api("GET", "/api/v1/audit?limit=100")[1]
        actions = [(e["action"], e["target"], e["actor"]) for e in events["events"]]
        assert ("fleet.added", outside, "operator:tests") in actions
        assert ("fleet.removed", fleet.agent_urls[1], "operator:tests") in actions
        assert ("fleet.added", fleet.agent_urls[0], "AVAILABLE_SERVERS") in actions
