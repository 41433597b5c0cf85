"""The Store contract of issue 10's task verbs, on both stores (MemoryStore and a real
PostgreSQL), with the acceptance rules (``rules.scheduled_verdict``, ``rules.in_pause``,
``rules.manual_verdict``) pinned by cases the pure functions and the stores answer alike."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
import pytest_twisted

from taskscheduler.protocol import Trigger
from taskscheduler.schedule import instant, parse_frequency
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AuditEvent, RecordOutcome, TaskChange, TaskState
from taskscheduler.server.store.rules import (
    Revision,
    in_pause,
    revise,
    scheduled_verdict,
)
from tests.unit.test_store_contract import (
    A_ID,
    A_URL,
    ANCHOR,
    B_ID,
    B_URL,
    INTERVAL,
    STORED,
    at,
    make_spec,
    result,
)

USEC = timedelta(microseconds=1)
SUPERSEDED = RecordOutcome.SUPERSEDED
PAUSED = RecordOutcome.TASK_PAUSED
MISALIGNED = RecordOutcome.MISALIGNED


def audit(action: str) -> AuditEvent:
    return AuditEvent(ANCHOR, "operator:alice", action, "t", "127.0.0.1")


# -- pure rules --------------------------------------------------------------------------------


def test_a_pause_holds_the_instants_after_it_up_to_and_including_the_resume() -> None:
    pauses = [(at(2), at(4))]
    assert not in_pause(pauses, at(2))  # the instant of the pause itself ran
    assert in_pause(pauses, at(2) + USEC)
    assert in_pause(pauses, at(4))  # the resume's own instant was still paused
    assert not in_pause(pauses, at(4) + USEC)
    assert in_pause([(at(2), None)], at(100))


def test_the_revision_in_effect_is_the_latest_that_took_effect_strictly_before() -> None:
    anchor2 = at(3) + timedelta(seconds=7)
    revisions = [
        Revision(1, ANCHOR, ANCHOR, INTERVAL),
        Revision(2, anchor2, anchor2, timedelta(seconds=60)),
    ]
    assert scheduled_verdict(revisions, [], None, at(3), 1) == (None, 1)
    assert scheduled_verdict(revisions, [], None, at(4), 1) == (SUPERSEDED, 0)  # old grid
    new_first = anchor2 + timedelta(seconds=60)
    assert scheduled_verdict(revisions, [], None, new_first, 2) == (None, 2)
    assert scheduled_verdict(revisions, [], None, new_first, 1) == (SUPERSEDED, 2)
    assert scheduled_verdict(revisions, [], None, new_first, None) == (None, 2)  # older agent
    assert scheduled_verdict(revisions, [], None, at(4) + USEC, 2) == (MISALIGNED, 0)


def test_a_change_that_changes_nothing_makes_no_revision() -> None:
    spec = make_spec()
    assert revise(spec, TaskChange(command=spec.command), at(3)) is None
    hourly = dataclasses.replace(spec, frequency=parse_frequency("every 1 hours"))
    respelled = revise(hourly, TaskChange(frequency=parse_frequency("every 60 minutes")), at(3))
    assert respelled is not None and respelled.anchor == spec.anchor  # the same grid
    changed = revise(spec, TaskChange(frequency=parse_frequency("every 60 seconds")), at(3))
    assert changed is not None and changed.anchor == at(3) and changed.revision == 2
    kept = revise(spec, TaskChange(command="echo new"), at(3))
    assert kept is not None and kept.anchor == spec.anchor and kept.revision == 2


# -- both stores ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_patch_is_a_revision_and_old_revisions_are_superseded(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    assert await store.record_results([result(task.task_id, A_ID, 1)], at(1)) == [STORED]
    changed_at = at(2) + timedelta(seconds=5)
    answer = await store.update_task(
        task.task_id, TaskChange(command="echo two"), changed_at, audit("task.updated")
    )
    assert answer is not None
    updated, changed = answer
    assert changed and updated.spec.revision == 2 and updated.spec.command == "echo two"
    assert updated.spec.anchor == ANCHOR and updated.updated_at == changed_at
    assert await store.get_task(task.task_id) == updated
    # The instant before the change is revision 1's; after it, revision 2's only.
    assert await store.record_results(
        [
            result(task.task_id, A_ID, 2, revision=1),
            result(task.task_id, A_ID, 3, revision=1),
            result(task.task_id, B_ID, 3, revision=2),
            result(task.task_id, A_ID, 4, revision=None),  # an older agent: in effect
        ],
        at(4),
    ) == [STORED, SUPERSEDED, STORED, STORED]
    history = await store.list_executions(task.task_id, 10)
    assert [(e.scheduled_at, e.revision) for e in history] == [
        (at(4), 2),
        (at(3), 2),
        (at(2), 1),
        (at(1), 1),
    ]
    assert {r.revision for e in history for r in e.results if e.scheduled_at >= at(3)} == {2}
    # A PATCH that changes nothing is no revision, and writes no audit.
    before = await store.audit_events(100)
    again = await store.update_task(
        task.task_id, TaskChange(command="echo two"), at(5), audit("task.updated")
    )
    assert again == (updated, False)
    events = await store.audit_events(100)
    assert len(events) == len(before) + 0
    assert events[0].details == {
        "old": {"command": "echo hello"},
        "new": {"command": "echo two"},
        "revision": 2,
    }


@pytest_twisted.ensureDeferred
async def test_a_new_frequency_re_anchors_at_the_change(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    changed_at = at(2) + timedelta(seconds=5)
    answer = await store.update_task(
        task.task_id,
        TaskChange(frequency=parse_frequency("every 60 seconds")),
        changed_at,
        audit("task.updated"),
    )
    assert answer is not None and answer[0].spec.anchor == changed_at
    first = instant(changed_at, timedelta(seconds=60), 1)
    assert await store.record_results(
        [
            result(task.task_id, A_ID, 3, revision=1),  # the old grid, after the change
            dataclasses.replace(result(task.task_id, A_ID, 1, revision=2), scheduled_at=first),
            dataclasses.replace(
                result(task.task_id, B_ID, 1, revision=2), scheduled_at=first + USEC
            ),
        ],
        at(5),
    ) == [SUPERSEDED, STORED, MISALIGNED]


@pytest_twisted.ensureDeferred
async def test_a_changed_task_is_due_again_and_an_older_acknowledgement_does_not_count(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.mark_delivered(A_URL, [task.task_id], A_ID, [1])
    assert await store.undelivered_tasks(A_URL, 10) == []
    answer = await store.update_task(
        task.task_id, TaskChange(command="echo two"), at(2), audit("task.updated")
    )
    assert answer is not None
    assert [t.spec.revision for t in await store.undelivered_tasks(A_URL, 10)] == [2]
    await store.mark_delivered(A_URL, [task.task_id], A_ID, [1])  # sent before the PATCH
    assert [t.spec.revision for t in await store.undelivered_tasks(A_URL, 10)] == [2]
    await store.mark_delivered(A_URL, [task.task_id], A_ID, [2])
    assert await store.undelivered_tasks(A_URL, 10) == []


@pytest_twisted.ensureDeferred
async def test_a_paused_task_is_removed_everywhere_its_instants_refused_then_resumed(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.mark_delivered(A_URL, [task.task_id], A_ID)
    await store.mark_delivered(B_URL, [task.task_id], B_ID)
    paused_at = at(2) + timedelta(seconds=1)
    answer = await store.pause_task(task.task_id, paused_at, audit("task.paused"))
    assert answer is not None and answer[1] and answer[0].state is TaskState.PAUSED
    assert await store.pause_task(task.task_id, at(3), audit("task.paused")) == (answer[0], False)
    for url in (A_URL, B_URL):
        assert await store.pending_removals(url, 10) == [task.task_id]
        assert await store.assigned_task_ids(url) == set()
        await store.mark_removed(url, [task.task_id])
    assert await store.undelivered_tasks(A_URL, 10) == []
    resumed_at = at(5)
    resumed = await store.resume_task(task.task_id, resumed_at, audit("task.resumed"))
    assert resumed is not None and resumed[1] and resumed[0].state is TaskState.ACTIVE
    assert resumed[0].spec.anchor == ANCHOR  # the same grid
    assert await store.resume_task(task.task_id, at(6), audit("x")) == (resumed[0], False)
    assert await store.undelivered_tasks(A_URL, 10) == [resumed[0]]
    assert await store.record_results(
        [result(task.task_id, A_ID, k) for k in (2, 3, 5, 6)], at(6)
    ) == [STORED, PAUSED, PAUSED, STORED]
    actions = [e.action for e in await store.audit_events(10)]
    assert actions == ["task.resumed", "task.paused"]


@pytest_twisted.ensureDeferred
async def test_a_run_now_is_a_manual_execution_delivered_until_acknowledged(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    now = at(3) + timedelta(seconds=4)
    execution = await store.record_manual_execution(task.task_id, now, audit("task.run"))
    assert execution is not None
    assert (execution.trigger, execution.revision, execution.expected) == (Trigger.MANUAL, 1, 2)
    with pytest.raises(ValueError):  # one execution per instant
        await store.record_manual_execution(task.task_id, now, audit("task.run"))
    for url in (A_URL, B_URL):
        [run] = await store.pending_manual_runs(url, now, 10)
        assert (run.spec.task_id, run.scheduled_at, run.revision) == (task.task_id, now, 1)
    await store.mark_manual_delivered(A_URL, [(task.task_id, now)])
    assert await store.pending_manual_runs(A_URL, now, 10) == []
    assert await store.pending_manual_runs(B_URL, now + INTERVAL - USEC, 10) != []
    assert await store.pending_manual_runs(B_URL, now + INTERVAL, 10) == []  # past its deadline
    manual = dataclasses.replace(
        result(task.task_id, A_ID, 3), scheduled_at=now, trigger=Trigger.MANUAL
    )
    elsewhere = dataclasses.replace(manual, scheduled_at=now + USEC)
    scheduled_there = dataclasses.replace(manual, trigger=Trigger.SCHEDULE)
    assert await store.record_results([manual, elsewhere, scheduled_there], now) == [
        STORED,
        MISALIGNED,
        MISALIGNED,
    ]
    found = await store.get_execution(task.task_id, now)
    assert found is not None and found.trigger is Trigger.MANUAL
    assert [r.trigger for r in found.results] == [Trigger.MANUAL]
    assert await store.get_execution(task.task_id, now + USEC) is None
    [summary] = (await store.last_executions([task.task_id])).values()
    assert (summary.scheduled_at, summary.trigger, len(summary.statuses)) == (
        now,
        Trigger.MANUAL,
        1,
    )


@pytest.mark.parametrize("limit", [1, 2, 3, 7])
@pytest_twisted.ensureDeferred
async def test_paging_through_tasks_sees_each_exactly_once_newest_first(
    store: Store, limit: int
) -> None:
    # Two tasks per creation instant: the task id breaks the tie.
    created = [
        await store.create_task(make_spec(f"job {i}"), ANCHOR + timedelta(seconds=i // 2))
        for i in range(7)
    ]
    seen = []
    after = None
    for _ in range(len(created) + 1):  # a cursor that repeats a page must not loop forever
        page = await store.list_tasks(limit, after)
        seen.extend(page)
        if len(page) < limit:
            break
        after = (page[-1].created_at, page[-1].task_id)
    expected = sorted(created, key=lambda t: (t.created_at, t.task_id), reverse=True)
    assert [t.task_id for t in seen] == [t.task_id for t in expected]


@pytest_twisted.ensureDeferred
async def test_tasks_filter_by_state_and_by_a_literal_substring(store: Store) -> None:
    plain = await store.create_task(make_spec("echo 100%_done"), ANCHOR)
    paused = await store.create_task(make_spec("echo 100 done"), ANCHOR)
    gone = await store.create_task(make_spec("echo x"), ANCHOR)
    await store.pause_task(paused.task_id, at(1), audit("task.paused"))
    await store.delete_task(gone.task_id, at(1), audit("task.deleted"))
    ids = lambda tasks: {t.task_id for t in tasks}  # noqa: E731
    assert ids(await store.list_tasks(10, state=TaskState.ACTIVE)) == {plain.task_id}
    assert ids(await store.list_tasks(10, state=TaskState.PAUSED)) == {paused.task_id}
    assert ids(await store.list_tasks(10, state=TaskState.DELETED)) == {gone.task_id}
    assert ids(await store.list_tasks(10, command="%_")) == {plain.task_id}
    assert ids(await store.list_tasks(10, command="100")) == {plain.task_id, paused.task_id}
    assert ids(await store.list_tasks(10, command="ECHO")) == set()


@pytest_twisted.ensureDeferred
async def test_retention_keeps_the_newest_executions_of_each_task(store: Store) -> None:
    one = await store.create_task(make_spec(), ANCHOR)
    two = await store.create_task(make_spec(), ANCHOR)
    await store.record_results([result(one.task_id, A_ID, k) for k in range(1, 7)], at(7))
    await store.record_results([result(two.task_id, A_ID, k) for k in range(1, 3)], at(7))
    assert await store.prune_history(at(100), 100, keep=3) == 3
    kept = [e.scheduled_at for e in await store.list_executions(one.task_id, 10)]
    assert kept == [at(6), at(5), at(4)]
    assert len(await store.list_executions(two.task_id, 10)) == 2
    assert await store.prune_history(at(100), 100, keep=3) == 0


@pytest_twisted.ensureDeferred
async def test_a_deleted_tasks_run_now_is_no_longer_due(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    now = at(3)
    assert await store.record_manual_execution(task.task_id, now, audit("task.run"))
    assert await store.delete_task(task.task_id, now, audit("task.deleted"))
    assert await store.pending_manual_runs(A_URL, now, 10) == []
