"""The agent's ``GET /metrics``: what moves when runs start and end and results are
acknowledged, and who may read the page. A fake runner and a fake server on a Clock."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from taskscheduler.agent.identity import load_or_create_agent_id
from taskscheduler.agent.service import AgentConfig, AgentService
from taskscheduler.auth import OPERATOR_PREFIX, hash_token, new_token
from taskscheduler.protocol import ResultStatus, Trigger
from taskscheduler.signing import InstructionSigner
from taskscheduler.web.guards import make_site
from tests.unit.agent_fakes import (
    ANCHOR,
    ANCHOR_SECONDS,
    SERVER,
    SERVER_KEY,
    Agent,
    FakeRunner,
    FakeServer,
    provision,
    spec,
)
from tests.unit.test_web_guards import Client

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by (name, labels)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(agent: Agent) -> Samples:
    return parse(generate_latest(agent.service.metrics.registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def agent_at(
    tmp_path: Path, seconds_after_anchor: float, server: FakeServer | None = None
) -> Agent:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + seconds_after_anchor)
    return Agent(tmp_path / "data", clock, server or FakeServer())


def runs(samples: Samples, task_id: Any, status: str) -> float | None:
    return value(samples, "taskscheduler_agent_runs_total", task_id=str(task_id), status=status)


def test_a_run_that_ends_counts_for_its_task_and_status_with_its_duration(tmp_path: Path) -> None:
    agent = agent_at(tmp_path, 5)
    task = spec()
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(10)
    [run] = agent.runner.runs
    assert runs(scrape(agent), task.task_id, "succeeded") is None, "not before it ends"
    agent.settle(3)
    agent.runner.finish(run, b"hi\n")
    samples = scrape(agent)
    assert runs(samples, task.task_id, "succeeded") == 1
    assert value(samples, "taskscheduler_agent_run_duration_seconds_count") == 1
    assert value(samples, "taskscheduler_agent_run_duration_seconds_sum") == 3.0
    agent.advance_to(20)
    agent.runner.finish(agent.runner.runs[1], exit_code=1, status=ResultStatus.FAILED)
    samples = scrape(agent)
    assert runs(samples, task.task_id, "succeeded") == 1
    assert runs(samples, task.task_id, "failed") == 1


def test_start_lateness_is_observed_from_the_instant_to_the_process_start(tmp_path: Path) -> None:
    agent = agent_at(tmp_path, 5)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    # The reactor wakes 1.5 s after the instant (10): the run starts that late.
    agent.settle(6.5)
    assert len(agent.runner.runs) == 1
    samples = scrape(agent)
    lateness = "taskscheduler_agent_start_lateness_seconds"
    assert value(samples, f"{lateness}_count") == 1
    assert value(samples, f"{lateness}_sum") == 1.5
    assert value(samples, f"{lateness}_bucket", le="1.0") == 0
    assert value(samples, f"{lateness}_bucket", le="2.5") == 1
    assert value(samples, f"{lateness}_bucket", le="0.0005") == 0


def test_an_instant_started_on_time_falls_in_the_smallest_bucket(tmp_path: Path) -> None:
    agent = agent_at(tmp_path, 5)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.advance_to(10, step=0.25)
    samples = scrape(agent)
    bucket = "taskscheduler_agent_start_lateness_seconds_bucket"
    assert value(samples, bucket, le="0.0005") == 1


@pytest_twisted.ensureDeferred
async def test_a_manual_run_is_not_on_the_schedule_so_not_in_the_lateness(
    tmp_path: Path,
) -> None:
    agent = agent_at(tmp_path, 5)
    task = spec(every="every 1 hour")
    scheduler: Any = agent.service.scheduler
    scheduler.schedule(task)
    # Labelled with the server's instant, a second before the agent heard of it.
    assert await scheduler.run_now(task, ANCHOR + timedelta(seconds=4))
    agent.settle(0)
    assert [run.trigger for run in agent.runner.runs] == [Trigger.MANUAL]
    assert value(scrape(agent), "taskscheduler_agent_start_lateness_seconds_count") == 0


def test_a_skipped_instant_counts_as_skipped_and_is_no_start(tmp_path: Path) -> None:
    agent = agent_at(tmp_path, 5)
    task = spec()
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.settle(8)  # 3 s late: past the starting deadline of a quarter of 10 s
    assert agent.runner.runs == []
    samples = scrape(agent)
    assert runs(samples, task.task_id, "skipped") == 1
    assert value(samples, "taskscheduler_agent_start_lateness_seconds_count") == 0


def test_a_task_that_leaves_the_agent_takes_its_series_with_it(tmp_path: Path) -> None:
    agent = agent_at(tmp_path, 5)
    task = spec()
    scheduler: Any = agent.service.scheduler
    scheduler.schedule(task)
    agent.advance_to(10)
    agent.runner.finish(agent.runner.runs[0])
    assert runs(scrape(agent), task.task_id, "succeeded") == 1
    scheduler.unschedule(task.task_id)
    assert runs(scrape(agent), task.task_id, "succeeded") is None


def test_reported_results_and_the_report_latency(tmp_path: Path) -> None:
    server = FakeServer()
    agent = agent_at(tmp_path, 5, server)
    task = spec()
    scheduler: Any = agent.service.scheduler
    scheduler.schedule(task)
    agent.advance_to(10)
    scheduler.unschedule(task.task_id)  # one run: no later instant is skipped meanwhile
    server.down = True
    agent.runner.finish(agent.runner.runs[0])
    agent.settle(0)
    samples = scrape(agent)
    assert value(samples, "taskscheduler_agent_results_spooled") == 1
    assert value(samples, "taskscheduler_agent_results_reported_total") == 0
    assert value(samples, "taskscheduler_agent_report_latency_seconds_count") == 0
    server.down = False
    agent.advance_to(40)  # the back-off passes; the result goes
    samples = scrape(agent)
    assert value(samples, "taskscheduler_agent_results_spooled") == 0
    assert value(samples, "taskscheduler_agent_results_reported_total") == 1
    assert value(samples, "taskscheduler_agent_report_latency_seconds_count") == 1
    latency = value(samples, "taskscheduler_agent_report_latency_seconds_sum")
    assert latency is not None and 1 <= latency <= 30, latency
    assert value(samples, "taskscheduler_agent_results_dropped_total") == 0


# -- who may read /metrics -----------------------------------------------------------------

TOKEN = new_token(OPERATOR_PREFIX)


def service(tmp_path: Path, endpoint: Any = None, **config: Any) -> AgentService:
    tmp_path.mkdir(parents=True, exist_ok=True)
    provision(tmp_path / "data")
    clock = Clock()
    clock.advance(ANCHOR_SECONDS)
    agent = AgentService(
        AgentConfig(tmp_path / "data", SERVER, **config),
        clock,
        lambda: FakeRunner(clock),
        StubTreq(FakeServer().app.resource()),
        endpoint=endpoint,
    )
    agent.startService()
    return agent


async def get_metrics(agent: AgentService, token: str | None = None) -> tuple[int, bytes, Any]:
    assert agent.api is not None
    http = StubTreq(agent.api.resource())
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    response = await http.get("http://agent.test/metrics", headers=headers)
    return response.code, await response.content(), response.headers


@pytest_twisted.ensureDeferred
async def test_metrics_are_closed_without_a_token_file_or_a_loopback_listener(
    tmp_path: Path,
) -> None:
    agent = service(tmp_path)
    code, body, headers = await get_metrics(agent)
    assert code == 401, body
    assert headers.getRawHeaders("WWW-Authenticate")
    assert (await get_metrics(agent, TOKEN))[0] == 401


@pytest_twisted.ensureDeferred
async def test_the_token_of_the_token_file_reads_the_metrics(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text(TOKEN + "\n")
    agent = service(tmp_path, metrics_token_file=token_file)
    code, body, headers = await get_metrics(agent, TOKEN)
    assert code == 200, body
    assert headers.getRawHeaders("Content-Type")[0].startswith("text/plain")
    assert "taskscheduler_agent_start_lateness_seconds" in body.decode()
    assert (await get_metrics(agent))[0] == 401
    assert (await get_metrics(agent, new_token(OPERATOR_PREFIX)))[0] == 401


@pytest_twisted.ensureDeferred
async def test_no_other_credential_reads_the_metrics(tmp_path: Path) -> None:
    """Neither the server's signature (instructions only) nor a garbled or doubled header."""
    token_file = tmp_path / "metrics-token"
    token_file.write_text(TOKEN)
    agent = service(tmp_path, metrics_token_file=token_file)
    assert agent.api is not None
    http = StubTreq(agent.api.resource())
    me = load_or_create_agent_id(tmp_path / "data")
    now = Clock()
    now.advance(ANCHOR_SECONDS)
    signed = InstructionSigner(SERVER_KEY, now).authorization("GET", "/metrics", me, b"")
    for headers in [
        {"Authorization": signed},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": [f"Bearer {TOKEN}", f"Bearer {TOKEN}"]},
    ]:
        response = await http.get("http://agent.test/metrics", headers=headers)
        assert response.code == 401, headers
        await response.content()


