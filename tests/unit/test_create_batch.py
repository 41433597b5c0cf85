"""Group commit of task creations (:mod:`taskscheduler.server.store.create_batch`): creates
that arrive while a batch is written are written together, each keeps its own outcome,
and none is answered before its batch's transaction ends."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import psycopg2.errors
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList

from taskscheduler.server.store.create_batch import CreateBatches
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AuditEvent, StoreUnavailable, Task
from tests.unit.test_store_contract import A_URL, ANCHOR, B_URL, make_spec


class FakeDatabase:
    """Each batch's query waits on a Deferred the test fires (or fails): its commit."""

    def __init__(self) -> None:
        self.queries: list[tuple[list[str], Deferred[None]]] = []

    async def run(self, operation: Any, *, transaction: bool = True) -> Any:
        assert not transaction, "a batch is one query: one implicit transaction"
        return await operation(self)

    def execute(self, sql: str, parameters: dict[str, list[Any]]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.queries.append((parameters["task_id"], d))
        return d

    def written(self) -> list[list[str]]:
        return [ids for ids, _ in self.queries]


def new_task() -> Task:
    return Task(make_spec(), ANCHOR)


def audit_of(task: Task) -> AuditEvent:
    return AuditEvent(ANCHOR, "operator:tests", "task.created", str(task.task_id), "127.0.0.1")


def create(batches: CreateBatches, task: Task) -> Deferred[Task]:
    return Deferred.fromCoroutine(batches.create(task, audit_of(task)))


def ids(*tasks: Task) -> list[str]:
    return [str(t.task_id) for t in tasks]


def failure_of(d: Deferred[Any]) -> BaseException:
    failures: list[BaseException] = []
    d.addErrback(lambda f: failures.append(f.value))
    assert failures, "it did not fail"
    return failures[0]


def test_creates_arriving_during_a_write_go_together_none_answered_before_commit() -> None:
    db = FakeDatabase()
    batches = CreateBatches(db)  # type: ignore[arg-type]
    first, second, third = new_task(), new_task(), new_task()
    d1 = create(batches, first)
    assert db.written() == [ids(first)]  # a lone create waits for nobody
    d2, d3 = create(batches, second), create(batches, third)
    assert db.written() == [ids(first)]  # one batch written at a time
    assert not (d1.called or d2.called or d3.called)

    db.queries[0][1].callback(None)
    assert d1.result is first
    assert db.written() == [ids(first), ids(second, third)]
    assert not (d2.called or d3.called)

    db.queries[1][1].callback(None)
    assert (d2.result, d3.result) == (second, third)


def test_a_batch_that_fails_fails_each_of_its_creates_and_the_next_batch_is_written() -> None:
    db = FakeDatabase()
    batches = CreateBatches(db)  # type: ignore[arg-type]
    first, second, third, fourth = new_task(), new_task(), new_task(), new_task()
    d1 = create(batches, first)
    d2, d3 = create(batches, second), create(batches, third)
    db.queries[0][1].callback(None)
    assert d1.result is first

    db.queries[1][1].errback(StoreUnavailable("the database did not answer within 30 s"))
    for d in (d2, d3):
        assert isinstance(failure_of(d), StoreUnavailable)
    assert len(db.queries) == 2  # not written again: its outcome is unknown

    d4 = create(batches, fourth)
    assert db.written()[-1] == ids(fourth)
    db.queries[-1][1].callback(None)
    assert d4.result is fourth


def test_a_refused_batch_is_written_again_one_by_one_and_only_the_culprit_is_refused() -> None:
    db = FakeDatabase()
    batches = CreateBatches(db)  # type: ignore[arg-type]
    first, good, bad, other = new_task(), new_task(), new_task(), new_task()
    d1 = create(batches, first)
    d_good, d_bad, d_other = create(batches, good), create(batches, bad), create(batches, other)
    db.queries[0][1].callback(None)
    assert d1.result is first

    db.queries[1][1].errback(psycopg2.errors.UniqueViolation())
    assert not (d_good.called or d_bad.called or d_other.called)
    assert db.written()[2:] == [ids(good)]
    db.queries[2][1].callback(None)
    assert d_good.result is good
    assert db.written()[3:] == [ids(bad)]
    db.queries[3][1].errback(psycopg2.errors.UniqueViolation())
    error = failure_of(d_bad)
    assert isinstance(error, ValueError) and "already exists" in str(error)
    assert db.written()[4:] == [ids(other)]
    db.queries[4][1].callback(None)
    assert d_other.result is other


@pytest_twisted.ensureDeferred
async def test_concurrent_creates_keep_their_own_outcome_and_audit_line(store: Store) -> None:
    existing = await store.create_task(make_spec("existing"), ANCHOR)
    specs = [make_spec(f"task {i}") for i in range(12)]
    specs[6] = dataclasses.replace(specs[6], task_id=existing.task_id)

    def audit(task_id: uuid.UUID) -> AuditEvent:
        return AuditEvent(ANCHOR, "operator:tests", "task.created", str(task_id), "127.0.0.1")

    outcomes = await DeferredList(
        [
            Deferred.fromCoroutine(store.create_task(spec, ANCHOR, audit(spec.task_id)))
            for spec in specs
        ],
        consumeErrors=True,
    )
    refused = [i for i, (ok, _) in enumerate(outcomes) if not ok]
    assert refused == [6]
    error = outcomes[6][1].value  # type: ignore[union-attr]
    assert isinstance(error, ValueError) and "already exists" in str(error)
    created = {spec.task_id for i, spec in enumerate(specs) if i != 6}
    for spec in specs:
        if spec.task_id in created:
            task = await store.get_task(spec.task_id)
            assert task is not None and task.spec.command == spec.command
    assert (await store.get_task(existing.task_id)) == existing
    for url in (A_URL, B_URL):
        assert await store.assigned_task_ids(url) == created | {existing.task_id}
    audited = [e.target for e in await store.audit_events(100)]
    assert sorted(audited) == sorted(str(t) for t in created)
