"""Durable writes off the reactor thread, in batches; and what the agent does meanwhile."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock

from taskscheduler.agent import reporter as reporter_module
from taskscheduler.agent.durable import BatchWriter, write_durably
from taskscheduler.agent.reporter import Reporter
from taskscheduler.agent.server_client import ServerClient
from taskscheduler.agent.spool import Spool
from tests.unit.agent_fakes import (
    ANCHOR_SECONDS,
    SERVER,
    Agent,
    FakeServer,
    FakeThread,
    UnreachableHttp,
    fired,
    older_agents_run_marker,
    result,
    spec,
)

AGENT_ID = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")


def test_writes_of_one_turn_go_to_the_thread_together(tmp_path: Path) -> None:
    clock, thread = Clock(), FakeThread()
    writer = BatchWriter(clock, thread)
    done = [writer.write(tmp_path / f"{i}.json", b"%d" % i) for i in range(5)]
    assert thread.jobs == [], "nothing is written before the end of the turn"
    clock.advance(0)
    assert len(thread.jobs) == 1
    assert not any(d.called for d in done)
    thread.run_all()
    assert all(fired(d) is None for d in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.json" for i in range(5)]
    assert (tmp_path / "3.json").read_bytes() == b"3"


def test_writes_asked_for_during_a_flush_follow_it(tmp_path: Path) -> None:
    clock, thread = Clock(), FakeThread()
    writer = BatchWriter(clock, thread)
    first = writer.write(tmp_path / "a.json", b"old")
    clock.advance(0)
    second = writer.write(tmp_path / "a.json", b"new")
    clock.advance(0)
    assert len(thread.jobs) == 1, "one batch at a time"
    thread.run_all()
    assert first.called and not second.called
    clock.advance(0)
    thread.run_all()
    assert second.called
    assert (tmp_path / "a.json").read_bytes() == b"new"


def test_a_path_changed_twice_in_one_batch_ends_as_the_last_change_left_it(
    tmp_path: Path,
) -> None:
    clock, thread = Clock(), FakeThread()
    writer = BatchWriter(clock, thread)
    (tmp_path / "gone.json").write_bytes(b"old")
    done = [
        writer.write(tmp_path / "a.json", b"first"),
        writer.write(tmp_path / "a.json", b"second"),
        writer.remove(tmp_path / "gone.json"),
        writer.write(tmp_path / "saved-then-removed.json", b"x"),
        writer.remove(tmp_path / "saved-then-removed.json"),
        writer.remove(tmp_path / "removed-then-saved.json"),
        writer.write(tmp_path / "removed-then-saved.json", b"back"),
    ]
    clock.advance(0)
    assert len(thread.jobs) == 1, "one batch"
    thread.run_all()
    assert [fired(d) for d in done] == [None] * len(done)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "removed-then-saved.json"]
    assert (tmp_path / "a.json").read_bytes() == b"second"


def test_an_unsynced_change_that_fails_fails_alone(tmp_path: Path) -> None:
    clock, thread = Clock(), FakeThread()
    writer = BatchWriter(clock, thread)
    durable = writer.write(tmp_path / "result.json", b"{}")
    mark = writer.write(tmp_path / "missing" / "mark", b"x", sync=False)
    clock.advance(0)
    thread.run_all()
    assert fired(durable) is None
    assert isinstance(fired(mark).value, FileNotFoundError)
    assert (tmp_path / "result.json").read_bytes() == b"{}"


def test_the_reporter_reads_a_backlog_back_off_the_reactor_in_one_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Any bytes are a backlog here: a few small fresh results are read on the reactor
    # (test_agent_reporter.py), a backlog off it, all its bodies in one job.
    monkeypatch.setattr(reporter_module, "INLINE_READ_BYTES", 0)
    clock, thread = Clock(), FakeThread()
    spool = Spool(tmp_path / "spool", writer=BatchWriter(clock, thread), run_in_thread=thread)
    spool.load()
    server = FakeServer()
    http = UnreachableHttp(StubTreq(server.app.resource()))
    reporter = Reporter(spool, ServerClient(http, clock, SERVER), clock, jitter=lambda: 1.0)
    spool.on_ready = reporter.wake
    reporter.start()
    for k in (1, 2, 3):
        spool.add(result(uuid.uuid4(), k, AGENT_ID))
    clock.advance(0)
    thread.run_all()  # the results are durable
    clock.advance(0)
    http.flush()
    assert len(thread.jobs) == 1, "the reporter asked for the three bodies at once"
    assert server.requests == [], "and sends nothing before they are read"
    thread.run_all()
    http.flush()
    assert server.requests == [("batch", 3)]
    assert len(server.stored) == 3 and len(spool) == 0


def test_a_batch_is_all_or_nothing(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_durably([(tmp_path / "a.json", b"a"), (tmp_path / "missing" / "b.json", b"b")])
    assert list(tmp_path.iterdir()) == []


def test_a_result_the_disk_refuses_is_dropped_and_counted(tmp_path: Path) -> None:
    clock, thread = Clock(), FakeThread()
    spool = Spool(tmp_path / "spool", writer=BatchWriter(clock, thread))
    spool.load()
    ready: list[int] = []
    spool.on_ready = lambda: ready.append(1)
    added = spool.add(result(uuid.uuid4(), 1, AGENT_ID))
    assert len(spool) == 1 and spool.bytes > 0
    assert spool.oldest(10, 10**9) == [], "not offered before it is durable"
    (tmp_path / "spool").rmdir()  # the write will fail
    clock.advance(0)
    thread.run_all()
    assert fired(added) is False
    assert (len(spool), spool.bytes, spool.dropped, ready) == (0, 0, 1, [])


def finish_disk_work(agent: Agent, thread: FakeThread) -> None:
    """Let the thread do every job, and the reactor everything that follows."""
    agent.settle()
    while thread.jobs:
        thread.run_all()
        agent.settle()


def test_a_result_is_reported_and_its_run_files_removed_only_once_durable(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    thread = FakeThread()
    agent = Agent(tmp_path / "data", clock, FakeServer(), run_in_thread=thread)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.advance_to(10)
    agent.runner.finish(agent.runner.runs[0], b"out\n")
    agent.settle()
    assert agent.server.stored == {}
    assert agent.runner.discarded == [], "the run's files stay until its result is durable"
    assert agent.service.api._counters()["spooled"] == 1  # type: ignore[union-attr]
    assert agent.service.scheduler.running == 0, "the task may run again meanwhile"  # type: ignore[union-attr]
    finish_disk_work(agent, thread)
    [stored] = agent.server.stored.values()
    assert stored.stdout.data == b"out\n"
    assert agent.runner.discarded == [agent.runner.runs[0].key]


@pytest_twisted.ensureDeferred
async def test_shutdown_waits_for_results_still_being_written(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    thread = FakeThread()
    server = FakeServer()
    server.down = True
    agent = Agent(tmp_path / "data", clock, server, run_in_thread=thread)
    agent.service.scheduler.schedule(spec())  # type: ignore[union-attr]
    agent.advance_to(10)
    agent.runner.finish(agent.runner.runs[0])
    agent.settle()
    stopping = agent.stop()
    assert not stopping.called
    finish_disk_work(agent, thread)
    await stopping
    [spooled] = (tmp_path / "data" / "spool").glob("*.json")
    assert json.loads(spooled.read_bytes())["status"] == "succeeded"


def test_a_lost_result_keeps_its_marker_until_durable(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    first = Agent(tmp_path / "data", clock, FakeServer())
    first.crash()
    # An older agent's marker of a run it died during.
    at = datetime.fromtimestamp(ANCHOR_SECONDS + 10, UTC)
    older_agents_run_marker(tmp_path / "data" / "running", uuid.uuid4(), at, at)
    thread = FakeThread()
    second = Agent(tmp_path / "data", clock, FakeServer(), run_in_thread=thread)
    second.settle()
    assert len(list((tmp_path / "data" / "running").glob("*.json"))) == 1
    finish_disk_work(second, thread)
    assert list((tmp_path / "data" / "running").glob("*.json")) == []
    [lost] = second.server.stored.values()
    assert lost.status.value == "lost"


def test_the_count_of_dropped_results_survives_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=10)
    spool.load()
    assert fired(spool.add(result(uuid.uuid4(), 1, AGENT_ID))) is False
    assert fired(spool.add(result(uuid.uuid4(), 2, AGENT_ID))) is False
    assert spool.dropped == 2
    again = Spool(tmp_path / "spool", max_bytes=10)
    again.load()
    assert (again.dropped, len(again)) == (2, 0), "the count, not a result"


def test_acknowledged_results_leave_the_spool_at_once_and_their_files_off_the_reactor(
    tmp_path: Path,
) -> None:
    thread = FakeThread()
    spool = Spool(tmp_path / "spool", writer=BatchWriter(Clock(), thread))
    spool.load()
    clock = spool._writer._clock  # type: ignore[union-attr]
    added = spool.add(result(uuid.uuid4(), 1, AGENT_ID))
    clock.advance(0)
    thread.run_all()
    assert fired(added) is True
    [entry] = list(spool)
    spool.remove(entry)
    assert len(spool) == 0
    assert entry.path.exists(), "unlinked on the writer's thread, not on the reactor"
    clock.advance(0)
    thread.run_all()
    assert not entry.path.exists()
