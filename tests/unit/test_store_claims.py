"""Claims of run-on-one instants, on both stores (MemoryStore and a real PostgreSQL): each
(task, instant) is granted to one agent at most; the chosen one first, any after the grace;
refused as results are (misaligned, superseded, paused, deleted); an execution of a claimed
instant expects its holder alone; a run-now goes to one agent."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import datetime, timedelta

import pytest_twisted
from twisted.internet.defer import DeferredList, ensureDeferred

from taskscheduler.cron import parse_cron
from taskscheduler.protocol import TaskSpec
from taskscheduler.protocol.options import RunOn, Target, TaskOptions, frozen_map
from taskscheduler.server.store.claim_rules import chosen_agent
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import (
    AuditEvent,
    Claim,
    ClaimAnswer,
    ClaimRefusal,
    ClaimStatus,
    Heartbeat,
    RecordOutcome,
    TaskChange,
)
from tests.unit.test_store_contract import A_ID, A_URL, ANCHOR, B_ID, B_URL, at, make_spec, result

GRACE = timedelta(seconds=5)
WINDOW = timedelta(seconds=30)  # heard from within it: online
HASH_A, HASH_B = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def audit(action: str) -> AuditEvent:
    return AuditEvent(ANCHOR, "operator:alice", action, "t", "127.0.0.1")


def one_spec() -> TaskSpec:
    return dataclasses.replace(make_spec(), options=TaskOptions(run_on=RunOn.ONE))


async def fleet_of_two(store: Store, seen: datetime) -> None:
    """Agents A and B enrolled at their URLs, both heard from at ``seen``."""
    await store.enrol_agent(A_ID, A_URL, HASH_A, ANCHOR, audit("agent.enrolled"))
    await store.enrol_agent(B_ID, B_URL, HASH_B, ANCHOR, audit("agent.enrolled"))
    for agent_id in (A_ID, B_ID):
        await store.record_heartbeat(agent_id, seen, Heartbeat("1", "h", None, 1, 0, 0, 0))


def claim_of(task_id: uuid.UUID, url: str, scheduled_at: datetime, revision: int = 1) -> Claim:
    agent_id = A_ID if url == A_URL else B_ID
    return Claim(task_id, scheduled_at, agent_id, url, revision)


async def ask(store: Store, claim: Claim, now: datetime) -> ClaimAnswer:
    return await store.claim_instant(claim, now, GRACE, now - WINDOW)


def chosen_and_other(task_id: uuid.UUID, k: int) -> tuple[str, str]:
    chosen = chosen_agent(task_id, at(k), [A_URL, B_URL])
    return (A_URL, B_URL) if chosen == A_URL else (B_URL, A_URL)


@pytest_twisted.ensureDeferred
async def test_the_chosen_agent_is_granted_and_the_other_waits_then_finds_it_held(
    store: Store,
) -> None:
    task = await store.create_task(one_spec(), ANCHOR)
    await fleet_of_two(store, at(1))
    chosen, other = chosen_and_other(task.task_id, 1)
    now = at(1) + timedelta(milliseconds=10)

    waited = await ask(store, claim_of(task.task_id, other, at(1)), now)
    assert waited.status is ClaimStatus.WAIT
    assert waited.retry_at == at(1) + GRACE
    granted = await ask(store, claim_of(task.task_id, chosen, at(1)), now)
    assert granted.status is ClaimStatus.GRANTED
    # Asked again (its answer was lost): granted again; the other: held by the chosen.
    assert (await ask(store, claim_of(task.task_id, chosen, at(1)), now)).status is (
        ClaimStatus.GRANTED
    )
    held = await ask(store, claim_of(task.task_id, other, at(1)), at(1) + GRACE)
    assert held.status is ClaimStatus.HELD
    assert held.holder == granted.holder


@pytest_twisted.ensureDeferred
async def test_after_the_grace_another_agent_takes_the_instant_and_the_chosen_is_too_late(
    store: Store,
) -> None:
    task = await store.create_task(one_spec(), ANCHOR)
    await fleet_of_two(store, at(1))
    chosen, other = chosen_and_other(task.task_id, 1)
    just_before = at(1) + GRACE - timedelta(microseconds=1)
    assert (await ask(store, claim_of(task.task_id, other, at(1)), just_before)).status is (
        ClaimStatus.WAIT
    )
    taken = await ask(store, claim_of(task.task_id, other, at(1)), at(1) + GRACE)
    assert taken.status is ClaimStatus.GRANTED
    late = await ask(store, claim_of(task.task_id, chosen, at(1)), at(1) + GRACE)
    assert late.status is ClaimStatus.HELD


@pytest_twisted.ensureDeferred
async def test_an_offline_agent_is_never_chosen(store: Store) -> None:
    task = await store.create_task(one_spec(), ANCHOR)
    await fleet_of_two(store, at(1))
    # Pick an instant whose chosen agent (both online) is A, then let A fall silent.
    k = next(k for k in range(3, 60) if chosen_and_other(task.task_id, k)[0] == A_URL)
    await store.record_heartbeat(B_ID, at(k), Heartbeat("1", "h", None, 1, 0, 0, 0))
    now = at(k) + timedelta(milliseconds=10)
    assert now - WINDOW > at(1)  # A was heard from at at(1) only: offline now
    granted = await ask(store, claim_of(task.task_id, B_URL, at(k)), now)
    assert granted.status is ClaimStatus.GRANTED


@pytest_twisted.ensureDeferred
async def test_concurrent_claims_grant_one_instant_once(store: Store) -> None:
    task = await store.create_task(one_spec(), ANCHOR)
    await fleet_of_two(store, at(1))
    for k in range(1, 11):  # (PostgreSQL: some of the claims race to the insert)
        late = at(k) + GRACE  # past the grace: both may take it
        claims = [claim_of(task.task_id, url, at(k)) for url in (A_URL, B_URL) * 4]
        answers = await DeferredList(
            [ensureDeferred(ask(store, c, late)) for c in claims], fireOnOneErrback=True
        )
        holders = {answer.holder for _, answer in answers}
        assert len(holders) == 1
        winner = holders.pop()
        for claim, (_, answer) in zip(claims, answers, strict=True):
            expected = ClaimStatus.GRANTED if claim.agent_id == winner else ClaimStatus.HELD
            assert answer.status is expected


@pytest_twisted.ensureDeferred
async def test_claims_are_refused_as_results_would_be(store: Store) -> None:
    task = await store.create_task(one_spec(), ANCHOR)
    await fleet_of_two(store, at(1))
    now = at(3)

    async def refusal(claim: Claim) -> ClaimRefusal | None:
        return (await ask(store, claim, now)).refused

    misaligned = at(2) + timedelta(seconds=1)
    assert await refusal(claim_of(task.task_id, A_URL, misaligned)) is ClaimRefusal.MISALIGNED
    assert await refusal(claim_of(task.task_id, A_URL, at(2), 2)) is ClaimRefusal.SUPERSEDED
    assert await refusal(claim_of(uuid.uuid4(), A_URL, at(2))) is ClaimRefusal.UNKNOWN_TASK
    stranger = Claim(task.task_id, at(2), uuid.uuid4(), "http://stranger:8081", 1)
    assert await refusal(stranger) is ClaimRefusal.NOT_ASSIGNED

    everywhere = await store.create_task(make_spec(), ANCHOR)
    assert await refusal(claim_of(everywhere.task_id, A_URL, at(2))) is (
        ClaimRefusal.NOT_RUN_ON_ONE
    )
    await store.pause_task(task.task_id, at(3) - timedelta(seconds=1), audit("task.paused"))
    assert await refusal(claim_of(task.task_id, A_URL, at(3))) is ClaimRefusal.TASK_PAUSED
    await store.delete_task(task.task_id, at(3), audit("task.deleted"))
    assert await refusal(claim_of(task.task_id, A_URL, at(4))) is ClaimRefusal.DELETED


@pytest_twisted.ensureDeferred
async def test_an_execution_of_a_claimed_instant_expects_its_holder_alone(store: Store) -> None:
    task = await store.create_task(one_spec(), ANCHOR)
    await fleet_of_two(store, at(1))
    chosen, _ = chosen_and_other(task.task_id, 1)
    granted = await ask(store, claim_of(task.task_id, chosen, at(1)), at(1))
    assert granted.holder is not None
    outcome = await store.record_results([result(task.task_id, granted.holder, 1)], at(1))
    assert outcome == [RecordOutcome.STORED]
    [execution] = await store.list_executions(task.task_id, 10)
    assert (execution.expected, execution.expected_urls) == (1, (chosen,))
    latest = await store.latest_complete_execution(task.task_id, at(1), GRACE)
    assert latest is not None and latest.scheduled_at == at(1), "complete with one result"


@pytest_twisted.ensureDeferred
async def test_a_run_now_of_a_run_on_one_task_goes_to_one_online_agent(store: Store) -> None:
    task = await store.create_task(one_spec(), ANCHOR)
    await fleet_of_two(store, at(1))
    now = at(1) + timedelta(seconds=7)
    execution = await store.record_manual_execution(
        task.task_id, now, audit("task.run"), now - WINDOW
    )
    assert execution is not None
    expected = chosen_agent(task.task_id, now, [A_URL, B_URL])
    assert (execution.expected, execution.expected_urls) == (1, (expected,))
    other = B_URL if expected == A_URL else A_URL
    assert [r.scheduled_at for r in await store.pending_manual_runs(expected, now, 10)] == [now]
    assert await store.pending_manual_runs(other, now, 10) == []

    # Every agent runs a run-now of a run-on-all task, as before.
    everywhere = await store.create_task(make_spec(), ANCHOR)
    both = await store.record_manual_execution(
        everywhere.task_id, now, audit("task.run"), now - WINDOW
    )
    assert both is not None and both.expected == 2


@pytest_twisted.ensureDeferred
async def test_a_change_of_run_on_is_claimed_from_its_new_revision(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await fleet_of_two(store, at(1))
    change = TaskChange(options={"run_on": "one"})
    changed = await store.update_task(task.task_id, change, at(2), audit("task.updated"))
    assert changed is not None and changed[0].spec.revision == 2
    chosen, _ = chosen_and_other(task.task_id, 3)
    assert (await ask(store, claim_of(task.task_id, chosen, at(3), 2), at(3))).status is (
        ClaimStatus.GRANTED
    )
    assert (await ask(store, claim_of(task.task_id, chosen, at(4), 1), at(4))).refused is (
        ClaimRefusal.SUPERSEDED
    )


@pytest_twisted.ensureDeferred
async def test_pruning_history_drops_old_claims(store: Store) -> None:
    task = await store.create_task(one_spec(), ANCHOR)
    await fleet_of_two(store, at(1))
    chosen, other = chosen_and_other(task.task_id, 1)
    await ask(store, claim_of(task.task_id, chosen, at(1)), at(1))
    await store.prune_history(at(2), 100)
    # The claim is gone with its instant: the next asker of that old instant gets it.
    again = await ask(store, claim_of(task.task_id, other, at(1)), at(1) + GRACE)
    assert again.status is ClaimStatus.GRANTED


@pytest_twisted.ensureDeferred
async def test_a_cron_task_runs_on_one_too_its_grace_bounded_by_its_shortest_gap(
    store: Store,
) -> None:
    # Every 4 s: the grace (5 s configured) is 2 s, half the gap between its instants.
    cron = parse_cron("*/4 * * * * *", "Europe/Paris")
    spec = dataclasses.replace(one_spec(), frequency=None, cron=cron)
    task = await store.create_task(spec, ANCHOR)
    await fleet_of_two(store, ANCHOR)
    instant = cron.next_after(ANCHOR + timedelta(seconds=20))
    chosen = chosen_agent(task.task_id, instant, [A_URL, B_URL])
    other = B_URL if chosen == A_URL else A_URL
    waited = await ask(store, claim_of(task.task_id, other, instant), instant)
    assert (waited.status, waited.retry_at) == (ClaimStatus.WAIT, instant + timedelta(seconds=2))
    taken = await ask(store, claim_of(task.task_id, other, instant), instant + timedelta(seconds=2))
    assert taken.status is ClaimStatus.GRANTED
    off = instant + timedelta(seconds=1)
    assert (await ask(store, claim_of(task.task_id, chosen, off), off)).refused is (
        ClaimRefusal.MISALIGNED
    )


@pytest_twisted.ensureDeferred
async def test_a_targeted_task_runs_on_one_of_the_agents_its_target_matches(store: Store) -> None:
    await store.enrol_agent(A_ID, A_URL, HASH_A, ANCHOR, audit("e"), {"role": "web"})
    await store.enrol_agent(B_ID, B_URL, HASH_B, ANCHOR, audit("e"), {"role": "db"})
    for agent_id, role in ((A_ID, "web"), (B_ID, "db")):
        beat = Heartbeat("1", "h", None, 1, 0, 0, 0, {"role": role})
        await store.record_heartbeat(agent_id, at(1), beat)
    web = TaskOptions(run_on=RunOn.ONE, target=Target(labels=frozen_map({"role": "web"})))
    task = await store.create_task(dataclasses.replace(make_spec(), options=web), ANCHOR)
    for k in range(1, 6):  # A, the only match, is chosen for every instant: never waits
        assert (await ask(store, claim_of(task.task_id, A_URL, at(k)), at(k))).status is (
            ClaimStatus.GRANTED
        )
    refused = await ask(store, claim_of(task.task_id, B_URL, at(6)), at(6) + GRACE)
    assert refused.refused is ClaimRefusal.NOT_ASSIGNED
