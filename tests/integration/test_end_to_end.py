"""The seed's flow on real parts: twistd server and agents, embedded PostgreSQL, HTTP."""

from __future__ import annotations

import collections
import signal
import time
import uuid
from pathlib import Path

import pytest

from taskscheduler.schedule import parse_instant
from tests.integration.daemons import Fleet, http, running_fleet, wait_for

pytestmark = pytest.mark.integration

# Each run appends its scheduled instant to a file in the agent's working directory:
# the ground truth of what ran, outside the system's control.
WITNESSED = 'echo hello world; echo "$TASKSCHEDULER_SCHEDULED_AT" >> witness.txt'


def latest(fleet: Fleet, task_id: str) -> dict:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200, body
    return body


def both_agents_said_hello(fleet: Fleet, task_id: str, after: str = "") -> dict | None:
    body = latest(fleet, task_id)
    outputs = body["outputs"]
    if body["completion_time"] is None or body["scheduled_at"] <= after:
        return None
    if len(outputs) == 2 and all(o.get("stdout") == "hello world\n" for o in outputs):
        return body
    return None


def agent_ids(fleet: Fleet) -> list[str]:
    return [
        http("GET", f"http://127.0.0.1:{port}/api/v1/health")[1]["agent_id"]
        for port in fleet.agent_ports
    ]


def test_seed_flow_and_recovery_from_sigkill(tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        # The history pruner is wired in with its default retention.
        assert "keeping 90 days of execution history" in fleet.server.log_path.read_text(
            errors="replace"
        )
        code, body = fleet.api(
            "POST",
            "/api/v1/tasks/create",
            {"command": "echo hello world", "frequency": "every 2 seconds"},
        )
        assert code == 201, body
        hello = body["command_id"]
        assert uuid.UUID(hello)
        code, body = fleet.api(
            "POST", "/api/v1/tasks/create", {"command": WITNESSED, "frequency": "every 2 seconds"}
        )
        witnessed = body["command_id"]

        first = wait_for(
            lambda: both_agents_said_hello(fleet, hello), 30, "both agents' hello world"
        )
        ids = agent_ids(fleet)
        assert sorted(o["agent_id"] for o in first["outputs"]) == sorted(ids)
        assert all(o["exit_code"] == 0 and o["status"] == "succeeded" for o in first["outputs"])
        assert all("stderr" not in o for o in first["outputs"])

        # SIGKILL an agent and the server; bring them back; nobody touches the tasks.
        fleet.agents[0].kill(signal.SIGKILL)
        fleet.server.kill(signal.SIGKILL)
        fleet.agents[0].start()
        fleet.server.start()
        fleet.wait_until_healthy()
        wait_for(
            lambda: both_agents_said_hello(fleet, hello, after=first["scheduled_at"]),
            40,
            "both agents to keep running the task after the restarts",
        )
        wait_for(
            lambda: both_agents_said_hello(fleet, witnessed, after=first["scheduled_at"]),
            40,
            "the witnessed task to keep running",
        )

        # Every run an agent witnessed is listed once in the history, with that agent's
        # result; every result that says the command succeeded has its witness line.
        def ran() -> dict[str, list[str]]:
            return {
                agent_id: (tmp_path / f"agent-{i}" / "witness.txt").read_text().split()
                for i, agent_id in enumerate(ids)
            }

        def every_run_listed() -> list[tuple[str, str, str]] | None:
            before = ran()  # read first: each of these runs must be listed now
            listed = listed_results(fleet, witnessed)
            keys = {(agent_id, at) for agent_id, at, _ in listed}
            long_enough = len({at for _, at, _ in listed}) > HISTORY_PAGE  # several pages
            every_run = all(keys.issuperset((a, at) for at in before[a]) for a in before)
            return listed if long_enough and every_run else None

        listed = wait_for(every_run_listed, 30, "every witnessed run's result to be listed")
        after = ran()  # read last: every run listed has written its line by now
        for agent_id, lines in after.items():
            assert len(lines) == len(set(lines)), f"agent {agent_id} ran an instant twice"
        twice = [k for k, n in collections.Counter(r[:2] for r in listed).items() if n > 1]
        assert not twice, f"the history API lists a result twice: {twice}"
        for agent_id, at, status in listed:
            if status == "succeeded":
                assert at in after[agent_id], f"a result of {agent_id} at {at} has no witness"


#: Executions per page when walking a history: small, so that it spans several pages and
#: a paging bug shows as a result listed twice (or missing).
HISTORY_PAGE = 2


def listed_results(fleet: Fleet, task_id: str) -> list[tuple[str, str, str]]:
    """``(agent_id, scheduled_at, status)`` of every output the history API lists for the
    task, walking it page by page; nothing merged, so a result listed twice is here twice."""
    listed = []
    before = None
    while True:
        path = f"/api/v1/tasks/{task_id}/executions?limit={HISTORY_PAGE}"
        code, page = fleet.api("GET", path if before is None else f"{path}&before={before}")
        assert code == 200, page
        for e in page["executions"]:
            listed += [(o["agent_id"], e["scheduled_at"], o["status"]) for o in e["outputs"]]
        before = page["next_before"]
        if before is None:
            return listed


def witness_lines(root: Path, agent: int, name: str) -> list[str]:
    path = root / f"agent-{agent}" / name
    return path.read_text().split() if path.exists() else []


def test_a_deleted_task_stops_on_every_agent_and_keeps_its_history(tmp_path: Path) -> None:
    witness = "deleted-witness.txt"
    command = f'echo hello world; echo "$TASKSCHEDULER_SCHEDULED_AT" >> {witness}'
    with running_fleet(tmp_path) as fleet:
        code, body = fleet.api(
            "POST", "/api/v1/tasks/create", {"command": command, "frequency": "every 1 second"}
        )
        assert code == 201, body
        task_id = body["command_id"]
        wait_for(lambda: both_agents_said_hello(fleet, task_id), 30, "both agents' output")

        code, body = fleet.api("DELETE", f"/api/v1/tasks/{task_id}")
        assert (code, body) == (200, {"task_id": task_id, "status": "deleted"})

        def stopped() -> bool:
            before = [len(witness_lines(tmp_path, i, witness)) for i in range(2)]
            time.sleep(2.5)  # more than two instants of the task
            return before == [len(witness_lines(tmp_path, i, witness)) for i in range(2)]

        wait_for(stopped, 10, "both witness files to stop growing", interval=0)
        assert all(fleet.agent_health(i)["tasks"] == 0 for i in range(2))
        for i in range(2):
            assert list((tmp_path / f"agent-{i}" / "data" / "tasks").glob("*.json")) == []

        code, task = fleet.api("GET", f"/api/v1/tasks/{task_id}")
        assert code == 200 and task["deleted_at"] is not None, task
        code, error = fleet.api("DELETE", f"/api/v1/tasks/{task_id}")
        assert (code, error["error"]["code"]) == (404, "task_deleted")
        # The history stays, and holds nothing scheduled after the deletion.
        code, latest_body = fleet.api("GET", f"/api/v1/tasks/{task_id}/latest_output")
        assert code == 200 and latest_body["outputs"], latest_body
        code, history = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?limit=1000")
        assert code == 200 and history["executions"]
        deleted_at = parse_instant(task["deleted_at"])
        assert all(parse_instant(e["scheduled_at"]) <= deleted_at for e in history["executions"])
        for i in range(2):
            lines = witness_lines(tmp_path, i, witness)
            late = [line for line in lines if parse_instant(line) > deleted_at]
            assert len(late) <= 2, f"agent {i} ran {late} after the deletion"
