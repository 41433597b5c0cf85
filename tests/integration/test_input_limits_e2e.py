"""Issue 8's input limits on real daemons and a real PostgreSQL: what used to be a 500
is a 400, and output over the server's ``--max-output-bytes`` is stored trimmed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.daemons import Fleet, running_fleet, wait_for

pytestmark = pytest.mark.integration


def test_hostile_input_is_refused_and_output_is_capped_on_a_real_server(tmp_path: Path) -> None:
    prepared = Fleet(tmp_path, agents=1)
    prepared.server.env["TASKSCHEDULER_MAX_OUTPUT_BYTES"] = "1000"
    with running_fleet(tmp_path, prepared=prepared) as fleet:
        for body, words in [
            ({"command": "echo \ud800", "frequency": "every 5 seconds"}, "lone surrogate"),
            ({"command": "\U0001f600" * 65536, "frequency": "every 5 seconds"}, "bytes"),
        ]:
            code, error = fleet.api("POST", "/api/v1/tasks/create", body)
            assert code == 400 and words in error["error"]["message"], error
        command = "head -c 5000 /dev/zero | tr '\\0' x"
        code, body = fleet.api(
            "POST", "/api/v1/tasks/create", {"command": command, "frequency": "every 1 second"}
        )
        assert code == 201, body
        task_id = body["command_id"]
        for query in ("before=9999-12-31T23:59:59-23:59", "limit=" + "9" * 5000):
            code, error = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?{query}")
            assert code == 400, error

        def stored() -> dict | None:
            code, latest = fleet.api("GET", f"/api/v1/tasks/{task_id}/latest_output")
            assert code == 200, latest
            return latest["outputs"][0] if latest["outputs"] else None

        output = wait_for(stored, 30, "a result")
        assert (output["stdout_bytes"], output["stdout_truncated"]) == (5000, True), output
        assert output["stdout"] == "x" * 1000, json.dumps(output)[:300]
