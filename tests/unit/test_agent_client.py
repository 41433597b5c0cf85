"""The server's client of an agent, against the agent's real Klein app behind StubTreq:
each answer read into the outcome dispatch acts on (accepted, refused, failed)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from taskscheduler.protocol import task_spec_to_json
from taskscheduler.server.agent_client import (
    Accepted,
    AgentClient,
    BatchAnswered,
    Failed,
    Refused,
    TaskList,
)
from taskscheduler.signing import InstructionSigner
from tests.unit.agent_fakes import ANCHOR_SECONDS, SERVER_KEY, Agent, FakeServer, spec

URL = "http://agent.test:8081"


class Front(Resource):
    """The agent's app, or an answer of its own in its place (a proxy, an agent down)."""

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.answer: tuple[int, bytes] | None = None
        self.hang = False

    def render(self, request: Any) -> Any:
        if self.hang:
            return NOT_DONE_YET
        if self.answer is None:
            return self.inner.render(request)
        status, body = self.answer
        request.setResponseCode(status)
        return body


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.clock.advance(ANCHOR_SECONDS + 5)
        self.agent = Agent(tmp_path / "data", self.clock, FakeServer())
        assert self.agent.service.api is not None
        self.front = Front(self.agent.service.api.resource())
        self.http = StubTreq(self.front)
        self.client = AgentClient(
            URL, self.http, self.clock, InstructionSigner(SERVER_KEY, self.clock)
        )
        self.agent_id = self.agent.service.api._agent_id

    async def run(self, coroutine: Any) -> Any:
        d = Deferred.fromCoroutine(coroutine)
        for _ in range(5):
            self.http.flush()
            self.clock.advance(0)
        assert d.called, "no answer"
        return await d


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def encoded(command: str = "echo hi", task_id: uuid.UUID | None = None) -> tuple[uuid.UUID, bytes]:
    task = spec(command, task_id=task_id)
    return task.task_id, json.dumps(task_spec_to_json(task)).encode()


@pytest_twisted.ensureDeferred
async def test_a_scheduled_task_is_accepted_listed_and_unscheduled(s: Setup) -> None:
    task_id, body = encoded()
    assert await s.run(s.client.schedule(body, s.agent_id)) == Accepted(s.agent_id)
    assert await s.run(s.client.list_tasks(s.agent_id, 4096)) == TaskList(s.agent_id, {task_id})
    assert await s.run(s.client.unschedule(task_id, s.agent_id)) == Accepted(s.agent_id)
    assert await s.run(s.client.list_tasks(s.agent_id, 4096)) == TaskList(s.agent_id, set())


@pytest_twisted.ensureDeferred
async def test_a_batch_has_one_outcome_per_task_in_order(s: Setup) -> None:
    good, bad = encoded(), encoded()
    bad_body = json.loads(bad[1])
    bad_body["frequency"] = "every 0 seconds"
    tasks = [good, (bad[0], json.dumps(bad_body).encode())]
    answer = await s.run(s.client.schedule_batch(tasks, s.agent_id))
    assert isinstance(answer, BatchAnswered)
    accepted, refused = answer.outcomes
    assert accepted == Accepted(s.agent_id)
    assert isinstance(refused, Refused) and refused.status is None
    assert refused.code == "invalid_request" and str(bad[0]) in refused.message


@pytest_twisted.ensureDeferred
async def test_a_task_the_agents_disk_cannot_take_is_a_failure_not_a_refusal(s: Setup) -> None:
    def full(spec: object) -> None:
        raise OSError(28, "No space left on device")

    s.agent.service.api._task_store.save = full  # type: ignore[union-attr,method-assign]
    single = await s.run(s.client.schedule(encoded()[1], s.agent_id))
    assert isinstance(single, Failed) and "503" in single.reason
    batch = await s.run(s.client.schedule_batch([encoded(), encoded()], s.agent_id))
    assert isinstance(batch, BatchAnswered)
    assert [type(outcome) for outcome in batch.outcomes] == [Failed, Failed]


@pytest_twisted.ensureDeferred
async def test_a_malformed_or_unsigned_request_is_refused_with_its_status_and_code(
    s: Setup,
) -> None:
    bad = await s.run(s.client.schedule(b'{"task_id": "nope"}', s.agent_id))
    assert isinstance(bad, Refused) and (bad.status, bad.code) == (400, "invalid_request")
    unsigned = AgentClient(URL, s.http, s.clock)  # no signer: the agent says no
    refused = await s.run(unsigned.schedule(encoded()[1], None))
    assert isinstance(refused, Refused) and refused.status == 401
    assert refused.code is not None
    # Signed for another identity: the agent refuses it as not addressed to it.
    other = await s.run(s.client.unschedule(uuid.uuid4(), uuid.uuid4()))
    assert isinstance(other, Refused) and other.status == 401


@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
@pytest_twisted.ensureDeferred
async def test_an_agent_down_busy_or_slow_is_a_failure_to_retry(s: Setup, status: int) -> None:
    s.front.answer = (status, b'{"error": {"code": "down", "message": "down"}}')
    outcome = await s.run(s.client.schedule(encoded()[1], s.agent_id))
    assert isinstance(outcome, Failed) and str(status) in outcome.reason
    listed = await s.run(s.client.list_tasks(s.agent_id, 4096))
    assert isinstance(listed, Failed)


@pytest_twisted.ensureDeferred
async def test_an_answer_from_another_identity_or_not_ours_is_a_failure(s: Setup) -> None:
    s.front.answer = (200, json.dumps({"agent_id": str(uuid.uuid4())}).encode())
    other = await s.run(s.client.unschedule(uuid.uuid4(), s.agent_id))
    assert isinstance(other, Failed) and "answered as" in other.reason
    s.front.answer = (200, b"<html>hello</html>")
    assert isinstance(await s.run(s.client.unschedule(uuid.uuid4(), s.agent_id)), Failed)
    s.front.answer = (200, json.dumps({"agent_id": str(s.agent_id), "results": []}).encode())
    batch = await s.run(s.client.schedule_batch([encoded()], s.agent_id))
    assert isinstance(batch, Failed) and "every task" in batch.reason


@pytest_twisted.ensureDeferred
async def test_an_answer_over_the_bound_is_a_failure_and_unread(s: Setup) -> None:
    for _ in range(3):
        await s.run(s.client.schedule(encoded()[1], s.agent_id))
    listed = await s.run(s.client.list_tasks(s.agent_id, 64))
    assert isinstance(listed, Failed) and "AnswerTooLarge" in listed.reason


@pytest_twisted.ensureDeferred
async def test_an_agent_that_never_answers_times_out_but_a_cancel_is_a_cancel(s: Setup) -> None:
    s.front.hang = True
    d = Deferred.fromCoroutine(s.client.schedule(encoded()[1], s.agent_id))
    s.http.flush()
    s.clock.advance(10)  # REQUEST_TIMEOUT
    outcome = await d
    assert isinstance(outcome, Failed) and "ResponseNeverReceived" in outcome.reason
    # Stopping the dispatcher cancels what it awaits: no outcome to act on (and in a
    # loop of requests, no next one).
    d = Deferred.fromCoroutine(s.client.schedule(encoded()[1], s.agent_id))
    s.http.flush()
    d.cancel()
    with pytest.raises(CancelledError):
        await d
