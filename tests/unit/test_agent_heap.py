"""What waiting tasks hold is frozen out of the garbage collector's way once the tasks
settle (:mod:`taskscheduler.agent.heap`); a full collection follows a task's leaving, never
more than once per gap, and never in a steady state."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from taskscheduler.agent import tap
from taskscheduler.agent.heap import FULL_EVERY, FULL_GAP, MAX_WAIT, SETTLE, STEADY, HeapKeeper
from taskscheduler.agent.scheduler import Scheduler
from taskscheduler.agent.service import AgentService
from taskscheduler.agent.spool import Spool
from tests.unit.agent_fakes import ANCHOR_SECONDS, FakeRunner, spec
from tests.unit.test_agent_restart import parse


class FakeGC:
    """Records what the keeper asks of the collector, in order."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail

    def collect(self, generation: int = 2) -> int:
        if self.fail:
            raise RuntimeError("collector broken")
        self.calls.append(f"collect({generation})")
        return 0

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")


YOUNG = ["collect(2)", "freeze"]  # over the objects not frozen yet
FULL = ["unfreeze", "collect(2)", "freeze"]


def scheduler(tmp_path: Path, collector: Any) -> tuple[Clock, Scheduler]:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    heap = HeapKeeper(clock, collector)
    spool = Spool(tmp_path / "spool")
    spool.load()
    return clock, Scheduler(
        clock,
        FakeRunner(clock),
        spool,
        uuid.uuid4(),
        watchdog=False,
        heap=heap,
    )


def test_new_tasks_are_frozen_once_they_settle_not_before(tmp_path: Path) -> None:
    collector = FakeGC()
    clock, sched = scheduler(tmp_path, collector)
    for _ in range(3):
        sched.schedule(spec())
        clock.advance(SETTLE / 2)
    assert collector.calls == [], "still changing: nothing yet"
    clock.advance(SETTLE / 2)
    assert collector.calls == YOUNG, "no unfreezing: no task left"
    clock.advance(STEADY - 0.1)
    assert collector.calls == YOUNG
    clock.advance(0.1)
    assert collector.calls == YOUNG * 2, "each run's new timer is frozen in turn"


def test_a_stream_of_changes_is_frozen_by_the_longest_wait(tmp_path: Path) -> None:
    collector = FakeGC()
    clock, sched = scheduler(tmp_path, collector)
    waited = 0.0
    while waited < MAX_WAIT:
        sched.schedule(spec())
        clock.advance(SETTLE / 2)
        waited += SETTLE / 2
    assert collector.calls == YOUNG


@pytest.mark.parametrize("how", ["unscheduled", "replaced"])
def test_a_task_that_leaves_brings_one_full_collection(tmp_path: Path, how: str) -> None:
    collector = FakeGC()
    clock, sched = scheduler(tmp_path, collector)
    task = spec()
    sched.schedule(task)
    clock.advance(MAX_WAIT)
    assert collector.calls == YOUNG
    if how == "unscheduled":
        assert sched.unschedule(task.task_id)
    else:
        sched.schedule(spec(task_id=task.task_id, command="echo new"))
    clock.advance(MAX_WAIT)
    assert collector.calls == YOUNG + FULL, "its frozen cycles are collected"


def test_full_collections_are_at_least_a_gap_apart(tmp_path: Path) -> None:
    collector = FakeGC()
    clock, sched = scheduler(tmp_path, collector)
    tasks = [spec() for _ in range(3)]
    for task in tasks:
        sched.schedule(task)
    clock.advance(MAX_WAIT)
    sched.unschedule(tasks[0].task_id)
    clock.advance(SETTLE)
    assert collector.calls == YOUNG + FULL
    collector.calls.clear()
    sched.unschedule(tasks[1].task_id)
    clock.advance(FULL_GAP - 0.5)
    assert collector.calls == [], "too soon after the last full collection"
    clock.advance(0.5)
    assert collector.calls == FULL


def test_settles_without_a_leaving_task_collect_fully_now_and_then(tmp_path: Path) -> None:
    collector = FakeGC()
    clock, sched = scheduler(tmp_path, collector)
    sched.schedule(spec())
    clock.advance(SETTLE)
    for _ in range(FULL_EVERY - 2):
        clock.advance(STEADY)
    assert collector.calls == YOUNG * (FULL_EVERY - 1)
    clock.advance(STEADY)
    assert collector.calls[-3:] == FULL, "the garbage frozen meanwhile is freed"
    clock.advance(STEADY)
    assert collector.calls[-2:] == YOUNG


def test_a_stopped_scheduler_freezes_nothing_more(tmp_path: Path) -> None:
    collector = FakeGC()
    clock, sched = scheduler(tmp_path, collector)
    sched.schedule(spec())
    sched.stop()
    clock.advance(10 * FULL_GAP)
    assert collector.calls == []
    assert clock.getDelayedCalls() == []


def test_a_failing_collector_is_logged_and_the_next_change_tries_again(tmp_path: Path) -> None:
    collector = FakeGC(fail=True)
    clock, sched = scheduler(tmp_path, collector)
    sched.schedule(spec())
    clock.advance(MAX_WAIT)
    collector.fail = False
    sched.schedule(spec())
    clock.advance(MAX_WAIT)
    assert collector.calls == YOUNG


@pytest.fixture
def real_gc() -> Iterator[None]:
    gc.collect()
    assert gc.get_freeze_count() == 0, "another test left the heap frozen"
    yield
    gc.unfreeze()


@pytest.mark.usefixtures("real_gc")
def test_with_the_real_collector_a_waiting_task_is_out_of_every_collected_generation(
    tmp_path: Path,
) -> None:
    clock, sched = scheduler(tmp_path, gc)
    task = spec()
    sched.schedule(task)
    loop = sched._loops[task.task_id]

    def collected() -> bool:
        ids = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
        return id(loop) in ids or id(task) in ids

    assert collected()
    clock.advance(MAX_WAIT)
    assert not collected(), "the task and its loop are frozen"
    assert gc.get_freeze_count() > 0


def test_the_daemon_hands_the_collector_to_the_agent(tmp_path: Path) -> None:
    options = parse(["--data-dir", str(tmp_path / "data"), "--listen", "tcp:0"])
    services = list(tap.makeService(options))
    [agent] = [s for s in services if isinstance(s, AgentService)]
    assert agent._gc is gc


def test_the_tasks_are_read_through_not_copied_at_each_delivery(tmp_path: Path) -> None:
    """Each delivered task and each health check reads them: a copy of 10,000 each time
    made delivering 10,000 tasks quadratic."""
    _, sched = scheduler(tmp_path, FakeGC())
    tasks = sched.tasks
    task = spec()
    sched.schedule(task)
    assert tasks[task.task_id] is task
    assert len(tasks) == 1
    assert sched.unschedule(task.task_id)
    assert task.task_id not in tasks


def test_tasks_alike_share_their_options_frequency_and_time_limit(tmp_path: Path) -> None:
    _, sched = scheduler(tmp_path, FakeGC())
    first, second = spec(), spec()
    other = spec(every="every 20 seconds", time_limit=5)
    other = replace(other, options=replace(other.options, retries=2))
    for task in (first, second, other):
        sched.schedule(task)
    held = sched.tasks
    assert held[second.task_id] == second, "the same task, to every comparison"
    assert held[second.task_id].options is held[first.task_id].options
    assert held[second.task_id].frequency is held[first.task_id].frequency
    assert held[second.task_id].time_limit is held[first.task_id].time_limit
    assert held[other.task_id] == other
    assert held[other.task_id].options is not held[first.task_id].options
    assert held[other.task_id].options.retries == 2
