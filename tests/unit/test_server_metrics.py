"""The server's ``GET /metrics``: who may read it, what the routes count (by route name,
never by path), results and late results, heartbeats, and the database's query times and
pool (on a real PostgreSQL)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor

from taskscheduler.protocol import result_to_json
from taskscheduler.server.metrics import PoolState, ServerMetrics, operation_name
from taskscheduler.server.store.postgres import PostgresStore
from tests.unit.test_server_api import (
    AGENT_A,
    AGENT_B,
    AGENTS,
    CREDENTIALS,
    JSON,
    OPERATOR,
    Harness,
    enrol_test_agents,
)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def get_metrics(h: Harness, token: str | None = OPERATOR) -> tuple[int, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    response = await h.http.get("http://server/metrics", headers=headers)
    body = (await response.content()).decode()
    if response.code == 200:
        [content_type] = response.headers.getRawHeaders("Content-Type")
        assert content_type.startswith("text/plain; version=")
    return response.code, body


async def scrape(h: Harness) -> Samples:
    code, body = await get_metrics(h)
    assert code == 200, body
    return parse(body)


@pytest_twisted.ensureDeferred
async def test_metrics_need_an_operator_token_unless_opened() -> None:
    h = Harness()
    await h.store.set_fleet(AGENTS)
    await enrol_test_agents(h.store)
    assert (await get_metrics(h, None))[0] == 401
    assert (await get_metrics(h, CREDENTIALS[AGENT_A]))[0] == 403
    assert (await get_metrics(h))[0] == 200
    h.api.open_metrics()
    assert (await get_metrics(h, None))[0] == 200


@pytest_twisted.ensureDeferred
async def test_opened_metrics_stay_open_in_a_resource_made_later() -> None:
    h = Harness()
    h.api.open_metrics()
    h.http = type(h.http)(h.api.resource())
    assert (await get_metrics(h, None))[0] == 200


@pytest_twisted.ensureDeferred
async def test_requests_are_counted_by_route_name_and_status_not_by_path() -> None:
    h = Harness()
    task_id = await h.create()
    await h.request("GET", f"/api/v1/tasks/{task_id}")
    await h.request("GET", f"/api/v1/tasks/{uuid.uuid4()}")
    response = await h.http.get("http://server/no/such/path", headers=JSON)
    await response.content()
    samples = await scrape(h)
    requests = "taskscheduler_server_http_requests_total"
    assert value(samples, requests, route="create_task", code="201") == 1
    assert value(samples, requests, route="get_task", code="200") == 1
    assert value(samples, requests, route="get_task", code="404") == 1
    assert value(samples, requests, route="unmatched", code="404") == 1
    labels = {v for (name, pairs) in samples for _, v in pairs if name == requests}
    assert task_id not in labels and "/no/such/path" not in labels


@pytest_twisted.ensureDeferred
async def test_results_are_counted_by_outcome_and_late_ones_apart() -> None:
    h = Harness()
    await h.store.set_fleet(AGENTS)
    await enrol_test_agents(h.store)
    task_id = await h.create()  # every 30 s: a time limit of 30 s, and 30 s of grace
    h.clock.advance(31)
    on_time = h.result(task_id, AGENT_A, 1)
    assert (await h.report(on_time))[0] == 200
    assert (await h.report(on_time))[0] == 200  # again: a duplicate
    samples = await scrape(h)
    assert value(samples, "taskscheduler_server_results_total", outcome="stored") == 1
    assert value(samples, "taskscheduler_server_results_total", outcome="duplicate") == 1
    assert value(samples, "taskscheduler_server_results_late_total") == 0
    h.clock.advance(44)  # 45 s after instant 1: past the grace, within time limit + grace
    assert (await h.report(h.result(task_id, AGENT_B, 1)))[0] == 200
    assert value(await scrape(h), "taskscheduler_server_results_late_total") == 0
    h.clock.advance(76)  # instant 2 (at 60 s) was due by 60 + 30 + 30 = 120 s
    late = h.result(task_id, AGENT_A, 2)
    batch = {"results": [result_to_json(late)]}
    headers = {**JSON, "Authorization": f"Bearer {CREDENTIALS[AGENT_A]}"}
    code, answer = await h.request("POST", "/api/v1/results", batch, headers=headers)
    assert code == 200 and answer["results"] == [{"status": "stored"}], answer
    samples = await scrape(h)
    assert value(samples, "taskscheduler_server_results_total", outcome="stored") == 3
    assert value(samples, "taskscheduler_server_results_late_total") == 1


@pytest_twisted.ensureDeferred
async def test_a_heartbeat_sets_its_agents_last_heartbeat_time() -> None:
    h = Harness()
    await h.store.set_fleet(AGENTS)
    await enrol_test_agents(h.store)
    headers = {**JSON, "Authorization": f"Bearer {CREDENTIALS[AGENT_A]}"}
    code, _ = await h.request("POST", "/api/v1/agents/heartbeat", {"tasks": 0}, headers=headers)
    assert code == 200
    samples = await scrape(h)
    name = "taskscheduler_server_agent_last_heartbeat_timestamp_seconds"
    assert value(samples, name, agent_id=str(AGENT_A)) == h.clock.seconds()
    code, _ = await h.request("DELETE", f"/api/v1/agents/{AGENT_A}")
    assert code == 200
    assert value(await scrape(h), name, agent_id=str(AGENT_A)) is None, "revoked: not offline"


class Tasks:
    def get_task(self) -> Any:
        async def operation(cursor: Any) -> None:
            return None

        return operation

    def count(self) -> Any:
        return lambda cursor: None


def test_an_operation_is_named_by_the_method_that_runs_it() -> None:
    assert operation_name(Tasks().get_task()) == "Tasks.get_task"
    assert operation_name(Tasks().count()) == "Tasks.count"


@pytest_twisted.ensureDeferred
async def test_database_operations_are_timed_and_the_pool_is_shown(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    metrics = ServerMetrics()
    store.db.observer = metrics.queries

    def pool() -> PoolState | None:
        state = store.db.pool_state()
        return None if state is None else PoolState(*state)

    metrics.watch_pool(pool)
    await store.start()
    try:
        await store.get_task(uuid.uuid4())
        await store.get_task(uuid.uuid4())
        samples = parse(generate_latest(metrics.registry).decode())
        size = pool()
    finally:
        await store.stop()
    counts = {
        dict(labels)["operation"]: count
        for (name, labels), count in samples.items()
        if name == "taskscheduler_server_db_query_duration_seconds_count"
    }
    get_task = [op for op in counts if op.endswith(".get_task")]
    assert len(get_task) == 1 and counts[get_task[0]] == 2, counts
    assert all("<" not in op for op in counts), counts
    assert size is not None and value(samples, "taskscheduler_server_db_pool_size") == size.size
    assert value(samples, "taskscheduler_server_db_pool_in_use") == 0
    assert (value(samples, "taskscheduler_server_db_pool_idle") or 0) >= 1


def test_each_server_has_a_registry_of_its_own() -> None:
    first, second = ServerMetrics(), ServerMetrics()
    first.result_recorded("stored")
    assert "stored" in generate_latest(first.registry).decode()
    assert 'outcome="stored"' not in generate_latest(second.registry).decode()
