"""Delivery of issue 10's task verbs on a task.Clock, through StubTreq over the agent's
real Klein app: a PATCH reaches every agent as a higher revision, a pause removes the task
and a resume brings it back on its grid, a run-now is delivered until the agent
acknowledges it or its deadline passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from taskscheduler.schedule import utc_now_from
from taskscheduler.server.dispatch import Dispatcher
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.records import AuditEvent, TaskChange
from tests.unit.test_dispatch import URL, AgentFront, enrol, settle, signer, spec


class Recorder(Resource):
    """The real agent's front, recording each instruction's method and path."""

    isLeaf = True

    def __init__(self, front: AgentFront) -> None:
        super().__init__()
        self.front = front
        self.seen: list[tuple[str, str]] = []

    def render(self, request: Any) -> Any:
        self.seen.append((request.method.decode(), request.path.decode()))
        return self.front.render(request)

    def runs(self) -> int:
        return sum(1 for method, path in self.seen if path.endswith("/run"))


async def setup(tmp_path: Path) -> tuple[MemoryStore, Dispatcher, Clock, StubTreq, Recorder]:
    clock = Clock()
    clock.advance(1_795_000_000)
    store = MemoryStore()
    await store.start()
    await store.set_fleet([URL])
    await enrol(store, clock)
    recorder = Recorder(AgentFront(tmp_path / "agent", clock))
    http = StubTreq(recorder)
    dispatcher = Dispatcher(
        store, http, clock, [URL], signer=signer(clock), reconcile_interval=30, jitter=lambda: 1.0
    )
    return store, dispatcher, clock, http, recorder


def audit(clock: Clock, action: str) -> AuditEvent:
    return AuditEvent(utc_now_from(clock.seconds()), "operator:alice", action, "t", "")


@pytest_twisted.ensureDeferred
async def test_a_patch_reaches_the_agent_as_the_next_revision(tmp_path: Path) -> None:
    store, dispatcher, clock, http, recorder = await setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(clock.seconds()))
    dispatcher.task_created(task)
    settle(clock, http)
    answer = await store.update_task(
        task.task_id,
        TaskChange(command="echo two"),
        utc_now_from(clock.seconds()),
        audit(clock, "u"),
    )
    assert answer is not None
    dispatcher.task_changed(answer[0])
    settle(clock, http)
    held = recorder.front.tasks[task.task_id]
    assert (held.revision, held.command, held.anchor) == (2, "echo two", task.spec.anchor)
    assert await store.undelivered_tasks(URL, 10) == []
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_pause_removes_the_task_and_a_resume_brings_it_back(tmp_path: Path) -> None:
    store, dispatcher, clock, http, recorder = await setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(clock.seconds()))
    dispatcher.task_created(task)
    settle(clock, http)
    paused = await store.pause_task(task.task_id, utc_now_from(clock.seconds()), audit(clock, "p"))
    assert paused is not None
    dispatcher.task_changed(paused[0])
    settle(clock, http)
    assert task.task_id not in recorder.front.tasks
    assert await store.pending_removals(URL, 10) == []
    settle(clock, http, 30)  # a reconciliation does not bring it back
    assert task.task_id not in recorder.front.tasks
    resumed = await store.resume_task(
        task.task_id, utc_now_from(clock.seconds()), audit(clock, "r")
    )
    assert resumed is not None
    dispatcher.task_changed(resumed[0])
    settle(clock, http)
    assert recorder.front.tasks[task.task_id].anchor == task.spec.anchor
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_run_now_is_sent_until_acknowledged_then_never_again(tmp_path: Path) -> None:
    store, dispatcher, clock, http, recorder = await setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(clock.seconds()))
    dispatcher.task_created(task)
    settle(clock, http)
    recorder.front.down = True
    at = utc_now_from(clock.seconds() + 0.5)
    clock.advance(0.5)
    assert await store.record_manual_execution(task.task_id, at, audit(clock, "task.run"))
    dispatcher.task_changed(task)
    settle(clock, http)
    assert recorder.runs() == 1
    settle(clock, http, 1)  # the retry after the back-off
    assert recorder.runs() == 2
    recorder.front.down = False
    settle(clock, http, 2)
    assert recorder.runs() == 3
    assert await store.pending_manual_runs(URL, at, 10) == []
    settle(clock, http, 30)
    dispatcher.task_changed(task)
    settle(clock, http)
    assert recorder.runs() == 3
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_run_now_is_no_longer_sent_past_its_deadline(tmp_path: Path) -> None:
    store, dispatcher, clock, http, recorder = await setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(clock.seconds()))
    dispatcher.task_created(task)
    settle(clock, http)
    recorder.front.down = True
    at = utc_now_from(clock.seconds())
    assert await store.record_manual_execution(task.task_id, at, audit(clock, "task.run"))
    dispatcher.task_changed(task)
    interval = task.spec.frequency.seconds
    for delay in (0, 1, 2, 4, 8, 16, 32, 60, 60):
        settle(clock, http, delay)
    sent = recorder.runs()
    assert clock.seconds() - at.timestamp() > interval
    recorder.front.down = False
    settle(clock, http, 60)
    assert recorder.runs() == sent, "a run-now past its deadline was sent again"
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_run_now_not_yet_delivered_survives_a_server_restart(tmp_path: Path) -> None:
    store, dispatcher, clock, http, recorder = await setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(clock.seconds()))
    dispatcher.task_created(task)
    settle(clock, http)
    recorder.front.down = True
    at = utc_now_from(clock.seconds())
    assert await store.record_manual_execution(task.task_id, at, audit(clock, "task.run"))
    dispatcher.task_changed(task)
    settle(clock, http)
    dispatcher.stopService()  # the server stops before the agent took it
    recorder.front.down = False
    again = Dispatcher(
        store, http, clock, [URL], signer=signer(clock), reconcile_interval=30, jitter=lambda: 1.0
    )
    again.startService()
    settle(clock, http, 1)
    assert await store.pending_manual_runs(URL, at, 10) == []
    assert recorder.runs() == 2
    again.stopService()


@pytest_twisted.ensureDeferred
async def test_a_run_now_of_a_paused_task_runs_once_on_the_agent_that_dropped_it(
    tmp_path: Path,
) -> None:
    store, dispatcher, clock, http, recorder = await setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(clock.seconds()))
    dispatcher.task_created(task)
    settle(clock, http)
    paused = await store.pause_task(task.task_id, utc_now_from(clock.seconds()), audit(clock, "p"))
    assert paused is not None
    dispatcher.task_changed(paused[0])
    settle(clock, http)
    assert task.task_id not in recorder.front.tasks
    at = utc_now_from(clock.seconds())
    assert await store.record_manual_execution(task.task_id, at, audit(clock, "task.run"))
    dispatcher.task_changed(paused[0])
    settle(clock, http)
    assert recorder.runs() == 1
    assert await store.pending_manual_runs(URL, at, 10) == []  # the agent took it
    assert task.task_id not in recorder.front.tasks  # and still does not hold it
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_run_now_of_a_task_deleted_before_delivery_is_never_sent(tmp_path: Path) -> None:
    store, dispatcher, clock, http, recorder = await setup(tmp_path)
    task = await store.create_task(spec(), utc_now_from(clock.seconds()))
    at = utc_now_from(clock.seconds())
    assert await store.record_manual_execution(task.task_id, at, audit(clock, "task.run"))
    assert await store.delete_task(task.task_id, at, audit(clock, "task.deleted"))
    assert await store.pending_manual_runs(URL, at, 10) == []
    dispatcher.startService()
    settle(clock, http, 1)
    assert recorder.runs() == 0
    dispatcher.stopService()
