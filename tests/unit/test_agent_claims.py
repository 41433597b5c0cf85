"""Run on one, agents and server together: two agents' schedulers claim each instant of a
run-on-one task from the server's real Klein app (behind StubTreq, on one task.Clock);
each instant runs on exactly one of them, spread over both; when the chosen agent is gone
the other runs its instants after the grace; without the server none runs."""

from __future__ import annotations

import dataclasses
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

from taskscheduler.agent.scheduler import Scheduler
from taskscheduler.agent.server_client import Claimed, Refused, ServerClient
from taskscheduler.agent.spool import Spool
from taskscheduler.auth import AGENT_PREFIX, hash_token, new_token
from taskscheduler.protocol import ResultStatus, TaskSpec
from taskscheduler.protocol.options import RunOn, TaskOptions
from taskscheduler.schedule import format_instant
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.store.claim_rules import chosen_agent
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.records import AuditEvent, Heartbeat
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, SERVER, FakeRunner, UnreachableHttp, spec

A_URL, B_URL = "http://agent-a:8081", "http://agent-b:8081"
GRACE = 2.0
EVERY = 10  # seconds
STEP = 0.25  # how often the reactor wakes up, as it were
#: A task whose instants 6 to 8 go to A (the test kills A before them), 9 of 20 in all.
TASK_ID = uuid.UUID("00000004-0000-4000-8000-000000000004")


def at(k: int) -> datetime:
    return ANCHOR + timedelta(seconds=EVERY * k)


class Node:
    """One agent: its scheduler, fake runner and spool, claiming through its own client."""

    def __init__(self, folder: Path, clock: Clock, http: Any, url: str) -> None:
        self.url = url
        self.agent_id = uuid.uuid4()
        self.credential = new_token(AGENT_PREFIX)
        self.client = ServerClient(http, clock, SERVER, credential=self.credential)
        self.runner = FakeRunner(clock)
        self.spool = Spool(folder / "spool")
        self.spool.load()
        self.scheduler = Scheduler(
            clock,
            self.runner,
            self.spool,
            self.agent_id,
            monotonic=clock.seconds,
            watchdog=False,
            claim_client=self.client,
        )

    def ran(self) -> list[datetime]:
        return [run.key[1] for run in self.runner.runs if run.key is not None]


