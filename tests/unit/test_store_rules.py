"""The store's rules (``server/store/rules.py``): their answers, and both stores held to them.

Each rule's cases are listed once, with the answer the rule must give. The pure tests
check the rules module against those answers; the store tests feed the same cases to
MemoryStore and to PostgreSQL (whose SQL decides completeness and the deletion cut-off on
its own) and assert that each store answers as the rule does.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
import pytest_twisted

from taskscheduler.protocol import Output, ResultStatus
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AgentRecord, AuditEvent, RecordOutcome
from taskscheduler.server.store.rules import (
    after_deletion,
    enrolment_conflict,
    is_complete,
    on_schedule,
    release_conflict,
    result_digest,
    same_result,
    utc_result,
    utc_spec,
)
from tests.unit.test_store_contract import (
    A_ID,
    ANCHOR,
    GRACE,
    INTERVAL,
    TIME_LIMIT,
    at,
    make_spec,
    result,
)

USEC = timedelta(microseconds=1)
#: result_digest() of the result in test_a_result_without_a_reason_digests_as_before...,
#: as computed before results had a reason.
OLD_DIGEST = "b1fca4febcfb039812c324c283d45ee09146c53ce4432d6f7357b92772600492"
#: When execution 1 stops waiting for missing agents.
DEADLINE = at(1) + TIME_LIMIT + GRACE

# -- completeness -------------------------------------------------------------------------


@dataclass(frozen=True)
class Completeness:
    expected: int  # agents assigned when the execution was first reported
    reported: int
    now: datetime
    complete: bool


COMPLETENESS = {
    "all-reported": Completeness(2, 2, at(1), True),
    "one-of-one": Completeness(1, 1, at(1), True),
    "none-expected": Completeness(0, 1, at(1), True),
    "one-missing": Completeness(2, 1, DEADLINE - USEC, False),
    "two-of-three": Completeness(3, 2, at(1), False),
    "one-missing-at-the-deadline": Completeness(2, 1, DEADLINE, False),
    "one-missing-past-the-deadline": Completeness(2, 1, DEADLINE + USEC, True),
    "all-reported-past-the-deadline": Completeness(2, 2, DEADLINE + USEC, True),
}


def rule_complete(case: Completeness) -> bool:
    return is_complete(
        at(1),
        case.reported,
        case.expected,
        now=case.now,
        time_limit=TIME_LIMIT,
        report_grace=GRACE,
    )


@pytest.mark.parametrize("case", COMPLETENESS.values(), ids=COMPLETENESS.keys())
def test_completeness_rule(case: Completeness) -> None:
    assert rule_complete(case) is case.complete


@pytest.mark.parametrize("case", COMPLETENESS.values(), ids=COMPLETENESS.keys())
@pytest_twisted.ensureDeferred
async def test_each_store_calls_an_execution_complete_as_the_rule_does(
    store: Store, case: Completeness
) -> None:
    await store.set_fleet([f"http://agent-{n}:8081" for n in range(case.expected)])
    task = await store.create_task(make_spec(), ANCHOR)
    agents = [uuid.UUID(int=n + 1) for n in range(case.reported)]
    reported = [result(task.task_id, agent, 1) for agent in agents]
    assert await store.record_results(reported, at(1)) == [RecordOutcome.STORED] * case.reported
    latest = await store.latest_complete_execution(task.task_id, case.now, GRACE)
    assert (latest is not None) is rule_complete(case)


# -- the deletion cut-off -----------------------------------------------------------------

DELETIONS = {
    "not-deleted": (None, False),
    "deleted-just-before": (at(2) - USEC, True),
    "deleted-at-the-instant": (at(2), False),
    "deleted-just-after": (at(2) + USEC, False),
}


@pytest.mark.parametrize(("deleted_at", "refused"), DELETIONS.values(), ids=DELETIONS.keys())
def test_deletion_cut_off_rule(deleted_at: datetime | None, refused: bool) -> None:
    assert after_deletion(deleted_at, at(2)) is refused


@pytest.mark.parametrize(("deleted_at", "refused"), DELETIONS.values(), ids=DELETIONS.keys())
@pytest_twisted.ensureDeferred
async def test_each_store_refuses_results_after_the_deletion_as_the_rule_does(
    store: Store, deleted_at: datetime | None, refused: bool
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    if deleted_at is not None:
        audit = AuditEvent(deleted_at, "operator:alice", "task.deleted", "t", "::1")
        assert await store.delete_task(task.task_id, deleted_at, audit) is not None
    [outcome] = await store.record_results([result(task.task_id, A_ID, 2)], at(2))
    assert (outcome is RecordOutcome.DELETED) is after_deletion(deleted_at, at(2))
    assert outcome in {RecordOutcome.DELETED, RecordOutcome.STORED}


# -- alignment ------------------------------------------------------------------------------

ALIGNMENT = {
    "first": (at(1), True),
    "far": (at(1000), True),
    "the-anchor": (ANCHOR, False),
    "before-the-anchor": (at(-1), False),
    "a-microsecond-late": (at(1) + USEC, False),
    "a-microsecond-early": (at(2) - USEC, False),
    "halfway": (at(1) + INTERVAL / 2, False),
}


@pytest.mark.parametrize(("scheduled_at", "aligned"), ALIGNMENT.values(), ids=ALIGNMENT.keys())
def test_alignment_rule(scheduled_at: datetime, aligned: bool) -> None:
    assert on_schedule(ANCHOR, INTERVAL, scheduled_at) is aligned
    # The zone an instant is written in does not move it off the grid.
    shifted = scheduled_at.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert on_schedule(ANCHOR, INTERVAL, shifted) is aligned


@pytest.mark.parametrize(("scheduled_at", "aligned"), ALIGNMENT.values(), ids=ALIGNMENT.keys())
@pytest_twisted.ensureDeferred
async def test_each_store_refuses_misaligned_results_as_the_rule_does(
    store: Store, scheduled_at: datetime, aligned: bool
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    reported = result(task.task_id, A_ID, 1, scheduled_at=scheduled_at)
    [outcome] = await store.record_results([reported], at(1))
    assert (outcome is RecordOutcome.STORED) is on_schedule(ANCHOR, INTERVAL, scheduled_at)
    assert outcome in {RecordOutcome.STORED, RecordOutcome.MISALIGNED}


# -- result identity ------------------------------------------------------------------------

ELSEWHERE = timezone(timedelta(hours=-5))
IDENTITY: dict[str, tuple[dict[str, Any], bool]] = {
    "resent": ({}, True),
    "other-zone": (
        {
            "scheduled_at": at(1).astimezone(ELSEWHERE),
            "started_at": (at(1) + timedelta(milliseconds=1)).astimezone(ELSEWHERE),
            "finished_at": (at(1) + timedelta(milliseconds=20)).astimezone(ELSEWHERE),
        },
        True,
    ),
    "stdout": ({"stdout": Output.of(b"other")}, False),
    "stdout-split-into-stderr": ({"stdout": Output.of(b"ou"), "stderr": Output.of(b"t")}, False),
    "stderr": ({"stderr": Output.of(b"warning")}, False),
    "exit": ({"status": ResultStatus.FAILED, "exit_code": 1}, False),
    "signal": ({"exit_code": None, "signal": 9, "status": ResultStatus.FAILED}, False),
    "started": ({"started_at": at(1) + timedelta(milliseconds=2)}, False),
    "finished": ({"finished_at": at(1) + timedelta(milliseconds=21)}, False),
    "unfinished": ({"finished_at": None}, False),
    "truncation": ({"stdout": Output(b"out", 10_000, True)}, False),
    "reason": ({"reason": "the agent was overloaded"}, False),
    "empty-reason": ({"reason": ""}, False),
}


@pytest.mark.parametrize(("change", "same"), IDENTITY.values(), ids=IDENTITY.keys())
def test_identity_rule(change: dict[str, Any], same: bool) -> None:
    task_id = uuid.UUID(int=7)
    original = result(task_id, A_ID, 1)
    assert same_result(original, result(task_id, A_ID, 1, **change)) is same


@pytest.mark.parametrize(("change", "same"), IDENTITY.values(), ids=IDENTITY.keys())
@pytest_twisted.ensureDeferred
async def test_each_store_tells_a_duplicate_from_a_conflict_as_the_rule_does(
    store: Store, change: dict[str, Any], same: bool
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    original = result(task.task_id, A_ID, 1)
    again = result(task.task_id, A_ID, 1, **change)
    assert await store.record_results([original], at(1)) == [RecordOutcome.STORED]
    [outcome] = await store.record_results([again], at(2))
    assert (outcome is RecordOutcome.DUPLICATE) is same_result(original, again)
    assert outcome in {RecordOutcome.DUPLICATE, RecordOutcome.CONFLICT}


def test_a_result_without_a_reason_digests_as_before_reasons_existed() -> None:
    """Results stored before migration 5 must still be duplicates of their resends."""
    task_id = uuid.UUID("cccccccc-0000-4000-8000-000000000003")
    old = result(task_id, A_ID, 1, err=b"warn")
    # The digest main computed before the reason field existed, for this very result.
    assert result_digest(old).hex() == OLD_DIGEST
    assert result_digest(replace(old, reason="why")) != result_digest(old)


# -- time and agents ------------------------------------------------------------------------


def test_the_store_keeps_every_instant_in_utc() -> None:
    paris = timezone(timedelta(hours=1))
    spec = make_spec(anchor=ANCHOR.astimezone(paris))
    assert utc_spec(spec).anchor == ANCHOR and utc_spec(spec).anchor.tzinfo is UTC
    moved = result(uuid.UUID(int=7), A_ID, 1, scheduled_at=at(1).astimezone(paris))
    kept = utc_result(moved)
    assert kept == moved
    assert [kept.scheduled_at.tzinfo, kept.started_at and kept.started_at.tzinfo] == [UTC, UTC]
    assert utc_result(replace(moved, started_at=None, finished_at=None)).started_at is None


ENROLMENTS: dict[str, tuple[bool, list[bool], str | None]] = {
    "new": (False, [], None),
    "identity-known": (True, [], "agent_exists"),
    "identity-known-and-url-taken": (True, [True], "agent_exists"),
    "url-held-by-a-live-agent": (False, [True], "url_taken"),
    "url-held-by-live-and-revoked": (False, [False, True], "url_taken"),
    "url-held-by-a-revoked-agent": (False, [False], "url_revoked"),
}


@pytest.mark.parametrize(("known", "holders", "code"), ENROLMENTS.values(), ids=ENROLMENTS.keys())
def test_enrolment_conflict_rule(known: bool, holders: list[bool], code: str | None) -> None:
    conflict = enrolment_conflict(
        A_ID, "http://a:8081", identity_known=known, url_holders_live=holders
    )
    assert (conflict and conflict.code) == code


def test_only_a_revoked_agents_url_may_be_released() -> None:
    live = AgentRecord(A_ID, "http://a:8081", ANCHOR)
    conflict = release_conflict(live)
    assert conflict is not None and conflict.code == "agent_live"
    assert release_conflict(replace(live, revoked_at=at(1))) is None
