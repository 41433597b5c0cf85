"""The agent's client of its server, against the server's real Klein app behind StubTreq:
enrolment, one result, a batch; each answer read into the outcome the enroller and the
reporter act on."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from taskscheduler.agent.server_client import (
    Acknowledged,
    BatchAnswered,
    Enrolled,
    Refused,
    RetryLater,
    SendSingly,
    ServerClient,
    TooLarge,
)
from taskscheduler.agent.spool import encode_result
from taskscheduler.auth import JOIN_PREFIX, TokenFile, hash_token, new_token
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.signing import public_key_text
from taskscheduler.web.errors import error_body, too_large
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, SERVER, result, spec

AGENT_URL = "http://agent.test:8081"
TASK = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")


class Front(Resource):
    """The server's app, behind a body limit, or an answer of its own (a proxy)."""

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.max_body_bytes: int | None = None
        self.answer: tuple[int, bytes] | None = None

    def render(self, request: Any) -> Any:
        if self.answer is not None:
            status, body = self.answer
            request.setResponseCode(status)
            return body
        size = len(request.content.read())
        request.content.seek(0)
        if self.max_body_bytes is not None and size > self.max_body_bytes:
            request.setResponseCode(413)
            return error_body(too_large(self.max_body_bytes))
        return self.inner.render(request)


class Setup:
    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(ANCHOR_SECONDS + 3600)
        self.join = new_token(JOIN_PREFIX)
        self.store = MemoryStore()
        self.server_key = Ed25519PrivateKey.generate().public_key()
        joins = TokenFile.from_env_value(f"fleet {hash_token(self.join)}")
        api = ServerAPI(
            self.store,
            self.clock,
            ServerAccess(self.store, self.clock, None, joins),
            server_public_key=public_key_text(self.server_key),
        )
        self.front = Front(api.resource())
        self.http = StubTreq(self.front)
        self.client = ServerClient(self.http, self.clock, SERVER)
        self.agent_id = uuid.uuid4()

    async def run(self, coroutine: Any) -> Any:
        d = Deferred.fromCoroutine(coroutine)
        for _ in range(5):
            self.http.flush()
            self.clock.advance(0)
        assert d.called, "no answer"
        return await d

    async def enrolled(self) -> None:
        await self.store.set_fleet([AGENT_URL])
        enrolled = await self.run(self.client.enrol(self.agent_id, AGENT_URL, self.join))
        assert isinstance(enrolled, Enrolled)
        self.client.credential = enrolled.credential
        await self.store.create_task(spec(task_id=TASK), ANCHOR)

    def body(self, k: int, stdout: bytes = b"hi\n", task_id: uuid.UUID = TASK) -> bytes:
        return encode_result(result(task_id, k, self.agent_id, stdout=stdout))


@pytest.fixture
def s() -> Setup:
    return Setup()


@pytest_twisted.ensureDeferred
async def test_enrolment_gives_a_credential_and_the_servers_key(s: Setup) -> None:
    await s.store.set_fleet([AGENT_URL])
    enrolled = await s.run(s.client.enrol(s.agent_id, AGENT_URL, s.join))
    assert isinstance(enrolled, Enrolled)
    assert public_key_text(enrolled.server_key) == public_key_text(s.server_key)
    record = await s.store.agent_by_credential(hash_token(enrolled.credential))
    assert record is not None and record.agent_id == s.agent_id
    assert s.client.credential is None, "the enroller decides when the client uses it"


@pytest_twisted.ensureDeferred
async def test_enrolment_refused_or_not_answered(s: Setup) -> None:
    await s.store.set_fleet([AGENT_URL])
    wrong = await s.run(s.client.enrol(s.agent_id, AGENT_URL, new_token(JOIN_PREFIX)))
    assert isinstance(wrong, Refused) and "join secret refused (401" in wrong.reason
    assert "--join-secret-file" in wrong.reason
    assert isinstance(await s.run(s.client.enrol(s.agent_id, AGENT_URL, s.join)), Enrolled)
    taken = await s.run(s.client.enrol(uuid.uuid4(), AGENT_URL, s.join))
    assert isinstance(taken, Refused) and "409" in taken.reason
    s.front.answer = (502, b"<html>bad gateway</html>")
    assert isinstance(await s.run(s.client.enrol(s.agent_id, AGENT_URL, s.join)), RetryLater)
    s.front.answer = (201, json.dumps({"credential": "nope", "server_public_key": ""}).encode())
    bogus = await s.run(s.client.enrol(s.agent_id, AGENT_URL, s.join))
    assert isinstance(bogus, Refused) and "no valid credential" in bogus.reason


