"""A restarted agent (new objects over the same data folder) carries on where it stopped."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.application.service import IService
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.web.resource import Resource

from taskscheduler.agent import tap
from taskscheduler.agent.identity import load_or_create_agent_id
from taskscheduler.agent.options import _SETTINGS, Options
from taskscheduler.agent.outcome import REATTACHED, RecoveredRun, RunOutcome
from taskscheduler.agent.service import AgentConfig, AgentService
from taskscheduler.agent.taskstore import TaskStore
from taskscheduler.auth import JOIN_PREFIX, new_token
from taskscheduler.protocol import Output, ResultStatus, Trigger, task_spec_to_json
from taskscheduler.schedule import format_instant
from tests.unit.agent_fakes import (
    ANCHOR,
    ANCHOR_SECONDS,
    Agent,
    FakeRunner,
    FakeServer,
    older_agents_run_marker,
    spec,
)

JSON = {"Content-Type": "application/json"}
STEP = timedelta(seconds=10)  # the interval of agent_fakes.spec()


def clock_at(seconds_after_anchor: float) -> Clock:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + seconds_after_anchor)
    return clock


async def schedule(agent: Agent, body: dict[str, Any]) -> None:
    api: Any = agent.api
    data = json.dumps(body).encode()
    response = await api.post(
        "http://agent.test/api/v1/tasks/schedule",
        data=data,
        headers=agent.signed("POST", "/api/v1/tasks/schedule", data),
    )
    assert response.code == 200, await api.content(response)


@pytest_twisted.ensureDeferred
async def test_tasks_resume_after_a_restart_with_no_one_acting(tmp_path: Path) -> None:
    server = FakeServer()
    clock = clock_at(5)
    first = Agent(tmp_path / "data", clock, server)
    task = spec()
    await schedule(first, task_spec_to_json(task))
    await first.stop()
    clock.advance(20)
    second = Agent(tmp_path / "data", clock, server)
    assert second.service.scheduler.tasks == {task.task_id: task}  # type: ignore[union-attr]
    second.advance_to(30)
    assert [r.extra_env["TASKSCHEDULER_SCHEDULED_AT"] for r in second.runner.runs] == [
        format_instant(ANCHOR + timedelta(seconds=30))
    ]


@pytest_twisted.ensureDeferred
async def test_the_identity_is_created_once_and_kept(tmp_path: Path) -> None:
    clock = clock_at(5)
    first = Agent(tmp_path / "data", clock, FakeServer())
    agent_id = uuid.UUID((tmp_path / "data" / "agent_id").read_text().strip())
    await first.stop()
    Agent(tmp_path / "data", clock, FakeServer())
    assert load_or_create_agent_id(tmp_path / "data") == agent_id
    assert list((tmp_path / "data").glob(".*tmp")) == []


def test_a_corrupt_identity_stops_the_agent_rather_than_inventing_one(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "agent_id").write_text("garbage\n")
    agent = Agent(tmp_path / "data", clock_at(5), FakeServer())
    assert agent.fatal == 1
    assert agent.service.api is None
    assert (tmp_path / "data" / "agent_id").read_text() == "garbage\n"


@pytest_twisted.ensureDeferred
async def test_unreported_results_are_sent_at_start_up(tmp_path: Path) -> None:
    server = FakeServer()
    server.down = True
    clock = clock_at(5)
    first = Agent(tmp_path / "data", clock, server)
    first.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    first.advance_to(10)
    first.runner.finish(first.runner.runs[0], b"kept\n")
    first.settle()
    await first.stop()
    assert server.stored == {}
    server.down = False
    Agent(tmp_path / "data", clock, server).settle()
    [stored] = server.stored.values()
    assert stored.stdout.data == b"kept\n"
    assert list((tmp_path / "data" / "spool").glob("*.json")) == []


def test_a_run_a_crashed_agent_left_is_followed_to_its_end_and_its_task_not_doubled(
    tmp_path: Path,
) -> None:
    server = FakeServer()
    task = spec()
    # The runner found the run of 10 s, which a crashed agent left, still going.
    outcome: Deferred[Any] = Deferred()
    began = ANCHOR + timedelta(seconds=10)
    recovered = RecoveredRun(task.task_id, began, began, outcome, still_running=True)
    second = Agent(tmp_path / "data", clock_at(15), server, recovered=[recovered])
    second.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent_id = load_or_create_agent_id(tmp_path / "data")
    second.advance_to(20)
    # Skip-on-overlap holds across the restart: 20 is not started beside the old run.
    assert second.runner.runs == []
    [skipped] = server.stored.values()
    assert (skipped.status, skipped.scheduled_at) == (ResultStatus.SKIPPED, began + STEP)
    assert skipped.reason == "the previous run was still going"

    outcome.callback(
        RunOutcome(
            status=ResultStatus.FAILED,
            exit_code=3,
            signal=None,
            started_at=began,
            finished_at=began + timedelta(seconds=12),
            duration=12.0,
            stdout=Output.of(b"done\n"),
            stderr=Output(),
            reason=REATTACHED,
        )
    )
    second.settle()
    reattached = server.stored[(task.task_id, agent_id, began)]
    assert (reattached.status, reattached.exit_code) == (ResultStatus.FAILED, 3)
    assert reattached.stdout.data == b"done\n"
    assert reattached.reason == REATTACHED
    assert second.runner.discarded == [(task.task_id, began)], "its files go once durable"
    second.advance_to(30)
    assert [run.key for run in second.runner.runs] == [(task.task_id, began + 2 * STEP)]


def test_a_run_marker_of_an_older_agent_is_reported_lost(tmp_path: Path) -> None:
    server = FakeServer()
    task_id = uuid.uuid4()
    began = ANCHOR + timedelta(seconds=10)
    older_agents_run_marker(tmp_path / "data" / "running", task_id, began, began)
    Agent(tmp_path / "data", clock_at(15), server).settle()
    [lost] = server.stored.values()
    assert (lost.status, lost.task_id, lost.scheduled_at) == (ResultStatus.LOST, task_id, began)
    assert lost.started_at == began
    assert list((tmp_path / "data" / "running").glob("*.json")) == []


def test_a_marker_whose_result_was_spooled_is_not_reported_lost(tmp_path: Path) -> None:
    server = FakeServer()
    server.down = True
    first = Agent(tmp_path / "data", clock_at(5), server)
    first.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    first.advance_to(10)
    [run] = first.runner.runs
    first.runner.finish(run, b"done\n")
    first.settle()
    assert run.key is not None
    # An older agent died after spooling, before removing its marker.
    older_agents_run_marker(tmp_path / "data" / "running", run.key[0], run.key[1], run.key[1])
    first.crash()
    server.down = False
    Agent(tmp_path / "data", clock_at(10), server).settle()
    [stored] = server.stored.values()
    assert stored.status is ResultStatus.SUCCEEDED
    assert list((tmp_path / "data" / "running").glob("*.json")) == []


def test_a_second_agent_over_a_folder_in_use_refuses_to_start(tmp_path: Path) -> None:
    clock = clock_at(5)
    first = Agent(tmp_path / "data", clock, FakeServer())
    first.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    TaskStore(tmp_path / "data" / "tasks").save(spec())
    second = Agent(tmp_path / "data", clock, FakeServer())
    assert second.fatal == 1
    assert second.service.scheduler is None
    first.advance_to(10)
    assert len(first.runner.runs) == 1 and second.runner.runs == []


class FakeEndpoint:
    def __init__(self) -> None:
        self.listening: Deferred[Any] = Deferred()
        self.sites: list[Any] = []

    def listen(self, factory: Any) -> Deferred[Any]:
        self.sites.append(factory)
        return self.listening


class FakePort:
    address: Any = "127.0.0.1:8081"

    def getHost(self) -> Any:
        return self.address

    def stopListening(self) -> None:
        return None


def test_nothing_runs_before_the_agent_listens(tmp_path: Path) -> None:
    TaskStore(tmp_path / "data" / "tasks").directory.mkdir(parents=True)
    TaskStore(tmp_path / "data" / "tasks").save(spec())
    endpoint = FakeEndpoint()
    agent = Agent(tmp_path / "data", clock_at(5), FakeServer(), endpoint=endpoint)
    agent.advance_to(10)
    assert agent.runner.runs == [], "no run before the port is open"
    endpoint.listening.callback(FakePort())
    agent.advance_to(20)
    assert len(agent.runner.runs) == 1


def test_an_agent_that_cannot_listen_stops_having_run_nothing(tmp_path: Path) -> None:
    TaskStore(tmp_path / "data" / "tasks").directory.mkdir(parents=True)
    TaskStore(tmp_path / "data" / "tasks").save(spec())
    endpoint = FakeEndpoint()
    agent = Agent(tmp_path / "data", clock_at(5), FakeServer(), endpoint=endpoint)
    endpoint.listening.errback(CannotListenError("127.0.0.1", 8081, OSError(98, "in use")))
    assert agent.fatal == 1
    agent.advance_to(30)
    assert agent.runner.runs == []


@pytest_twisted.ensureDeferred
async def test_shutdown_lets_a_run_finish_and_spools_its_result(tmp_path: Path) -> None:
    server = FakeServer()
    server.down = True
    agent = Agent(tmp_path / "data", clock_at(5), server)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.advance_to(10)
    stopping = agent.stop()
    agent.advance_to(20)
    assert not stopping.called, "the run under way is waited for"
    assert len(agent.runner.runs) == 1, "no new run starts while stopping"
    agent.runner.finish(agent.runner.runs[0], b"finished\n")
    await stopping
    assert agent.runner.terminated == 0
    assert len(list((tmp_path / "data" / "spool").glob("*.json"))) == 1
    assert list((tmp_path / "data" / "running").glob("*.json")) == []


@pytest_twisted.ensureDeferred
async def test_shutdown_terminates_runs_that_outlive_the_grace(tmp_path: Path) -> None:
    server = FakeServer()
    server.down = True
    agent = Agent(tmp_path / "data", clock_at(5), server)
    agent.service.scheduler.schedule(spec(time_limit=3600))  # type: ignore[union-attr]
    agent.advance_to(10)
    stopping = agent.stop()
    agent.settle(29.9)
    assert not stopping.called
    agent.settle(0.1)
    await stopping
    assert agent.runner.terminated == 1
    assert len(list((tmp_path / "data" / "spool").glob("*.json"))) == 1


# -- options -------------------------------------------------------------------------


def parse(args: list[str], environ: dict[str, str] | None = None) -> Options:
    options = Options(environ or {})
    options.parseOptions(args)
    return options


def test_options_have_defaults() -> None:
    options = parse([])
    assert options["listen"] == "tcp:8081"
    assert options["server"] == "http://127.0.0.1:8080"
    assert options["data-dir"] == "taskscheduler-agent-data"
    assert options["output-cap"] == 1024 * 1024
    assert options["kill-grace"] == 5.0
    assert options["shutdown-grace"] == 30.0
    assert options["spool-max-bytes"] == 1024**3


def test_options_come_from_the_environment_and_the_command_line_wins() -> None:
    environ = {
        "TASKSCHEDULER_AGENT_LISTEN": "tcp:9000",
        "TASKSCHEDULER_SERVER_URL": "http://server:8080/",
        "TASKSCHEDULER_AGENT_DATA_DIR": "/var/lib/agent",
        "TASKSCHEDULER_AGENT_OUTPUT_CAP": "4096",
        "TASKSCHEDULER_AGENT_KILL_GRACE": "2.5",
        "TASKSCHEDULER_AGENT_SHUTDOWN_GRACE": "7",
        "TASKSCHEDULER_AGENT_SPOOL_MAX_BYTES": "1000000",
    }
    options = parse(["--listen", "tcp:9001:interface=127.0.0.1"], environ)
    assert options["listen"] == "tcp:9001:interface=127.0.0.1"
    assert options["server"] == "http://server:8080"
    assert options["data-dir"] == "/var/lib/agent"
    assert options["output-cap"] == 4096
    assert options["kill-grace"] == 2.5
    assert options["shutdown-grace"] == 7.0
    assert options["spool-max-bytes"] == 1_000_000


@pytest.mark.parametrize(
    "args",
    [
        ["--server", "server:8080"],
        ["--output-cap", "lots"],
        ["--output-cap", "0"],
        ["--kill-grace", "-1"],
        ["--spool-max-bytes", "1.5"],
    ],
)
def test_bad_options_are_refused(args: list[str]) -> None:
    with pytest.raises(usage.UsageError):
        parse(args)


def test_every_option_is_documented_with_its_environment_variable() -> None:
    help_text = str(Options())
    for name, variable, _ in _SETTINGS:
        assert f"--{name}" in help_text
        assert variable in help_text


def test_make_service_builds_without_touching_the_data_folder(tmp_path: Path) -> None:
    data_dir = tmp_path / "not-yet"
    options = parse(["--data-dir", str(data_dir), "--listen", "tcp:0:interface=127.0.0.1"])
    service = tap.makeService(options)
    assert IService.providedBy(service)
    assert not data_dir.exists()


@pytest.mark.parametrize(
    ("listen", "scheme"),
    [
        ("tcp:8081", "http"),
        ("tcp:8081:interface=127.0.0.1", "http"),
        ("tcp:port=9000:interface=0.0.0.0", "http"),
        ("ssl:8443:privateKey=k.pem", "https"),
    ],
)
def test_the_advertised_url_defaults_to_the_bound_port(listen: str, scheme: str) -> None:
    options = parse(["--listen", listen])
    # Known once the port is bound (test_an_enrolling_agent_advertises_its_bound_port).
    assert options["advertise-url"] is None and options["advertise-scheme"] == scheme
    assert parse(["--listen", listen, "--advertise-url", "http://a:1/"])["advertise-url"] == (
        "http://a:1"
    )


class EnrolmentRecorder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []

    def render_POST(self, request: Any) -> bytes:
        self.bodies.append(json.loads(request.content.read()))
        request.setResponseCode(503)
        return b"{}"


@pytest.mark.parametrize(
    ("bound", "url"),
    [
        (IPv4Address("TCP", "0.0.0.0", 9000), "http://127.0.0.1:9000"),
        (IPv4Address("TCP", "10.1.2.3", 8081), "http://10.1.2.3:8081"),
    ],
)
def test_an_enrolling_agent_advertises_its_bound_port(
    tmp_path: Path, bound: IPv4Address, url: str
) -> None:
    clock = clock_at(5)
    server = EnrolmentRecorder()
    endpoint = FakeEndpoint()
    service = AgentService(
        AgentConfig(
            tmp_path / "data",
            "http://server:8080",
            join_secret=new_token(JOIN_PREFIX),
            advertise_url=None,
        ),
        clock,
        lambda: FakeRunner(clock),
        StubTreq(server),
        endpoint=endpoint,
    )
    service.startService()
    port = FakePort()
    port.address = bound
    endpoint.listening.callback(port)
    clock.advance(1)
    assert [body["url"] for body in server.bodies] == [url]
    service.stopService()


def test_the_join_secret_comes_from_the_environment_only_as_a_value() -> None:
    options = parse([], {"TASKSCHEDULER_JOIN_SECRET": "tsj_abc"})
    assert options["join-secret"] == "tsj_abc"
    with pytest.raises(usage.UsageError):
        parse(["--listen", "unix:/tmp/x"])
    with pytest.raises(usage.UsageError):
        parse(["--run-as", "no-such-user-here"])
    with pytest.raises(usage.UsageError):
        parse(["--run-as", "root"])


def _lost(began: Any) -> RunOutcome:
    return RunOutcome(
        status=ResultStatus.LOST,
        exit_code=None,
        signal=None,
        started_at=began,
        finished_at=began + timedelta(seconds=1),
        duration=1.0,
        stdout=Output(),
        stderr=Output(),
        reason="the host restarted during the run",
    )


def test_a_run_a_crashed_agent_left_is_reported_with_its_revision_and_trigger(
    tmp_path: Path,
) -> None:
    server = FakeServer()
    task = spec()
    manual_at = ANCHOR + timedelta(seconds=8.25)
    scheduled_at = ANCHOR + timedelta(seconds=10)
    recovered = [
        RecoveredRun(
            task.task_id,
            manual_at,
            manual_at,
            Deferred(),
            still_running=True,
            revision=4,
            trigger=Trigger.MANUAL,
        ),
        RecoveredRun(
            uuid.uuid4(), scheduled_at, scheduled_at, Deferred(), still_running=True, revision=7
        ),
    ]
    agent = Agent(tmp_path / "data", clock_at(15), server, recovered=recovered)
    for run in recovered:
        run.outcome.callback(_lost(run.scheduled_at))
    agent.settle()
    labels = sorted((r.scheduled_at, r.revision, r.trigger) for r in server.stored.values())
    assert labels == [(manual_at, 4, Trigger.MANUAL), (scheduled_at, 7, Trigger.SCHEDULE)]
    assert agent.service.scheduler.lead == 0, "a manual run is no instant of the grid"  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_manual_run_the_journal_does_not_name_is_told_by_its_acceptance(
    tmp_path: Path,
) -> None:
    """A run the agent died starting, before its journal line: its trigger is known
    from the manual runs accepted, which are on disk before a manual run starts."""
    task = spec()
    first = Agent(tmp_path / "data", clock_at(5), FakeServer())
    await first.service.api._task_store.save(task)  # type: ignore[union-attr]
    first.service.scheduler.schedule(task)  # type: ignore[union-attr]
    at = ANCHOR + timedelta(seconds=5.5)
    assert await first.service.scheduler.run_now(task, at)  # type: ignore[union-attr]
    first.crash()
    server = FakeServer()
    lost = RecoveredRun(task.task_id, at, None, Deferred(), still_running=False)
    second = Agent(tmp_path / "data", first.clock, server, recovered=[lost])
    lost.outcome.callback(_lost(at))
    second.settle()
    [result] = server.stored.values()
    assert (result.status, result.trigger, result.revision) == (
        ResultStatus.LOST,
        Trigger.MANUAL,
        None,
    )
