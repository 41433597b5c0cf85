"""``GET /metrics`` on a real server and a real agent: a task runs, both pages are scraped
over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemons import Fleet, running_fleet, wait_for

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """The samples of ``url``/metrics, which both daemons on loopback serve to anyone."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, pairs), v in samples.items() if n == name and wanted <= pairs)


def succeeded_on_the_server(fleet: Fleet, task_id: str) -> int:
    code, body = fleet.api("GET", f"/api/v1/tasks/{task_id}/executions?limit=100")
    assert code == 200, body
    return sum(
        1
        for execution in body["executions"]
        for output in execution["outputs"]
        if output["status"] == "succeeded"
    )


def test_both_daemons_count_the_runs_of_a_task(tmp_path: Path) -> None:
    with running_fleet(tmp_path, agents=1) as fleet:
        [agent_url] = fleet.agent_urls
        code, body = fleet.api(
            "POST", "/api/v1/tasks/create", {"command": "echo hi", "frequency": "every 1 second"}
        )
        assert code == 201, body
        task_id = body["command_id"]
        stored = wait_for(
            lambda: (n := succeeded_on_the_server(fleet, task_id)) >= 3 and n,
            30,
            "three runs stored",
        )

        agent = scrape(agent_url)
        # Every result the server stored, the agent counted, and counted reported.
        runs = total(agent, "taskscheduler_agent_runs_total", task_id=task_id, status="succeeded")
        assert runs >= stored, (runs, stored)
        assert total(agent, "taskscheduler_agent_results_reported_total") >= stored
        assert total(agent, "taskscheduler_agent_run_duration_seconds_count") >= stored
        # Each scheduled run's start lateness was observed, and none was a minute late.
        lateness = "taskscheduler_agent_start_lateness_seconds"
        observed = total(agent, f"{lateness}_count")
        assert observed >= stored, (observed, stored)
        assert total(agent, f"{lateness}_bucket", le="60.0") == observed
        assert 0 < total(agent, f"{lateness}_sum") < observed * 60
        assert total(agent, "taskscheduler_agent_report_latency_seconds_count") >= stored
        assert total(agent, "taskscheduler_agent_results_dropped_total") == 0
        assert total(agent, "taskscheduler_agent_info") == 1

        server = scrape(fleet.server_url)
        assert total(server, "taskscheduler_server_results_total", outcome="stored") >= stored
        requests = "taskscheduler_server_http_requests_total"
        reports = total(server, requests, route="complete", code="200")
        assert reports + total(server, requests, route="complete_batch", code="200") > 0
        assert total(server, requests, route="create_task", code="201") == 1
        assert total(server, "taskscheduler_server_db_query_duration_seconds_count") > 0
        assert total(server, "taskscheduler_server_db_pool_size") > 0
        heartbeat = "taskscheduler_server_agent_last_heartbeat_timestamp_seconds"
        wait_for(
            lambda: total(scrape(fleet.server_url), heartbeat) > 0, 30, "the agent's heartbeat"
        )

        # Deleted, the task leaves the agent, and its series with it.
        assert fleet.api("DELETE", f"/api/v1/tasks/{task_id}")[0] == 200
        wait_for(
            lambda: total(scrape(agent_url), "taskscheduler_agent_tasks") == 0,
            30,
            "the agent to drop the task",
        )
        wait_for(
            lambda: total(scrape(agent_url), "taskscheduler_agent_runs_in_flight") == 0,
            30,
            "its last run to end",
        )
        left = scrape(agent_url)
        assert total(left, "taskscheduler_agent_runs_total", task_id=task_id) <= 1
