"""Webhook state and history in both stores (MemoryStore and a real PostgreSQL): the
de-duplication rules applied by the store, and what survives a restart."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest_twisted
from twisted.internet import reactor

from taskscheduler.protocol import ResultStatus
from taskscheduler.protocol.notify import NotifyConfig, NotifyEvent
from taskscheduler.server.notify.rules import WHOLE_TASK, DeliveryStatus, Observed
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.postgres import PostgresStore
from tests.unit.test_store_contract import A_ID, A_URL, ANCHOR, B_ID, B_URL, at, make_spec

URL = "https://hooks.example.com/T1"
ALL = NotifyConfig(URL)
FAILED, SUCCEEDED = ResultStatus.FAILED, ResultStatus.SUCCEEDED


def seen(
    task_id: uuid.UUID,
    k: int,
    status: ResultStatus,
    agent: uuid.UUID = A_ID,
    key: uuid.UUID | None = None,
    config: NotifyConfig = ALL,
) -> Observed:
    return Observed(
        task_id=task_id,
        agent_id=agent,
        agent_key=agent if key is None else key,
        scheduled_at=at(k),
        status=status,
        exit_code=0 if status is SUCCEEDED else 3,
        config=config,
    )


async def events(store: Store, observed: list[Observed]) -> list[str | None]:
    """Each result in a batch of its own: the event it raised, if any."""
    found = []
    for o in observed:
        made = await store.observe_results([o], ANCHOR)
        assert len(made) <= 1
        found.append(made[0].event.value if made else None)
    return found


@pytest_twisted.ensureDeferred
async def test_failing_three_times_then_succeeding_is_one_alert_and_one_recovery(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    statuses = [FAILED, FAILED, FAILED, SUCCEEDED, SUCCEEDED, FAILED]
    raised = await events(store, [seen(task.task_id, k, s) for k, s in enumerate(statuses)])
    assert raised == ["failed", None, None, "recovered", None, "failed"]
    history = await store.list_notifications(task.task_id, 10)
    assert [n.event for n in history] == [
        NotifyEvent.FAILED,
        NotifyEvent.RECOVERED,
        NotifyEvent.FAILED,
    ]
    assert [n.scheduled_at for n in history] == [at(5), at(3), at(0)]
    newest = history[0]
    assert (newest.status, newest.attempts, newest.url, newest.exit_code) == (
        DeliveryStatus.PENDING,
        0,
        URL,
        3,
    )


@pytest_twisted.ensureDeferred
async def test_a_batch_is_judged_in_order_as_one_by_one(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    t = task.task_id
    batch = [
        seen(t, 0, FAILED, A_ID),
        seen(t, 0, FAILED, B_ID),
        seen(t, 1, FAILED, A_ID),
        seen(t, 2, SUCCEEDED, A_ID),
        seen(t, 1, SUCCEEDED, A_ID),  # late: A's newest is 2
        seen(t, 3, FAILED, A_ID),
        seen(t, 1, SUCCEEDED, B_ID),
    ]
    made = await store.observe_results(batch, ANCHOR)
    assert [(n.agent_id, n.scheduled_at, n.event.value) for n in made] == [
        (A_ID, at(0), "failed"),
        (B_ID, at(0), "failed"),
        (A_ID, at(2), "recovered"),
        (A_ID, at(3), "failed"),
        (B_ID, at(1), "recovered"),
    ]
    ids = [n.notification_id for n in made]
    assert ids == sorted(ids)
    assert await store.observe_results([], ANCHOR) == []
    # The states it left: A failing since 3, B fine since 1.
    assert await events(store, [seen(t, 4, FAILED, A_ID), seen(t, 4, SUCCEEDED, B_ID)]) == [
        None,
        None,
    ]


@pytest_twisted.ensureDeferred
async def test_each_agent_fails_and_recovers_on_its_own(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    t = task.task_id
    raised = await events(
        store,
        [
            seen(t, 0, FAILED, A_ID),
            seen(t, 0, SUCCEEDED, B_ID),  # B is fine: no recovery for A
            seen(t, 1, FAILED, A_ID),
            seen(t, 1, FAILED, B_ID),  # B's own first failure
            seen(t, 2, SUCCEEDED, A_ID),
        ],
    )
    assert raised == ["failed", None, None, "failed", "recovered"]


@pytest_twisted.ensureDeferred
async def test_a_run_on_one_task_has_one_state_whoever_runs_it(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    t = task.task_id
    raised = await events(
        store,
        [
            seen(t, 0, FAILED, A_ID, WHOLE_TASK),
            seen(t, 1, FAILED, B_ID, WHOLE_TASK),
            seen(t, 2, SUCCEEDED, B_ID, WHOLE_TASK),
        ],
    )
    assert raised == ["failed", None, "recovered"]


@pytest_twisted.ensureDeferred
async def test_a_late_older_result_changes_nothing(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    t = task.task_id
    raised = await events(store, [seen(t, 5, SUCCEEDED), seen(t, 3, FAILED), seen(t, 6, FAILED)])
    assert raised == [None, None, "failed"]


@pytest_twisted.ensureDeferred
async def test_events_not_asked_for_move_the_state_but_send_nothing(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    t = task.task_id
    only_recovered = NotifyConfig(URL, frozenset({NotifyEvent.RECOVERED}))
    raised = await events(
        store,
        [
            seen(t, 0, FAILED, config=only_recovered),
            seen(t, 1, ResultStatus.TIMED_OUT, config=only_recovered),
            seen(t, 2, SUCCEEDED, config=only_recovered),
        ],
    )
    assert raised == [None, None, "recovered"]
    assert len(await store.list_notifications(t, 10)) == 1


@pytest_twisted.ensureDeferred
async def test_deliveries_are_recorded_and_pending_ones_listed(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    t = task.task_id
    [first] = await store.observe_results([seen(t, 0, FAILED)], ANCHOR)
    [second] = await store.observe_results([seen(t, 1, SUCCEEDED)], ANCHOR)
    later = ANCHOR + timedelta(seconds=40)
    await store.update_notification(
        first.notification_id, DeliveryStatus.FAILED, 7, 503, "x", later
    )
    pending = await store.pending_notifications(10)
    assert [n.notification_id for n in pending] == [second.notification_id]
    [newest, oldest] = await store.list_notifications(t, 10)
    assert (oldest.status, oldest.attempts, oldest.response_code, oldest.error) == (
        DeliveryStatus.FAILED,
        7,
        503,
        "x",
    )
    assert oldest.updated_at == later
    assert [n.notification_id for n in await store.list_notifications(t, 1)] == [
        newest.notification_id
    ]
    assert await store.list_notifications(t, 10, before=newest.notification_id) == [oldest]
    assert await store.list_notifications(uuid.uuid4(), 10) == []


@pytest_twisted.ensureDeferred
async def test_state_and_history_survive_a_restart_of_postgresql_store(database_dsn: str) -> None:
    first = PostgresStore(database_dsn, reactor=reactor)
    await first.start()
    await first.set_fleet([A_URL, B_URL])
    task = await first.create_task(make_spec(), ANCHOR)
    t = task.task_id
    assert await events(first, [seen(t, 0, FAILED), seen(t, 1, FAILED)]) == ["failed", None]
    await first.stop()

    again = PostgresStore(database_dsn, reactor=reactor)
    await again.start()
    try:
        # Still failing: no second alert; the success is a recovery.
        assert await events(again, [seen(t, 2, FAILED), seen(t, 3, SUCCEEDED)]) == [
            None,
            "recovered",
        ]
        assert len(await again.pending_notifications(10)) == 2
    finally:
        await again.stop()
