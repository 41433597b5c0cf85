"""The Store contract, run against MemoryStore and PostgresStore (a real PostgreSQL).

Then what only PostgreSQL has: migrations, outages, query plans, the embedded server.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import psutil
import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList

from taskscheduler.embedded_pg import EmbeddedPostgres
from taskscheduler.protocol import Output, ResultStatus, RunResult, TaskSpec
from taskscheduler.schedule import instant, parse_frequency
from taskscheduler.server.store.interface import (
    AuditEvent,
    RecordOutcome,
    Store,
    StoreUnavailable,
    UnknownTask,
)
from taskscheduler.server.store.migrations import MIGRATIONS
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.results import (
    EXECUTION_RESULTS_SQL,
    LATEST_EXECUTION_SQL,
    PRUNE_SQL,
)
from taskscheduler.server.store.rules import result_digest
from tests.conftest import RestartablePostgres, _create_database, _drop_database
from tests.integration.daemons import wait_for

T = TypeVar("T")

A_URL, B_URL, C_URL = "http://agent-a:8081", "http://agent-b:8081", "http://agent-c:8081"
A_ID = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")
B_ID = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")
ANCHOR = datetime(2026, 11, 27, 7, 30, 0, 123456, tzinfo=UTC)
INTERVAL = timedelta(seconds=30)
TIME_LIMIT = timedelta(seconds=10)
GRACE = timedelta(seconds=5)
#: result_digest() of the result in test_a_result_without_a_reason_digests_as_before...,
#: as computed before results had a reason.
OLD_DIGEST = "b1fca4febcfb039812c324c283d45ee09146c53ce4432d6f7357b92772600492"

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


def test_a_result_without_a_reason_digests_as_before_reasons_existed() -> None:
    """Results stored before migration 5 must still be duplicates of their resends."""
    task_id = uuid.UUID("cccccccc-0000-4000-8000-000000000003")
    old = result(task_id, A_ID, 1, err=b"warn")
    # The digest main computed before the reason field existed, for this very result.
    assert result_digest(old).hex() == OLD_DIGEST
    assert result_digest(dataclasses.replace(old, reason="why")) != result_digest(old)


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


# -- PostgreSQL only -------------------------------------------------------------------------


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


def _query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_migrations_apply_once_even_when_servers_start_together(database_dsn: str) -> None:
    stores = [PostgresStore(database_dsn, reactor=reactor) for _ in range(3)]
    await DeferredList([Deferred.fromCoroutine(s.start()) for s in stores], fireOnOneErrback=True)
    task = await stores[0].create_task(make_spec(), ANCHOR)
    for s in stores:
        await s.stop()
    again = PostgresStore(database_dsn, reactor=reactor)
    await again.start()
    assert await again.get_task(task.task_id) == task
    await again.stop()
    versions = _query(database_dsn, "SELECT version FROM schema_migrations ORDER BY version")
    assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]


@pytest_twisted.ensureDeferred
async def test_a_schema_newer_than_the_server_is_refused(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await store.stop()
    _query(database_dsn, "INSERT INTO schema_migrations (version) VALUES (%s)", (999,))
    with pytest.raises(RuntimeError, match="newer"):
        await PostgresStore(database_dsn, reactor=reactor).start()


@pytest_twisted.ensureDeferred
async def test_a_database_restart_is_unavailable_then_recovers_by_itself(
    restartable_postgres: RestartablePostgres,
) -> None:
    name, dsn = _create_database(restartable_postgres.server_dsn)
    try:
        await _survive_a_restart(restartable_postgres, dsn)
    finally:
        _drop_database(restartable_postgres.server_dsn, name)


async def _survive_a_restart(restartable_postgres: RestartablePostgres, dsn: str) -> None:
    store = PostgresStore(dsn, reactor=reactor, connect_timeout=2, operation_timeout=5)
    await store.start()
    await store.set_fleet([A_URL])
    task = await store.create_task(make_spec(), ANCHOR)
    # Fill the pool with idle connections that the restart will kill.
    await DeferredList([Deferred.fromCoroutine(store.get_task(task.task_id)) for _ in range(4)])

    await restartable_postgres.stop()
    with pytest.raises(StoreUnavailable):
        await within(10, store.get_task(task.task_id))
    with pytest.raises(StoreUnavailable):
        await within(10, store.record_results([result(task.task_id, A_ID, 1)], at(1)))
    with pytest.raises(StoreUnavailable):
        await within(10, store.latest_complete_execution(task.task_id, at(5), GRACE))

    await restartable_postgres.start()
    assert await within(10, store.get_task(task.task_id)) == task
    outcomes = await within(10, store.record_results([result(task.task_id, A_ID, 1)], at(1)))
    assert outcomes == [STORED]  # the attempt during the outage stored nothing
    latest = await store.latest_complete_execution(task.task_id, at(1), GRACE)
    assert latest is not None and latest.scheduled_at == at(1)
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_a_stuck_database_call_gives_up_at_its_deadline(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor, operation_timeout=0.5)
    await store.start()
    task = await store.create_task(make_spec(), ANCHOR)
    blocker = psycopg2.connect(database_dsn)
    try:
        blocker.cursor().execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(StoreUnavailable, match="did not answer"):
            await within(10, store.get_task(task.task_id))
    finally:
        blocker.rollback()
        blocker.close()
    assert await within(10, store.get_task(task.task_id)) == task
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_an_unreachable_database_fails_fast(tmp_path: Path) -> None:
    nobody = f"host={tmp_path} port=5432 dbname=nothing"
    with pytest.raises(StoreUnavailable, match="cannot connect"):
        await within(10, PostgresStore(nobody, reactor=reactor).start())
    refused = "host=127.0.0.1 port=1 dbname=nothing"
    with pytest.raises(StoreUnavailable):
        await within(10, PostgresStore(refused, reactor=reactor).start())
    # A TCP address that never answers: only our own deadline ends the wait.
    silent = "host=10.255.255.1 port=5432 dbname=nothing"
    with pytest.raises(StoreUnavailable):
        await within(10, PostgresStore(silent, reactor=reactor, connect_timeout=0.5).start())


@pytest_twisted.ensureDeferred
async def test_latest_output_queries_walk_indexes_not_history(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    tasks = [await store.create_task(make_spec(f"task {i}"), ANCHOR) for i in range(5)]
    for task in tasks:
        for first in range(1, 600, 300):
            batch = [
                result(task.task_id, agent, k)
                for k in range(first, first + 300)
                for agent in (A_ID, B_ID)
                if k % 7 or agent == A_ID  # some executions wait for B
            ]
            await store.record_results(batch, at(600))
    await store.stop()
    _query(database_dsn, "ANALYZE")
    now, task_id = at(450), str(tasks[2].task_id)
    plans = [
        _query(
            database_dsn,
            "EXPLAIN " + LATEST_EXECUTION_SQL,
            {"task_id": task_id, "now": now, "grace": GRACE},
        ),
        _query(
            database_dsn,
            "EXPLAIN " + EXECUTION_RESULTS_SQL,
            {"task_id": task_id, "scheduled_at": at(440)},
        ),
    ]
    texts = ["\n".join(row[0] for row in plan) for plan in plans]
    for text in texts:
        assert "Index" in text, text
        # A handful of tasks may be scanned; the tables the history lives in may not.
        assert "Seq Scan on executions" not in text, text
        assert "Seq Scan on results" not in text, text
    # Nor may a task's executions be sorted (one execution's few results may be).
    assert "Sort  (" not in texts[0], texts[0]


@pytest_twisted.ensureDeferred
async def test_a_prune_skips_executions_being_recorded_and_never_waits(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor, operation_timeout=5)
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    task = await store.create_task(make_spec(), ANCHOR)
    for k in (1, 2, 3):
        await store.record_results([result(task.task_id, A_ID, k)], at(k))
    # Another transaction holds execution 1 as record_results does while adding to it.
    holder = psycopg2.connect(database_dsn)
    try:
        holder.cursor().execute(
            "SELECT 1 FROM executions WHERE task_id = %s::uuid AND scheduled_at = %s FOR UPDATE",
            (str(task.task_id), at(1)),
        )
        assert await within(5, store.prune_history(at(10), 100)) == 2
        holder.cursor().execute(
            "INSERT INTO results SELECT task_id, scheduled_at, %s::uuid, status, exit_code,"
            " signal, started_at, finished_at, stdout, stdout_bytes, stdout_truncated, stderr,"
            " stderr_bytes, stderr_truncated, digest, received_at FROM results"
            " WHERE task_id = %s::uuid AND scheduled_at = %s",
            (str(B_ID), str(task.task_id), at(1)),
        )
        holder.commit()
    finally:
        holder.close()
    [execution] = await store.list_executions(task.task_id, 10)
    assert execution.scheduled_at == at(1) and len(execution.results) == 2
    assert await store.prune_history(at(10), 100) == 1
    assert await store.list_executions(task.task_id, 10) == []
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_pruning_while_results_pour_in_loses_none_and_never_deadlocks(
    database_dsn: str,
) -> None:
    store = PostgresStore(database_dsn, reactor=reactor, operation_timeout=10)
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    tasks = [await store.create_task(make_spec(f"task {i}"), ANCHOR) for i in range(4)]
    for task in tasks:
        await store.record_results(
            [result(task.task_id, a, k) for k in range(1, 200) for a in (A_ID, B_ID)], at(200)
        )
    recent = [
        [result(task.task_id, agent, k) for task in tasks for k in range(200, 400, 7)]
        for agent in (A_ID, B_ID)
    ]
    calls = [Deferred.fromCoroutine(store.record_results(batch, at(400))) for batch in recent]
    calls += [Deferred.fromCoroutine(store.prune_history(at(200), 50)) for _ in range(8)]
    everything = DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
    everything.addTimeout(30, reactor)
    outcomes = await everything
    assert all(outcome == STORED for _, stored in outcomes[:2] for outcome in stored)
    while await store.prune_history(at(200), 500):
        pass
    for task in tasks:
        history = await store.list_executions(task.task_id, 100)
        assert [e.scheduled_at for e in history] == [at(k) for k in reversed(range(200, 400, 7))]
        assert all(len(e.results) == 2 for e in history)
    await store.stop()


@pytest_twisted.ensureDeferred
async def test_the_prune_query_walks_an_index_not_history(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await store.set_fleet([A_URL, B_URL])
    tasks = [await store.create_task(make_spec(f"task {i}"), ANCHOR) for i in range(5)]
    for task in tasks:
        for first in range(1, 2000, 500):
            batch = [
                result(task.task_id, agent, k)
                for k in range(first, first + 500)
                for agent in (A_ID, B_ID)
            ]
            await store.record_results(batch, at(2000))
    await store.stop()
    _query(database_dsn, "ANALYZE")
    rows = _query(database_dsn, "EXPLAIN " + PRUNE_SQL, {"before": at(1500), "limit": 50})
    text = "\n".join(row[0] for row in rows)
    assert "executions_by_scheduled_at" in text, text
    assert "Tid Scan on executions" in text, text
    assert "Seq Scan on executions" not in text, text
    assert "Seq Scan on results" not in text, text


# -- the embedded PostgreSQL -----------------------------------------------------------------


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_embedded_postgres_keeps_its_data_and_survives_being_killed(
    private_folder: Callable[[], Path],
) -> None:
    # Deep enough that the unix socket cannot live in the data folder itself.
    folder = private_folder() / ("d" * 60) / ("e" * 60) / "postgres"
    server = EmbeddedPostgres(folder)
    dsn = server.start_blocking()
    try:
        _query(dsn, "CREATE TABLE kept (x text); INSERT INTO kept VALUES ('still here')")
        server.stop_blocking()
        assert not (folder / "postmaster.pid").exists(), "stop left PostgreSQL running"
        dsn = server.start_blocking()
        assert _query(dsn, "SELECT x FROM kept") == [("still here",)]

        # After a crash, postmaster.pid may name a pid that is now some other process.
        server.stop_blocking()
        (folder / "postmaster.pid").write_text(
            f"{os.getpid()}\n{folder}\n1\n5432\n{folder}\n\n  0 0\nready\n"
        )
        dsn = server.start_blocking()
        assert _query(dsn, "SELECT x FROM kept") == [("still here",)]

        assert server.postmaster_pid is not None
        postmaster = psutil.Process(server.postmaster_pid)
        postmaster.send_signal(signal.SIGKILL)
        wait_for(lambda: not running(postmaster), 10, "the postmaster to die", interval=0.01)
        dsn = server.start_blocking()
        assert _query(dsn, "SELECT x FROM kept") == [("still here",)]

        # A server that died while using the folder must not keep PostgreSQL running.
        dead = subprocess.Popen(["true"])
        dead.wait()
        handles = folder / ".handle_pids.json"
        handles.write_text(json.dumps([dead.pid, *json.loads(handles.read_text())]))
        server.stop_blocking()
        assert not (folder / "postmaster.pid").exists(), "a dead user kept PostgreSQL running"
    finally:
        server.stop_blocking()
