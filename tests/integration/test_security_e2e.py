"""Security on real twistd daemons: the flow over TLS, what a task's environment holds,
and that no secret reaches a log."""

from __future__ import annotations

import shutil
import ssl
import uuid
from pathlib import Path

import pytest

from tests.integration.daemons import Daemon, Fleet, free_port, http, running_fleet, wait_for

pytestmark = pytest.mark.integration

#: What a run's environment may hold: ours, plus what /bin/sh adds itself.
ALLOWED = {
    "PATH",
    "LANG",
    "HOME",
    "TASKSCHEDULER_TASK_ID",
    "TASKSCHEDULER_SCHEDULED_AT",
    "TASKSCHEDULER_RUN_ID",
}
SHELL_OWN = {"PWD", "OLDPWD", "SHLVL", "_"}
AGENT_SECRET = "hunter2-" + uuid.uuid4().hex


def all_outputs(fleet: Fleet, task_id: str, count: int) -> list[dict] | None:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200, body
    outputs = body["outputs"]
    if len(outputs) == count and all(o["status"] == "succeeded" for o in outputs):
        return list(outputs)
    return None


def secrets_of(fleet: Fleet) -> list[str]:
    found = [fleet.operator_token, fleet.join_secret, AGENT_SECRET]
    for i in range(len(fleet.agents)):
        found.append((fleet.root / f"agent-{i}" / "data" / "credential").read_text().strip())
    return found


def test_the_flow_runs_over_tls_with_verified_certificates(tmp_path: Path) -> None:
    with running_fleet(tmp_path, agents=2, tls=True) as fleet:
        assert fleet.server_url.startswith("https://")
        code, body = fleet.api(
            "POST",
            "/api/v1/tasks/create",
            {"command": "echo over tls", "frequency": "every 1 second"},
        )
        assert code == 201, body
        outputs = wait_for(
            lambda: all_outputs(fleet, body["command_id"], 2), 40, "both agents' results over TLS"
        )
        assert {o["stdout"] for o in outputs} == {"over tls\n"}
        # Plain HTTP to the TLS ports gets nothing useful.
        code, _ = fleet.api("GET", "/api/v1/health")
        assert code == 200
        with pytest.raises(OSError):
            http("GET", f"http://127.0.0.1:{fleet.server_port}/api/v1/health", timeout=3)
        assert "Starting factory" not in fleet.logs()


def test_the_flow_runs_over_mutual_tls_and_a_client_without_a_certificate_is_refused(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path, agents=1, mutual_tls=True) as fleet:
        code, body = fleet.api(
            "POST",
            "/api/v1/tasks/create",
            {"command": "echo mutual", "frequency": "every 1 second"},
        )
        assert code == 201, body
        [output] = wait_for(
            lambda: all_outputs(fleet, body["command_id"], 1), 40, "a result over mutual TLS"
        )
        assert output["stdout"] == "mutual\n"
        anonymous = ssl.create_default_context(cafile=str(fleet.pki.ca))
        for url in [fleet.server_url, fleet.agent_urls[0]]:
            with pytest.raises(OSError):
                http("GET", f"{url}/api/v1/health", timeout=5, context=anonymous)


