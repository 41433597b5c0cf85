"""Group commit (:mod:`taskscheduler.server.store.group_commit`): concurrent requests
are written together, each still gets its own answers, none before the commit, and a
failed group fails (or retries alone) each request; then the same through the
PostgreSQL store's results."""

from __future__ import annotations

import uuid

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList

from taskscheduler.server.store.group_commit import GroupCommit
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.records import RecordOutcome, StoreUnavailable
from tests.unit.test_store_contract import (
    A_ID,
    A_URL,
    ANCHOR,
    B_ID,
    B_URL,
    DUPLICATE,
    STORED,
    at,
    make_spec,
    result,
    within,
)
from tests.unit.test_store_postgres import _query


class FakeCommit:
    """A ``commit`` whose every call waits until the test settles it; answers are the
    items doubled, and an item "bad" raises what ``bad`` says."""

    def __init__(self, bad: Exception | None = None) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self.pending: list[Deferred[None]] = []
        self.bad = bad

    async def __call__(self, items: list[str], context: int) -> list[str]:
        self.calls.append((list(items), context))
        gate: Deferred[None] = Deferred()
        self.pending.append(gate)
        await gate
        if self.bad is not None and "bad" in items:
            raise self.bad
        return [item * 2 for item in items]

    def settle_next(self, error: Exception | None = None) -> None:
        gate = self.pending.pop(0)
        if error is None:
            gate.callback(None)
        else:
            gate.errback(error)


def make_group(commit: FakeCommit, **options: int) -> GroupCommit[str, str, int]:
    return GroupCommit(
        commit, max, alone_after=lambda e: not isinstance(e, StoreUnavailable), **options
    )


def submit(group: GroupCommit[str, str, int], items: list[str], context: int = 0) -> Deferred:
    return Deferred.fromCoroutine(group.submit(items, context))


def test_requests_arriving_during_a_commit_are_written_together_each_with_its_answers() -> None:
    commit = FakeCommit()
    group = make_group(commit, max_in_flight=1)
    first = submit(group, ["a"], 1)
    # The first is written at once: an idle server adds no delay.
    assert commit.calls == [(["a"], 1)]
    second = submit(group, ["b", "c"], 5)
    third = submit(group, ["d"], 9)
    fourth = submit(group, ["e"], 3)
    assert len(commit.calls) == 1
    commit.settle_next()
    assert first.result == ["aa"]
    # Those that waited go as one group, received when the latest came.
    assert commit.calls[1] == (["b", "c", "d", "e"], 9)
    assert not second.called and not third.called  # nothing before its commit
    commit.settle_next()
    assert second.result == ["bb", "cc"]
    assert third.result == ["dd"]
    assert fourth.result == ["ee"]
    assert (group.groups, group.requests) == (2, 4)


def test_a_group_holds_at_most_max_items_and_max_in_flight_groups_run_at_once() -> None:
    commit = FakeCommit()
    group = make_group(commit, max_in_flight=2, max_items=3)
    answers = [submit(group, [str(i)]) for i in range(2)]
    answers += [submit(group, [str(i)] * 2) for i in range(2, 5)]
    assert [items for items, _ in commit.calls] == [["0"], ["1"]]
    commit.settle_next()
    # One request of two items fits beside none other under three items.
    assert [items for items, _ in commit.calls[2:]] == [["2", "2"]]
    commit.settle_next()
    commit.settle_next()
    commit.settle_next()
    commit.settle_next()
    assert [items for items, _ in commit.calls[2:]] == [["2", "2"], ["3", "3"], ["4", "4"]]
    assert [a.result for a in answers] == [["00"], ["11"], ["22", "22"], ["33", "33"], ["44", "44"]]


def test_a_request_as_large_as_a_group_is_written_at_once_beside_the_groups() -> None:
    commit = FakeCommit()
    group = make_group(commit, max_in_flight=1, max_items=3)
    small = submit(group, ["a"])
    large = submit(group, ["b", "c", "d"])
    assert [items for items, _ in commit.calls] == [["a"], ["b", "c", "d"]]
    commit.settle_next()
    commit.settle_next()
    assert small.result == ["aa"] and large.result == ["bb", "cc", "dd"]


def test_a_group_the_database_refused_fails_each_of_its_requests() -> None:
    commit = FakeCommit()
    group = make_group(commit, max_in_flight=1)
    first = submit(group, ["a"])
    second = submit(group, ["b"])
    third = submit(group, ["c"])
    commit.settle_next()
    commit.settle_next(StoreUnavailable("the database did not answer"))
    for answer in (second, third):
        failure = answer.result
        answer.addErrback(lambda f: None)
        assert failure.check(StoreUnavailable)
    # Not retried: every request is told to send again.
    assert len(commit.calls) == 2
    assert first.result == ["aa"]
    # The next requests are written as usual.
    fourth = submit(group, ["d"])
    commit.settle_next()
    assert fourth.result == ["dd"]


