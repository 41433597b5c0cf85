"""The taskscheduler command against a real server (twistd, embedded PostgreSQL) and real
agents: each verb as an operator types it, its output and exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from taskscheduler.cli.main import cli
from tests.integration.daemons import Fleet, running_fleet, wait_for

pytestmark = pytest.mark.integration

COMMAND = Path(sys.executable).with_name("taskscheduler")


@pytest.fixture(scope="module")
def fleet(private_folder: Callable[[], Path]) -> Iterator[Fleet]:
    # One fleet for the module: each test makes its own tasks; revoking comes last.
    with running_fleet(private_folder()) as started:
        yield started


def env(fleet: Fleet, token: str | None = None) -> dict[str, str]:
    return {
        "TASKSCHEDULER_URL": fleet.server_url,
        "TASKSCHEDULER_TOKEN": fleet.operator_token if token is None else token,
    }


def run(fleet: Fleet, *args: str, token: str | None = None) -> Result:
    """The command in-process, as ``taskscheduler ARGS`` with the fleet's URL and token."""
    return CliRunner().invoke(cli, list(args), env=env(fleet, token))


def run_json(fleet: Fleet, *args: str) -> Any:
    result = run(fleet, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def create(fleet: Fleet, *command: str, every: str = "2 seconds") -> str:
    result = run(fleet, "tasks", "create", "--every", every, "--", *command)
    assert result.exit_code == 0, result.output
    task_id = result.stdout.strip()
    assert uuid.UUID(task_id)
    return task_id


def test_the_installed_command_creates_a_task_the_server_runs(fleet: Fleet) -> None:
    """The console script itself, URL and token from the environment."""
    result = subprocess.run(
        [str(COMMAND), "tasks", "create", "--every", "1 hour", "--", "echo", "from", "cli"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env(fleet)},
    )
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.strip()
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}")
    assert code == 200 and body["command"] == "echo from cli"
    assert body["frequency"] == "every 1 hour"


def test_create_show_output_history_rm(fleet: Fleet) -> None:
    task_id = create(fleet, "echo", "hello world;", "echo", "oops", ">&2")
    shown = run(fleet, "tasks", "show", task_id)
    assert shown.exit_code == 0, shown.output
    assert "echo hello world; echo oops >&2" in shown.stdout
    assert "every 2 seconds" in shown.stdout
    assert (
        run_json(fleet, "tasks", "show", task_id) == fleet.api("GET", f"/api/v1/tasks/{task_id}")[1]
    )

    def both_reported() -> dict[str, Any] | None:
        body = run_json(fleet, "tasks", "output", task_id)
        return body if len(body["outputs"]) == 2 else None

    latest = wait_for(both_reported, 60, "both agents' output")
    result = run(fleet, "tasks", "output", task_id)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.count("--- stdout\nhello world\n") == 2
    assert text.count("--- stderr\noops\n") == 2
    for url in fleet.agent_urls:
        assert f" {url}: succeeded, exit 0, " in text
    for output in latest["outputs"]:
        assert f"==> agent {output['agent_id'][:8]} " in text

    history = run(fleet, "tasks", "output", task_id, "--history", "--limit", "2")
    assert history.exit_code == 0, history.output
    assert history.stdout.count("\nexecution ") + history.stdout.startswith("execution ") >= 1
    executions = run_json(fleet, "tasks", "output", task_id, "--history", "--limit", "2")
    assert 1 <= len(executions["executions"]) <= 2

    removed = run(fleet, "tasks", "rm", task_id)
    assert removed.exit_code == 0 and removed.stdout == f"deleted {task_id}\n"
    again = run(fleet, "tasks", "rm", task_id)
    assert again.exit_code == 1
    assert again.stderr == "this task is already deleted (404 task_deleted)\n"
    # Its history stays readable.
    assert run(fleet, "tasks", "output", task_id).exit_code == 0


