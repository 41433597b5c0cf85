"""``replaced`` on the server: a result status like the others, in both stores, the task's
last execution, one execution's outputs, and the CLI's summary."""

from __future__ import annotations

import dataclasses
import signal

import pytest_twisted

from taskscheduler.cli.tables import execution_summary
from taskscheduler.protocol import ResultStatus
from taskscheduler.schedule import format_instant, utc_now_from
from taskscheduler.server.store.interface import Store
from tests.unit.test_openapi import answer_validator
from tests.unit.test_server_api import AGENT_A, AGENT_B, START, Harness, started
from tests.unit.test_store_contract import A_ID, GRACE, STORED, at, make_spec, result


@pytest_twisted.ensureDeferred
async def test_a_replaced_result_round_trips_in_both_stores(store: Store) -> None:
    task = await store.create_task(make_spec(), at(0))
    replaced = result(
        task.task_id,
        A_ID,
        1,
        out=b"half done\n",
        status=ResultStatus.REPLACED,
        exit_code=None,
        signal=signal.SIGTERM,
    )
    assert await store.record_results([replaced], at(2)) == [STORED]
    [execution] = await store.list_executions(task.task_id, 10)
    assert execution.results == (replaced,)
    latest = await store.latest_complete_execution(task.task_id, at(3), GRACE)
    assert latest is not None and latest.results == (replaced,)


@pytest_twisted.ensureDeferred
async def test_replaced_is_counted_shown_and_completes_an_execution_like_any_result() -> None:
    h = await started(Harness())
    task_id = await h.create()
    h.clock.advance(31)
    replaced = dataclasses.replace(
        h.result(task_id, AGENT_A, 1, stdout=b"half done\n"),
        status=ResultStatus.REPLACED,
        exit_code=None,
        signal=signal.SIGTERM,
    )
    assert (await h.report(replaced))[0] == 200
    assert (await h.report(h.result(task_id, AGENT_B, 1)))[0] == 200
    code, body = await h.request("GET", f"/api/v1/tasks/{task_id}")
    assert code == 200, body
    last = body["last_execution"]
    assert (last["replaced"], last["succeeded"], last["reported"]) == (1, 1, 2)
    assert last["complete"] is True
    assert execution_summary(last) == "1 succeeded, 1 replaced"
    instant = format_instant(utc_now_from(START + 30))
    code, one = await h.request("GET", f"/api/v1/tasks/{task_id}/executions/{instant}")
    assert code == 200, one
    [output] = [o for o in one["outputs"] if o["status"] == "replaced"]
    assert (output["signal"], output["exit_code"], output["stdout"]) == (15, None, "half done\n")
    # Both answers are as the OpenAPI document says.
    answer_validator("GET", "/api/v1/tasks/{task_id}", 200).validate(body)
    answer_validator("GET", "/api/v1/tasks/{task_id}/executions/{scheduled_at}", 200).validate(one)


def test_the_cli_summary_names_every_status_the_server_counts() -> None:
    counts = {status.value: 1 for status in ResultStatus}
    summary = execution_summary({**counts, "complete": True})
    assert summary is not None
    for status in ResultStatus:
        assert f"1 {status.value.replace('_', ' ')}" in summary