@pytest_twisted.ensureDeferred
async def test_a_token_file_may_hold_the_hash_of_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text(hash_token(TOKEN))
    agent = service(tmp_path, metrics_token_file=token_file)
    assert (await get_metrics(agent, TOKEN))[0] == 200
    assert (await get_metrics(agent, hash_token(TOKEN)))[0] == 401


@pytest_twisted.ensureDeferred
async def test_metrics_public_opens_them_to_anyone(tmp_path: Path) -> None:
    agent = service(tmp_path, metrics_public=True)
    assert (await get_metrics(agent))[0] == 200


class Endpoint:
    def __init__(self, host: str) -> None:
        self.host = host

    def listen(self, factory: Any) -> Deferred[Any]:
        return succeed(Port(IPv4Address("TCP", self.host, 8081)))


class Port:
    def __init__(self, address: IPv4Address) -> None:
        self.address = address

    def getHost(self) -> IPv4Address:
        return self.address

    def stopListening(self) -> None:
        return None


@pytest_twisted.ensureDeferred
async def test_a_loopback_listener_opens_the_metrics_and_any_other_does_not(
    tmp_path: Path,
) -> None:
    loopback = service(tmp_path / "a", endpoint=Endpoint("127.0.0.1"))
    assert (await get_metrics(loopback))[0] == 200
    everywhere = service(tmp_path / "b", endpoint=Endpoint("0.0.0.0"))
    assert (await get_metrics(everywhere))[0] == 401
    # Its HTTP requests are counted by route name.
    _, body, _ = await get_metrics(loopback)
    samples = parse(body.decode())
    requests = "taskscheduler_agent_http_requests_total"
    assert value(samples, requests, route="metrics", code="200") == 1


def test_on_a_real_site_the_token_passes_the_early_check_and_nothing_else_does(
    tmp_path: Path,
) -> None:
    """The refusal on headers alone (before any body, :class:`LimitedRequest`) agrees."""
    token_file = tmp_path / "metrics-token"
    token_file.write_text(TOKEN)
    agent = service(tmp_path, metrics_token_file=token_file)
    assert agent.api is not None
    site = make_site(agent.api.resource(), reactor=Clock())
    for authorization, status in [(f"Bearer {TOKEN}", 200), (None, 401), ("Bearer tso_x", 401)]:
        client = Client(site)
        header = b"" if authorization is None else f"Authorization: {authorization}\r\n".encode()
        client.send(b"GET /metrics HTTP/1.1\r\nHost: agent.test\r\n" + header + b"\r\n")
        assert client.status() == status, (authorization, client.answer()[:200])
        client.close()
