"""The reporter, against the server's real Klein app behind StubTreq (on a MemoryStore),
a front in between to take it down, hang it, or answer as a proxy would: single vs batch,
acknowledgement, back-off, refusals; which answers are verdicts; trimming to fit the
server's body limit."""

from __future__ import annotations

import dataclasses
import itertools
import json
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from taskscheduler.agent.identity import load_or_create_agent_id
from taskscheduler.agent.reporter import INLINE_READ_BYTES, Reporter, shrink_to_fit
from taskscheduler.agent.server_client import ServerClient
from taskscheduler.agent.spool import Spool
from taskscheduler.auth import AGENT_PREFIX, hash_token, new_token
from taskscheduler.protocol import MAX_BATCH, Output, ResultStatus, RunResult, parse_result
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.records import AuditEvent, RecordOutcome
from taskscheduler.web.errors import error_body, too_large
from tests.unit.agent_fakes import (
    ANCHOR,
    ANCHOR_SECONDS,
    SERVER,
    Agent,
    FakeServer,
    UnreachableHttp,
    fired,
    result,
    spec,
)

AGENT_ID = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")
TASK = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")


AGENT_URL = "http://agent.test:8081"
CREDENTIAL = new_token(AGENT_PREFIX)
#: A day after the anchor: every result of the tests below ran in the server's past.
A_DAY_LATER = ANCHOR_SECONDS + 86_400


def now(coroutine: Any) -> Any:
    """The result of a store call (the MemoryStore answers at once)."""
    return fired(Deferred.fromCoroutine(coroutine))


class Setup:
    """The reporter, sending to the server's real Klein app (on a MemoryStore) behind a
    :class:`Front` that can take it down; the agent is enrolled, ``TASK`` assigned to it."""

    def __init__(self, tmp_path: Path, **options: Any) -> None:
        self.clock = Clock()
        self.clock.advance(A_DAY_LATER)
        self.store = MemoryStore()
        self.server = Front(
            ServerAPI(
                self.store, self.clock, ServerAccess(self.store, self.clock, None, None)
            ).resource()
        )
        self.http = UnreachableHttp(StubTreq(self.server))
        self.spool = Spool(tmp_path / "spool")
        self.spool.load()
        timeout = {k: options.pop(k) for k in ("timeout",) if k in options}
        self.client = ServerClient(self.http, self.clock, SERVER, credential=CREDENTIAL, **timeout)
        self.reporter = Reporter(self.spool, self.client, self.clock, jitter=lambda: 1.0, **options)
        self.tasks: list[uuid.UUID] = []
        moment = utc_now_from(self.clock.seconds())
        now(self.store.set_fleet([AGENT_URL]))
        audit = AuditEvent(moment, "join:test", "agent.enrolled", str(AGENT_ID), "")
        now(self.store.enrol_agent(AGENT_ID, AGENT_URL, hash_token(CREDENTIAL), moment, audit))
        self.task(TASK)

    def task(self, task_id: uuid.UUID | None = None) -> uuid.UUID:
        """A task of the agent's, every 10 s from the anchor."""
        created = now(self.store.create_task(spec(task_id=task_id or uuid.uuid4()), ANCHOR))
        self.tasks.append(created.task_id)
        return created.task_id  # type: ignore[no-any-return]

    def record(self, item: RunResult) -> None:
        """A result the server already has."""
        assert now(self.store.record_results([item], ANCHOR)) == [RecordOutcome.STORED]

    def delete(self, task_id: uuid.UUID) -> None:
        """The task is deleted at its anchor: every result of it comes too late."""
        audit = AuditEvent(ANCHOR, "operator:test", "task.deleted", str(task_id), "")
        assert now(self.store.delete_task(task_id, ANCHOR, audit)) is not None

    def stored(self) -> list[RunResult]:
        executions = [e for t in self.tasks for e in now(self.store.list_executions(t, 10_000))]
        return [r for e in executions for r in e.results]

    def spool_results(
        self, count: int, task_id: uuid.UUID = TASK, first: int = 1, agent_id: uuid.UUID = AGENT_ID
    ) -> None:
        for k in range(first, first + count):
            assert fired(self.spool.add(result(task_id, k, agent_id))) is True

    def settle(self, seconds: float = 0) -> None:
        self.clock.advance(seconds)
        for _ in range(3):
            self.http.flush()
            self.clock.advance(0)

    def files(self) -> list[Path]:
        return sorted(self.spool.directory.glob("*.json"))


