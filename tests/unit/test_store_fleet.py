"""The Store contract for the fleet at run time, heartbeats and leaves, on both stores."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest_twisted

from taskscheduler.server.store.fleet import expected_urls, holder_of, missing_agents
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AgentRecord, AuditEvent, Heartbeat
from tests.unit.test_store_contract import (
    A_ID,
    A_URL,
    ANCHOR,
    B_ID,
    B_URL,
    C_URL,
    after_deadline,
    make_spec,
    result,
)

C_ID = uuid.UUID("cccccccc-0000-4000-8000-000000000003")


def event(action: str, target: str) -> AuditEvent:
    return AuditEvent(ANCHOR, "operator:ops", action, target, "127.0.0.1")


async def enrol(store: Store, agent_id: uuid.UUID, url: str) -> AgentRecord:
    return await store.enrol_agent(
        agent_id, url, f"sha256:{agent_id.hex}", ANCHOR, event("agent.enrolled", str(agent_id))
    )


@pytest_twisted.ensureDeferred
async def test_a_member_added_gets_every_live_task_and_is_audited_once(store: Store) -> None:
    live = await store.create_task(make_spec("live"), ANCHOR)
    gone = await store.create_task(make_spec("gone"), ANCHOR)
    await store.delete_task(gone.task_id, ANCHOR, event("task.deleted", str(gone.task_id)))
    member, added = await store.add_fleet_member(
        C_URL, ANCHOR + timedelta(seconds=1), event("fleet.added", C_URL)
    )
    assert added and member.url == C_URL and member.added_at == ANCHOR + timedelta(seconds=1)
    assert await store.assigned_task_ids(C_URL) == {live.task_id}
    assert [t.task_id for t in await store.undelivered_tasks(C_URL, 10)] == [live.task_id]
    again, added = await store.add_fleet_member(C_URL, ANCHOR, event("fleet.added", C_URL))
    assert not added and again == member
    assert sorted(m.url for m in await store.list_fleet()) == [A_URL, B_URL, C_URL]
    assert [e.action for e in await store.audit_events(10)].count("fleet.added") == 1


@pytest_twisted.ensureDeferred
async def test_is_fleet_member_follows_members_added_and_removed(store: Store) -> None:
    assert await store.is_fleet_member(A_URL)
    assert not await store.is_fleet_member(C_URL)
    await store.add_fleet_member(C_URL, ANCHOR, event("fleet.added", C_URL))
    assert await store.is_fleet_member(C_URL)
    await store.remove_fleet_member(A_URL, event("fleet.removed", A_URL))
    assert not await store.is_fleet_member(A_URL)
    assert not await store.is_fleet_member(A_URL + "/")


@pytest_twisted.ensureDeferred
async def test_a_member_removed_loses_its_tasks_and_its_agent_is_told_to_leave(
    store: Store,
) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await enrol(store, A_ID, A_URL)
    removed = await store.remove_fleet_member(A_URL, event("fleet.removed", A_URL))
    assert removed is not None and removed.url == A_URL
    assert await store.remove_fleet_member(A_URL, event("fleet.removed", A_URL)) is None
    assert await store.assigned_task_ids(A_URL) == set()
    assert await store.assigned_task_ids(B_URL) == {task.task_id}
    [leave] = await store.pending_leaves(10)
    assert (leave.agent_id, leave.url, leave.reason) == (A_ID, A_URL, "removed")
    await store.mark_left(A_ID, "removed")
    assert await store.pending_leaves(10) == []
    assert [m.url for m in await store.list_fleet()] == [B_URL]


@pytest_twisted.ensureDeferred
async def test_adding_a_member_again_calls_off_its_leave(store: Store) -> None:
    await enrol(store, A_ID, A_URL)
    await store.remove_fleet_member(A_URL, event("fleet.removed", A_URL))
    await store.add_fleet_member(A_URL, ANCHOR, event("fleet.added", A_URL))
    assert await store.pending_leaves(10) == []


@pytest_twisted.ensureDeferred
async def test_a_revoked_agent_is_told_to_leave_and_expected_no_more(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await enrol(store, A_ID, A_URL)
    await enrol(store, B_ID, B_URL)
    await store.record_results([result(task.task_id, A_ID, 1)], ANCHOR)
    await store.revoke_agent(A_ID, ANCHOR, event("agent.revoked", str(A_ID)))
    [leave] = await store.pending_leaves(10)
    assert (leave.agent_id, leave.reason) == (A_ID, "revoked")
    # An acknowledgement of an older reason does not call off the newer one.
    await store.mark_left(A_ID, "removed")
    assert len(await store.pending_leaves(10)) == 1
    await store.record_results([result(task.task_id, B_ID, 2)], ANCHOR)
    history = await store.list_executions(task.task_id, 10)
    assert [(e.expected, e.expected_urls) for e in history] == [
        (1, (B_URL,)),
        (2, (A_URL, B_URL)),
    ]
    latest = await store.latest_complete_execution(task.task_id, after_deadline(2), timedelta(0))
    assert latest is not None and latest.expected_urls == (B_URL,)


@pytest_twisted.ensureDeferred
async def test_a_url_removed_is_expected_no_more(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    await store.remove_fleet_member(B_URL, event("fleet.removed", B_URL))
    await store.record_results([result(task.task_id, A_ID, 1)], ANCHOR)
    [execution] = await store.list_executions(task.task_id, 10)
    assert execution.expected == 1 and execution.expected_urls == (A_URL,)


@pytest_twisted.ensureDeferred
async def test_set_fleet_says_what_changed_and_audits_it_as_its_actor(store: Store) -> None:
    await enrol(store, B_ID, B_URL)
    added, removed = await store.set_fleet([A_URL, C_URL], ANCHOR, "AVAILABLE_SERVERS")
    assert (added, removed) == ([C_URL], [B_URL])
    events = [(e.actor, e.action, e.target) for e in await store.audit_events(10)]
    assert ("AVAILABLE_SERVERS", "fleet.added", C_URL) in events
    assert ("AVAILABLE_SERVERS", "fleet.removed", B_URL) in events
    assert [(x.agent_id, x.reason) for x in await store.pending_leaves(10)] == [(B_ID, "removed")]
    assert await store.set_fleet([A_URL, C_URL], ANCHOR, "AVAILABLE_SERVERS") == ([], [])


@pytest_twisted.ensureDeferred
async def test_a_heartbeat_is_kept_with_the_agent(store: Store) -> None:
    await enrol(store, A_ID, A_URL)
    assert (await store.get_agent(A_ID)).last_seen_at is None  # type: ignore[union-attr]
    beat = Heartbeat("0.1.0", "host-a", ANCHOR, 3, 1, 2, 0)
    await store.record_heartbeat(A_ID, ANCHOR + timedelta(seconds=5), beat)
    agent = await store.get_agent(A_ID)
    assert agent is not None
    assert agent.last_seen_at == ANCHOR + timedelta(seconds=5)
    assert agent.heartbeat == beat
    assert [a.heartbeat for a in await store.list_agents()] == [beat]
    assert await store.get_agent(B_ID) is None


def test_missing_agents_names_each_expected_url_without_a_result() -> None:
    agents = [
        AgentRecord(A_ID, A_URL, ANCHOR),
        AgentRecord(B_ID, B_URL, ANCHOR, revoked_at=ANCHOR),
    ]
    task_id = uuid.uuid4()
    got = missing_agents((A_URL, B_URL, C_URL), [result(task_id, A_ID, 1)], agents)
    assert got == [(B_URL, B_ID), (C_URL, None)]
    assert missing_agents(None, [], agents) == []
    assert expected_urls([C_URL, A_URL, B_URL], agents) == (A_URL, C_URL)
    assert holder_of(C_URL, agents) is None
