"""The history pruner: a LoopingCall on a Clock over a MemoryStore."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher

from taskscheduler.protocol import Output, ResultStatus, RunResult, TaskSpec
from taskscheduler.schedule import instant, parse_frequency
from taskscheduler.server.retention import HistoryPruner
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.records import StoreUnavailable

AGENT = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")
ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL = timedelta(hours=1)
RETENTION = timedelta(days=1)
TICK = 300.0


class FlakyStore(MemoryStore):
    """A MemoryStore whose prune_history fails with the queued errors first."""

    def __init__(self) -> None:
        super().__init__()
        self.failures: list[Exception] = []
        self.prune_calls = 0

    async def prune_history(self, before: datetime, limit: int, keep: int = 0) -> int:
        self.prune_calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return await super().prune_history(before, limit, keep)


async def a_task_with_history(store: MemoryStore, hours: int) -> uuid.UUID:
    """A task with one result an hour for ``hours`` hours after ANCHOR."""
    spec = TaskSpec(
        task_id=uuid.uuid4(),
        command="true",
        frequency=parse_frequency("every 1 hours"),
        anchor=ANCHOR,
        time_limit=timedelta(seconds=10),
    )
    await store.set_fleet(["http://agent:8081"])
    await store.create_task(spec, ANCHOR)
    results = []
    for k in range(1, hours + 1):
        at = instant(ANCHOR, INTERVAL, k)
        results.append(
            RunResult(
                task_id=spec.task_id,
                agent_id=AGENT,
                scheduled_at=at,
                status=ResultStatus.SUCCEEDED,
                exit_code=0,
                started_at=at,
                finished_at=at + timedelta(seconds=1),
                stdout=Output.of(b"ok"),
                stderr=Output.of(b""),
            )
        )
    await store.record_results(results, ANCHOR)
    return spec.task_id


def clock_at(when: datetime) -> Clock:
    clock = Clock()
    clock.advance(when.timestamp())
    return clock


async def history(store: MemoryStore, task_id: uuid.UUID) -> list[datetime]:
    return [e.scheduled_at for e in await store.list_executions(task_id, 1000)]


@pytest.fixture
def logged() -> list[LogEvent]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest_twisted.ensureDeferred
async def test_it_prunes_on_its_interval_and_keeps_the_recent_history(
    logged: list[LogEvent],
) -> None:
    store = FlakyStore()
    task_id = await a_task_with_history(store, 48)
    # The cutoff falls half-way between instants 5 and 6.
    clock = clock_at(instant(ANCHOR, INTERVAL, 30) - timedelta(minutes=30))
    pruner = HistoryPruner(store, clock, RETENTION, interval=TICK, batch_size=4)
    pruner.startService()
    # At once: the 5 instants before the cutoff, in batches of 4.
    assert await history(store, task_id) == [instant(ANCHOR, INTERVAL, k) for k in range(48, 5, -1)]
    assert store.prune_calls == 2
    assert any(e.get("count") == 5 for e in logged)

    clock.advance(TICK - 1)
    assert store.prune_calls == 2  # not before its interval
    clock.advance(1)
    assert store.prune_calls == 3
    assert len(await history(store, task_id)) == 43  # nothing more is old enough yet
    clock.advance(3600 - TICK)  # an hour on: one more instant ages out at the next tick
    clock.advance(TICK)
    assert min(await history(store, task_id)) == instant(ANCHOR, INTERVAL, 7)
    await pruner.stopService()


@pytest_twisted.ensureDeferred
async def test_it_survives_an_outage_and_a_bug_and_carries_on(logged: list[LogEvent]) -> None:
    store = FlakyStore()
    task_id = await a_task_with_history(store, 10)
    store.failures = [StoreUnavailable("connection refused"), RuntimeError("boom")]
    clock = clock_at(instant(ANCHOR, INTERVAL, 40))
    pruner = HistoryPruner(store, clock, RETENTION, interval=TICK)
    pruner.startService()
    assert len(await history(store, task_id)) == 10
    warnings = [e for e in logged if "unavailable" in e.get("log_format", "")]
    assert warnings and warnings[0]["log_level"].name == "warn"
    assert "log_failure" not in warnings[0]  # an outage is expected, not a bug
    clock.advance(TICK)
    assert any("log_failure" in e and e["log_failure"].check(RuntimeError) for e in logged)
    assert len(await history(store, task_id)) == 10
    clock.advance(TICK)  # the loop is still alive
    assert await history(store, task_id) == []
    assert store.prune_calls == 3
    await pruner.stopService()


@pytest_twisted.ensureDeferred
async def test_a_tick_stops_when_its_time_budget_is_spent() -> None:
    clock = clock_at(ANCHOR + timedelta(days=30))

    class SlowStore(MemoryStore):
        calls = 0

        async def prune_history(self, before: datetime, limit: int, keep: int = 0) -> int:
            self.calls += 1
            clock.advance(4)  # each batch takes 4 s and there is always more
            return limit

    store = SlowStore()
    pruner = HistoryPruner(store, clock, RETENTION, interval=TICK, time_budget=10)
    pruner.startService()
    assert store.calls == 3  # 4 s, 8 s, 12 s: past the budget after the third
    await pruner.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_waits_for_the_batch_under_way_and_ends_the_loop() -> None:
    clock = clock_at(ANCHOR + timedelta(days=30))
    pending: list[Deferred[int]] = []

    class PausedStore(MemoryStore):
        async def prune_history(self, before: datetime, limit: int, keep: int = 0) -> int:
            d: Deferred[int] = Deferred()
            pending.append(d)
            return await d

    pruner = HistoryPruner(PausedStore(), clock, RETENTION, interval=TICK, batch_size=10)
    pruner.startService()
    assert len(pending) == 1
    stopped = pruner.stopService()
    assert stopped is not None
    assert not stopped.called  # the store must not be closed under the batch
    pending[0].callback(10)  # a full batch: there would be more, but we are stopping
    assert stopped.called
    assert len(pending) == 1
    clock.advance(TICK * 10)
    assert len(pending) == 1  # no tick after stopping
    assert clock.getDelayedCalls() == []


def test_a_retention_of_zero_is_not_a_pruner() -> None:
    with pytest.raises(ValueError):
        HistoryPruner(MemoryStore(), Clock(), timedelta(0))


@pytest_twisted.ensureDeferred
async def test_each_tick_makes_the_weeks_ahead_drops_whole_weeks_then_prunes_below_them() -> None:
    class PartitionedStore(MemoryStore):
        """Partitions below ``low_until``: the drop says rows go only below it."""

        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, datetime, int]] = []
            self.low_until = instant(ANCHOR, INTERVAL, 3)

        async def ensure_partitions(self, now: datetime) -> int:
            self.calls.append(("ensure", now, 0))
            return 0

        async def drop_partitions(self, before: datetime, keep: int = 0) -> datetime:
            self.calls.append(("drop", before, keep))
            return min(before, self.low_until)

    store = PartitionedStore()
    task_id = await a_task_with_history(store, 48)
    now = instant(ANCHOR, INTERVAL, 40)
    pruner = HistoryPruner(store, clock_at(now), RETENTION, interval=TICK, keep=2)
    pruner.startService()  # at once, at start
    # Weeks are dropped one a call, until the bound stops moving.
    drop = ("drop", now - RETENTION, 2)
    assert store.calls == [("ensure", now, 0), drop, drop]
    # Rows only below the weeks: 1 and 2 (3 is the first instant of the weeks).
    assert min(await history(store, task_id)) == instant(ANCHOR, INTERVAL, 3)
    await pruner.stopService()
