"""The server brings its embedded PostgreSQL back when it dies, without being restarted."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.integration.daemons import running_fleet, wait_for

pytestmark = pytest.mark.integration

#: Seconds the API may take to answer again after the postmaster is killed.
RECOVERY_DEADLINE = 60


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (OSError, ValueError, IndexError, psutil.Error):
        return None
    return pid if alive else None


def test_a_killed_embedded_postgres_is_restarted_and_the_api_recovers(
    private_folder: Callable[[], Path],
) -> None:
    root = private_folder()  # out of reach of pytest's clean-up of old tmp_path trees
    # No DSN: the server runs the embedded PostgreSQL, as in the playground.
    with running_fleet(root, agents=1) as fleet:
        data = root / "server" / "data" / "postgres"
        assert fleet.server.process is not None
        server_pid = fleet.server.process.pid
        task = {"command": "echo before", "frequency": "every 1 second"}
        code, body = fleet.api("POST", "/api/v1/tasks/create", task)
        assert code == 201, body
        before = body["command_id"]
        killed = postmaster_pid(data)
        assert killed is not None

        os.kill(killed, signal.SIGKILL)
        started = time.monotonic()

        def answers_again() -> bool:
            code, _ = fleet.api("GET", f"/api/v1/tasks/{before}")
            return code == 200 and postmaster_pid(data) not in (None, killed)

        wait_for(answers_again, RECOVERY_DEADLINE, "the API to answer again on a new postmaster")
        print(f"API answering again {time.monotonic() - started:.1f} s after the SIGKILL")
        # A connection the pool held to the dead server may still cost one 503 (retryable,
        # nothing changed) before the pool drops them all.
        task = {"command": "echo after", "frequency": "every 1 second"}
        wait_for(
            lambda: fleet.api("POST", "/api/v1/tasks/create", task)[0] == 201,
            10,
            "a task to be created again",
        )
        print(f"a task created again {time.monotonic() - started:.1f} s after the SIGKILL")
        assert fleet.api("GET", "/api/v1/health")[0] == 200
        fleet.server.assert_running()
        assert fleet.server.process.pid == server_pid, "the server itself was not restarted"

        # PostgreSQL accepts connections a moment before its start is over and logged.
        # The whole log: while PostgreSQL starts again, every request logs a line (6 s of
        # them on a loaded machine), which pushes the supervisor's first line out of a tail.
        log = wait_for(
            lambda: (
                "the embedded PostgreSQL is back" in fleet.server.whole_log()
                and fleet.server.whole_log()
            ),
            30,
            "the server to log that PostgreSQL is back",
        )
        assert log.count("is not running; starting it again") == 1, log[-5000:]
        assert log.count("the embedded PostgreSQL is back") == 1, log[-5000:]
