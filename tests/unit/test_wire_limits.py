"""Issue 8, finding 3: neither daemon reads an answer of the other past a bound. An
oversized or endless answer is refused, its connection dropped, the refusal logged, and
the daemon carries on; answers within the bound are read as before."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, LoopingCall
from twisted.logger import capturedLogs, formatEvent

from taskscheduler.agent.enrolment import Enroller
from taskscheduler.agent.reporter import Reporter
from taskscheduler.agent.server_client import ServerClient
from taskscheduler.auth import AGENT_PREFIX, JOIN_PREFIX, new_token
from taskscheduler.httpclient import AnswerTooLarge, AnswerTooSlow, read_body
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.dispatch import Dispatcher
from taskscheduler.signing import public_key_text
from tests.unit.agent_fakes import SERVER
from tests.unit.test_agent_reporter import Setup as ReporterSetup
from tests.unit.test_dispatch import AGENT_ID, URL, FakeAgent, settle, setup, spec

CHUNK = 1024 * 1024


class Streamer:
    """Writes ``CHUNK`` bytes every ``interval`` of its clock, forever, until the
    client goes away (which it records)."""

    def __init__(self, clock: Clock, interval: float = 0.01) -> None:
        self.clock = clock
        self.interval = interval
        self.written = 0
        self.dropped = 0

    def stream(self, request: Any, opening: bytes = b"") -> Any:
        request.setHeader(b"Content-Type", b"application/json")
        request.write(opening)
        writer = LoopingCall(lambda: self._write(request))
        writer.clock = self.clock
        writer.start(self.interval, now=False)

        def gone(_: object) -> None:
            self.dropped += 1
            writer.stop()

        request.notifyFinish().addErrback(gone)
        return Deferred()  # Klein answers when it fires: never, the body is endless

    def _write(self, request: Any) -> None:
        request.write(b" " * CHUNK)
        self.written += CHUNK


class Answers:
    app = Klein()

    def __init__(self, clock: Clock) -> None:
        self.streamer = Streamer(clock)

    @app.route("/small")
    def small(self, request: Any) -> bytes:
        return b'{"ok": true}'

    @app.route("/declared")
    def declared(self, request: Any) -> bytes:
        body = b"x" * (3 * CHUNK)
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    @app.route("/endless")
    def endless(self, request: Any) -> Any:
        return self.streamer.stream(request, b"[")

    @app.route("/slow")
    def slow(self, request: Any) -> Any:
        request.write(b"{")
        return Deferred()


async def fetch(http: StubTreq, clock: Clock, path: str, limit: int) -> Any:
    response = await http.get("http://answers.test" + path, unbuffered=True)
    reading = read_body(response, limit, clock, 10)
    outcome: list[Any] = []
    reading.addBoth(outcome.append)
    for _ in range(2000):
        if outcome:
            break
        clock.advance(0.01)
        http.flush()
    return outcome[0]


@pytest_twisted.ensureDeferred
async def test_an_answer_is_read_within_its_bound_and_refused_past_it() -> None:
    clock = Clock()
    answers = Answers(clock)
    http = StubTreq(answers.app.resource())
    assert await fetch(http, clock, "/small", 1024) == b'{"ok": true}'
    declared = await fetch(http, clock, "/declared", CHUNK)
    assert declared.check(AnswerTooLarge) and "declares" in str(declared.value)
    endless = await fetch(http, clock, "/endless", 4 * CHUNK)
    assert endless.check(AnswerTooLarge)
    http.flush()
    assert answers.streamer.dropped == 1, "the connection was dropped, not drained"
    assert answers.streamer.written <= 6 * CHUNK
    slow = await fetch(http, clock, "/slow", CHUNK)
    assert slow.check(AnswerTooSlow)


class HostileAgent(FakeAgent):
    """A compromised agent: its task list is endless, or holds more ids than it can."""

    app = Klein()

    def __init__(self) -> None:
        super().__init__()
        self.streamer = Streamer(Clock())  # on the dispatcher's clock once it has one
        self.endless = True
        self.extra_ids = 0

    @app.route("/api/v1/tasks/schedule", methods=["POST"])
    def schedule(self, request: Any) -> bytes:
        return FakeAgent.schedule(self, request)

    @app.route("/api/v1/agent/tasks", methods=["GET"])
    def task_ids(self, request: Any) -> Any:
        if self.endless:
            opening = b'{"agent_id": "%s", "task_ids": [' % str(AGENT_ID).encode()
            return self.streamer.stream(request, opening)
        request.setHeader(b"Content-Type", b"application/json")
        ids = [str(t) for t in self.tasks] + [str(uuid.uuid4()) for _ in range(self.extra_ids)]
        return json.dumps({"agent_id": str(AGENT_ID), "task_ids": ids}).encode()


def reconcile(clock: Clock, http: StubTreq, seconds: float = 30) -> None:
    settle(clock, http, seconds)
    for _ in range(1000):
        clock.advance(0.01)
        http.flush()


@pytest_twisted.ensureDeferred
async def test_an_endless_task_list_is_refused_and_the_server_carries_on() -> None:
    agent = HostileAgent()
    store, dispatcher, clock, http = await setup(agent)
    agent.streamer = Streamer(clock)
    with capturedLogs() as events:
        dispatcher.startService()
        reconcile(clock, http, 0)
    http.flush()
    refusals = [formatEvent(e) for e in events if "could not reconcile" in formatEvent(e)]
    assert refusals and "AnswerTooLarge" in refusals[0], refusals
    assert agent.streamer.dropped == 1, "the connection was dropped, not drained"
    assert agent.streamer.written <= 6 * CHUNK, "read no further than the bound"
    # Delivery goes on.
    task = await store.create_task(spec(), utc_now_from(0))
    dispatcher.task_created(task)
    settle(clock, http)
    assert set(agent.tasks) == {task.task_id}
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_the_task_list_bound_grows_with_the_tasks_the_agent_should_hold() -> None:
    agent = HostileAgent()
    agent.endless = False
    store, _, clock, http = await setup(agent)
    # 2 KB of room, plus 80 bytes a task: 100 tasks (4 KB of ids) fit, 300 ids do not.
    dispatcher = Dispatcher(
        store, http, clock, [URL], jitter=lambda: 1.0, list_answer_floor_bytes=2048
    )
    tasks = [await store.create_task(spec(), utc_now_from(0)) for _ in range(100)]
    with capturedLogs() as events:
        dispatcher.startService()
        settle(clock, http)
        assert len(agent.tasks) == 100
        settle(clock, http, 30)
        assert not [e for e in events if "could not reconcile" in formatEvent(e)]
        agent.extra_ids = 200
        settle(clock, http, 30)
    refusals = [formatEvent(e) for e in events if "could not reconcile" in formatEvent(e)]
    assert len(refusals) == 1 and "AnswerTooLarge" in refusals[0], refusals
    assert await store.pending_removals(URL, 1000) == []
    assert {t.task_id for t in tasks} == set(agent.tasks)
    dispatcher.stopService()


class PaddedServer:
    """A server whose enrolment answer is valid but padded to ``padding`` bytes."""

    app = Klein()

    def __init__(self, padding: int) -> None:
        self.padding = padding
        self.key = Ed25519PrivateKey.generate()

    @app.route("/api/v1/agents/enrol", methods=["POST"])
    def enrol(self, request: Any) -> bytes:
        request.setResponseCode(201)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(
            {
                "credential": new_token(AGENT_PREFIX),
                "server_public_key": public_key_text(self.key.public_key()),
                "padding": "x" * self.padding,
            }
        ).encode()


@pytest.mark.parametrize(("padding", "enrolled"), [(1000, True), (10 * CHUNK, False)])
def test_the_agent_reads_no_oversized_enrolment_answer(
    tmp_path: Path, padding: int, enrolled: bool
) -> None:
    clock = Clock()
    server = PaddedServer(padding)
    http = StubTreq(server.app.resource())
    done: list[Any] = []
    enroller = Enroller(
        ServerClient(http, clock, "http://server.test"),
        clock,
        tmp_path,
        uuid.uuid4(),
        "http://agent.test",
        new_token(JOIN_PREFIX),
        done.append,
        jitter=lambda: 1.0,
    )
    with capturedLogs() as events:
        enroller.start()
        for _ in range(5):
            clock.advance(0.1)
            http.flush()
    enroller.stop()
    assert bool(done) is enrolled
    if not enrolled:
        logged = " ".join(formatEvent(e) for e in events)
        assert "could not enrol" in logged and "AnswerTooLarge" in logged, logged


class PaddedResults:
    """A server that stores every result and says so, in an answer padded to ``padding``."""

    app = Klein()

    def __init__(self, padding: int) -> None:
        self.padding = padding

    def _answer(self, request: Any, body: dict[str, Any]) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({**body, "padding": "x" * self.padding}).encode()

    @app.route("/api/v1/tasks/<task_id>/complete", methods=["POST"])
    def complete(self, request: Any, task_id: str) -> bytes:
        return self._answer(request, {"status": "stored"})

    @app.route("/api/v1/results", methods=["POST"])
    def complete_batch(self, request: Any) -> bytes:
        count = len(json.loads(request.content.read())["results"])
        return self._answer(request, {"results": [{"status": "stored"}] * count})


@pytest.mark.parametrize(("padding", "acknowledged"), [(1000, True), (10 * CHUNK, False)])
def test_the_agent_reads_no_oversized_answer_to_its_results(
    tmp_path: Path, padding: int, acknowledged: bool
) -> None:
    s = ReporterSetup(tmp_path)
    s.http = StubTreq(PaddedResults(padding).app.resource())
    s.reporter = Reporter(
        s.spool, ServerClient(s.http, s.clock, SERVER), s.clock, jitter=lambda: 1.0
    )
    s.spool_results(3)
    with capturedLogs() as events:
        s.reporter.start()
        s.settle()
    s.reporter.stop()
    if acknowledged:
        assert len(s.spool) == 0
    else:
        assert len(s.spool) == 3, "kept, to be sent again"
        logged = " ".join(formatEvent(e) for e in events)
        assert "AnswerTooLarge" in logged, logged