class Fleet:
    def __init__(self, tmp_path: Path, at_seconds: float = 5) -> None:
        self.clock = Clock()
        self.clock.advance(ANCHOR_SECONDS + at_seconds)
        self.store = MemoryStore()
        api = ServerAPI(
            self.store,
            self.clock,
            ServerAccess(self.store, self.clock, None, None),
            claim_grace=timedelta(seconds=GRACE),
            heartbeat_interval=10.0,
        )
        self.http = UnreachableHttp(StubTreq(api.resource()))
        self.nodes = [
            Node(tmp_path / name, self.clock, self.http, url)
            for name, url in (("a", A_URL), ("b", B_URL))
        ]
        self.task = dataclasses.replace(
            spec(every=f"every {EVERY} seconds", task_id=TASK_ID),
            options=TaskOptions(run_on=RunOn.ONE),
        )

    async def start(self) -> None:
        await self.store.set_fleet([A_URL, B_URL])
        await self.store.create_task(self.task, ANCHOR)
        now = self.now()
        for node in self.nodes:
            event = AuditEvent(now, "join:fleet", "agent.enrolled", node.url, "::1")
            await self.store.enrol_agent(
                node.agent_id, node.url, hash_token(node.credential), now, event
            )
            node.scheduler.schedule(self.task)
        self.heartbeats()

    def now(self) -> datetime:
        return ANCHOR + timedelta(seconds=self.clock.seconds() - ANCHOR_SECONDS)

    def heartbeats(self, nodes: list[Node] | None = None) -> None:
        for node in self.nodes if nodes is None else nodes:
            beat = Heartbeat("1", "host", None, 1, 0, 0, 0)
            Deferred.fromCoroutine(self.store.record_heartbeat(node.agent_id, self.now(), beat))

    def advance(
        self, seconds: float, beating: list[Node] | None = None, finish: bool = True
    ) -> None:
        """Let time pass, the reactor waking every STEP; every run ends within a step
        (unless not ``finish``); the ``beating`` agents (all by default) send a
        heartbeat every 5 s."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(STEP, end - self.clock.seconds()))
            for _ in range(3):
                self.http.flush()
                self.clock.advance(0)
            for node in self.nodes:
                for run in node.runner.runs if finish else []:
                    if not run.done:
                        node.runner.finish(run, b"ok\n")
            if round(self.clock.seconds() * 4) % 20 == 0:
                self.heartbeats(beating)


def chosen(task: TaskSpec, k: int) -> str | None:
    return chosen_agent(task.task_id, at(k), [A_URL, B_URL])


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


@pytest_twisted.ensureDeferred
async def test_each_instant_runs_on_exactly_one_agent_the_chosen_one(fleet: Fleet) -> None:
    await fleet.start()
    fleet.advance(EVERY * 20)  # instants 1 to 20
    a, b = fleet.nodes
    assert sorted(a.ran() + b.ran()) == [at(k) for k in range(1, 21)], "each once, none twice"
    # The server's choice, on time: no failover was needed, and both got their share.
    assert a.ran() == [at(k) for k in range(1, 21) if chosen(fleet.task, k) == A_URL]
    assert len(a.ran()) == 9
    for node in fleet.nodes:
        assert _lateness(node, range(1, 21)) == [0.0] * len(node.ran()), "started on time"
        # An agent that was not granted an instant recorded nothing for it.
        assert len(node.spool) == len(node.ran())


@pytest_twisted.ensureDeferred
async def test_when_the_chosen_agent_is_gone_the_other_runs_its_instants_after_the_grace(
    fleet: Fleet,
) -> None:
    await fleet.start()
    a, b = fleet.nodes
    # B starts nothing more than 1 s late: taking over after the 2 s grace is not late,
    # since B asks as soon as the server lets it.
    b.scheduler.starting_deadline = 1.0
    fleet.advance(EVERY * 5)
    # A dies: it claims nothing more, but the server sees it online for 30 s more (3
    # heartbeat intervals), and keeps choosing it for some instants.
    a.scheduler.stop()
    before = len(a.ran())
    record = await fleet.store.get_agent(a.agent_id)
    assert record is not None and record.last_seen_at is not None
    online_until = record.last_seen_at + timedelta(seconds=30)
    fleet.advance(EVERY * 15, beating=[b])  # instants 6 to 20
    assert len(a.ran()) == before
    expected = [at(k) for k in range(1, 21) if k > 5 or chosen(fleet.task, k) == B_URL]
    assert sorted(b.ran()) == expected, "B ran every instant from A's death on, once"
    failovers = 0
    for k, late in zip(range(6, 21), _lateness(b, range(6, 21)), strict=True):
        if chosen(fleet.task, k) == A_URL and at(k) <= online_until:
            # A still looked online: B took the instant once the grace was over.
            assert GRACE <= late <= GRACE + STEP
            failovers += 1
        else:  # B was chosen (A offline: never chosen), at once
            assert late == 0
    assert failovers == 3, "instants 6 to 8: A chosen while dead"


def _lateness(node: Node, ks: range) -> list[float]:
    """How late ``node`` started each of the instants ``ks`` it ran."""
    runs = {run.key[1]: run for run in node.runner.runs if run.key is not None}
    return [(runs[at(k)].started_at - at(k)).total_seconds() for k in ks if at(k) in runs]


@pytest_twisted.ensureDeferred
async def test_without_the_server_no_agent_runs_the_instant_nor_records_it(fleet: Fleet) -> None:
    await fleet.start()
    fleet.http.unreachable = True
    fleet.advance(EVERY * 3)
    for node in fleet.nodes:
        assert node.runner.runs == [] and len(node.spool) == 0
        assert node.scheduler._claims is not None and node.scheduler._claims.unreachable == 3
    fleet.http.unreachable = False
    fleet.advance(EVERY)
    assert sorted(fleet.nodes[0].ran() + fleet.nodes[1].ran()) == [at(4)]


@pytest_twisted.ensureDeferred
async def test_a_granted_instant_that_cannot_start_is_recorded_skipped_by_its_holder(
    fleet: Fleet,
) -> None:
    await fleet.start()
    k = next(k for k in range(1, 40) if chosen(fleet.task, k) == A_URL)
    a, b = fleet.nodes
    a.scheduler.max_running = 0  # A cannot start anything: it records the skip
    fleet.advance(EVERY * k)
    skipped = [r for r in _spooled(a) if r["scheduled_at"] == _iso(at(k))]
    assert [r["status"] for r in skipped] == [ResultStatus.SKIPPED.value]
    assert at(k) not in b.ran(), "held by A: B does not run it"


def _iso(value: datetime) -> str:
    return format_instant(value)


def _spooled(node: Node) -> list[dict[str, Any]]:
    return [json.loads(node.spool.read(entry)) for entry in node.spool]


@pytest_twisted.ensureDeferred
async def test_the_server_refuses_claims_that_are_not_the_agents_to_make(fleet: Fleet) -> None:
    await fleet.start()
    a = fleet.nodes[0]

    async def claim(task_id: uuid.UUID, scheduled_at: datetime, revision: int = 1) -> Any:
        d = Deferred.fromCoroutine(a.client.claim(task_id, scheduled_at, revision, timeout=5))
        for _ in range(3):
            fleet.http.flush()
            fleet.clock.advance(0)
        return await d

    misaligned = await claim(fleet.task.task_id, at(1) + timedelta(seconds=1))
    assert isinstance(misaligned, Refused) and misaligned.reason.startswith("400 misaligned")
    superseded = await claim(fleet.task.task_id, at(1), 2)
    assert isinstance(superseded, Refused) and superseded.reason.startswith("409 superseded")
    unknown = await claim(uuid.uuid4(), at(1))
    assert isinstance(unknown, Refused) and unknown.reason.startswith("404 unknown_task")
    everywhere = spec(every=f"every {EVERY} seconds")
    await fleet.store.create_task(everywhere, ANCHOR)
    not_one = await claim(everywhere.task_id, at(1))
    assert isinstance(not_one, Refused) and not_one.reason.startswith("409 not_run_on_one")
    # At 5 s, A asks for instant 1 (10 s), which the server chose B for: wait until 12 s.
    assert chosen(fleet.task, 1) == B_URL
    assert await claim(fleet.task.task_id, at(1)) == Claimed("wait", 7.0)
    fleet.clock.advance(7)
    assert await claim(fleet.task.task_id, at(1)) == Claimed("granted")


@pytest_twisted.ensureDeferred
async def test_instants_an_overloaded_agent_passed_over_are_not_recorded_by_it(
    fleet: Fleet,
) -> None:
    """An agent that wakes up late records the instants it missed ``skipped``; not those
    of a run-on-one task: another agent may have run them."""
    await fleet.start()
    a, b = fleet.nodes
    fleet.clock.advance(EVERY * 2 + 6)  # from 5 s to 31 s in one late wake-up: 1 to 3 due
    for _ in range(3):
        fleet.http.flush()
        fleet.clock.advance(0)
    assert _spooled(a) == [] and _spooled(b) == []
    # (the latest instant, 3, came 1 s late: within the starting deadline, it is claimed)
    assert sorted(a.ran() + b.ran()) == [at(3)]


@pytest_twisted.ensureDeferred
async def test_a_failed_run_is_retried_by_the_agent_that_holds_its_instant(fleet: Fleet) -> None:
    fleet.task = dataclasses.replace(
        fleet.task,
        options=TaskOptions(run_on=RunOn.ONE, retries=1, retry_delay=timedelta(seconds=1)),
    )
    await fleet.start()
    a, b = fleet.nodes
    assert chosen(fleet.task, 1) == B_URL
    fleet.advance(5, finish=False)  # instant 1 (10 s) starts on B
    [first] = b.runner.runs
    b.runner.finish(first, b"no\n", exit_code=1, status=ResultStatus.FAILED)
    fleet.advance(2)
    assert b.ran() == [at(1), at(1)], "retried on B, the holder"
    assert a.ran() == []