def test_a_request_that_fails_the_group_fails_alone_the_others_are_written() -> None:
    commit = FakeCommit(bad=ValueError("A string literal cannot contain NUL"))
    group = make_group(commit, max_in_flight=1)
    submit(group, ["a"])
    good = submit(group, ["b"])
    bad = submit(group, ["bad"])
    after = submit(group, ["c"])
    commit.settle_next()
    commit.settle_next()  # the group b, bad, c fails
    # Each is written again alone, in order.
    for _ in range(3):
        commit.settle_next()
    assert [items for items, _ in commit.calls[2:]] == [["b"], ["bad"], ["c"]]
    assert good.result == ["bb"]
    assert after.result == ["cc"]
    failure = bad.result
    bad.addErrback(lambda f: None)
    assert failure.check(ValueError)


def test_a_request_given_up_on_leaves_the_rest_of_its_group_answered() -> None:
    commit = FakeCommit()
    group = make_group(commit, max_in_flight=1)
    submit(group, ["a"])
    gone = submit(group, ["b"])
    kept = submit(group, ["c"])
    gone.cancel()  # the HTTP client went away
    gone.addErrback(lambda f: f.trap(CancelledError))
    commit.settle_next()
    commit.settle_next()
    assert kept.result == ["cc"]
    assert group.requests == 3  # it was still written (its agent will be told duplicate)


@pytest_twisted.ensureDeferred
async def test_postgres_concurrent_reports_share_a_transaction_each_with_its_outcome(
    database_dsn: str,
) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    try:
        await store.set_fleet([A_URL, B_URL])
        task = await store.create_task(make_spec(), ANCHOR)
        unknown = uuid.uuid4()
        reports = [
            [result(task.task_id, A_ID, 1)],
            [result(task.task_id, B_ID, 1)],
            [result(unknown, A_ID, 1)],
            [result(task.task_id, A_ID, 1)],  # the first again: a duplicate
            [result(task.task_id, A_ID, 2), result(task.task_id, B_ID, 2)],
        ]
        answers = await within(
            10,
            _gather([Deferred.fromCoroutine(store.record_results(r, at(3))) for r in reports]),
        )
        assert answers == [
            [STORED],
            [STORED],
            [RecordOutcome.UNKNOWN_TASK],
            [DUPLICATE],
            [STORED, STORED],
        ]
        group = store.recording.group
        assert group.requests == 5 and group.groups < 5
        # Both agents' results complete their executions, counted once each.
        for k in (1, 2):
            execution = await store.get_execution(task.task_id, at(k))
            assert execution is not None
            assert {r.agent_id for r in execution.results} == {A_ID, B_ID}
        counted = _query(
            database_dsn,
            "SELECT reported, completed_at IS NOT NULL FROM executions ORDER BY scheduled_at",
        )
        assert counted == [(2, True), (2, True)]
    finally:
        await store.stop()


@pytest_twisted.ensureDeferred
async def test_postgres_a_result_the_database_refuses_fails_only_its_request(
    database_dsn: str,
) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    try:
        await store.set_fleet([A_URL])
        task = await store.create_task(make_spec(), ANCHOR)
        # PostgreSQL takes no NUL in text: this one fails its statement, whoever sends it.
        refused = result(task.task_id, A_ID, 2, reason="\x00")
        reports = [[result(task.task_id, A_ID, k)] for k in (1, 3)]
        # Two are written at once; these two wait, and go together.
        reports += [[refused], [result(task.task_id, A_ID, 4)]]
        answers = [Deferred.fromCoroutine(store.record_results(r, at(5))) for r in reports]
        outcomes = await within(10, _gather(answers, consume=True))
        assert outcomes[0] == outcomes[1] == outcomes[3] == [STORED]
        assert isinstance(outcomes[2], ValueError)
        assert store.recording.group.groups == 3
        assert await store.get_execution(task.task_id, at(2)) is None
        assert await store.get_execution(task.task_id, at(4)) is not None
    finally:
        await store.stop()


async def _gather(answers: list[Deferred], consume: bool = False) -> list:
    settled = await DeferredList(answers, consumeErrors=consume)
    if not consume:
        for ok, value in settled:
            if not ok:
                value.raiseException()
    return [value if ok else value.value for ok, value in settled]
