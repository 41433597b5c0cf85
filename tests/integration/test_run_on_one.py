"""Run on one on real parts (twistd server and two agents, embedded PostgreSQL, HTTP): each
instant of a ``run_on: one`` task runs on exactly one agent, spread over both; SIGKILL the
agent the server chooses for the coming instants and the other runs them, within the
grace."""

from __future__ import annotations

import signal
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from taskscheduler.schedule import format_instant, parse_instant
from taskscheduler.server.store.claim_rules import chosen_agent
from tests.integration.daemons import Fleet, http, running_fleet, wait_for

pytestmark = pytest.mark.integration

EVERY = 2  # seconds
GRACE = EVERY / 2  # --claim-grace 5, at most half the interval
HEARTBEAT = 2.0  # an agent is offline 3 heartbeats (6 s) after the last one
# Each run appends its instant to a file in its agent's folder: what ran, seen from outside.
WITNESSED = 'echo "$TASKSCHEDULER_SCHEDULED_AT" >> witness.txt'


def executions(fleet: Fleet, task_id: str) -> list[dict[str, Any]]:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?limit=200")
    assert code == 200, body
    return list(body["executions"])


def witnessed(fleet: Fleet, index: int) -> list[str]:
    path = fleet.agents[index].workdir / "witness.txt"
    return path.read_text().split() if path.exists() else []


def agent_ids(fleet: Fleet) -> list[str]:
    return [
        http("GET", f"http://127.0.0.1:{port}/api/v1/health")[1]["agent_id"]
        for port in fleet.agent_ports
    ]


def test_each_instant_runs_once_and_a_killed_agents_instants_fail_over(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, agents=2)
    fleet.server.env["TASKSCHEDULER_HEARTBEAT_INTERVAL"] = str(HEARTBEAT)
    for agent in fleet.agents:
        agent.env["TASKSCHEDULER_AGENT_HEARTBEAT_INTERVAL"] = str(HEARTBEAT)
    with running_fleet(tmp_path, prepared=fleet):
        code, body = fleet.api(
            "POST",
            "/api/v1/tasks/create",
            {"command": WITNESSED, "frequency": f"every {EVERY} seconds", "run_on": "one"},
        )
        assert code == 201, body
        task_id = body["command_id"]
        ids = agent_ids(fleet)
        url_of = dict(zip(ids, fleet.agent_urls, strict=True))

        # Normal operation: one result per instant, from the agent the server chose.
        def enough() -> list[dict[str, Any]] | None:
            done = [e for e in executions(fleet, task_id) if e["complete"]]
            return done if len(done) >= 12 else None

        before = wait_for(enough, 60, "twelve complete executions")
        ran_on: dict[str, str] = {}
        for execution in before:
            assert execution["expected_agents"] == 1, execution
            [output] = execution["outputs"]  # exactly one result
            assert output["status"] == "succeeded", output
            ran_on[execution["scheduled_at"]] = output["agent_id"]
        assert set(ran_on.values()) == set(ids), "both agents had their share"
        for at, agent_id in ran_on.items():
            # The chosen agent ran it (no failover needed on an idle machine, unless the
            # chosen one was that late to ask: then the other took it after the grace).
            if (
                chosen_agent(uuid.UUID(task_id), parse_instant(at), fleet.agent_urls)
                != (url_of[agent_id])
            ):
                assert _late(before, at) >= GRACE - 0.05, (at, agent_id)

        # SIGKILL the agent chosen for the next instants (seen online for 6 s more).
        now = parse_instant(executions(fleet, task_id)[0]["scheduled_at"])
        coming = [now + timedelta(seconds=EVERY * k) for k in range(2, 6)]
        victim_url = max(
            fleet.agent_urls,
            key=lambda u: sum(
                chosen_agent(uuid.UUID(task_id), at, fleet.agent_urls) == u for at in coming
            ),
        )
        victim = fleet.agent_urls.index(victim_url)
        survivor = 1 - victim
        fleet.agents[victim].kill(signal.SIGKILL)
        killed_at = time.time()
        killed_instant = datetime.fromtimestamp(killed_at, tz=now.tzinfo)

        def after_kill() -> list[dict[str, Any]] | None:
            later = [
                e
                for e in executions(fleet, task_id)
                if e["complete"] and parse_instant(e["scheduled_at"]) > killed_instant
            ]
            return later if len(later) >= 8 else None

        later = wait_for(after_kill, 60, "eight executions after the kill")
        took_over = 0
        for execution in later:
            [output] = execution["outputs"]
            assert output["agent_id"] == ids[survivor], execution
            assert output["status"] == "succeeded", output
            at = parse_instant(execution["scheduled_at"])
            late = _late(later, execution["scheduled_at"])
            assert late < GRACE + 1.0, f"{at}: started {late:.2f}s late"
            if chosen_agent(uuid.UUID(task_id), at, fleet.agent_urls) == victim_url:
                took_over += 1
        assert took_over >= 1, "the victim was chosen for some instants after its death"

        # A run-now goes to one agent: an online one (the victim is offline by now).
        code, body = fleet.api("POST", f"/api/v1/tasks/{task_id}/run")
        assert code == 202, body
        manual = body["scheduled_at"]

        def ran_now() -> dict[str, Any] | None:
            code, found = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions/{manual}")
            return found if code == 200 and found["complete"] else None

        execution = wait_for(ran_now, 30, "the run-now to complete")
        assert execution["expected_agents"] == 1
        assert [o["agent_id"] for o in execution["outputs"]] == [ids[survivor]]

        # What ran, as the runs themselves wrote it: each instant once, on one agent.
        both = witnessed(fleet, 0) + witnessed(fleet, 1)
        assert len(both) == len(set(both)), "an instant ran on two agents"
        for execution in before + later:
            assert execution["scheduled_at"] in {_canonical(w) for w in both}


def _late(page: list[dict[str, Any]], at: str) -> float:
    [execution] = [e for e in page if e["scheduled_at"] == at]
    started = parse_instant(execution["outputs"][0]["started_at"])
    return (started - parse_instant(at)).total_seconds()


def _canonical(text: str) -> str:
    return format_instant(parse_instant(text))
