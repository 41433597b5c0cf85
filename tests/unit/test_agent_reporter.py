"""The reporter: single vs batch, acknowledgement, back-off, refusals (StubTreq, fake server)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock

from taskscheduler.agent.reporter import Reporter
from taskscheduler.agent.spool import Spool
from taskscheduler.protocol import ResultStatus
from tests.unit.agent_fakes import (
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


class Setup:
    def __init__(self, tmp_path: Path, **options: Any) -> None:
        self.clock = Clock()
        self.spool = Spool(tmp_path / "spool")
        self.spool.load()
        self.server = FakeServer()
        self.http = UnreachableHttp(StubTreq(self.server.app.resource()))
        self.reporter = Reporter(
            self.spool, self.http, self.clock, SERVER, jitter=lambda: 1.0, **options
        )

    def spool_results(self, count: int, task_id: uuid.UUID = TASK, first: int = 1) -> None:
        for k in range(first, first + count):
            assert fired(self.spool.add(result(task_id, k, AGENT_ID))) is True

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
    assert len(s.server.stored) == 1
    assert len(s.spool) == 0 and s.files() == []
    assert s.reporter.acknowledged == 1


def test_many_waiting_results_go_in_batches(tmp_path: Path) -> None:
    s = Setup(tmp_path, batch_size=3)
    s.spool_results(7)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("batch", 3), ("batch", 3), ("single", 1)]
    assert len(s.server.stored) == 7
    assert s.files() == []


def test_a_batch_is_bounded_in_bytes_too(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.spool_results(4)
    size = next(iter(s.spool)).size
    s.reporter = Reporter(s.spool, s.http, s.clock, SERVER, batch_bytes=2 * size + 10)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("batch", 2), ("batch", 2)]


def test_a_duplicate_counts_as_acknowledged(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    already = result(TASK, 1, AGENT_ID)
    s.server.stored[already.key] = already
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
    assert len(s.server.stored) == 1


def test_back_off_is_capped_and_jittered(tmp_path: Path) -> None:
    draws = iter([0.0, 0.5, 1.0] + [0.0] * 20)
    s = Setup(tmp_path)
    s.reporter = Reporter(s.spool, s.http, s.clock, SERVER, jitter=lambda: next(draws))
    s.reporter._failures = 1
    assert s.reporter._backoff() == 0.5  # half of the 1 s ceiling, at the bottom
    s.reporter._failures = 2
    assert s.reporter._backoff() == 1.5
    s.reporter._failures = 3
    assert s.reporter._backoff() == 4.0
    s.reporter._failures = 40
    assert s.reporter._backoff() == 15.0  # half of the 30 s cap


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
    assert len(s.server.stored) == 3 and len(s.spool) == 0


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
    s.server.conflicting.add(TASK)
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
    other = uuid.uuid4()
    s.server.conflicting.add(other)
    s.spool_results(2)
    s.spool_results(1, task_id=other)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("batch", 3)]
    assert len(s.spool) == 0
    assert s.reporter.rejected == 1
    assert {key[0] for key in s.server.stored} == {TASK}


def test_results_of_a_task_deleted_before_they_were_due_are_dropped(tmp_path: Path) -> None:
    single = Setup(tmp_path / "single")
    single.server.deleted.add(TASK)
    single.spool_results(1)
    single.reporter.start()
    single.settle()
    assert single.server.requests == [("single", 1)]
    assert len(single.spool) == 0 and single.reporter.rejected == 1

    s = Setup(tmp_path / "batch")
    s.server.deleted.add(TASK)
    s.spool_results(2)
    s.spool_results(1, task_id=uuid.uuid4())
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
    s.reporter = Reporter(s.spool, s.http, s.clock, SERVER)
    s.reporter.start()
    s.settle()
    assert s.server.requests == [("batch", 3), ("single", 1), ("single", 1), ("single", 1)]
    assert len(s.server.stored) == 2
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
    assert len(s.spool) == 0 and len(s.server.stored) == 3


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
    [pending] = s.server.hanging
    s.server.stored[result(TASK, 1, AGENT_ID).key] = result(TASK, 1, AGENT_ID)
    pending.callback(b'{"status": "stored"}')
    s.settle()
    assert s.server.requests == [("single", 1), ("batch", 2)]
    assert len(s.spool) == 0


def test_results_carry_the_agents_credential(tmp_path: Path) -> None:
    s = Setup(tmp_path, credential="tsa_" + "c" * 43)
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert s.server.authorizations == ["Bearer tsa_" + "c" * 43]
    assert s.files() == []


def test_a_refused_credential_keeps_the_results_and_backs_off(tmp_path: Path) -> None:
    s = Setup(tmp_path, credential="tsa_" + "c" * 43)
    s.server.refuse_with = 401  # revoked, or not enrolled yet
    s.spool_results(3)
    s.reporter.start()
    s.settle()
    assert len(s.files()) == 3 and s.reporter.rejected == 0
    tried = len(s.server.requests)
    s.settle(0.5)
    assert len(s.server.requests) == tried, "backing off"
    s.server.refuse_with = None
    s.settle(2)
    assert s.files() == []


def test_a_forbidden_result_is_dropped_and_a_forbidden_batch_is_sent_one_by_one(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    s.server.refuse_with = 403  # not this agent's task, or not as itself
    s.spool_results(3)
    s.reporter.start()
    s.settle()
    assert [kind for kind, _ in s.server.requests] == ["batch", "single", "single", "single"]
    assert s.files() == [] and s.reporter.rejected == 3
