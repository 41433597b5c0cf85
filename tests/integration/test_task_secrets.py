"""A task cannot read the agent's secrets (issue 8, finding 4), on real twistd daemons.

In the documented layout (the agent started as root, ``--run-as`` an unprivileged user,
the join secret in a 0600 file) a task reads neither the agent's environment nor its
credential, its join secret or a co-located server's signing key. Without ``--run-as``
(the agent's own unprivileged user) the agent is still non-dumpable: a task of the same
user cannot read its ``/proc/PID/environ``, while the agent still reads its runs'.

The first needs root, to run tasks as another user; the second, run as root, runs the
agent as ``nobody``.
"""

from __future__ import annotations

import os
import pwd
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.daemons import Fleet, run_as_nobody, running_fleet, wait_for

pytestmark = pytest.mark.integration

NOBODY = pwd.getpwnam("nobody") if os.name == "posix" else None
CANARY = "canary-" + uuid.uuid4().hex


def open_root(private_folder: Callable[[], Path]) -> Path:
    """A folder every user may traverse: what protects a secret below is then its own
    mode and its folder's, as in a real deployment, not a private test folder above."""
    root = private_folder()
    root.chmod(0o755)
    return root


def latest(fleet: Fleet, task_id: str) -> dict | None:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200, body
    outputs = body["outputs"]
    return outputs[0] if outputs and outputs[0]["status"] in ("succeeded", "failed") else None


def run_once(fleet: Fleet, command: str, every: int = 2) -> dict:
    """The output of the first run of ``command`` (at most ``every`` seconds away)."""
    code, body = fleet.api(
        "POST", "/api/v1/tasks/create", {"command": command, "frequency": f"every {every} seconds"}
    )
    assert code == 201, body
    output = wait_for(lambda: latest(fleet, body["command_id"]), 60, "the task's result")
    fleet.api("DELETE", f"/api/v1/tasks/{body['command_id']}")
    return output


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to run tasks as another user")
def test_in_the_documented_layout_a_task_reads_none_of_the_agents_secrets(
    private_folder: Callable[[], Path],
) -> None:
    root = open_root(private_folder)
    fleet = Fleet(root, agents=1)
    [agent] = fleet.agents
    join_file = root / "agent-0" / "join.secret"
    join_file.write_text(fleet.join_secret + "\n")
    join_file.chmod(0o600)
    # The documented layout: root, --run-as, the join secret in a file; plus a secret of
    # the agent's own environment, which no task may see either.
    agent.args += ["--run-as", "nobody", "--join-secret-file", str(join_file)]
    agent.env = {"AGENT_CANARY": CANARY}
    with running_fleet(root, prepared=fleet):
        assert agent.process is not None
        data = root / "agent-0" / "data"
        credential = (data / "credential").read_text().strip()
        signing_key = root / "server" / "data" / "signing_key.pem"
        targets = [
            f"/proc/{agent.process.pid}/environ",
            data / "credential",
            join_file,
            signing_key,
        ]
        output = run_once(fleet, "id -u; " + "; ".join(f"cat {t}" for t in targets))
        assert output["stdout"].split("\n")[0] == str(NOBODY.pw_uid), output
        seen = output["stdout"] + output["stderr"]
        for secret in (CANARY, fleet.join_secret, credential, "PRIVATE KEY"):
            assert secret not in seen, f"the task read {secret[:12]}...: {output}"
        assert output["stderr"].count("Permission denied") == len(targets), output
        # The agent said nothing about tasks running as its own user.
        assert "tasks run as the agent's own user" not in agent.log_path.read_text()


def test_without_run_as_a_task_cannot_read_the_non_dumpable_agents_environment(
    private_folder: Callable[[], Path],
) -> None:
    root = open_root(private_folder)
    fleet = Fleet(root, agents=1)
    [agent] = fleet.agents
    # Tasks run as the agent's own user (no --run-as), an unprivileged one: root reads
    # any process, dumpable or not.
    if os.geteuid() == 0 and run_as_nobody(agent) is None:
        pytest.skip("needs setpriv and a Python that user nobody may run")
    # The subreaper, which tells a run's orphans apart by their environment.
    agent.args += ["--cgroup-parent", "none"]
    agent.env["AGENT_CANARY"] = CANARY
    with running_fleet(root, prepared=fleet):
        assert agent.process is not None
        pid = agent.process.pid
        # A task reads the agent's environment, and leaves an orphan (re-parented to the
        # agent) that must survive while its run goes on: the agent, non-dumpable, still
        # reads the orphan's /proc/PID/environ to know it belongs to a live run.
        command = (
            f"id -u; cat /proc/{pid}/environ; echo; "
            "orphan=$(sh -c 'sleep 300 >/dev/null 2>&1 & echo $!'); "
            "sleep 4; kill -0 $orphan && echo orphan-alive; kill $orphan"
        )
        code, body = fleet.api(
            "POST", "/api/v1/tasks/create", {"command": "true", "frequency": "every 1 second"}
        )
        assert code == 201, body  # runs that end all the time, and so sweep the orphans
        output = run_once(fleet, command, every=10)
        uid = NOBODY.pw_uid if os.geteuid() == 0 and NOBODY else os.geteuid()
        assert output["stdout"].split("\n")[0] == str(uid), output
        assert CANARY not in output["stdout"], "the task read the agent's environment"
        assert "Permission denied" in output["stderr"], output
        assert "orphan-alive" in output["stdout"], output
        log = agent.log_path.read_text()
        assert "tasks run as the agent's own user" in log
        assert "the agent is the subreaper of its runs" in log