def test_unknown_ids_and_refused_tokens(fleet: Fleet) -> None:
    unknown = str(uuid.uuid4())
    result = run(fleet, "tasks", "show", unknown)
    assert result.exit_code == 5
    assert result.stderr == "no task has this id (404 unknown_task)\n"
    result = run(fleet, "tasks", "output", unknown)
    assert result.exit_code == 5

    result = run(fleet, "tasks", "show", unknown, token="tso_not-a-token-of-this-server")
    assert result.exit_code == 4
    assert result.stderr.startswith("the server refused the request: ")
    assert "(401 unauthorized)" in result.stderr
    result = run(fleet, "tasks", "show", unknown, token="")
    assert result.exit_code == 4 and "no token given" in result.stderr
    result = run(fleet, "agents", "ls", token="")
    assert result.exit_code == 4


def test_audit_shows_who_created_and_deleted(fleet: Fleet) -> None:
    task_id = create(fleet, "true", every="1 hour")
    assert run(fleet, "tasks", "rm", task_id).exit_code == 0
    result = run(fleet, "audit", "--limit", "5")
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    mine = [row for row in rows if task_id in row]
    assert [row[row.index(task_id) - 1] for row in mine] == ["task.deleted", "task.created"]
    assert all("operator:tests" in row for row in mine)
    events = run_json(fleet, "audit", "--limit", "2")["events"]
    assert [e["action"] for e in events] == ["task.deleted", "task.created"]


def lines_starting(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]


def test_agents_show_and_fleet_rm_add(private_folder: Callable[[], Path]) -> None:
    """On a fleet of its own: it takes an agent out and brings it back."""
    with running_fleet(private_folder()) as fleet:

        def both_online() -> list[dict[str, Any]] | None:
            agents = run_json(fleet, "agents", "ls")["agents"]
            return agents if [a["state"] for a in agents] == ["online", "online"] else None

        agents = wait_for(both_online, 30, "both agents online")
        table = run(fleet, "agents", "ls").stdout
        for agent in agents:
            (row,) = lines_starting(table, agent["agent_id"][:8])
            assert row.split()[1:3] == ["online", agent["url"]]

        target = agents[0]
        prefix = shortest_prefix(target["agent_id"], [a["agent_id"] for a in agents[1:]])
        shown = run(fleet, "agents", "show", prefix)
        assert shown.exit_code == 0, shown.output
        assert f"agent            {target['agent_id']}\n" in shown.stdout
        assert "state            online\n" in shown.stdout
        assert f"hostname         {target['hostname']}\n" in shown.stdout
        assert run_json(fleet, "agents", "show", prefix)["agent_id"] == target["agent_id"]

        members = run(fleet, "fleet", "ls").stdout
        (row,) = lines_starting(members, target["url"])
        assert row.split()[1:3] == ["online", target["agent_id"][:8]]

        removed = run(fleet, "fleet", "rm", target["url"])
        assert removed.exit_code == 0, removed.output
        assert removed.stdout.startswith(f"removed {target['url']} (agent {target['agent_id']}, ")
        assert lines_starting(run(fleet, "fleet", "ls").stdout, target["url"]) == []
        again = run(fleet, "fleet", "rm", target["url"])
        assert again.exit_code == 5 and "(404 not_in_fleet)" in again.stderr
        (row,) = lines_starting(run(fleet, "agents", "ls").stdout, target["agent_id"][:8])
        assert row.split()[1] == "not_in_fleet"

        added = run(fleet, "fleet", "add", target["url"])
        assert added.exit_code == 0, added.output
        assert added.stdout.startswith(f"added {target['url']} (agent {target['agent_id']}, ")
        twice = run(fleet, "fleet", "add", target["url"])
        assert twice.stdout.startswith(f"already in the fleet: {target['url']} ")
        (row,) = lines_starting(run(fleet, "fleet", "ls").stdout, target["url"])
        assert row.split()[2] == target["agent_id"][:8]
        actions = [e["action"] for e in run_json(fleet, "audit", "--limit", "2")["events"]]
        assert actions == ["fleet.added", "fleet.removed"]

        # An agent that is down: the output names it among the agents that did not report.
        down = next(a for a in agents if a["url"] == fleet.agent_urls[1])
        fleet.agents[1].kill()
        task_id = create(fleet, "echo", "still", "here")

        def missing_one() -> dict[str, Any] | None:
            body = run_json(fleet, "tasks", "output", task_id)
            return body if body.get("missing_agents") else None

        latest = wait_for(missing_one, 60, "an execution missing the stopped agent")
        assert latest["missing_agents"] == [{"url": down["url"], "agent_id": down["agent_id"]}]
        text = run(fleet, "tasks", "output", task_id).stdout
        assert f"\nmissing: {down['url']} (agent {down['agent_id'][:8]})\n" in text
        assert ", 1 of 2 agents reported" in text.splitlines()[0]
        assert text.count("==> agent ") == 1 and "--- stdout\nstill here\n" in text