def test_one_waiting_result_goes_alone_and_leaves_the_spool_once_stored(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("single", 1)]
    assert len(s.stored()) == 1
    assert len(s.spool) == 0 and s.files() == []
    assert s.reporter.acknowledged == 1


def test_many_waiting_results_go_in_batches(tmp_path: Path) -> None:
    s = Setup(tmp_path, batch_size=3)
    s.spool_results(7)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("batch", 3), ("batch", 3), ("single", 1)]
    assert len(s.stored()) == 7
    assert s.files() == []


def test_a_backlog_goes_in_batches_as_large_as_the_server_takes(tmp_path: Path) -> None:
    # A busy agent answers slowly: every round trip must carry as much as it may.
    s = Setup(tmp_path)
    s.spool_results(MAX_BATCH + 500)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("batch", MAX_BATCH), ("batch", 500)]
    assert len(s.spool) == 0


def test_a_batch_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.spool_results(4)
    size = next(iter(s.spool)).size
    s.reporter = Reporter(s.spool, s.client, s.clock, batch_bytes=2 * size + 10)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("batch", 2), ("batch", 2)]


def test_a_duplicate_counts_as_acknowledged(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.record(result(TASK, 1, AGENT_ID))
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert len(s.spool) == 0
    assert s.reporter.rejected == 0


def test_a_server_answering_503_is_retried_with_exponential_back_off(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.server.down = True
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert len(s.server.requests) == 1
    # Jitter pinned to its top: 1, 2, 4, 8 s between attempts; nothing in between.
    for delay in (1, 2, 4, 8):
        s.settle(delay - 0.01)
        before = len(s.server.requests)
        s.reporter.wake()  # a new result does not bypass the back-off
        s.settle(0)
        assert len(s.server.requests) == before
        s.settle(0.01)
        assert len(s.server.requests) == before + 1
    assert len(s.spool) == 1, "nothing is lost while the server is down"
    s.server.down = False
    s.settle(16)
    assert len(s.spool) == 0
    assert len(s.stored()) == 1


def test_back_off_is_capped_and_jittered(tmp_path: Path) -> None:
    draws = iter([0.0, 0.5, 1.0] + [0.0] * 20)
    s = Setup(tmp_path)
    s.reporter = Reporter(s.spool, s.client, s.clock, jitter=lambda: next(draws))
    s.server.down = True
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    sent_at = [s.clock.seconds()]
    while len(sent_at) < 8:
        s.settle(0.5)
        if len(s.server.requests) > len(sent_at):
            sent_at.append(s.clock.seconds())
    gaps = [later - earlier for earlier, later in itertools.pairwise(sent_at)]
    # Half the ceiling plus the jitter's share of the other half: 1 s at the bottom (0.5),
    # 2 s halfway (1.5), 4 s at the top (4); then at the bottom, up to half the 30 s cap.
    assert gaps == [0.5, 1.5, 4.0, 4.0, 8.0, 15.0, 15.0]


def test_a_connection_error_is_retried_and_loses_nothing(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.http.unreachable = True
    s.spool_results(3)
    s.reporter.start()
    s.settle()
    s.settle(1)
    s.settle(2)
    assert s.http.attempts == 3
    assert len(s.spool) == 3
    s.http.unreachable = False
    s.settle(4)
    assert len(s.stored()) == 3 and len(s.spool) == 0


def test_a_server_that_never_answers_times_out_and_is_retried(tmp_path: Path) -> None:
    s = Setup(tmp_path, timeout=10)
    s.server.hang = True
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    s.settle(9.9)
    assert len(s.server.requests) == 1
    s.server.hang = False
    s.settle(0.1)  # the request times out; back-off of 1 s
    s.settle(1)
    assert len(s.server.requests) == 2
    assert len(s.spool) == 0


def test_a_single_result_refused_for_good_is_dropped_and_counted(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.record(result(TASK, 1, AGENT_ID, stdout=b"another\n"))  # so this one conflicts
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("single", 1)]
    assert len(s.spool) == 0 and s.files() == []
    assert s.reporter.rejected == 1
    s.settle(60)
    assert len(s.server.requests) == 1, "a refused result is not retried"


def test_refused_items_of_a_batch_are_dropped_the_others_acknowledged(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    other = s.task()
    s.record(result(other, 1, AGENT_ID, stdout=b"another\n"))  # so this one conflicts
    s.spool_results(2)
    s.spool_results(1, task_id=other)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("batch", 3)]
    assert len(s.spool) == 0
    assert s.reporter.rejected == 1
    assert sorted(r.stdout.data for r in s.stored() if r.task_id == other) == [b"another\n"]
    assert len([r for r in s.stored() if r.task_id == TASK]) == 2


def test_results_of_a_task_deleted_before_they_were_due_are_dropped(tmp_path: Path) -> None:
    single = Setup(tmp_path / "single")
    single.delete(TASK)
    single.spool_results(1)
    single.reporter.start()
    single.settle()
    assert single.server.requests == [("single", 1)]
    assert len(single.spool) == 0 and single.reporter.rejected == 1

    s = Setup(tmp_path / "batch")
    s.delete(TASK)
    s.spool_results(2)
    s.spool_results(1, task_id=s.task())
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("batch", 3)]
    assert len(s.spool) == 0 and s.reporter.rejected == 2
    s.settle(60)
    assert len(s.server.requests) == 1, "nothing refused is sent again"


def test_a_batch_refused_whole_is_sent_singly_to_isolate_the_bad_result(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.spool_results(3)
    # Spoiled on disk: the server refuses the result, and so the whole batch.
    bad = sorted(s.spool, key=lambda e: e.key[1])[1]
    body = json.loads(bad.path.read_bytes())
    body["server_id"] = "not-a-uuid"
    bad.path.write_bytes(json.dumps(body).encode())
    s.spool = Spool(s.spool.directory)
    s.spool.load()
    s.reporter = Reporter(s.spool, s.client, s.clock)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("batch", 3), ("single", 1), ("single", 1), ("single", 1)]
    assert len(s.stored()) == 2
    assert len(s.spool) == 0
    assert s.reporter.rejected == 1


def test_an_unreadable_spool_file_is_dropped_without_sending(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.spool_results(1)
    [entry] = list(s.spool)
    entry.path.write_bytes(b"\x00garbage")
    s.reporter.start()
    s.settle()
    assert s.server.requests == []
    assert s.reporter.rejected == 1
    assert len(s.spool) == 0


def test_stopping_keeps_the_unsent_results(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.server.hang = True
    s.spool_results(2)
    s.reporter.start()
    s.settle()
    s.reporter.stop()
    s.settle(120)
    assert len(s.server.requests) == 1
    assert len(s.spool) == 2 and len(s.files()) == 2


def test_stopping_while_backing_off_sends_nothing_more(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.server.down = True
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    s.settle(1)  # the first retry; the next is due in 2 s
    assert len(s.server.requests) == 2
    s.reporter.stop()
    s.reporter.wake()
    s.server.down = False
    s.settle(120)
    assert len(s.server.requests) == 2, "no request after stop"
    assert len(s.spool) == 1


def test_a_full_spool_drops_new_results_and_counts_them(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.spool_results(1)
    size = s.spool.bytes
    capped = Spool(tmp_path / "capped", max_bytes=2 * size + size // 2)
    capped.load()
    assert fired(capped.add(result(TASK, 1, AGENT_ID))) is True
    assert fired(capped.add(result(TASK, 2, AGENT_ID))) is True
    assert fired(capped.add(result(TASK, 3, AGENT_ID))) is False
    assert capped.dropped == 1
    assert len(capped) == 2 and len(list(capped.directory.glob("*.json"))) == 2


def test_a_new_result_is_reported_at_once(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    agent = Agent(tmp_path / "data", clock, FakeServer())
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.advance_to(10)
    agent.advance_to(12)
    agent.runner.finish(agent.runner.runs[0], b"hello\n")
    agent.settle(0)  # no time passes
    [stored] = agent.server.stored.values()
    assert stored.stdout.data == b"hello\n"
    assert stored.status is ResultStatus.SUCCEEDED
    assert agent.server.requests == [("single", 1)]


def test_health_shows_dropped_and_refused_results(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    server = FakeServer()
    agent = Agent(tmp_path / "data", clock, server, spool_max_bytes=1)
    task = spec()
    agent.service.scheduler.schedule(task)  # type: ignore[union-attr]
    agent.advance_to(10)
    agent.runner.finish(agent.runner.runs[0])
    agent.settle()
    assert server.stored == {}
    counters = agent.service.api._counters()  # type: ignore[union-attr]
    assert counters["dropped"] == 1
    assert counters["spooled"] == 0


def test_a_batch_answer_that_does_not_match_the_batch_is_retried(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.spool_results(3)
    s.server.garbled = True
    s.reporter.start()
    s.settle()
    assert len(s.spool) == 3, "an answer that is not one per result acknowledges nothing"
    assert s.reporter.acknowledged == 0
    s.server.garbled = False
    s.settle(1)
    assert len(s.spool) == 0 and len(s.stored()) == 3


def test_results_spooled_while_a_send_is_under_way_go_in_the_same_pass(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.server.hang = True
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("single", 1)]
    s.spool_results(2, first=2)
    s.reporter.wake()
    s.server.hang = False
    s.server.release()
    s.settle()
    assert s.server.requests == [("single", 1), ("batch", 2)]
    assert len(s.spool) == 0


class HeldThread:
    """Jobs sent off the reactor run only when released: a busy agent's thread pool."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, Deferred[None]]] = []

    def __call__(self, job: Any) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.jobs.append((job, done))
        return done

    def release(self) -> None:
        jobs, self.jobs = self.jobs, []
        for job, done in jobs:
            job()
            done.callback(None)


def test_fresh_results_are_read_on_the_reactor_and_a_backlog_off_it(tmp_path: Path) -> None:
    """A few small results wait for no thread (each hop costs a busy agent tens of ms);
    past INLINE_READ_BYTES they are read off the reactor."""
    s = Setup(tmp_path)
    thread = HeldThread()
    spool = Spool(tmp_path / "held", run_in_thread=thread)
    spool.load()
    reporter = Reporter(spool, s.client, s.clock, jitter=lambda: 1.0)
    for k in range(1, 4):
        assert fired(spool.add(result(TASK, k, AGENT_ID))) is True
    reporter.start()
    s.settle()
    assert s.server.requests == [("batch", 3)] and thread.jobs == []
    assert len(spool) == 0
    big = b"x" * (INLINE_READ_BYTES // 2)
    for k in range(4, 7):
        bulky = dataclasses.replace(result(TASK, k, AGENT_ID), stdout=Output(big, len(big), False))
        assert fired(spool.add(bulky)) is True
    reporter.wake()
    s.settle()
    assert s.server.requests == [("batch", 3)] and len(thread.jobs) == 1
    thread.release()
    s.settle()
    assert s.server.requests == [("batch", 3), ("batch", 3)]
    assert len(spool) == 0 and reporter.acknowledged == 6


def test_results_carry_the_agents_credential(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert s.server.authorizations == [f"Bearer {CREDENTIAL}"]
    assert s.files() == []


def test_a_refused_credential_keeps_the_results_and_backs_off(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.client.credential = new_token(AGENT_PREFIX)  # revoked, or not enrolled yet
    s.spool_results(3)
    s.reporter.start()
    s.settle()
    assert len(s.files()) == 3 and s.reporter.rejected == 0
    tried = len(s.server.requests)
    s.settle(0.5)
    assert len(s.server.requests) == tried, "backing off"
    s.client.credential = CREDENTIAL
    s.settle(2)
    assert s.files() == []


def test_a_forbidden_result_is_dropped_and_a_forbidden_batch_is_sent_one_by_one(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    s.spool_results(3, agent_id=uuid.uuid4())  # not as itself: 403 impersonation
    s.reporter.start()
    s.settle()
    assert [kind for kind, _ in s.server.requests] == ["batch", "single", "single", "single"]
    assert s.files() == [] and s.reporter.rejected == 3


# -- against the real server: which answers are verdicts ---------------------------------------


class Front(Resource):
    """What stands between the agent and the real server's API: nothing, a body limit
    answered as the server's own site answers it, a proxy answering by itself, or a
    server down (503), hanging, or garbling its batch answers. It records each request."""

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.max_body_bytes: int | None = None
        self.proxy: tuple[int, bytes] | None = None  # (status, body): answer instead
        self.answers: list[int] = []
        self.requests: list[tuple[str, int]] = []  # ("single" | "batch", results)
        self.authorizations: list[str | None] = []
        self.down = False
        self.hang = False  # keep the request unanswered, in ``hanging``
        self.hanging: list[Any] = []
        self.garbled = False  # answer a batch with one answer too few, storing nothing

    def render(self, request: Any) -> Any:
        raw = request.content.read()
        request.content.seek(0)
        if request.path.endswith(b"/results"):
            self.requests.append(("batch", len(json.loads(raw)["results"])))
        else:
            self.requests.append(("single", 1))
        header = request.getHeader(b"authorization")
        self.authorizations.append(None if header is None else header.decode())
        if self.proxy is not None:
            status, body = self.proxy
            self.answers.append(status)
            request.setResponseCode(status)
            request.setHeader(b"Content-Type", b"text/html")
            return body
        if self.hang:
            self.hanging.append(request)
            return NOT_DONE_YET
        request.setHeader(b"Content-Type", b"application/json")
        if self.down:
            request.setResponseCode(503)
            return b'{"error": {"code": "database_unavailable", "message": "down"}}'
        if self.garbled:
            return b'{"results": [{"status": "stored"}]}'
        if self.max_body_bytes is not None and len(raw) > self.max_body_bytes:
            self.answers.append(413)
            request.setResponseCode(413)
            return error_body(too_large(self.max_body_bytes))
        self.answers.append(0)  # passed to the server
        return self.inner.render(request)

    def release(self) -> None:
        """Pass the hanging requests to the server at last."""
        self.hang = False
        hanging, self.hanging = self.hanging, []
        for request in hanging:
            self.answers.append(0)
            assert self.inner.render(request) is NOT_DONE_YET


class RealServer:
    """The agent's reporter, sending to the server's real Klein app (on a MemoryStore)."""

    def __init__(self, tmp_path: Path, server_url: str = SERVER) -> None:
        self.clock = Clock()
        # An hour after the anchor: the results (instants of the first hour) ran before
        # they are reported, as the server checks.
        self.clock.advance(ANCHOR_SECONDS + 3600)
        self.store = MemoryStore()
        self.front = Front(
            ServerAPI(
                self.store, self.clock, ServerAccess(self.store, self.clock, None, None)
            ).resource()
        )
        self.http = StubTreq(self.front)
        self.spool = Spool(tmp_path / "spool")
        self.spool.load()
        self.client = ServerClient(self.http, self.clock, server_url, credential=CREDENTIAL)
        self.reporter = Reporter(self.spool, self.client, self.clock, jitter=lambda: 1.0)
        self.spool.on_ready = self.reporter.wake  # as the agent's service wires it
        self.task = spec(task_id=TASK)

    async def start(self) -> None:
        now = utc_now_from(self.clock.seconds())
        await self.store.set_fleet([AGENT_URL])
        audit = AuditEvent(now, "join:test", "agent.enrolled", str(AGENT_ID), "")
        await self.store.enrol_agent(AGENT_ID, AGENT_URL, hash_token(CREDENTIAL), now, audit)
        await self.store.create_task(self.task, ANCHOR)

    def add(self, *results: RunResult) -> None:
        for item in results:
            assert fired(self.spool.add(item)) is True

    def settle(self, seconds: float = 0) -> None:
        self.clock.advance(seconds)
        for _ in range(5):
            self.http.flush()
            self.clock.advance(0)

    async def stored(self) -> dict[datetime, RunResult]:
        executions = await self.store.list_executions(TASK, 1000)
        return {r.scheduled_at: r for e in executions for r in e.results}


@pytest_twisted.async_fixture
async def real(tmp_path: Path) -> RealServer:
    s = RealServer(tmp_path)
    await s.start()
    return s


def loud(events: list[Any]) -> list[str]:
    return [formatEvent(e) for e in events if "no taskscheduler server gives" in formatEvent(e)]


@pytest_twisted.ensureDeferred
async def test_a_proxys_404_keeps_the_results_and_warns_loudly_once_a_minute(
    real: RealServer,
) -> None:
    real.front.proxy = (404, b"<html><body>404 Not Found</body></html>")
    real.add(result(TASK, 1, AGENT_ID))
    with capturedLogs() as events:
        real.reporter.start()
        real.settle()
        for _ in range(20):  # five minutes of retries, 15 to 30 s apart once backed off
            real.settle(15)
    assert len(real.spool) == 1 and real.reporter.rejected == 0
    attempts = len(real.front.answers)
    warnings = loud(events)
    assert attempts >= 12
    assert 1 <= len(warnings) <= 6, warnings  # at most one a minute, not one an attempt
    assert "404" in warnings[0] and "--server URL" in warnings[0]
    real.front.proxy = None
    real.settle(30)
    assert len(real.spool) == 0 and len(await real.stored()) == 1


@pytest_twisted.ensureDeferred
async def test_a_wrong_path_prefix_is_retried_not_dropped(tmp_path: Path) -> None:
    """Our own server's 404 ``not_found`` says the route is wrong, not the result."""
    s = RealServer(tmp_path, server_url=SERVER + "/scheduler")
    await s.start()
    s.add(result(TASK, 1, AGENT_ID))
    s.add(result(TASK, 2, AGENT_ID), result(TASK, 3, AGENT_ID))  # a batch, then singles
    with capturedLogs() as events:
        s.reporter.start()
        s.settle()
        s.settle(1)
    assert len(s.spool) == 3 and s.reporter.rejected == 0
    assert loud(events) and "not_found" in loud(events)[0]


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (413, b"<html><body>413 Request Entity Too Large</body></html>"),
        (400, b'{"error": "blocked by policy"}'),
        (403, b'{"message": "forbidden by the firewall"}'),
        (409, b"conflict"),
        (502, b'{"error": {"code": "conflict", "message": "our code, not our status"}}'),
    ],
    ids=["html-413", "400-not-ours", "403-not-ours", "409-not-json", "code-with-wrong-status"],
)
@pytest_twisted.ensureDeferred
async def test_an_answer_that_is_not_a_verdict_of_ours_keeps_the_result(
    real: RealServer, status: int, body: bytes
) -> None:
    real.front.proxy = (status, body)
    real.add(result(TASK, 1, AGENT_ID))
    real.reporter.start()
    real.settle()
    real.settle(1)
    assert len(real.front.answers) == 2, "retried with back-off"
    assert len(real.spool) == 1 and real.reporter.rejected == 0
    real.front.proxy = None
    real.settle(2)
    assert len(real.spool) == 0 and len(await real.stored()) == 1


def noisy_output(size: int) -> bytes:
    """Text that JSON escapes heavily, multibyte characters, and a byte that is not UTF-8."""
    unit = 'line \u00e9t\u00e9 \u2603\t\x01 "quoted" \\\n'.encode()
    return (unit * (size // len(unit) + 1))[:size]


@pytest_twisted.ensureDeferred
async def test_a_result_over_the_servers_limit_is_trimmed_and_stored_not_dropped(
    real: RealServer,
) -> None:
    real.front.max_body_bytes = 8000
    big = result(TASK, 1, AGENT_ID, stdout=b"HEAD" + noisy_output(40_000) + b"TAIL")
    real.add(big)
    real.reporter.start()
    real.settle()
    [stored] = (await real.stored()).values()
    assert real.front.answers == [413, 0]
    assert real.reporter.rejected == 0 and real.reporter.trimmed == 1
    assert real.reporter.max_body_bytes == 8000
    assert len(real.spool) == 0
    assert stored.stdout.truncated and stored.stdout.size == big.stdout.size
    assert stored.stdout.data.startswith(b"HEAD") and stored.stdout.data.endswith(b"TAIL")
    assert 4000 < len(stored.stdout.data) < 8000
    assert stored.stdout.data.decode("utf-8")  # cut between characters: still text

    # The limit is known now: the next big result is trimmed before it is sent.
    real.add(result(TASK, 2, AGENT_ID, stdout=noisy_output(30_000)))
    real.settle()
    assert real.front.answers == [413, 0, 0]
    assert len(await real.stored()) == 2


@pytest_twisted.ensureDeferred
async def test_a_batch_over_the_limit_is_split_and_its_too_large_result_trimmed(
    real: RealServer,
) -> None:
    real.front.max_body_bytes = 6000
    small = [result(TASK, k, AGENT_ID, stdout=b"x" * 1500) for k in (1, 2, 3)]
    big = result(TASK, 4, AGENT_ID, stdout=b"y" * 20_000)
    real.add(*small, big)
    real.reporter.start()
    real.settle()
    stored = await real.stored()
    assert len(stored) == 4 and len(real.spool) == 0 and real.reporter.rejected == 0
    assert stored[big.scheduled_at].stdout.size == 20_000
    assert stored[big.scheduled_at].stdout.truncated
    assert [r.stdout for r in small] == [stored[r.scheduled_at].stdout for r in small]
    # Later batches are sized to the limit: no more 413s.
    before = real.front.answers.count(413)
    real.add(*[result(TASK, k, AGENT_ID, stdout=b"z" * 1500) for k in range(5, 12)])
    real.settle()
    assert real.front.answers.count(413) == before
    assert len(await real.stored()) == 11


@pytest_twisted.ensureDeferred
async def test_the_real_servers_verdicts_on_single_results_drop_them(real: RealServer) -> None:
    other_agent = uuid.UUID("cccccccc-0000-4000-8000-000000000003")
    unknown = uuid.uuid4()
    first = result(TASK, 1, AGENT_ID)
    assert await real.store.record_results([first], ANCHOR) == [RecordOutcome.STORED]
    verdicts = {
        "conflict": result(TASK, 1, AGENT_ID, stdout=b"another\n"),
        "misaligned": dataclasses.replace(
            result(TASK, 2, AGENT_ID), scheduled_at=ANCHOR + timedelta(seconds=3)
        ),
        "impersonation": result(TASK, 3, other_agent),
        "not_assigned": result(unknown, 1, AGENT_ID),
        "invalid_request": dataclasses.replace(
            result(TASK, 4, AGENT_ID), stdout=Output(b"x", 1, False), reason="r" * 600
        ),
    }
    with capturedLogs() as events:
        for label, item in verdicts.items():
            real.add(item)
            real.reporter.start()
            real.settle()
            assert len(real.spool) == 0, label
            real.reporter.stop()
    assert real.reporter.rejected == len(verdicts)
    dropped = [formatEvent(e) for e in events if "refused and dropped" in formatEvent(e)]
    assert [label for label in verdicts if any(label in line for line in dropped)] == list(verdicts)
    # A task deleted before the instant: 404 task_deleted.
    now = utc_now_from(real.clock.seconds())
    await real.store.delete_task(
        TASK, ANCHOR + timedelta(seconds=25), AuditEvent(now, "o", "d", "t", "")
    )
    real.add(result(TASK, 5, AGENT_ID))
    real.reporter.start()
    real.settle()
    assert len(real.spool) == 0 and real.reporter.rejected == len(verdicts) + 1
    assert len(await real.stored()) == 1


@pytest_twisted.ensureDeferred
async def test_the_real_servers_verdicts_on_batch_items_drop_them(real: RealServer) -> None:
    first = result(TASK, 1, AGENT_ID)
    assert await real.store.record_results([first], ANCHOR) == [RecordOutcome.STORED]
    real.add(
        result(TASK, 1, AGENT_ID, stdout=b"another\n"),  # conflict
        result(uuid.uuid4(), 2, AGENT_ID),  # forbidden: not assigned
        result(TASK, 3, AGENT_ID),  # stored
    )
    real.reporter.start()
    real.settle()
    assert real.front.answers == [0]  # one batch
    assert len(real.spool) == 0
    assert (real.reporter.rejected, real.reporter.acknowledged) == (2, 1)
    assert len(await real.stored()) == 2


@pytest_twisted.ensureDeferred
async def test_an_unknown_credential_keeps_the_results(real: RealServer) -> None:
    real.client.credential = new_token(AGENT_PREFIX)
    real.add(result(TASK, 1, AGENT_ID))
    real.reporter.start()
    real.settle()
    real.settle(1)
    assert len(real.spool) == 1 and real.reporter.rejected == 0
    real.client.credential = CREDENTIAL
    real.settle(2)
    assert len(real.spool) == 0


# -- trimming to fit ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stdout",
    [b"a" * 50_000, noisy_output(50_000), bytes(range(256)) * 200],
    ids=["plain", "escaped", "binary"],
)
@pytest.mark.parametrize("limit", [1000, 5000, 30_000])
def test_shrink_to_fit_fits_keeps_head_tail_and_sizes(stdout: bytes, limit: int) -> None:
    item = dataclasses.replace(
        result(TASK, 1, AGENT_ID, stdout=stdout),
        stderr=Output.of(b"E" * 3000),
        reason="the agent was overloaded",
    )
    body = shrink_to_fit(item, limit)
    assert body is not None and len(body) <= limit
    assert len(body) > limit * 0.8, "not trimmed far more than needed"
    back = parse_result(json.loads(body))
    assert (back.stdout.size, back.stderr.size) == (len(stdout), 3000)
    assert back.stdout.truncated
    assert back.stderr.truncated is (limit < 6000)  # a short stream is kept whole if it fits
    assert back.reason == item.reason and back.status is item.status
    kept = back.stdout.data
    assert kept and stdout.startswith(kept[: len(kept) // 3])
    assert stdout.endswith(kept[-(len(kept) // 3) :])


def test_shrink_to_fit_gives_up_only_when_nothing_but_the_output_could_go() -> None:
    item = result(TASK, 1, AGENT_ID, stdout=b"a" * 1000)
    assert shrink_to_fit(item, 100) is None
    body = shrink_to_fit(item, 400)
    assert body is not None and len(body) <= 400


@pytest_twisted.ensureDeferred
async def test_results_ahead_of_the_servers_clock_are_kept_quietly_and_taken_when_due(
    real: RealServer,
) -> None:
    """Labelled 300 s ahead (the agent's clock stepped back by that much, or is that far
    ahead of the server's): the server refuses them for now (the task's limit is 10 s,
    clocks may differ by 60 s); the agent keeps them, without calling the server foreign,
    and they are stored once the server's clock has come near enough."""
    now = 360  # instants since the anchor: the server's clock is at ANCHOR + 3600 s
    with capturedLogs() as events:
        real.add(result(TASK, now + 30, AGENT_ID))
        real.reporter.start()
        real.settle()
        assert len(real.spool) == 1 and real.reporter.rejected == 0  # 409 too_early
        real.add(result(TASK, now + 31, AGENT_ID), result(TASK, 1, AGENT_ID))
        real.settle(60)  # a batch: [too_early, too_early, stored]
        assert len(real.spool) == 2 and real.reporter.rejected == 0
        assert list(await real.stored()) == [ANCHOR + timedelta(seconds=10)]
        real.settle(300 - 60 - 70 + 1)  # the first is due: limit 10 s, allowance 60 s
        real.settle(60)
    assert len(real.spool) == 0 and real.reporter.rejected == 0
    assert len(await real.stored()) == 3
    assert loud(events) == []
    assert not [e for e in events if "refused and dropped" in formatEvent(e)]


@pytest.mark.parametrize("verdict", ["superseded", "task_paused"])
def test_a_result_of_an_old_revision_or_a_paused_instant_is_dropped_with_one_line(
    tmp_path: Path, verdict: str
) -> None:
    """The server's 409 ``superseded`` / ``task_paused`` (batch: the same statuses) is a
    verdict, as ``task_deleted`` is: the result leaves the spool, logged once."""
    server = FakeServer()
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 100)
    agent = Agent(tmp_path / "data", clock, server)
    me = load_or_create_agent_id(tmp_path / "data")
    refused, kept = uuid.uuid4(), uuid.uuid4()
    getattr(server, verdict).add(refused)
    spool = agent.service.spool
    assert spool is not None
    with capturedLogs() as events:
        spool.add(result(refused, 1, me))
        agent.settle()
        assert server.requests == [("single", 1)]
        server.down = True
        for item in (result(refused, 2, me), result(refused, 3, me), result(kept, 1, me)):
            spool.add(item)
        agent.settle()
        server.down = False
        agent.settle(60)
    assert ("batch", 3) in server.requests
    assert len(spool) == 0
    assert [key[0] for key in server.stored] == [kept]
    assert agent.service.reporter.rejected == 3  # type: ignore[union-attr]
    dropped = [formatEvent(e) for e in events if "refused and dropped" in formatEvent(e)]
    assert len(dropped) == 3 and all(verdict in line for line in dropped), dropped
