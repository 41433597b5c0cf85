"""Agent labels on the agent's side: ``--label`` (and its environment variable), checked
once; sent at enrolment and in every heartbeat; shown in the agent's health."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.web.resource import Resource

from taskscheduler.agent.options import Options
from taskscheduler.agent.service import AgentConfig, AgentService
from taskscheduler.auth import JOIN_PREFIX, new_token
from taskscheduler.protocol import InvalidMessage
from taskscheduler.protocol.labels import parse_labels
from tests.unit.agent_fakes import ANCHOR_SECONDS, FakeRunner, provision


def parse(args: list[str], environ: dict[str, str] | None = None) -> Options:
    options = Options(environ or {})
    options.parseOptions(args)
    return options


def test_labels_are_repeatable_and_kept_in_order() -> None:
    options = parse(["--label", "role=web", "--label", "dc=eu", "--label", "k8s.io/zone="])
    assert list(options["labels"].items()) == [("role", "web"), ("dc", "eu"), ("k8s.io/zone", "")]
    assert dict(parse([])["labels"]) == {}


def test_labels_come_from_the_environment_unless_given_on_the_command_line() -> None:
    environ = {"TASKSCHEDULER_AGENT_LABELS": "role=db, dc=us"}
    assert dict(parse([], environ)["labels"]) == {"role": "db", "dc": "us"}
    assert dict(parse(["--label", "role=web"], environ)["labels"]) == {"role": "web"}
    with pytest.raises(usage.UsageError) as e:
        parse([], {"TASKSCHEDULER_AGENT_LABELS": "role=web,role"})
    assert str(e.value).startswith("TASKSCHEDULER_AGENT_LABELS: label 'role' must be KEY=VALUE")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--label", "role"], "must be KEY=VALUE"),
        (["--label", "=web"], "label key ''"),
        (["--label", "ro le=web"], "label key 'ro le'"),
        (["--label", "k" * 64 + "=v"], "1 to 63"),
        (["--label", "role=web/api"], "the value must be"),
        (["--label", "role=" + "v" * 64], "the value must be"),
        (["--label", "role=web", "--label", "role=db"], "'role' is given twice"),
        ([arg for i in range(21) for arg in ("--label", f"k{i}=v")], "at most 20"),
    ],
)
def test_a_bad_label_stops_the_agent_saying_why(args: list[str], says: str) -> None:
    with pytest.raises(usage.UsageError) as e:
        parse(args)
    assert str(e.value).startswith("--label: ") and says in str(e.value)


def test_twenty_labels_and_the_longest_key_and_value_are_taken() -> None:
    args = [arg for i in range(19) for arg in ("--label", f"k{i}=v")]
    args += ["--label", "k" * 63 + "=" + "v" * 63]
    assert len(parse(args)["labels"]) == 20


@pytest.mark.parametrize(
    "body",
    [["role"], {"role": 1}, {"ro le": "web"}, {f"k{i}": "v" for i in range(21)}],
)
def test_the_server_reads_only_well_formed_labels(body: Any) -> None:
    with pytest.raises(InvalidMessage):
        parse_labels(body)
    assert dict(parse_labels(None)) == {}
    assert dict(parse_labels({"role": "web"})) == {"role": "web"}


class Recorder(Resource):
    """A server that records what agents post, and answers 503 (try again later)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[str, dict[str, Any]]] = []

    def render_POST(self, request: Any) -> bytes:
        self.posts.append((request.path.decode(), json.loads(request.content.read())))
        request.setResponseCode(503)
        return b"{}"

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [body for at, body in self.posts if at == path]


class Started:
    """An agent service on a Clock, talking to ``recorder`` through StubTreq."""

    def __init__(self, data_dir: Path, recorder: Recorder, **config: Any) -> None:
        self.clock = Clock()
        self.clock.advance(ANCHOR_SECONDS)
        self.http = StubTreq(recorder)
        self.service = AgentService(
            AgentConfig(data_dir, "http://server:8080", **config),
            self.clock,
            lambda: FakeRunner(self.clock),
            self.http,
        )
        self.service.startService()

    def settle(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for _ in range(3):
            self.http.flush()
            self.clock.advance(0)


@pytest_twisted.ensureDeferred
async def test_every_heartbeat_carries_the_labels_and_health_shows_them(tmp_path: Path) -> None:
    provision(tmp_path / "data")
    recorder = Recorder()
    labels = {"role": "web", "dc": "eu"}
    agent = Started(tmp_path / "data", recorder, labels=labels, heartbeat_interval=10)
    service = agent.service
    agent.settle(0)
    agent.settle(10)
    beats = recorder.bodies("/api/v1/agents/heartbeat")
    assert len(beats) == 2
    assert [beat["labels"] for beat in beats] == [labels, labels]
    assert service.api is not None
    health = StubTreq(service.api.resource())
    answer = await (await health.get("http://agent/api/v1/health")).json()
    assert answer["labels"] == labels
    await service.stopService()


def test_an_agent_without_labels_says_it_has_none(tmp_path: Path) -> None:
    provision(tmp_path / "data")
    recorder = Recorder()
    agent = Started(tmp_path / "data", recorder)
    agent.settle(0)
    assert [beat["labels"] for beat in recorder.bodies("/api/v1/agents/heartbeat")] == [{}]
    agent.service.stopService()


def test_enrolment_carries_the_labels(tmp_path: Path) -> None:
    recorder = Recorder()
    agent = Started(
        tmp_path / "data",
        recorder,
        labels={"role": "db"},
        join_secret=new_token(JOIN_PREFIX),
        advertise_url="http://agent:8081",
    )
    agent.settle(1)
    enrolments = recorder.bodies("/api/v1/agents/enrol")
    assert enrolments and enrolments[0]["labels"] == {"role": "db"}
    assert enrolments[0]["url"] == "http://agent:8081"
    agent.service.stopService()