@pytest_twisted.ensureDeferred
async def test_a_result_is_acknowledged_then_a_duplicate(s: Setup) -> None:
    await s.enrolled()
    assert await s.run(s.client.report(TASK, s.body(1))) == Acknowledged("stored")
    assert await s.run(s.client.report(TASK, s.body(1))) == Acknowledged("duplicate")


@pytest_twisted.ensureDeferred
async def test_the_servers_verdicts_are_refusals_and_the_rest_retry_later(s: Setup) -> None:
    await s.enrolled()
    await s.run(s.client.report(TASK, s.body(1)))
    conflict = await s.run(s.client.report(TASK, s.body(1, stdout=b"another\n")))
    assert isinstance(conflict, Refused) and conflict.reason.startswith("409 conflict")
    early = await s.run(s.client.report(TASK, s.body(400)))  # 4000 s after the anchor
    assert early == RetryLater(early.reason, foreign=False) and "too_early" in early.reason
    s.client.credential = "tsa_" + "x" * 43  # unknown: like a server down, not a verdict
    unknown = await s.run(s.client.report(TASK, s.body(2)))
    assert isinstance(unknown, RetryLater) and not unknown.foreign


@pytest.mark.parametrize(
    ("status", "body", "foreign"),
    [
        (404, b"<html>404 Not Found</html>", True),
        (409, b"conflict", True),
        (502, b'{"error": {"code": "conflict", "message": "our code, not our status"}}', False),
        (503, b"", False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_an_answer_no_server_of_ours_gives_is_foreign(
    s: Setup, status: int, body: bytes, foreign: bool
) -> None:
    await s.enrolled()
    s.front.answer = (status, body)
    outcome = await s.run(s.client.report(TASK, s.body(1)))
    assert outcome == RetryLater(outcome.reason, foreign=foreign)
    assert str(status) in outcome.reason


@pytest_twisted.ensureDeferred
async def test_a_body_over_the_servers_limit_is_too_large_with_the_limit(s: Setup) -> None:
    await s.enrolled()
    s.front.max_body_bytes = 1000
    body = s.body(1, stdout=b"x" * 5000)
    assert await s.run(s.client.report(TASK, body)) == TooLarge(
        1000, len(body), "413 payload_too_large: the request body is larger than 1000 bytes"
    )
    batch = await s.run(s.client.report_batch([body, s.body(2)]))
    assert isinstance(batch, TooLarge) and batch.limit == 1000 and batch.sent > len(body)
    s.front.max_body_bytes = None
    s.front.answer = (413, b"<html>too large</html>")
    assert isinstance(await s.run(s.client.report_batch([body, s.body(2)])), SendSingly)
    html = await s.run(s.client.report(TASK, body))
    assert isinstance(html, RetryLater) and html.foreign


@pytest_twisted.ensureDeferred
async def test_a_batch_has_a_verdict_per_result_or_is_sent_singly(s: Setup) -> None:
    await s.enrolled()
    await s.run(s.client.report(TASK, s.body(1)))
    answer = await s.run(
        s.client.report_batch(
            [
                s.body(1, stdout=b"another\n"),  # conflict
                s.body(2, task_id=uuid.uuid4()),  # not assigned
                s.body(3),
                s.body(400),  # too early
            ]
        )
    )
    assert answer == BatchAnswered(
        [
            Refused("conflict"),
            Refused("forbidden"),
            Acknowledged("stored"),
            RetryLater("too_early"),
        ]
    )
    malformed = await s.run(s.client.report_batch([s.body(4), b'{"task_id": "nope"}']))
    assert isinstance(malformed, SendSingly) and "invalid_request" in malformed.reason
    s.front.answer = (200, json.dumps({"results": [{"status": "stored"}]}).encode())
    short = await s.run(s.client.report_batch([s.body(5), s.body(6)]))
    assert isinstance(short, RetryLater)


def test_the_client_sends_its_credential_once_it_has_one(tmp_path: Path) -> None:
    seen: list[Any] = []

    class Recorder(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            seen.append(request.getHeader(b"authorization"))
            return b'{"status": "stored"}'

    clock = Clock()
    http = StubTreq(Recorder())
    client = ServerClient(http, clock, SERVER)
    for credential in (None, "tsa_" + "c" * 43):
        client.credential = credential
        Deferred.fromCoroutine(client.report(TASK, b"{}"))
        http.flush()
    assert seen == [None, b"Bearer tsa_" + b"c" * 43]