def test_a_task_sees_only_the_allowlisted_environment_and_no_secret_is_logged(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path, agents=1)
    for agent in fleet.agents:
        agent.env["AWS_SECRET_ACCESS_KEY"] = AGENT_SECRET
        agent.env["TASKSCHEDULER_AGENT_OUTPUT_CAP"] = "65536"
    try:
        fleet.start()
        code, body = fleet.api(
            "POST", "/api/v1/tasks/create", {"command": "env", "frequency": "every 1 second"}
        )
        assert code == 201, body
        [output] = wait_for(
            lambda: all_outputs(fleet, body["command_id"], 1), 40, "the env task's output"
        )
        names = {line.split("=", 1)[0] for line in output["stdout"].splitlines() if "=" in line}
        assert names >= ALLOWED, names
        assert names <= ALLOWED | SHELL_OWN, f"unexpected variables: {names - ALLOWED - SHELL_OWN}"
        for secret in secrets_of(fleet):
            assert secret not in output["stdout"]
        # Refused requests of every kind, so that their handling is logged too.
        assert (
            http(
                "GET",
                f"{fleet.server_url}/api/v1/audit",
                headers={"Authorization": f"Bearer {fleet.join_secret}"},
            )[0]
            == 403
        )
        assert (
            http(
                "GET",
                f"{fleet.server_url}/api/v1/audit",
                headers={"Authorization": "Bearer tso_" + "x" * 43},
            )[0]
            == 401
        )
        assert (
            http(
                "GET",
                f"{fleet.agent_urls[0]}/api/v1/agent/tasks",
                headers={"Authorization": f"Bearer {fleet.operator_token}"},
            )[0]
            == 401
        )
        code, audit = fleet.api("GET", "/api/v1/audit")
        assert code == 200
        assert [(e["action"], e["actor"]) for e in audit["events"]] == [
            ("task.created", "operator:tests"),
            ("agent.enrolled", "join:fleet"),
            ("fleet.added", "AVAILABLE_SERVERS"),  # the fleet set at the first start
        ]
    finally:
        fleet.stop()
    logs = "\n".join(path.read_text(errors="replace") for path in tmp_path.rglob("*.log"))
    assert "enrolled" in logs
    for secret in secrets_of(fleet):
        assert secret not in logs, "a secret reached a log"


def test_a_server_beyond_loopback_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    server = Daemon(
        "server",
        ["taskscheduler-server", "--listen", f"tcp:{free_port()}", "--data-dir", "data"],
        tmp_path,
        {},
    )
    server.start()
    assert server.process is not None
    server.process.wait(timeout=60)
    log = server.log()
    assert "refusing to listen" in log and "--insecure-allow-anonymous-operators" in log
    assert not (tmp_path / "data" / "postgres").exists(), "it stopped before doing anything"


def test_a_revoked_agent_is_refused_and_a_wiped_one_enrols_again(tmp_path: Path) -> None:
    with running_fleet(tmp_path, agents=1) as fleet:
        code, body = fleet.api(
            "POST", "/api/v1/tasks/create", {"command": "echo hi", "frequency": "every 1 second"}
        )
        task_id = body["command_id"]
        [first] = wait_for(lambda: all_outputs(fleet, task_id, 1), 40, "a first result")
        old_id = first["agent_id"]
        code, _ = fleet.api("DELETE", f"/api/v1/agents/{old_id}")
        assert code == 200
        # It is told to drop its tasks and stops running them; what it still sends (its
        # heartbeats, a run's result) is refused.
        wait_for(lambda: fleet.agent_health(0)["membership"] == "revoked", 20, "the agent to leave")
        assert fleet.agent_health(0)["tasks"] == 0
        wait_for(
            lambda: "401" in (tmp_path / "agent-0" / "agent-0.log").read_text(),
            20,
            "a request of the revoked agent to be refused",
        )
        # Wiped, the host comes back as a new identity: the revoked agent's URL is not
        # for the join secret to take until an operator releases it.
        fleet.agents[0].stop()
        shutil.rmtree(tmp_path / "agent-0" / "data")
        fleet.agents[0].start()
        wait_for(
            lambda: "must release its URL" in fleet.agents[0].log_path.read_text(),
            30,
            "the new identity's enrolment to be refused",
        )
        assert fleet.agent_health(0)["enrolled"] is False
        code, released = fleet.api("POST", f"/api/v1/agents/{old_id}/release-url")
        assert code == 200 and released["url_released_at"] is not None, released
        # ... and then it gets its URL's tasks again.
        fleet.wait_until_healthy()
        new_id = fleet.agent_health(0)["agent_id"]
        assert new_id != old_id
        wait_for(
            lambda: (
                (outputs := all_outputs(fleet, task_id, 1)) and outputs[0]["agent_id"] == new_id
            ),
            40,
            "a result from the new identity",
        )
        code, agents = fleet.api("GET", "/api/v1/agents")
        assert {(a["agent_id"], a["revoked_at"] is None) for a in agents["agents"]} == {
            (old_id, False),
            (new_id, True),
        }