def shortest_prefix(agent_id: str, others: list[str]) -> str:
    """The shortest prefix of ``agent_id`` that no other id starts with."""
    size = next(n for n in range(1, 37) if not any(o.startswith(agent_id[:n]) for o in others))
    return agent_id[:size]


def test_agents_ls_then_revoke_by_prefix(fleet: Fleet) -> None:
    """Last of those on the module's fleet: it takes an agent out of it."""
    agents = run_json(fleet, "agents", "ls")["agents"]
    assert sorted(a["url"] for a in agents) == sorted(fleet.agent_urls)
    table = run(fleet, "agents", "ls")
    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATE", "URL"]
    for agent in agents:
        assert any(
            line.startswith(agent["agent_id"][:8]) and agent["url"] in line for line in lines
        )

    target = agents[0]
    prefix = shortest_prefix(target["agent_id"], [a["agent_id"] for a in agents[1:]])
    result = run(fleet, "agents", "revoke", prefix)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"revoked {target['agent_id']} at {target['url']}\n"
    after = {a["agent_id"]: a for a in run_json(fleet, "agents", "ls")["agents"]}
    assert after[target["agent_id"]]["revoked_at"] is not None
    listed = run(fleet, "agents", "ls").stdout
    assert any(
        line.startswith(target["agent_id"][:8]) and " revoked " in line
        for line in listed.splitlines()
    )
    result = run(fleet, "agents", "revoke", target["agent_id"])
    assert result.exit_code == 5
    assert "no live agent has this id (404 unknown_agent)" in result.stderr

    released = run(fleet, "agents", "release-url", prefix)
    assert released.exit_code == 0, released.output
    assert released.stdout == f"released {target['url']} (was agent {target['agent_id']})\n"
    live = next(a for a in agents if a["agent_id"] != target["agent_id"])
    refused = run(fleet, "agents", "release-url", live["agent_id"])
    assert refused.exit_code == 1 and "(409 agent_live)" in refused.stderr
    actions = [e["action"] for e in run_json(fleet, "audit", "--limit", "2")["events"]]
    assert actions == ["agent.url_released", "agent.revoked"]


def test_an_https_server_with_its_ca(private_folder: Callable[[], Path]) -> None:
    with running_fleet(private_folder(), agents=0, tls=True) as secure:
        assert secure.pki is not None
        result = run(secure, "--ca-file", str(secure.pki.ca), "audit")
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0].split()[:3] == ["ID", "AT", "ACTOR"]
        # Without the CA the certificate is not trusted: unreachable, and why.
        result = run(secure, "audit")
        assert result.exit_code == 3
        assert result.stderr.startswith(f"cannot reach the server at {secure.server_url}: ")
        assert "CERTIFICATE_VERIFY_FAILED" in result.stderr
        assert len(result.stderr.splitlines()) == 1
