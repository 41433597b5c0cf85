"""A run never escapes and survives its agent: real twistd daemons, SIGKILLed agents.

Each test runs twice: with a cgroup per run (the agent's default where it may make
cgroups, as on this machine) and with the agent as child subreaper
(``--cgroup-parent none``). The witness lines the commands append in the agent's working
folder are the ground truth; the server's history API is what a user sees.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemons import Fleet, running_fleet, wait_for
from tests.integration.test_runner_processes import ESCAPES

pytestmark = pytest.mark.integration

#: Starts, works 6 s, ends: longer than its 4 s interval, so that an instant falls in it.
SLOW = (
    'echo "start $TASKSCHEDULER_SCHEDULED_AT" >> witness; sleep 6; '
    'echo "end $TASKSCHEDULER_SCHEDULED_AT" >> witness; echo done; exit 3'
)


@pytest.fixture(params=["cgroup", "subreaper"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, agents=1)
    if request.param == "subreaper":
        fleet.agents[0].args += ["--cgroup-parent", "none"]
    with running_fleet(tmp_path, agents=1, prepared=fleet) as running:
        log = running.agents[0].log()
        expected = "cgroup of its own" if request.param == "cgroup" else "subreaper of its runs"
        assert expected in log, log
        yield running


def create(fleet: Fleet, command: str, every: str, time_limit: int) -> str:
    code, body = fleet.api(
        "POST",
        "/api/v1/tasks/create",
        {"command": command, "frequency": every, "time_limit_seconds": time_limit},
    )
    assert code == 201, body
    return str(body["command_id"])


def witness(fleet: Fleet, name: str = "witness") -> list[str]:
    path = fleet.root / "agent-0" / name
    return path.read_text().splitlines() if path.exists() else []


def output_at(fleet: Fleet, task_id: str, scheduled_at: str) -> dict[str, Any] | None:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?limit=50")
    assert code == 200, body
    for execution in body["executions"]:
        if execution["scheduled_at"] == scheduled_at and execution["outputs"]:
            return dict(execution["outputs"][0])
    return None


def processes_of_task(task_id: str) -> list[int]:
    needle = f"TASKSCHEDULER_TASK_ID={task_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if needle in environ and state not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def restart_agent(fleet: Fleet) -> None:
    fleet.agents[0].start()
    fleet.wait_until_healthy()


def test_a_run_survives_its_agent_and_is_reported_as_it_really_ended(fleet: Fleet) -> None:
    task = create(fleet, SLOW, "every 4 seconds", 20)

    # 1. SIGKILLed mid-run, back at once: re-attached, and its task not doubled meanwhile.
    first = wait_for(lambda: [w for w in witness(fleet) if w.startswith("start")], 20, "a run")
    instant = first[0].split()[1]
    fleet.agents[0].kill(signal.SIGKILL)
    restart_agent(fleet)
    result = wait_for(lambda: output_at(fleet, task, instant), 20, "the re-attached result")
    assert (result["status"], result["exit_code"], result["stdout"]) == ("failed", 3, "done\n")
    assert result["reason"] == "re-attached after the agent restarted"
    lines = witness(fleet)
    began, ended = lines.index(f"start {instant}"), lines.index(f"end {instant}")
    assert not any(w.startswith("start") for w in lines[began + 1 : ended]), lines

    # 2. SIGKILLed mid-run, the run ends while the agent is down: its real outcome.
    second = wait_for(
        lambda: [w for w in witness(fleet) if w.startswith("start") and w != first[0]],
        20,
        "the next run",
    )
    instant = second[0].split()[1]
    fleet.agents[0].kill(signal.SIGKILL)
    wait_for(lambda: f"end {instant}" in witness(fleet), 20, "the run to end, agent down")
    restart_agent(fleet)
    result = wait_for(lambda: output_at(fleet, task, instant), 20, "the result of the run")
    assert (result["status"], result["exit_code"], result["stdout"]) == ("failed", 3, "done\n")
    assert result["reason"].startswith("re-attached after the agent restarted")
    fleet.api("DELETE", f"/api/v1/tasks/{task}")


def test_the_time_limit_holds_while_the_agent_is_down_and_nothing_escapes(fleet: Fleet) -> None:
    command = f'echo "$TASKSCHEDULER_SCHEDULED_AT" >> started; {ESCAPES}; sleep 300'
    task = create(fleet, command, "every 5 seconds", 3)
    wait_for(lambda: len(witness(fleet, "escaped")) >= 3, 20, "a run's escapes")
    instant = witness(fleet, "started")[0]
    fleet.agents[0].kill(signal.SIGKILL)
    time.sleep(3.5)  # past the run's time limit, with its agent down
    restart_agent(fleet)
    result = wait_for(lambda: output_at(fleet, task, instant), 20, "the run's result")
    assert result["status"] == "timed_out", result
    assert "time limit" in result["reason"]
    fleet.api("DELETE", f"/api/v1/tasks/{task}")
    pids = [int(line) for line in witness(fleet, "escaped")]
    wait_for(lambda: not any(_alive(pid) for pid in pids), 15, "every escaped process to die")
    wait_for(lambda: processes_of_task(task) == [], 15, "no process of the task left")


def test_processes_that_leave_the_group_or_session_die_with_their_run(fleet: Fleet) -> None:
    task = create(fleet, f"{ESCAPES}; echo finished", "every 4 seconds", 30)
    result = wait_for(
        lambda: output_at(fleet, task, _newest_instant(fleet, task)), 20, "the run's result"
    )
    assert (result["status"], result["stdout"]) == ("succeeded", "finished\n")
    fleet.api("DELETE", f"/api/v1/tasks/{task}")
    pids = [int(line) for line in witness(fleet, "escaped")]
    assert len(pids) >= 3
    wait_for(lambda: not any(_alive(pid) for pid in pids), 15, "every escaped process to die")
    wait_for(lambda: processes_of_task(task) == [], 15, "no process of the task left")


def _newest_instant(fleet: Fleet, task_id: str) -> str:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?limit=1")
    assert code == 200, body
    return str(body["executions"][0]["scheduled_at"]) if body["executions"] else ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state in ("Z", "X"):
        return False
    return os.path.exists(f"/proc/{pid}")
