"""What the dashboard reads from both stores: each agent's status in a task's last
execution (the tasks page), and start lateness (the agents page: first attempts of the
newest scheduled executions fleet-wide, never runs-now nor retries), with the percentile
rule."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import pytest_twisted

from taskscheduler.protocol import ResultStatus, RunResult, Trigger
from taskscheduler.server.lateness import Lateness, lateness_by_agent, percentile
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AuditEvent, RecordOutcome
from tests.unit.test_store_contract import A_ID, A_URL, ANCHOR, B_ID, B_URL, at, make_spec, result


async def enrolled(store: Store) -> None:
    await store.set_fleet([A_URL, B_URL])
    for agent_id, url in ((A_ID, A_URL), (B_ID, B_URL)):
        await store.enrol_agent(
            agent_id, url, f"hash-{agent_id}", ANCHOR, AuditEvent(ANCHOR, "t", "a", "x", "")
        )


def late(task_id: uuid.UUID, agent_id: uuid.UUID, k: int, ms: int, **changes: object) -> RunResult:
    started = at(k) + timedelta(milliseconds=ms)
    return result(task_id, agent_id, k, started_at=started, **changes)


@pytest_twisted.ensureDeferred
async def test_lateness_is_read_from_first_attempts_of_the_newest_scheduled_executions(
    store: Store,
) -> None:
    await enrolled(store)
    one = await store.create_task(make_spec("echo one"), ANCHOR)
    two = await store.create_task(make_spec("echo two"), ANCHOR)
    batch = [
        late(one.task_id, A_ID, 1, 10),
        late(one.task_id, B_ID, 1, 20),
        late(two.task_id, A_ID, 2, 30),
        late(one.task_id, A_ID, 3, 40),
        # A failed first attempt counts; its retry (started late on purpose) does not.
        late(two.task_id, B_ID, 3, 50, status=ResultStatus.FAILED, exit_code=1, final=False),
        late(two.task_id, B_ID, 3, 9000, attempt=2),
        # A run that never started has no lateness.
        result(one.task_id, B_ID, 3, status=ResultStatus.LOST, exit_code=None, started_at=None),
    ]
    assert set(await store.record_results(batch, at(4))) == {RecordOutcome.STORED}
    manual_at = at(3) + timedelta(seconds=1)
    audit = AuditEvent(manual_at, "operator:t", "task.run", str(one.task_id), "")
    assert await store.record_manual_execution(one.task_id, manual_at, audit) is not None
    run_now = result(
        one.task_id,
        A_ID,
        0,
        scheduled_at=manual_at,
        started_at=manual_at + timedelta(seconds=7),
        trigger=Trigger.MANUAL,
    )
    assert await store.record_results([run_now], at(4)) == [RecordOutcome.STORED]

    samples = sorted((str(a), round(s, 3)) for a, s in await store.recent_start_lateness(1000))
    assert samples == sorted(
        [
            (str(A_ID), 0.01),
            (str(B_ID), 0.02),
            (str(A_ID), 0.03),
            (str(A_ID), 0.04),
            (str(B_ID), 0.05),
        ]
    )
    # The newest two executions (k=3 of both tasks; the run now is not one of them).
    newest = sorted(round(s, 3) for _, s in await store.recent_start_lateness(2))
    assert newest == [0.04, 0.05]


@pytest_twisted.ensureDeferred
async def test_the_last_execution_names_the_agent_of_each_status(store: Store) -> None:
    await enrolled(store)
    task = await store.create_task(make_spec(), ANCHOR)
    failed = result(task.task_id, B_ID, 1, status=ResultStatus.FAILED, exit_code=2)
    await store.record_results([failed, result(task.task_id, A_ID, 1)], at(2))
    last = (await store.last_executions([task.task_id]))[task.task_id]
    assert dict(zip(last.agent_ids, last.statuses, strict=True)) == {
        A_ID: ResultStatus.SUCCEEDED,
        B_ID: ResultStatus.FAILED,
    }


def test_percentiles_are_nearest_rank_values_that_were_measured() -> None:
    assert percentile([1.0], 0.99) == 1.0
    assert percentile([1.0, 2.0], 0.5) == 1.0
    assert percentile([float(v) for v in range(1, 101)], 0.99) == 99.0
    assert percentile([float(v) for v in range(1, 201)], 0.99) == 198.0
    # The rank is rounded up: the median of five is the third, the p99 of ten the tenth.
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.5) == 3.0
    assert percentile([float(v) for v in range(1, 11)], 0.99) == 10.0
    a, b = uuid.uuid4(), uuid.uuid4()
    found = lateness_by_agent([(a, 3.0), (b, 0.5), (a, 1.0), (a, 2.0)])
    assert found == {a: Lateness(3, 2.0, 3.0), b: Lateness(1, 0.5, 0.5)}
    assert found[a].to_json() == {"samples": 3, "p50_seconds": 2.0, "p99_seconds": 3.0}


@pytest.mark.parametrize("q", [0.5, 0.99])
def test_a_percentile_is_within_the_samples(q: float) -> None:
    values = sorted([0.2, 0.1, 5.0, 0.3])
    assert percentile(values, q) in values
