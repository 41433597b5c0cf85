"""Several replicas of one server for agent tests: the server's real Klein app behind
StubTreq, one app per replica on one shared MemoryStore (one database), each of which
can refuse connections, answer 503 or any status, hang, answer late, or store and lose
its answer; and an enrolled agent's client and reporter listing them."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from taskscheduler.agent.reporter import Reporter
from taskscheduler.agent.server_client import ServerClient
from taskscheduler.agent.spool import Spool, encode_result
from taskscheduler.auth import AGENT_PREFIX, JOIN_PREFIX, TokenFile, hash_token, new_token
from taskscheduler.protocol import RunResult
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.records import AuditEvent
from taskscheduler.signing import public_key_text
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, fired, result, spec

AGENT_ID = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")
TASK = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")
AGENT_URL = "http://agent.test:8081"
CREDENTIAL = new_token(AGENT_PREFIX)
A, B, C = "http://a.test:8080", "http://b.test:8080", "http://c.test:8080"
#: A day after the anchor: every result below ran in the server's past.
A_DAY_LATER = ANCHOR_SECONDS + 86_400
#: The issue's bound: an agent is on another replica within 5 s of trouble.
FIVE_SECONDS = 5.0


def now(coroutine: Any) -> Any:
    """The result of a store call (the MemoryStore answers at once)."""
    return fired(Deferred.fromCoroutine(coroutine))


class Replica(Resource):
    """One replica's site: the server's app, or down (503), or hanging, or answering a
    status of its own, or storing a request and then losing its answer (a replica that
    dies between its commit and its answer). It records the results sent to it."""

    isLeaf = True

    def __init__(self, inner: Any, clock: Clock) -> None:
        super().__init__()
        self.inner = inner
        self._clock = clock
        #: Seconds before each answer (an overloaded replica), 0 for at once.
        self.slow = 0.0
        #: Requests worked on after their agent stopped waiting (wasted work).
        self.abandoned = 0
        self.down = False
        self.hang = False
        self.lose_answers = False
        self.answer: tuple[int, bytes] | None = None
        self.requests: list[str] = []  # each request's path
        self.results: list[str] = []  # the scheduled_at of each result sent here
        self.held: list[Any] = []

    def render(self, request: Any) -> Any:
        raw = request.content.read()
        request.content.seek(0)
        self.requests.append(request.path.decode())
        if request.path.endswith(b"/complete"):
            self.results.append(json.loads(raw)["scheduled_at"])
        elif request.path.endswith(b"/results"):
            self.results += [item["scheduled_at"] for item in json.loads(raw)["results"]]
        if self.answer is not None:
            request.setResponseCode(self.answer[0])
            return self.answer[1]
        if self.down:
            request.setResponseCode(503)
            request.setHeader(b"Content-Type", b"text/html")
            return b"<html>503 Service Unavailable</html>"
        if self.lose_answers:
            # Stored (the MemoryStore answers at once), but the answer never leaves.
            request.write = request.finish = lambda *_: None
            self.inner.render(request)
            self.held.append(request)
            return NOT_DONE_YET
        if self.hang:
            self.held.append(request)
            return NOT_DONE_YET
        if self.slow:
            gone: list[bool] = []
            request.notifyFinish().addErrback(lambda _: gone.append(True))
            self._clock.callLater(self.slow, self._answer_late, request, raw, gone)
            return NOT_DONE_YET
        return self.inner.render(request)

    def _answer_late(self, request: Any, raw: bytes, gone: list[bool]) -> None:
        # The work is done whether or not the agent still waits, as a real server's is.
        if gone:
            self.abandoned += 1
            request.content = io.BytesIO(raw)  # closed with the connection
            request.write = request.finish = lambda *_: None
        body = self.inner.render(request)
        if body is not NOT_DONE_YET:
            request.write(body)
            request.finish()


class Replicas:
    """treq to several replicas of one server on one database: the host of each URL picks
    its replica; a host in ``refused`` refuses connections."""

    def __init__(self, clock: Clock, store: MemoryStore, urls: Sequence[str], join: str) -> None:
        joins = TokenFile.from_env_value(f"fleet {hash_token(join)}")
        self.server_key = Ed25519PrivateKey.generate()
        self.sites: dict[str, Replica] = {}
        self._stubs: dict[str, Any] = {}
        for url in urls:
            api = ServerAPI(
                store,
                clock,
                ServerAccess(store, clock, None, joins),
                server_public_key=public_key_text(self.server_key.public_key()),
            )
            host = urlsplit(url).netloc
            self.sites[url] = Replica(api.resource(), clock)
            self._stubs[host] = StubTreq(self.sites[url])
        self.refused: set[str] = set()
        #: The base URL of each request made, in order.
        self.asked: list[str] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        parts = urlsplit(url)
        base = f"{parts.scheme}://{parts.netloc}"
        self.asked.append(base)
        if base in self.refused:
            return Deferred.fromCoroutine(_refuse())
        return self._stubs[parts.netloc].request(method, url, **kwargs)

    def flush(self) -> None:
        for stub in self._stubs.values():
            stub.flush()


async def _refuse() -> None:
    raise ConnectionRefusedError("connection refused")


class Setup:
    """An enrolled agent's client and reporter, with the replicas ``urls`` in its list."""

    def __init__(self, tmp_path: Path, urls: Sequence[str] = (A, B)) -> None:
        self.clock = Clock()
        self.clock.advance(A_DAY_LATER)
        self.store = MemoryStore()
        self.join = new_token(JOIN_PREFIX)
        self.http = Replicas(self.clock, self.store, urls, self.join)
        self.spool = Spool(tmp_path / "spool")
        self.spool.load()
        self.client = ServerClient(self.http, self.clock, urls, credential=CREDENTIAL)
        self.logged: list[dict[str, Any]] = []
        self.client.servers.log = Logger(observer=self.logged.append)
        self.reporter = Reporter(self.spool, self.client, self.clock, jitter=lambda: 1.0)
        self.spool.on_ready = self.reporter.wake
        moment = utc_now_from(self.clock.seconds())
        now(self.store.set_fleet([AGENT_URL]))
        audit = AuditEvent(moment, "join:test", "agent.enrolled", str(AGENT_ID), "")
        now(self.store.enrol_agent(AGENT_ID, AGENT_URL, hash_token(CREDENTIAL), moment, audit))
        now(self.store.create_task(spec(task_id=TASK), ANCHOR))

    def site(self, url: str) -> Replica:
        return self.http.sites[url]

    def spool_results(self, *ks: int) -> None:
        for k in ks:
            assert fired(self.spool.add(result(TASK, k, AGENT_ID))) is True

    def settle(self, seconds: float = 0) -> None:
        self.clock.advance(seconds)
        for _ in range(4):
            self.http.flush()
            self.clock.advance(0)

    def stored(self) -> list[RunResult]:
        return [r for e in now(self.store.list_executions(TASK, 1000)) for r in e.results]

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.logged if e["log_level"].name == "warn"]

    async def run(self, coroutine: Any) -> Any:
        d = Deferred.fromCoroutine(coroutine)
        self.settle()
        assert d.called, "no answer"
        return await d


def instant(k: int) -> str:
    """The ``scheduled_at`` of result ``k`` as it goes on the wire."""
    return str(json.loads(encode_result(result(TASK, k, AGENT_ID)))["scheduled_at"])
