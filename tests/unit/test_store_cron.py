"""Cron tasks in the Store contract (MemoryStore and a real PostgreSQL) and in the pure
rules: stored and read back, results judged on the cron instants, a change of schedule
re-based at the change."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import pytest_twisted

from taskscheduler.cron import parse_cron
from taskscheduler.protocol import InvalidMessage, TaskSpec
from taskscheduler.schedule import instant, parse_frequency
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AuditEvent, RecordOutcome, Task, TaskChange
from taskscheduler.server.store.rules import (
    manual_instant,
    next_instant,
    revise,
    revision_of,
    scheduled_verdict,
    upcoming_instants,
)
from tests.unit.test_store_contract import A_ID, ANCHOR, B_ID, STORED, make_spec, result

SUPERSEDED = RecordOutcome.SUPERSEDED
MISALIGNED = RecordOutcome.MISALIGNED
USEC = timedelta(microseconds=1)
#: ANCHOR is 2026-11-27 07:30:00.123456 UTC (08:30 in Paris).
PARIS_CRON = parse_cron("0 8-17 * * *", "Europe/Paris")


def cron_spec() -> TaskSpec:
    return dataclasses.replace(make_spec(), frequency=None, cron=PARIS_CRON)


def audit() -> AuditEvent:
    return AuditEvent(ANCHOR, "operator:alice", "task.updated", "t", "127.0.0.1")


def at_utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def on(task_id: uuid.UUID, agent: uuid.UUID, scheduled_at: datetime, revision: int = 1) -> object:
    return dataclasses.replace(
        result(task_id, agent, 1, revision=revision),
        scheduled_at=scheduled_at,
        started_at=scheduled_at,
        finished_at=scheduled_at + timedelta(seconds=1),
    )


@pytest_twisted.ensureDeferred
async def test_a_cron_task_is_stored_and_its_results_judged_on_its_instants(store: Store) -> None:
    task = await store.create_task(cron_spec(), ANCHOR)
    assert (await store.get_task(task.task_id)) == task
    assert task.spec.cron == PARIS_CRON and task.spec.frequency is None
    nine, ten = at_utc(2026, 11, 27, 8), at_utc(2026, 11, 27, 9)  # 09:00 and 10:00 in Paris
    assert await store.record_results(
        [
            on(task.task_id, A_ID, nine),  # type: ignore[list-item]
            on(task.task_id, B_ID, ten),  # type: ignore[list-item]
            on(task.task_id, A_ID, nine + timedelta(minutes=1)),  # type: ignore[list-item]
            on(task.task_id, A_ID, at_utc(2026, 11, 27, 7)),  # type: ignore[list-item]  # before it
            on(task.task_id, A_ID, at_utc(2026, 11, 27, 16)),  # type: ignore[list-item]  # 17:00
            on(task.task_id, A_ID, at_utc(2026, 11, 27, 17)),  # type: ignore[list-item]  # 18:00
        ],
        at_utc(2026, 11, 27, 17),
    ) == [STORED, STORED, MISALIGNED, MISALIGNED, STORED, MISALIGNED]


@pytest_twisted.ensureDeferred
async def test_switching_to_cron_and_back_re_bases_at_each_change(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)  # every 30 seconds
    changed_at = ANCHOR + timedelta(seconds=65)
    answer = await store.update_task(
        task.task_id, TaskChange(cron="*/2 * * * * *"), changed_at, audit()
    )
    assert answer is not None
    cron_task = answer[0]
    assert cron_task.spec.frequency is None and cron_task.spec.anchor == changed_at
    assert cron_task.spec.cron == parse_cron("*/2 * * * * *", "UTC")
    assert await store.get_task(task.task_id) == cron_task
    first = cron_task.spec.schedule.next_after(changed_at)
    assert await store.record_results(
        [
            on(task.task_id, A_ID, instant(ANCHOR, timedelta(seconds=30), 3), 1),  # old grid
            on(task.task_id, A_ID, first, 2),
            on(task.task_id, B_ID, first + USEC, 2),
        ],  # type: ignore[list-item]
        first,
    ) == [SUPERSEDED, STORED, MISALIGNED]
    events = await store.audit_events(10)
    assert events[0].details == {
        "old": {"frequency": "every 30 seconds", "cron": None, "timezone": None},
        "new": {"frequency": None, "cron": "*/2 * * * * *", "timezone": "UTC"},
        "revision": 2,
    }
    # A zone alone keeps the expression; the same zone again changes nothing.
    later = changed_at + timedelta(minutes=1)
    answer = await store.update_task(
        task.task_id, TaskChange(timezone="Asia/Tokyo"), later, audit()
    )
    assert answer is not None and answer[1]
    assert answer[0].spec.cron == parse_cron("*/2 * * * * *", "Asia/Tokyo")
    assert answer[0].spec.anchor == later and answer[0].spec.revision == 3
    again = await store.update_task(task.task_id, TaskChange(timezone="Asia/Tokyo"), later, audit())
    assert again is not None and not again[1]
    # Back to a frequency: a new grid from the change.
    back = later + timedelta(seconds=7)
    answer = await store.update_task(
        task.task_id, TaskChange(frequency=parse_frequency("every 10 seconds")), back, audit()
    )
    assert answer is not None
    assert answer[0].spec.cron is None and answer[0].spec.anchor == back
    assert await store.get_task(task.task_id) == answer[0]


@pytest_twisted.ensureDeferred
async def test_a_zone_without_cron_on_a_frequency_task_is_refused(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    with pytest.raises(InvalidMessage, match="give 'cron' too"):
        await store.update_task(task.task_id, TaskChange(timezone="Europe/Paris"), ANCHOR, audit())
    assert (await store.get_task(task.task_id)) == task


# -- pure rules --------------------------------------------------------------------------------


def test_a_cron_without_zone_keeps_the_tasks_zone_and_both_kinds_at_once_are_refused() -> None:
    spec = cron_spec()
    new = revise(spec, TaskChange(cron="@hourly"), ANCHOR)
    assert new is not None and new.cron == parse_cron("@hourly", "Europe/Paris")
    assert revise(spec, TaskChange(cron="  0  8-17 * * * "), ANCHOR) is None, "same expression"
    with pytest.raises(InvalidMessage, match="not both"):
        revise(
            spec, TaskChange(frequency=parse_frequency("every 1 minute"), cron="* * * * *"), ANCHOR
        )


def test_the_verdict_of_a_cron_revision_and_the_next_instants() -> None:
    spec = cron_spec()
    revisions = [revision_of(spec, ANCHOR)]
    nine = at_utc(2026, 11, 27, 8)
    assert scheduled_verdict(revisions, [], None, nine, 1) == (None, 1)
    assert scheduled_verdict(revisions, [], None, nine + USEC, 1) == (MISALIGNED, 0)
    task = Task(spec, ANCHOR)
    assert next_instant(task, ANCHOR) == nine
    assert upcoming_instants(task, ANCHOR) == [at_utc(2026, 11, 27, h) for h in (8, 9, 10, 11, 12)]
    paused = dataclasses.replace(task, paused_at=ANCHOR)
    assert upcoming_instants(paused, ANCHOR) == [] and next_instant(paused, ANCHOR) is None
    deleted = dataclasses.replace(task, deleted_at=ANCHOR)
    assert upcoming_instants(deleted, ANCHOR) == []
    # A run-now that falls on an instant moves a microsecond on.
    assert manual_instant(nine, spec.schedule) == nine + USEC
    assert manual_instant(nine + USEC, spec.schedule) == nine + USEC
