"""The Store contract for retried runs (attempts), on MemoryStore and PostgresStore.

Each attempt of an agent's run is a result of its own, keyed by its attempt number; the
execution's result for the agent is its last attempt; an attempt the agent will retry
(``final`` false) does not count the agent as reported, and the agent counts once.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
import pytest_twisted

from taskscheduler.protocol import Output, ResultStatus, RunResult
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import RecordOutcome
from taskscheduler.server.store.rules import reported_agents, result_digest
from tests.unit.test_store_contract import (
    A_ID,
    ANCHOR,
    B_ID,
    GRACE,
    after_deadline,
    at,
    before_deadline,
    make_spec,
    result,
)

STORED = RecordOutcome.STORED
DUPLICATE = RecordOutcome.DUPLICATE
CONFLICT = RecordOutcome.CONFLICT


def attempt(task_id: Any, agent_id: Any, k: int, n: int, final: bool, **changes: Any) -> RunResult:
    """Attempt ``n`` of the run of instant ``k``: a failure unless ``changes`` say else."""
    fields: dict[str, Any] = {
        "status": ResultStatus.FAILED,
        "exit_code": 1,
        "started_at": at(k) + timedelta(seconds=n),
        "finished_at": at(k) + timedelta(seconds=n, milliseconds=20),
        "stdout": Output.of(f"attempt {n}".encode()),
        "attempt": n,
        "final": final,
    }
    fields.update(changes)
    return result(task_id, agent_id, k, **fields)


def succeeded(task_id: Any, agent_id: Any, k: int, n: int) -> RunResult:
    return attempt(task_id, agent_id, k, n, True, status=ResultStatus.SUCCEEDED, exit_code=0)


@pytest_twisted.ensureDeferred
async def test_every_attempt_is_stored_and_the_last_is_the_agents_result(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    first = attempt(task.task_id, A_ID, 1, 1, False)
    second = attempt(task.task_id, A_ID, 1, 2, False, status=ResultStatus.TIMED_OUT)
    third = succeeded(task.task_id, A_ID, 1, 3)
    assert await store.record_results([first], at(1)) == [STORED]
    assert await store.record_results([second, third], at(1)) == [STORED, STORED]
    execution = await store.get_execution(task.task_id, at(1))
    assert execution is not None
    assert execution.results == (third,)
    assert execution.attempts == (first, second, third)
    (listed,) = await store.list_executions(task.task_id, 10)
    assert listed.results == (third,) and listed.attempts == (first, second, third)


@pytest_twisted.ensureDeferred
async def test_a_resent_attempt_is_a_duplicate_and_a_different_one_conflicts(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    first = attempt(task.task_id, A_ID, 1, 1, False)
    second = succeeded(task.task_id, A_ID, 1, 2)
    assert await store.record_results([first, second], at(1)) == [STORED, STORED]
    # Attempt 1 sent again after attempt 2 is stored (its answer was lost): a duplicate,
    # judged against attempt 1, not against the agent's last result.
    assert await store.record_results([first], at(2)) == [DUPLICATE]
    assert await store.record_results([second], at(2)) == [DUPLICATE]
    changed = attempt(task.task_id, A_ID, 1, 1, False, stdout=Output.of(b"other"))
    assert await store.record_results([changed], at(2)) == [CONFLICT]
    # The same attempt now saying it is final is another report: a conflict.
    assert await store.record_results([attempt(task.task_id, A_ID, 1, 1, True)], at(2)) == [
        CONFLICT
    ]
    execution = await store.get_execution(task.task_id, at(1))
    assert execution is not None and execution.attempts == (first, second)


@pytest_twisted.ensureDeferred
async def test_an_agent_to_be_retried_is_not_reported_until_its_final_attempt(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.record_results([succeeded(task.task_id, B_ID, 1, 1)], at(1))
    await store.record_results([attempt(task.task_id, A_ID, 1, 1, False)], at(1))
    # A's first attempt is in, but A will retry: the execution waits for it.
    assert await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE) is None
    (summary,) = (await store.last_executions([task.task_id])).values()
    assert summary.reported == 1 and len(summary.statuses) == 2
    await store.record_results([attempt(task.task_id, A_ID, 1, 2, False)], at(1))
    assert await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE) is None
    final = succeeded(task.task_id, A_ID, 1, 3)
    await store.record_results([final], at(1))
    execution = await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE)
    assert execution is not None and execution.scheduled_at == at(1)
    assert execution.reported == 2 and execution.results[0] == final
    (summary,) = (await store.last_executions([task.task_id])).values()
    assert summary.reported == 2
    assert summary.statuses == (ResultStatus.SUCCEEDED, ResultStatus.SUCCEEDED)
    # A final attempt sent again counts nothing twice.
    assert await store.record_results([final], at(2)) == [DUPLICATE]
    (summary,) = (await store.last_executions([task.task_id])).values()
    assert summary.reported == 2


@pytest_twisted.ensureDeferred
async def test_a_retry_never_sent_leaves_the_execution_to_its_deadline(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.record_results([succeeded(task.task_id, B_ID, 1, 1)], at(1))
    first = attempt(task.task_id, A_ID, 1, 1, False)
    await store.record_results([first], at(1))
    assert await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE) is None
    execution = await store.latest_complete_execution(task.task_id, after_deadline(1), GRACE)
    assert execution is not None and execution.results[0] == first


@pytest_twisted.ensureDeferred
async def test_a_late_earlier_attempt_never_replaces_the_last(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.record_results([succeeded(task.task_id, B_ID, 1, 1)], at(1))
    second = succeeded(task.task_id, A_ID, 1, 2)
    first = attempt(task.task_id, A_ID, 1, 1, False)
    assert await store.record_results([second], at(1)) == [STORED]
    assert await store.record_results([first], at(1)) == [STORED]
    execution = await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE)
    assert execution is not None
    assert execution.results == (second, succeeded(task.task_id, B_ID, 1, 1))
    assert execution.reported == 2
    assert execution.attempts_of(A_ID) == (first, second)


@pytest_twisted.ensureDeferred
async def test_pruning_an_execution_prunes_all_its_attempts(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    first = attempt(task.task_id, A_ID, 1, 1, False)
    await store.record_results([first, succeeded(task.task_id, A_ID, 1, 2)], at(1))
    await store.record_results([succeeded(task.task_id, A_ID, 2, 1)], at(2))
    assert await store.prune_history(at(2), 10) == 1
    assert await store.get_execution(task.task_id, at(1)) is None
    # Nothing of it is left to be judged against: attempt 1 is taken afresh.
    assert await store.record_results([first], at(3)) == [STORED]
    execution = await store.get_execution(task.task_id, at(1))
    assert execution is not None and execution.attempts == (first,)


@pytest_twisted.ensureDeferred
async def test_an_agent_counts_once_whatever_attempts_it_sends(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.record_results([attempt(task.task_id, A_ID, 1, 1, True)], at(1))
    await store.record_results([succeeded(task.task_id, A_ID, 1, 2)], at(1))
    # B has not reported: A's two final attempts are one agent, not the two expected.
    assert await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE) is None
    (summary,) = (await store.last_executions([task.task_id])).values()
    assert summary.reported == 1


# -- the rule, and each store held to it ------------------------------------------------------

#: Attempts reported (agent, attempt, final), in order, and the agents counted reported.
COUNTS: dict[str, tuple[list[tuple[Any, int, bool]], int]] = {
    "first-final": ([(A_ID, 1, True)], 1),
    "to-be-retried": ([(A_ID, 1, False)], 0),
    "retried-final": ([(A_ID, 1, False), (A_ID, 2, True)], 1),
    "still-retrying": ([(A_ID, 1, False), (A_ID, 2, False)], 0),
    "late-earlier": ([(A_ID, 2, True), (A_ID, 1, False)], 1),
    "two-agents": ([(A_ID, 1, False), (B_ID, 1, True), (A_ID, 2, True)], 2),
    "two-finals": ([(A_ID, 1, True), (A_ID, 2, True)], 1),
}


def reports(task_id: Any, case: list[tuple[Any, int, bool]]) -> list[RunResult]:
    return [attempt(task_id, agent, 1, n, final) for agent, n, final in case]


@pytest.mark.parametrize(("case", "counted"), COUNTS.values(), ids=COUNTS.keys())
def test_reported_agents_rule(case: list[tuple[Any, int, bool]], counted: int) -> None:
    assert reported_agents(reports(uuid.UUID(int=7), case)) == counted


@pytest.mark.parametrize("one_batch", [False, True], ids=["one-by-one", "one-batch"])
@pytest.mark.parametrize(("case", "counted"), COUNTS.values(), ids=COUNTS.keys())
@pytest_twisted.ensureDeferred
async def test_each_store_counts_reported_agents_as_the_rule_does(
    store: Store, case: list[tuple[Any, int, bool]], counted: int, one_batch: bool
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    sent = reports(task.task_id, case)
    batches = [sent] if one_batch else [[r] for r in sent]
    for batch in batches:
        assert await store.record_results(batch, at(1)) == [STORED] * len(batch)
    (summary,) = (await store.last_executions([task.task_id])).values()
    assert summary.reported == reported_agents(sent) == counted
    complete = await store.latest_complete_execution(task.task_id, before_deadline(1), GRACE)
    assert (complete is not None) is (counted == 2)


def test_only_an_attempt_to_be_retried_digests_differently() -> None:
    first = attempt(uuid.UUID(int=7), A_ID, 1, 1, True)
    assert result_digest(first) != result_digest(replace(first, final=False))
    # The attempt number is in the key, not the digest: a final attempt digests as a
    # result did before retries existed.
    assert result_digest(first) == result_digest(replace(first, attempt=2))
