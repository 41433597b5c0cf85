"""Targeting on real parts: a twistd server (embedded PostgreSQL) and two real agents with
different labels. A task targeting a label runs only on the agent that carries it; an
agent restarted with the label joins it, one restarted without leaves it; a task
targeting an agent by id runs only there. An agent with a malformed label refuses to
start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemons import Daemon, Fleet, free_port, running_fleet, wait_for

pytestmark = pytest.mark.integration


def witness(name: str) -> str:
    """A command appending its instant to ``name`` in the agent's folder: what ran, for
    certain."""
    return f'echo "$TASKSCHEDULER_SCHEDULED_AT" >> {name}'


def witnessed(root: Path, index: int, name: str) -> list[str]:
    path = root / f"agent-{index}" / name
    return path.read_text().split() if path.exists() else []


def executions_after(fleet: Fleet, task_id: str, after: str, count: int) -> list[dict[str, Any]]:
    """Wait for ``count`` complete executions scheduled after ``after``; them."""

    def done() -> list[dict[str, Any]] | None:
        code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?limit=50")
        assert code == 200, body
        later = [e for e in body["executions"] if e["scheduled_at"] > after and e["complete"]]
        return later if len(later) >= count else None

    return wait_for(done, 60, f"{count} executions after {after}")


def reporters(execution: dict[str, Any]) -> set[str]:
    return {o["agent_id"] for o in execution["outputs"]}


def label_args(labels: list[str]) -> list[str]:
    return [arg for label in labels for arg in ("--label", label)]


def restart_with_labels(fleet: Fleet, index: int, base: list[str], labels: list[str]) -> None:
    agent = fleet.agents[index]
    agent.stop()
    agent.args = base + label_args(labels)
    agent.start()
    wait_for(
        lambda: fleet.agent_health(index)["labels"] == dict(lab.split("=") for lab in labels),
        30,
        f"agent {index} back with labels {labels}",
    )


def test_a_task_runs_on_the_agents_its_target_matches_as_they_join_and_leave(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path, agents=2)
    fleet.server.env["TASKSCHEDULER_HEARTBEAT_INTERVAL"] = "1"
    for agent in fleet.agents:
        agent.args += ["--heartbeat-interval", "1"]
    base = [list(agent.args) for agent in fleet.agents]
    fleet.agents[0].args += label_args(["role=web", "dc=eu"])
    fleet.agents[1].args += label_args(["role=db"])
    with running_fleet(tmp_path, prepared=fleet):
        ids = [fleet.agent_health(i)["agent_id"] for i in range(2)]
        assert fleet.agent_health(0)["labels"] == {"role": "web", "dc": "eu"}
        code, listed = fleet.api("GET", "/api/v1/agents")
        assert code == 200
        assert {a["agent_id"]: a["labels"] for a in listed["agents"]} == {
            ids[0]: {"role": "web", "dc": "eu"},
            ids[1]: {"role": "db"},
        }

        code, body = fleet.api(
            "POST",
            "/api/v1/tasks/create",
            {
                "command": witness("web.txt"),
                "frequency": "every 2 seconds",
                "target": {"labels": {"role": "web"}},
            },
        )
        assert code == 201, body
        web = body["command_id"]
        first = executions_after(fleet, web, "", 2)
        assert all(e["expected_agents"] == 1 for e in first)
        assert all(reporters(e) == {ids[0]} for e in first)
        assert witnessed(tmp_path, 1, "web.txt") == []
        assert fleet.agent_health(1)["tasks"] == 0

        # By id: only agent 1 runs it. An id no live agent has is refused.
        code, body = fleet.api(
            "POST",
            "/api/v1/tasks/create",
            {
                "command": witness("by-id.txt"),
                "frequency": "every 2 seconds",
                "target": {"agents": [ids[1]]},
            },
        )
        assert code == 201, body
        by_id = body["command_id"]
        runs = executions_after(fleet, by_id, "", 2)
        assert all(reporters(e) == {ids[1]} and e["expected_agents"] == 1 for e in runs)
        assert witnessed(tmp_path, 0, "by-id.txt") == []
        unknown = "0f0f0f0f-0000-4000-8000-000000000000"
        code, body = fleet.api(
            "POST",
            "/api/v1/tasks/create",
            {"command": "true", "frequency": "every 2 seconds", "target": {"agents": [unknown]}},
        )
        assert (code, body["error"]["code"]) == (400, "invalid_request"), body
        assert unknown in body["error"]["message"]

        # Agent 1 restarts with role=web: it joins the label and runs the task.
        restart_with_labels(fleet, 1, base[1], ["role=web"])
        wait_for(lambda: witnessed(tmp_path, 1, "web.txt"), 30, "agent 1 to run the task")
        joined = witnessed(tmp_path, 1, "web.txt")[0]
        both = executions_after(fleet, web, joined, 2)
        assert all(e["expected_agents"] == 2 for e in both)
        assert all(reporters(e) == set(ids) for e in both)
        # Its id target still holds: the by-id task runs there as before.
        assert fleet.agent_health(1)["tasks"] == 2

        # Agent 0 restarts without it: it leaves the label and drops the task.
        restart_with_labels(fleet, 0, base[0], ["dc=eu"])
        wait_for(lambda: fleet.agent_health(0)["tasks"] == 0, 30, "agent 0 to drop the task")
        left = max(witnessed(tmp_path, 0, "web.txt"))
        # Instants while agent 0 was restarting still expected it (it matched then): the
        # executions from now on are those recorded since it left.
        code, body = fleet.api("GET", f"/api/v1/tasks/{web}/executions?limit=1")
        since = max([left, *(e["scheduled_at"] for e in body["executions"])])
        later = executions_after(fleet, web, since, 3)
        assert all(e["expected_agents"] == 1 for e in later)
        assert all(reporters(e) == {ids[1]} for e in later)
        assert all(e["missing_agents"] == [] for e in later)
        assert max(witnessed(tmp_path, 0, "web.txt")) == left, "agent 0 ran it again"

        code, listed = fleet.api("GET", "/api/v1/agents")
        assert {a["agent_id"]: a["labels"] for a in listed["agents"]} == {
            ids[0]: {"dc": "eu"},
            ids[1]: {"role": "web"},
        }


def test_an_agent_with_a_malformed_label_refuses_to_start(tmp_path: Path) -> None:
    agent = Daemon(
        "agent",
        [
            "taskscheduler-agent",
            "--listen",
            f"tcp:{free_port()}:interface=127.0.0.1",
            "--data-dir",
            str(tmp_path / "data"),
            "--label",
            "role=web",
            "--label",
            "role=db",
        ],
        tmp_path,
        {"TASKSCHEDULER_JOIN_SECRET": "tsj_x"},
    )
    agent.start()
    assert agent.wait(60) != 0
    assert "--label: label 'role' is given twice" in agent.whole_log()
    assert not (tmp_path / "data").exists(), "it refused before touching its data folder"
