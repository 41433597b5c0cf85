"""Executions left incomplete, as GET /metrics shows them: both stores count the executions
past their reporting deadline with an agent's result missing, and the server's watch puts
that count in ``taskscheduler_server_executions_incomplete`` once a minute."""

from __future__ import annotations

from datetime import timedelta

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from taskscheduler.server.metrics import IncompleteWatch, ServerMetrics
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.memory import MemoryStore
from tests.unit.test_store_contract import (
    A_ID,
    A_URL,
    ANCHOR,
    B_ID,
    B_URL,
    GRACE,
    TIME_LIMIT,
    make_spec,
    result,
)
from tests.unit.test_store_task_verbs import at

HOUR = timedelta(hours=1)


@pytest_twisted.ensureDeferred
async def test_an_execution_missing_an_agent_past_its_deadline_counts_as_incomplete(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.record_results([result(task.task_id, A_ID, 1)], at(1))  # B never reports
    await store.record_results(
        [result(task.task_id, A_ID, 2), result(task.task_id, B_ID, 2)], at(2)
    )
    deadline = at(1) + TIME_LIMIT + GRACE
    # Before its deadline B may still report: not counted yet.
    assert await store.count_incomplete_executions(at(1) - HOUR, deadline, GRACE) == 0
    # Past it, execution 1 is incomplete; execution 2 had both agents.
    later = at(2) + TIME_LIMIT + GRACE + timedelta(seconds=1)
    assert await store.count_incomplete_executions(at(1) - HOUR, later, GRACE) == 1
    # Only the executions since the window's start count.
    assert await store.count_incomplete_executions(at(2), later, GRACE) == 0
    # B's late result completes it: no longer counted.
    await store.record_results([result(task.task_id, B_ID, 1)], later)
    assert await store.count_incomplete_executions(at(1) - HOUR, later, GRACE) == 0


def gauge(metrics: ServerMetrics) -> float:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        if family.name == "taskscheduler_server_executions_incomplete":
            return float(family.samples[0].value)
    raise AssertionError("taskscheduler_server_executions_incomplete is not on the page")


@pytest_twisted.ensureDeferred
async def test_the_watch_counts_them_into_the_gauge_once_a_minute() -> None:
    store = MemoryStore()
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    task = await store.create_task(make_spec(), ANCHOR)
    await store.record_results([result(task.task_id, A_ID, 1)], at(1))
    clock = Clock()
    clock.advance(at(1).timestamp())
    metrics = ServerMetrics()
    watch = IncompleteWatch(store, clock, metrics, GRACE)
    watch.startService()
    assert gauge(metrics) == 0  # counted at once: B may still report
    clock.advance((TIME_LIMIT + GRACE).total_seconds() + 60)
    assert gauge(metrics) == 1  # the next count, past the deadline
    watch.stopService()
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_failed_count_keeps_the_last_value_and_the_watch_goes_on() -> None:
    class FailingOnce(MemoryStore):
        failed = False

        async def count_incomplete_executions(self, *args: object) -> int:
            if not self.failed:
                self.failed = True
                raise RuntimeError("database unavailable")
            return 3

    store = FailingOnce()
    clock = Clock()
    metrics = ServerMetrics()
    metrics.incomplete.set(2)
    watch = IncompleteWatch(store, clock, metrics, GRACE)
    watch.startService()
    assert gauge(metrics) == 2
    clock.advance(60)
    assert gauge(metrics) == 3
    watch.stopService()
