"""The daemons' logs, on real twistd daemons: no command or environment value in them at
the default level, quiet per run, and ``--log-format json`` lines naming each run."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemons import Daemon, Fleet, running_fleet, wait_for
from tests.integration.test_overlap_e2e import create, results

pytestmark = pytest.mark.integration

#: In a task's command and in its env: neither may reach a log.
COMMAND_SECRET = "cmd-s3cr3t-" + uuid.uuid4().hex
ENV_SECRET = "env-s3cr3t-" + uuid.uuid4().hex
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def with_status(fleet: Fleet, task_id: str, status: str, count: int = 1) -> list[dict[str, Any]]:
    found = [o for o in results(fleet, task_id) if o["status"] == status]
    return found if len(found) >= count else []


def assert_no_secret(daemon: Daemon) -> None:
    log = daemon.whole_log()
    assert COMMAND_SECRET not in log, f"{daemon.name} logged a task's command"
    assert ENV_SECRET not in log, f"{daemon.name} logged a task's env value"


def test_at_the_default_level_no_command_or_env_value_is_logged_and_runs_are_quiet(
    tmp_path: Path,
) -> None:
    with running_fleet(tmp_path, agents=1) as fleet:
        quick = create(
            fleet,
            command=f"echo {COMMAND_SECRET} $TOKEN",
            frequency="every 1 second",
            env={"TOKEN": ENV_SECRET},
        )
        # Ended at its time limit: a line at info, which names the run.
        slow = create(
            fleet,
            command=f"echo {COMMAND_SECRET} $TOKEN; sleep 30",
            frequency="every 2 seconds",
            time_limit_seconds=1,
            env={"TOKEN": ENV_SECRET},
        )
        ran = wait_for(lambda: with_status(fleet, quick, "succeeded", 3), 60, "three runs")
        [timed_out] = wait_for(lambda: with_status(fleet, slow, "timed_out"), 60, "a time-out")
        assert ran[0]["stdout"] == f"{COMMAND_SECRET} {ENV_SECRET}\n"  # the runs had them
    for daemon in [fleet.server, *fleet.agents]:
        assert_no_secret(daemon)
    agent_log = fleet.agents[0].whole_log()
    assert f"task {slow}: its run of {timed_out['instant']} reached its time limit" in agent_log
    # Runs are debug: at info, the quick task is named only when it is created and
    # scheduled (a busy machine may add warnings of instants skipped).
    for daemon in [fleet.server, *fleet.agents]:
        lines = daemon.whole_log().splitlines()
        naming = [line for line in lines if quick in line and "#info]" in line]
        assert len(naming) < len(ran), naming
        assert not [line for line in lines if "#debug]" in line]


def test_json_lines_at_debug_name_each_run_by_task_and_instant(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, agents=1)
    for daemon in [fleet.server, *fleet.agents]:
        daemon.args += ["--log-format", "json", "--log-level", "debug"]
    with running_fleet(tmp_path, agents=1, prepared=fleet):
        task_id = create(
            fleet,
            command=f"echo {COMMAND_SECRET}",
            frequency="every 1 second",
            env={"TOKEN": ENV_SECRET},
        )
        [run, *_] = wait_for(lambda: with_status(fleet, task_id, "succeeded", 2), 60, "runs")
    records = {}
    for daemon in [fleet.server, *fleet.agents]:
        assert_no_secret(daemon)  # not even at debug
        lines = daemon.whole_log().splitlines()
        assert lines, f"{daemon.name} logged nothing"
        records[daemon.name] = [json.loads(line) for line in lines]  # each line is JSON
        for record in records[daemon.name]:
            assert {"time", "level", "namespace", "message"} <= record.keys(), record
            assert RFC3339_UTC.match(record["time"]), record
            assert record["level"] in ("debug", "info", "warn", "error", "critical"), record

    def of_the_run(name: str) -> list[dict[str, Any]]:
        return [
            r
            for r in records[name]
            if r.get("task_id") == task_id and r.get("scheduled_at") == run["instant"]
        ]

    agent = of_the_run("agent-0")
    messages = [r["message"] for r in agent]
    assert all(r["level"] == "debug" for r in agent), agent
    # The text says it too, for whoever reads only the message.
    assert all(task_id in m and run["instant"] in m for m in messages), messages
    for said in ["started", "ended: succeeded", "is spooled", "is reported"]:
        assert [m for m in messages if said in m], (said, messages)
    [ended] = [r for r in agent if "ended" in r["message"]]
    assert (ended["status"], ended["exit_code"]) == ("succeeded", 0), ended
    [stored] = of_the_run("server")
    assert (stored["level"], stored["status"]) == ("debug", "succeeded"), stored
    assert uuid.UUID(stored["agent_id"]), stored
