"""The Store contract, run against MemoryStore and PostgresStore (a real PostgreSQL).

What only PostgreSQL has (migrations, outages, query plans) is in test_store_postgres.py.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from taskscheduler.protocol import Output, ResultStatus, RunResult, TaskSpec
from taskscheduler.schedule import instant, parse_frequency
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AuditEvent, RecordOutcome, UnknownTask

T = TypeVar("T")

A_URL, B_URL, C_URL = "http://agent-a:8081", "http://agent-b:8081", "http://agent-c:8081"
A_ID = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")
B_ID = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")
ANCHOR = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)
INTERVAL = timedelta(seconds=30)
TIME_LIMIT = timedelta(seconds=10)
GRACE = timedelta(seconds=5)

STORED = RecordOutcome.STORED
DUPLICATE = RecordOutcome.DUPLICATE
CONFLICT = RecordOutcome.CONFLICT


def make_spec(command: str = "echo hello", anchor: datetime = ANCHOR) -> TaskSpec:
    return TaskSpec(
        task_id=uuid.uuid4(),
        command=command,
        frequency=parse_frequency("every 30 seconds"),
        anchor=anchor,
        time_limit=TIME_LIMIT,
    )


def at(k: int) -> datetime:
    return instant(ANCHOR, INTERVAL, k)


def result(
    task_id: uuid.UUID,
    agent_id: uuid.UUID,
    k: int,
    out: bytes = b"out",
    err: bytes = b"",
    **changes: Any,
) -> RunResult:
    scheduled = at(k)
    fields: dict[str, Any] = {
        "task_id": task_id,
        "agent_id": agent_id,
        "scheduled_at": scheduled,
        "status": ResultStatus.SUCCEEDED,
        "exit_code": 0,
        "started_at": scheduled + timedelta(milliseconds=1),
        "finished_at": scheduled + timedelta(milliseconds=20),
        "stdout": Output.of(out),
        "stderr": Output.of(err),
        "revision": 1,  # as an agent that knows revisions reports (an older one's: None)
    }
    fields.update(changes)
    return RunResult(**fields)


def before_deadline(k: int) -> datetime:
    """A moment when execution ``k`` may still be waiting for agents."""
    return at(k) + TIME_LIMIT


def after_deadline(k: int) -> datetime:
    return at(k) + TIME_LIMIT + GRACE + timedelta(microseconds=1)


async def within(seconds: float, coroutine: Coroutine[Any, Any, T]) -> T:
    """Await ``coroutine`` but fail the test if it takes longer than ``seconds``."""
    d: Deferred[T] = Deferred.fromCoroutine(coroutine)
    d.addTimeout(seconds, reactor)
    return await d


# -- tasks -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_created_task_reads_back_identically(store: Store) -> None:
    paris = timezone(timedelta(hours=1))
    spec = make_spec("printf 'a\\tb' | wc -c # ünïcödé", anchor=ANCHOR.astimezone(paris))
    created = await store.create_task(spec, created_at=ANCHOR.astimezone(paris))
    assert created.spec.anchor == ANCHOR and created.created_at == ANCHOR
    assert await store.get_task(spec.task_id) == created
    fetched = await store.get_task(spec.task_id)
    assert fetched is not None
    assert fetched.spec.anchor.utcoffset() == timedelta(0)
    assert str(fetched.spec.frequency) == "every 30 seconds"
    assert fetched.spec.time_limit == TIME_LIMIT
    assert await store.get_task(uuid.uuid4()) is None


@pytest_twisted.ensureDeferred
async def test_a_task_id_is_never_reused(store: Store) -> None:
    spec = make_spec()
    task = await store.create_task(spec, ANCHOR)
    with pytest.raises(ValueError, match="already exists"):
        await store.create_task(
            dataclasses.replace(make_spec("other"), task_id=spec.task_id), ANCHOR
        )
    assert await store.get_task(spec.task_id) == task


@pytest_twisted.ensureDeferred
async def test_a_new_task_is_assigned_undelivered_to_every_agent(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    for url in (A_URL, B_URL):
        assert await store.assigned_task_ids(url) == {task.task_id}
        assert await store.undelivered_tasks(url, 10) == [task]
    assert await store.assigned_task_ids(C_URL) == set()
    assert await store.undelivered_tasks(C_URL, 10) == []


@pytest_twisted.ensureDeferred
async def test_set_fleet_assigns_to_new_agents_and_unassigns_departed_ones(store: Store) -> None:
    one = await store.create_task(make_spec("one"), ANCHOR)
    two = await store.create_task(make_spec("two"), ANCHOR + timedelta(seconds=1))
    await store.mark_delivered(A_URL, [one.task_id, two.task_id], A_ID)

    await store.set_fleet([A_URL, B_URL, C_URL])
    assert await store.undelivered_tasks(C_URL, 10) == [one, two]
    assert await store.undelivered_tasks(A_URL, 10) == [], "A's deliveries were forgotten"

    await store.set_fleet([A_URL, C_URL])
    assert await store.assigned_task_ids(B_URL) == set()
    assert await store.undelivered_tasks(B_URL, 10) == []
    # Idempotent: nothing changes, delivered stays delivered.
    await store.set_fleet([A_URL, C_URL])
    assert await store.assigned_task_ids(A_URL) == {one.task_id, two.task_id}
    assert await store.undelivered_tasks(A_URL, 10) == []
    # A returning agent starts over: it must be sent everything again.
    await store.set_fleet([A_URL, B_URL, C_URL])
    assert await store.undelivered_tasks(B_URL, 10) == [one, two]

    three = await store.create_task(make_spec("three"), ANCHOR + timedelta(seconds=2))
    await store.set_fleet([])
    assert await store.assigned_task_ids(A_URL) == set()
    await store.set_fleet([B_URL])
    assert await store.undelivered_tasks(B_URL, 10) == [one, two, three]


@pytest_twisted.ensureDeferred
async def test_undelivered_tasks_come_oldest_first_up_to_the_limit(store: Store) -> None:
    middle = await store.create_task(make_spec("middle"), ANCHOR + timedelta(seconds=5))
    newest = await store.create_task(make_spec("newest"), ANCHOR + timedelta(seconds=9))
    oldest = await store.create_task(make_spec("oldest"), ANCHOR)
    assert await store.undelivered_tasks(A_URL, 2) == [oldest, middle]
    assert await store.undelivered_tasks(A_URL, 10) == [oldest, middle, newest]


@pytest_twisted.ensureDeferred
async def test_delivery_bookkeeping_is_per_agent(store: Store) -> None:
    one = await store.create_task(make_spec("one"), ANCHOR)
    two = await store.create_task(make_spec("two"), ANCHOR + timedelta(seconds=1))
    await store.mark_delivered(A_URL, [one.task_id, uuid.uuid4()], A_ID)
    assert await store.undelivered_tasks(A_URL, 10) == [two]
    assert await store.undelivered_tasks(B_URL, 10) == [one, two]
    assert await store.assigned_task_ids(A_URL) == {one.task_id, two.task_id}

    await store.mark_delivered(C_URL, [two.task_id], A_ID)  # not assigned there: no effect
    assert await store.assigned_task_ids(C_URL) == set()

    await store.mark_undelivered(A_URL, [one.task_id])
    assert await store.undelivered_tasks(A_URL, 10) == [one, two]
    await store.mark_delivered(A_URL, [], A_ID)
    await store.mark_undelivered(A_URL, [])
    assert await store.undelivered_tasks(A_URL, 10) == [one, two]


# -- results ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_result_is_stored_once_and_a_resend_is_a_duplicate(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    first = result(task.task_id, A_ID, 1)
    assert await store.record_results([first], at(1)) == [STORED]
    assert await store.record_results([first], at(2)) == [DUPLICATE]
    # Equal instants in another time zone are the same result.
    shifted = timezone(timedelta(hours=-5))
    moved = result(
        task.task_id,
        A_ID,
        1,
        scheduled_at=at(1).astimezone(shifted),
        started_at=first.started_at.astimezone(shifted) if first.started_at else None,
    )
    assert await store.record_results([moved], at(2)) == [DUPLICATE]


@pytest.mark.parametrize(
    "change",
    [
        {"stdout": Output.of(b"other")},
        {"stderr": Output.of(b"warning")},
        {"status": ResultStatus.FAILED, "exit_code": 1},
        {"exit_code": None, "signal": 9, "status": ResultStatus.FAILED},
        {"finished_at": at(1) + timedelta(milliseconds=21)},
        {"stdout": Output(b"out", 10_000, True)},
        {"reason": "the agent was overloaded"},
    ],
    ids=["stdout", "stderr", "exit", "signal", "finished", "truncation", "reason"],
)
@pytest_twisted.ensureDeferred
async def test_a_different_result_under_the_same_key_conflicts_and_changes_nothing(
    store: Store, change: dict[str, Any]
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    original = [result(task.task_id, A_ID, 1), result(task.task_id, B_ID, 1)]
    assert await store.record_results(original, at(1)) == [STORED, STORED]
    other = result(task.task_id, A_ID, 1, **change)
    assert await store.record_results([other], at(2)) == [CONFLICT]
    execution = await store.latest_complete_execution(task.task_id, at(1), GRACE)
    assert execution is not None
    assert execution.results == tuple(original)


@pytest_twisted.ensureDeferred
async def test_results_for_unknown_tasks_or_off_schedule_instants_are_refused(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    refused = [
        result(uuid.uuid4(), A_ID, 1),
        result(task.task_id, A_ID, 1, scheduled_at=ANCHOR),  # k = 0
        result(task.task_id, A_ID, 1, scheduled_at=at(-1)),
        result(task.task_id, A_ID, 1, scheduled_at=at(1) + timedelta(microseconds=1)),
        result(task.task_id, A_ID, 1, scheduled_at=at(1) + INTERVAL / 2),
    ]
    outcomes = await store.record_results(refused, at(1))
    assert outcomes == [RecordOutcome.UNKNOWN_TASK] + [RecordOutcome.MISALIGNED] * 4
    assert await store.latest_complete_execution(task.task_id, after_deadline(2), GRACE) is None


@pytest_twisted.ensureDeferred
async def test_a_batch_gets_one_outcome_per_result_in_order(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    earlier = result(task.task_id, B_ID, 1, out=b"b1")
    assert await store.record_results([earlier], at(1)) == [STORED]
    batch = [
        result(task.task_id, A_ID, 2, out=b"a2"),
        result(uuid.uuid4(), A_ID, 2),
        earlier,
        result(task.task_id, B_ID, 1, out=b"not b1"),
        result(task.task_id, A_ID, 2, out=b"a2"),  # repeated within the batch
        result(task.task_id, A_ID, 2, out=b"a2 again"),  # contradicted within the batch
        result(task.task_id, A_ID, 2, scheduled_at=at(2) + timedelta(seconds=1)),
        result(task.task_id, A_ID, 1, out=b"a1"),
    ]
    outcomes = await store.record_results(batch, at(3))
    assert outcomes == [
        STORED,
        RecordOutcome.UNKNOWN_TASK,
        DUPLICATE,
        CONFLICT,
        DUPLICATE,
        CONFLICT,
        RecordOutcome.MISALIGNED,
        STORED,
    ]
    first = await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE)
    assert first is not None and first.scheduled_at == at(1)
    assert [r.stdout.data for r in first.results] == [b"a1", b"b1"]
    assert await store.record_results([], at(3)) == []


@pytest_twisted.ensureDeferred
async def test_a_big_batch_is_stored_whole(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    batch = [result(task.task_id, agent, k) for k in range(1, 501) for agent in (A_ID, B_ID)]
    assert await store.record_results(batch, at(501)) == [STORED] * 1000
    assert await store.record_results(batch, at(501)) == [DUPLICATE] * 1000
    latest = await store.latest_complete_execution(task.task_id, at(501), GRACE)
    assert latest is not None and latest.scheduled_at == at(500)


@pytest_twisted.ensureDeferred
async def test_concurrent_reports_of_one_result_store_it_once(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    same = result(task.task_id, A_ID, 1)
    calls = [
        Deferred.fromCoroutine(store.record_results([same, result(task.task_id, B_ID, 1)], at(1)))
        for _ in range(4)
    ]
    outcomes = [value for _, value in await DeferredList(calls, fireOnOneErrback=True)]
    assert sorted(o[0] for o in outcomes) == [DUPLICATE] * 3 + [STORED]
    execution = await store.latest_complete_execution(task.task_id, at(1), GRACE)
    assert execution is not None and len(execution.results) == 2


@pytest.mark.parametrize(
    "stdout",
    [
        b"nul\x00in the\x00middle\x00",
        b"\xff\xfe invalid utf-8 \xc3\x28 \xed\xa0\x80",
        bytes(range(256)) * 4096,  # 1 MiB of every byte value
        b"",
    ],
    ids=["nul", "invalid-utf8", "one-mebibyte", "empty"],
)
@pytest_twisted.ensureDeferred
async def test_output_bytes_round_trip_exactly(store: Store, stdout: bytes) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    reported = [
        result(task.task_id, A_ID, 1, out=stdout, err=stdout[::-1]),
        RunResult(
            task_id=task.task_id,
            agent_id=B_ID,
            scheduled_at=at(1),
            status=ResultStatus.TIMED_OUT,
            signal=15,
            started_at=at(1),
            finished_at=None,
            stdout=Output(stdout[:10] + stdout[-10:], len(stdout) + 5, True),
            revision=1,
        ),
    ]
    assert await store.record_results(reported, at(1)) == [STORED, STORED]
    execution = await store.latest_complete_execution(task.task_id, at(1), GRACE)
    assert execution is not None
    assert execution.results == tuple(reported)
    assert await store.record_results(reported, at(1)) == [DUPLICATE, DUPLICATE]


@pytest_twisted.ensureDeferred
async def test_a_reason_round_trips_and_none_stays_none(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    skipped = result(
        task.task_id,
        A_ID,
        1,
        out=b"",
        status=ResultStatus.SKIPPED,
        exit_code=None,
        started_at=None,
        finished_at=None,
        reason="the previous run was still going",
    )
    lost = result(task.task_id, B_ID, 1, status=ResultStatus.LOST, reason="l'agent est mort ☠")
    plain = result(task.task_id, A_ID, 2)
    assert await store.record_results([skipped, lost, plain], at(2)) == [STORED] * 3
    latest = await store.latest_complete_execution(task.task_id, at(1), GRACE)
    assert latest is not None and latest.results == (skipped, lost)
    [second, first] = await store.list_executions(task.task_id, 10)
    assert first.results == (skipped, lost)
    assert second.results == (plain,) and plain.reason is None
    assert await store.record_results([skipped, lost], at(2)) == [DUPLICATE, DUPLICATE]


# -- history ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_history_pages_newest_first_with_each_executions_own_results(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    other = await store.create_task(make_spec("other"), ANCHOR)
    await store.record_results([result(other.task_id, A_ID, 2, out=b"not mine")], at(2))
    assert await store.list_executions(task.task_id, 10) == []
    for k in (1, 2, 3, 5):
        await store.record_results([result(task.task_id, A_ID, k, out=b"a%d" % k)], at(k))
    await store.record_results([result(task.task_id, B_ID, 2, out=b"b2")], at(2))

    page = await store.list_executions(task.task_id, 2)
    assert [e.scheduled_at for e in page] == [at(5), at(3)]
    assert [[r.stdout.data for r in e.results] for e in page] == [[b"a5"], [b"a3"]]
    rest = await store.list_executions(task.task_id, 10, before=page[-1].scheduled_at)
    assert [e.scheduled_at for e in rest] == [at(2), at(1)]
    assert [r.stdout.data for r in rest[0].results] == [b"a2", b"b2"]  # by agent_id
    assert all(e.expected == 2 and e.task_id == task.task_id for e in page + rest)
    with pytest.raises(UnknownTask):
        await store.list_executions(uuid.uuid4(), 10)


# -- retention -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pruning_removes_old_executions_with_their_results_oldest_first(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    other = await store.create_task(make_spec("other"), ANCHOR)
    for k in range(1, 7):
        await store.record_results(
            [result(task.task_id, A_ID, k), result(task.task_id, B_ID, k)], at(k)
        )
    for k in (2, 5):
        await store.record_results([result(other.task_id, A_ID, k)], at(k))

    # Before at(5): task's 1-4 and other's 2 qualify; the limit takes the oldest three.
    assert await store.prune_history(at(5), 3) == 3
    history = await store.list_executions(task.task_id, 10)
    assert [e.scheduled_at for e in history] == [at(6), at(5), at(4), at(3)]
    assert [e.scheduled_at for e in await store.list_executions(other.task_id, 10)] == [at(5)]
    assert await store.prune_history(at(5), 3) == 2
    assert await store.prune_history(at(5), 3) == 0
    history = await store.list_executions(task.task_id, 10)
    assert [e.scheduled_at for e in history] == [at(6), at(5)]
    assert all(len(e.results) == 2 for e in history)  # the recent ones keep every result
    assert [e.scheduled_at for e in await store.list_executions(other.task_id, 10)] == [at(5)]
    latest = await store.latest_complete_execution(task.task_id, after_deadline(6), GRACE)
    assert latest is not None and latest.scheduled_at == at(6)

    # A pruned instant is gone for good: a late resend of it starts a new execution.
    assert await store.record_results([result(task.task_id, A_ID, 1)], at(7)) == [STORED]


@pytest_twisted.ensureDeferred
async def test_a_task_whose_whole_history_is_pruned_answers_like_a_new_one(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    for k in (1, 2):
        await store.record_results(
            [result(task.task_id, A_ID, k), result(task.task_id, B_ID, k)], at(k)
        )
    assert await store.latest_complete_execution(task.task_id, after_deadline(2), GRACE)
    assert await store.prune_history(at(3), 100) == 2
    assert await store.latest_complete_execution(task.task_id, after_deadline(2), GRACE) is None
    assert await store.list_executions(task.task_id, 10) == []
    assert await store.get_task(task.task_id) == task  # the task itself stays
    # New results of the task are taken as ever.
    assert await store.record_results([result(task.task_id, A_ID, 3)], at(3)) == [STORED]
    latest = await store.latest_complete_execution(task.task_id, after_deadline(3), GRACE)
    assert latest is not None and latest.scheduled_at == at(3)


@pytest_twisted.ensureDeferred
async def test_pruning_never_touches_the_audit_log(store: Store) -> None:
    audit = AuditEvent(
        at=ANCHOR, actor="operator:alice", action="task.created", target="t", peer="127.0.0.1"
    )
    task = await store.create_task(make_spec(), ANCHOR, audit)
    await store.record_results([result(task.task_id, A_ID, 1)], at(1))
    assert await store.prune_history(at(100), 100) == 1
    assert [e.action for e in await store.audit_events(10)] == ["task.created"]


# -- latest complete execution ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_latest_is_none_before_anything_and_unknown_tasks_raise(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    assert await store.latest_complete_execution(task.task_id, after_deadline(5), GRACE) is None
    with pytest.raises(UnknownTask):
        await store.latest_complete_execution(uuid.uuid4(), after_deadline(5), GRACE)


@pytest_twisted.ensureDeferred
async def test_an_execution_is_complete_once_every_assigned_agent_reported(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    b_result = result(task.task_id, B_ID, 1, out=b"from b")
    a_result = result(task.task_id, A_ID, 1, out=b"from a")
    await store.record_results([b_result], at(1))
    assert await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE) is None
    await store.record_results([a_result], at(1))
    execution = await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE)
    assert execution is not None
    assert execution.task_id == task.task_id
    assert execution.scheduled_at == at(1)
    assert execution.expected == 2
    assert execution.results == (a_result, b_result)  # ordered by agent_id
    assert execution.completion_time == at(1) + timedelta(milliseconds=20)


@pytest_twisted.ensureDeferred
async def test_a_half_filled_newer_execution_never_hides_a_complete_older_one(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.record_results(
        [result(task.task_id, A_ID, 1, out=b"1a"), result(task.task_id, B_ID, 1, out=b"1b")],
        at(1),
    )
    await store.record_results([result(task.task_id, A_ID, 2, out=b"2a")], at(2))
    await store.record_results([result(task.task_id, B_ID, 3, out=b"3b")], at(3))
    latest = await store.latest_complete_execution(task.task_id, before_deadline(2), GRACE)
    assert latest is not None and latest.scheduled_at == at(1)
    assert [r.stdout.data for r in latest.results] == [b"1a", b"1b"]

    # Its deadline passed: execution 2 closes with the agent that reported, alone.
    latest = await store.latest_complete_execution(task.task_id, after_deadline(2), GRACE)
    assert latest is not None and latest.scheduled_at == at(2)
    assert [(r.agent_id, r.stdout.data) for r in latest.results] == [(A_ID, b"2a")]
    # A late result still counts, and never moves into another execution.
    await store.record_results([result(task.task_id, B_ID, 2, out=b"2b")], at(4))
    latest = await store.latest_complete_execution(task.task_id, after_deadline(2), GRACE)
    assert latest is not None and [r.stdout.data for r in latest.results] == [b"2a", b"2b"]
    latest = await store.latest_complete_execution(task.task_id, after_deadline(3), GRACE)
    assert latest is not None and latest.scheduled_at == at(3)
    assert [r.stdout.data for r in latest.results] == [b"3b"]


@pytest_twisted.ensureDeferred
async def test_the_deadline_is_time_limit_plus_grace_after_the_instant(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.record_results([result(task.task_id, A_ID, 1)], at(1))
    deadline = at(1) + TIME_LIMIT + GRACE
    assert await store.latest_complete_execution(task.task_id, deadline, GRACE) is None
    later = await store.latest_complete_execution(
        task.task_id, deadline + timedelta(microseconds=1), GRACE
    )
    assert later is not None and later.scheduled_at == at(1)
    wider = await store.latest_complete_execution(
        task.task_id, deadline + timedelta(microseconds=1), GRACE * 2
    )
    assert wider is None


@pytest_twisted.ensureDeferred
async def test_expected_agents_are_fixed_when_an_execution_is_first_reported(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.record_results([result(task.task_id, A_ID, 1)], at(1))
    await store.set_fleet([A_URL])
    await store.record_results([result(task.task_id, A_ID, 2)], at(2))
    # Execution 2 expected one agent and is complete; execution 1 still waits for B.
    latest = await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE)
    assert latest is not None and latest.scheduled_at == at(2) and latest.expected == 1
    await store.set_fleet([])
    await store.record_results([result(task.task_id, A_ID, 3)], at(3))
    latest = await store.latest_complete_execution(task.task_id, before_deadline(3), GRACE)
    assert latest is not None and latest.scheduled_at == at(3) and latest.expected == 0


# -- deleting tasks ---------------------------------------------------------------------------


def deletion(task_id: uuid.UUID) -> AuditEvent:
    return AuditEvent(at(2), "operator:alice", "task.deleted", str(task_id), "10.0.0.9")


@pytest_twisted.ensureDeferred
async def test_a_deleted_task_keeps_its_history_and_writes_its_audit_event(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    first = [result(task.task_id, A_ID, 1), result(task.task_id, B_ID, 1)]
    assert await store.record_results(first, at(1)) == [STORED, STORED]

    deleted = await store.delete_task(task.task_id, at(2), deletion(task.task_id))
    assert deleted is not None and deleted.deleted_at == at(2)
    assert deleted.spec == task.spec and deleted.created_at == task.created_at
    assert await store.get_task(task.task_id) == deleted
    latest = await store.latest_complete_execution(task.task_id, at(2), GRACE)
    assert latest is not None and latest.scheduled_at == at(1) and len(latest.results) == 2
    assert [e.scheduled_at for e in await store.list_executions(task.task_id, 10)] == [at(1)]
    [event] = await store.audit_events(10)
    assert (event.action, event.target, event.actor, event.peer) == (
        "task.deleted",
        str(task.task_id),
        "operator:alice",
        "10.0.0.9",
    )

    # Only once: a second deletion, or one of an unknown task, changes nothing.
    assert await store.delete_task(task.task_id, at(3), deletion(task.task_id)) is None
    assert await store.delete_task(uuid.uuid4(), at(3), deletion(task.task_id)) is None
    assert (await store.get_task(task.task_id)) == deleted
    assert len(await store.audit_events(10)) == 1


@pytest_twisted.ensureDeferred
async def test_results_scheduled_after_the_deletion_are_refused_earlier_ones_taken(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    other = await store.create_task(make_spec("other"), ANCHOR)
    # Deleted exactly at instant 2: instant 2 began before any agent could know.
    await store.delete_task(task.task_id, at(2), deletion(task.task_id))
    batch = [
        result(task.task_id, A_ID, 1),
        result(task.task_id, A_ID, 2),
        result(task.task_id, A_ID, 3),
        result(other.task_id, A_ID, 3),
        result(task.task_id, B_ID, 3),
    ]
    outcomes = await store.record_results(batch, at(3))
    assert outcomes == [STORED, STORED, RecordOutcome.DELETED, STORED, RecordOutcome.DELETED]
    assert await store.record_results(batch[:3], at(3)) == [
        DUPLICATE,
        DUPLICATE,
        RecordOutcome.DELETED,
    ]
    instants = [e.scheduled_at for e in await store.list_executions(task.task_id, 10)]
    assert instants == [at(2), at(1)], "no execution is made for a refused result"


@pytest_twisted.ensureDeferred
async def test_a_deleted_task_is_never_delivered_and_is_removed_from_each_agent(
    store: Store,
) -> None:
    kept = await store.create_task(make_spec("kept"), ANCHOR)
    gone = await store.create_task(make_spec("gone"), ANCHOR + timedelta(seconds=1))
    never = await store.create_task(make_spec("never"), ANCHOR + timedelta(seconds=2))
    await store.mark_delivered(A_URL, [kept.task_id, gone.task_id], A_ID)
    assert await store.pending_removals(A_URL, 10) == []

    await store.delete_task(gone.task_id, at(2), deletion(gone.task_id))
    await store.delete_task(never.task_id, at(3), deletion(never.task_id))
    for url in (A_URL, B_URL):
        assert [t.task_id for t in await store.undelivered_tasks(url, 10)] == (
            [] if url == A_URL else [kept.task_id]
        )
        assert await store.assigned_task_ids(url) == {kept.task_id}
        # Still assigned for the results that were due before the deletion.
        assert await store.assigned_among(url, [kept.task_id, gone.task_id]) == {
            kept.task_id,
            gone.task_id,
        }
        assert await store.pending_removals(url, 10) == [gone.task_id, never.task_id]
    assert await store.pending_removals(A_URL, 1) == [gone.task_id]
    assert await store.pending_removals(C_URL, 10) == []

    await store.mark_removed(A_URL, [gone.task_id, kept.task_id])
    await store.mark_removed(A_URL, [])
    assert await store.pending_removals(A_URL, 10) == [never.task_id]
    assert await store.pending_removals(B_URL, 10) == [gone.task_id, never.task_id]

    # The agent turns out to still have it (reconciliation): removed again. A live task
    # or an unknown one is not.
    marked = await store.request_removal(A_URL, [gone.task_id, kept.task_id, uuid.uuid4()])
    assert marked == {gone.task_id}
    assert await store.request_removal(A_URL, []) == set()
    assert await store.pending_removals(A_URL, 10) == [gone.task_id, never.task_id]

    # A new agent of the fleet is never given a deleted task.
    await store.set_fleet([A_URL, B_URL, C_URL])
    assert await store.undelivered_tasks(C_URL, 10) == [kept]
    assert await store.pending_removals(C_URL, 10) == []
