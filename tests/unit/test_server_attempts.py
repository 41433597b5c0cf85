"""The server's API over retried runs: every attempt is taken, an execution shows each
agent's last attempt with the list of its attempts, and completes once the agent's final
attempt is in."""

from __future__ import annotations

import dataclasses
from urllib.parse import quote

import pytest_twisted

from taskscheduler.protocol import Output, ResultStatus
from taskscheduler.schedule import format_instant
from tests.unit.test_server_api import AGENT_A, AGENT_B, Harness, started


@pytest_twisted.ensureDeferred
async def test_an_execution_shows_each_agents_attempts_and_completes_on_the_final_one() -> None:
    harness = await started(Harness())
    task_id = await harness.create()
    harness.clock.advance(1)
    failed = dataclasses.replace(
        harness.result(task_id, AGENT_A, 1, b"first\n", exit_code=1), final=False
    )
    assert (await harness.report(failed))[0] == 200
    assert (await harness.report(harness.result(task_id, AGENT_B, 1, b"b\n")))[0] == 200
    at = quote(format_instant(failed.scheduled_at))
    path = f"/api/v1/tasks/{task_id}/executions/{at}"
    code, execution = await harness.request("GET", path)
    assert code == 200
    assert execution["complete"] is False, "A will retry: its final attempt is awaited"
    by_agent = {o["agent_id"]: o for o in execution["outputs"]}
    assert (by_agent[str(AGENT_A)]["attempt"], by_agent[str(AGENT_A)]["final"]) == (1, False)
    _, task = await harness.request("GET", f"/api/v1/tasks/{task_id}")
    assert (task["last_execution"]["reported"], task["last_execution"]["complete"]) == (1, False)

    retried = dataclasses.replace(
        failed,
        status=ResultStatus.SUCCEEDED,
        exit_code=0,
        stdout=Output.of(b"second\n"),
        attempt=2,
        final=True,
    )
    assert (await harness.report(retried))[0] == 200
    assert (await harness.report(retried))[1] == {"status": "duplicate"}
    assert (await harness.report(failed))[1] == {"status": "duplicate"}
    code, execution = await harness.request("GET", path)
    assert execution["complete"] is True
    a = {o["agent_id"]: o for o in execution["outputs"]}[str(AGENT_A)]
    assert (a["status"], a["attempt"], a["stdout"], a["final"]) == (
        "succeeded",
        2,
        "second\n",
        True,
    )
    assert [(x["attempt"], x["status"], x["exit_code"], x["stdout"]) for x in a["attempts"]] == [
        (1, "failed", 1, "first\n"),
        (2, "succeeded", 0, "second\n"),
    ]
    b = {o["agent_id"]: o for o in execution["outputs"]}[str(AGENT_B)]
    assert [x["attempt"] for x in b["attempts"]] == [1]
    _, latest = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert [o["attempt"] for o in latest["outputs"]] == [2, 1]
    _, task = await harness.request("GET", f"/api/v1/tasks/{task_id}")
    assert (task["last_execution"]["reported"], task["last_execution"]["complete"]) == (2, True)
    assert task["last_execution"]["succeeded"] == 2
