"""Targeting in the Store contract (MemoryStore and PostgreSQL): a task is assigned to
exactly the fleet members whose live agent matches its target; an agent whose labels
change, an agent that enrols, is revoked, a member added, a PATCH of the target, each
re-assigns at once; executions expect the matching agents. And the dispatcher acting on
a relabelled agent at once (task.Clock, StubTreq over a real agent)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from taskscheduler.protocol import TaskSpec
from taskscheduler.protocol.options import Target, TaskOptions, frozen_map
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.store.assignment import member_matches, rematch
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.records import AgentRecord, Heartbeat, TaskChange
from tests.unit.test_dispatch import AGENT_ID, URL, real_setup, settle
from tests.unit.test_dispatch import spec as dispatch_spec
from tests.unit.test_store_agents import HASH_A, HASH_B, HASH_C, event
from tests.unit.test_store_contract import (
    A_ID,
    A_URL,
    ANCHOR,
    B_ID,
    B_URL,
    C_URL,
    STORED,
    make_spec,
    result,
)

C_ID = uuid.UUID("cccccccc-0000-4000-8000-00000000000c")


def targeted(target: Target) -> TaskSpec:
    return dataclasses.replace(make_spec(), options=TaskOptions(target=target))


def labels(**given: str) -> Target:
    return Target(labels=frozen_map(given))


def beat(**given: str) -> Heartbeat:
    return Heartbeat("1", "host", None, 0, 0, 0, 0, given)


async def fleet_of_two(store: Store, a: dict[str, str], b: dict[str, str]) -> None:
    """Members A and B, each with its agent enrolled, carrying ``a`` and ``b``."""
    await store.set_fleet([A_URL, B_URL])
    await store.enrol_agent(A_ID, A_URL, HASH_A, ANCHOR, event("agent.enrolled"), a)
    await store.enrol_agent(B_ID, B_URL, HASH_B, ANCHOR, event("agent.enrolled"), b)


async def runs_on(store: Store, task_id: uuid.UUID) -> set[str]:
    """The members the task is assigned to, as delivery and reconciliation see it."""
    return {url for url in (A_URL, B_URL, C_URL) if task_id in await store.assigned_task_ids(url)}


async def undelivered(store: Store, url: str) -> set[uuid.UUID]:
    return {t.task_id for t in await store.undelivered_tasks(url, 100)}


# -- the rule (pure) ---------------------------------------------------------------------


def test_a_member_without_an_agent_matches_only_an_untargeted_task() -> None:
    agent = AgentRecord(A_ID, A_URL, ANCHOR, labels={"role": "web", "dc": "eu"})
    assert member_matches(Target(), None)
    assert not member_matches(labels(role="web"), None)
    assert not member_matches(labels(role=""), None), "an empty value is still a label"
    assert not member_matches(Target(agents=frozenset({A_ID})), None)
    assert member_matches(labels(role="web"), agent)
    assert member_matches(labels(role="web", dc="eu"), agent)
    assert not member_matches(labels(role="web", dc="us"), agent), "every label must match"
    assert member_matches(Target(agents=frozenset({A_ID, B_ID})), agent)
    assert not member_matches(Target(agents=frozenset({B_ID})), agent)


@pytest.mark.parametrize(
    ("was", "now", "active", "acknowledged", "expected"),
    [
        (True, True, True, True, None),
        (False, False, True, True, None),
        # Stops matching: the agent drops it, if one ever took it.
        (True, False, True, True, (False, True, False)),
        (True, False, True, False, (False, False, False)),
        # Starts matching: delivered (again), a pending removal called off.
        (False, True, True, True, (True, False, True)),
        # Paused: only which members run it once resumed; its removals stay as they are.
        (True, False, False, True, (False, None, False)),
        (False, True, False, True, (True, None, True)),
    ],
)
def test_what_a_row_that_changes_becomes(
    was: bool, now: bool, active: bool, acknowledged: bool, expected: Any
) -> None:
    change = rematch(was, now, active, acknowledged)
    shape = None if change is None else (change.matched, change.removal_pending, change.undelivered)
    assert shape == expected


# -- the stores --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_task_is_assigned_only_to_the_members_its_target_matches(store: Store) -> None:
    await fleet_of_two(store, {"role": "web"}, {"role": "db"})
    everywhere = await store.create_task(make_spec(), ANCHOR)
    web = await store.create_task(targeted(labels(role="web")), ANCHOR)
    by_id = await store.create_task(targeted(Target(agents=frozenset({B_ID}))), ANCHOR)
    assert await runs_on(store, everywhere.task_id) == {A_URL, B_URL}
    assert await runs_on(store, web.task_id) == {A_URL}
    assert await runs_on(store, by_id.task_id) == {B_URL}
    assert await undelivered(store, A_URL) == {everywhere.task_id, web.task_id}
    assert await undelivered(store, B_URL) == {everywhere.task_id, by_id.task_id}
    # Never delivered to B: nothing for B to drop.
    assert await store.pending_removals(B_URL, 10) == []
    # Executions expect the matching agents only, and complete with their results.
    outcomes = await store.record_results([result(web.task_id, A_ID, 1)], ANCHOR)
    assert outcomes == [STORED]
    [execution] = await store.list_executions(web.task_id, 10)
    assert (execution.expected, execution.expected_urls) == (1, (A_URL,))
    assert await store.latest_complete_execution(web.task_id, ANCHOR, timedelta(0)) is not None
    # A member that never matched may not report the task; one that matched may.
    assert await store.assigned_among(B_URL, [web.task_id]) == set()
    assert await store.assigned_among(A_URL, [web.task_id]) == {web.task_id}
    manual = await store.record_manual_execution(
        web.task_id, ANCHOR + timedelta(seconds=3), event("task.run")
    )
    assert manual is not None and manual.expected_urls == (A_URL,)


@pytest_twisted.ensureDeferred
async def test_an_agent_that_changes_labels_joins_and_leaves_targeted_tasks(
    store: Store,
) -> None:
    await fleet_of_two(store, {"role": "web"}, {"role": "db"})
    web = await store.create_task(targeted(labels(role="web")), ANCHOR)
    await store.mark_delivered(A_URL, [web.task_id], A_ID)
    # B restarts with role=web: it joins, and is due the task.
    assert await store.record_heartbeat(B_ID, ANCHOR, beat(role="web"))
    assert await runs_on(store, web.task_id) == {A_URL, B_URL}
    assert await undelivered(store, B_URL) == {web.task_id}
    # A restarts without it: it leaves, and is told to drop the task it holds.
    assert await store.record_heartbeat(A_ID, ANCHOR, beat(role="db"))
    assert await runs_on(store, web.task_id) == {B_URL}
    assert await store.pending_removals(A_URL, 10) == [web.task_id]
    assert await undelivered(store, A_URL) == set()
    # Once it confirmed, it stays out (the task is not delivered to it again).
    await store.mark_removed(A_URL, [web.task_id])
    assert await store.pending_removals(A_URL, 10) == []
    assert await runs_on(store, web.task_id) == {B_URL}
    assert await undelivered(store, A_URL) == set()
    # What it ran before it left is still taken; a new execution expects B only.
    assert await store.assigned_among(A_URL, [web.task_id]) == {web.task_id}
    await store.record_results([result(web.task_id, B_ID, 2)], ANCHOR)
    assert [e.expected_urls for e in await store.list_executions(web.task_id, 10)] == [(B_URL,)]
    # Still holding it (its confirmation was lost): reconciliation removes it again.
    assert await store.request_removal(A_URL, [web.task_id]) == {web.task_id}
    await store.mark_removed(A_URL, [web.task_id])
    # It matches again: delivered again.
    assert await store.record_heartbeat(A_ID, ANCHOR, beat(role="web"))
    assert await runs_on(store, web.task_id) == {A_URL, B_URL}
    assert await undelivered(store, A_URL) == {web.task_id}
    assert await store.pending_removals(A_URL, 10) == []


@pytest_twisted.ensureDeferred
async def test_a_removal_still_pending_is_called_off_when_the_agent_matches_again(
    store: Store,
) -> None:
    await fleet_of_two(store, {"role": "web"}, {})
    web = await store.create_task(targeted(labels(role="web")), ANCHOR)
    await store.mark_delivered(A_URL, [web.task_id], A_ID)
    await store.record_heartbeat(A_ID, ANCHOR, beat())
    assert await store.pending_removals(A_URL, 10) == [web.task_id]
    await store.record_heartbeat(A_ID, ANCHOR, beat(role="web"))
    assert await store.pending_removals(A_URL, 10) == []
    assert await runs_on(store, web.task_id) == {A_URL}


@pytest_twisted.ensureDeferred
async def test_a_patch_of_the_target_reassigns_the_task(store: Store) -> None:
    await fleet_of_two(store, {"role": "web"}, {"role": "db"})
    task = await store.create_task(targeted(labels(role="web")), ANCHOR)
    await store.mark_delivered(A_URL, [task.task_id], A_ID)
    at = ANCHOR + timedelta(seconds=5)
    change = TaskChange(options={"target": {"labels": {"role": "db"}}})
    changed = await store.update_task(task.task_id, change, at, event("task.updated"))
    assert changed is not None and changed[1]
    assert await runs_on(store, task.task_id) == {B_URL}
    assert await store.pending_removals(A_URL, 10) == [task.task_id]
    assert await undelivered(store, B_URL) == {task.task_id}
    # Back to every agent: A's removal is called off and it is due the new revision.
    change = TaskChange(options={"target": None})
    await store.update_task(task.task_id, change, at + timedelta(seconds=1), event("x"))
    assert await runs_on(store, task.task_id) == {A_URL, B_URL}
    assert await store.pending_removals(A_URL, 10) == []
    assert await undelivered(store, A_URL) == {task.task_id}
    # To A by its id: B, which took the task, drops it.
    await store.mark_delivered(B_URL, [task.task_id], B_ID)
    only = TaskChange(options={"target": {"agents": [str(A_ID)]}})
    await store.update_task(task.task_id, only, at + timedelta(seconds=2), event("x"))
    assert await runs_on(store, task.task_id) == {A_URL}
    assert await store.pending_removals(B_URL, 10) == [task.task_id]
    # A change of something else leaves the assignment alone.
    await store.mark_removed(B_URL, [task.task_id])
    await store.update_task(
        task.task_id, TaskChange(command="echo other"), at + timedelta(seconds=3), event("x")
    )
    assert await runs_on(store, task.task_id) == {A_URL}
    assert await store.pending_removals(B_URL, 10) == []
    assert await undelivered(store, B_URL) == set()


@pytest_twisted.ensureDeferred
async def test_a_member_without_an_agent_gets_only_untargeted_tasks_until_one_enrols(
    store: Store,
) -> None:
    await fleet_of_two(store, {"role": "web"}, {"role": "db"})
    await store.add_fleet_member(C_URL, ANCHOR, event("fleet.added", C_URL))
    everywhere = await store.create_task(make_spec(), ANCHOR)
    web = await store.create_task(targeted(labels(role="web")), ANCHOR)
    assert await runs_on(store, everywhere.task_id) == {A_URL, B_URL, C_URL}
    assert await runs_on(store, web.task_id) == {A_URL}
    # Nobody at C yet: an untargeted execution counts it (an agent is on its way).
    await store.record_results([result(everywhere.task_id, A_ID, 1)], ANCHOR)
    [execution] = await store.list_executions(everywhere.task_id, 10)
    assert execution.expected_urls == (A_URL, B_URL, C_URL)
    # An agent with the label enrols at C: it gets the task at once.
    await store.enrol_agent(C_ID, C_URL, HASH_C, ANCHOR, event("agent.enrolled"), {"role": "web"})
    assert await runs_on(store, web.task_id) == {A_URL, C_URL}
    # Revoked: nobody at C to match any more.
    await store.revoke_agent(C_ID, ANCHOR, event("agent.revoked"))
    assert await runs_on(store, web.task_id) == {A_URL}
    assert await runs_on(store, everywhere.task_id) == {A_URL, B_URL, C_URL}


@pytest_twisted.ensureDeferred
async def test_a_member_added_or_a_restart_assigns_by_target(store: Store) -> None:
    # C's agent enrolled before its URL joined the fleet.
    await fleet_of_two(store, {"role": "web"}, {"role": "db"})
    await store.enrol_agent(C_ID, C_URL, HASH_C, ANCHOR, event("agent.enrolled"), {"role": "db"})
    web = await store.create_task(targeted(labels(role="web")), ANCHOR)
    db = await store.create_task(targeted(labels(role="db")), ANCHOR)
    await store.add_fleet_member(C_URL, ANCHOR, event("fleet.added", C_URL))
    assert await runs_on(store, web.task_id) == {A_URL}
    assert await runs_on(store, db.task_id) == {B_URL, C_URL}
    # The server restarts with another fleet (AVAILABLE_SERVERS): the same rule holds.
    await store.set_fleet([B_URL, C_URL])
    await store.set_fleet([A_URL, B_URL, C_URL])
    assert await runs_on(store, web.task_id) == {A_URL}
    assert await runs_on(store, db.task_id) == {B_URL, C_URL}


@pytest_twisted.ensureDeferred
async def test_a_paused_task_follows_its_target_when_resumed(store: Store) -> None:
    await fleet_of_two(store, {"role": "web"}, {"role": "db"})
    web = await store.create_task(targeted(labels(role="web")), ANCHOR)
    await store.mark_delivered(A_URL, [web.task_id], A_ID)
    await store.pause_task(web.task_id, ANCHOR, event("task.paused"))
    await store.mark_removed(A_URL, [web.task_id])
    # While paused, A leaves the label and B joins it.
    await store.record_heartbeat(A_ID, ANCHOR, beat())
    await store.record_heartbeat(B_ID, ANCHOR, beat(role="web"))
    assert await store.pending_removals(A_URL, 10) == []
    await store.resume_task(web.task_id, ANCHOR + timedelta(seconds=1), event("task.resumed"))
    assert await runs_on(store, web.task_id) == {B_URL}
    assert await undelivered(store, B_URL) == {web.task_id}
    assert await undelivered(store, A_URL) == set()


# -- the dispatcher ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_agent_relabelled_is_sent_the_tasks_it_joins_and_told_to_drop_those_it_leaves(
    tmp_path: Path,
) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    everywhere = await store.create_task(dispatch_spec("echo all"), utc_now_from(0))
    web_spec = dataclasses.replace(
        dispatch_spec("echo web"), options=TaskOptions(target=labels(role="web"))
    )
    web = await store.create_task(web_spec, utc_now_from(0))
    dispatcher.task_created(web)
    settle(clock, http)
    assert set(agent.tasks) == {everywhere.task_id}
    # The agent's heartbeat brings role=web: it is sent the task at once.
    assert await store.record_heartbeat(AGENT_ID, utc_now_from(1), beat(role="web"))
    dispatcher.agent_relabelled(URL)
    settle(clock, http)
    assert set(agent.tasks) == {everywhere.task_id, web.task_id}
    # And without it again: told, signed, to drop it, at once.
    assert await store.record_heartbeat(AGENT_ID, utc_now_from(2), beat())
    dispatcher.agent_relabelled(URL + "/")
    settle(clock, http)
    assert set(agent.tasks) == {everywhere.task_id}
    assert await store.pending_removals(URL, 10) == []
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_each_start_reapplies_every_target(store: Store) -> None:
    """set_fleet (each start) repairs assignments that drifted from the targets, say rows
    written by a server that predates targeting."""
    await fleet_of_two(store, {"role": "web"}, {"role": "db"})
    web = await store.create_task(targeted(labels(role="web")), ANCHOR)
    if isinstance(store, MemoryStore):
        for assignment in store._assignments[web.task_id].values():
            assignment.matched = True
    else:
        assert isinstance(store, PostgresStore)

        async def drift(cursor: Any) -> None:
            await cursor.execute("UPDATE task_agents SET matched = true")

        await store.db.run(drift)
    assert await runs_on(store, web.task_id) == {A_URL, B_URL}
    await store.set_fleet([A_URL, B_URL])
    assert await runs_on(store, web.task_id) == {A_URL}


@pytest_twisted.ensureDeferred
async def test_a_task_created_while_its_agent_is_relabelled_sees_the_new_labels(
    database_dsn: str,
) -> None:
    """PostgreSQL only: a relabelling not yet committed is waited for, not read past (a
    create reading the old labels would leave the agent out until the next restart)."""
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await fleet_of_two(store, {}, {"role": "db"})
    relabelling = psycopg2.connect(database_dsn)
    watcher = psycopg2.connect(database_dsn)
    watcher.autocommit = True
    try:
        relabelling.cursor().execute(
            'UPDATE agents SET labels = \'{"role": "web"}\' WHERE agent_id = %s', (str(A_ID),)
        )
        creating = Deferred.fromCoroutine(store.create_task(targeted(labels(role="web")), ANCHOR))

        def waiting_on_a_lock() -> bool:
            cursor = watcher.cursor()
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return bool(cursor.fetchone()[0])

        for _ in range(500):  # wait for the create to reach the agent's row, 10 s at most
            if waiting_on_a_lock():
                break
            await deferLater(reactor, 0.02, lambda: None)
        assert waiting_on_a_lock(), "the create did not wait for the relabelling"
        relabelling.commit()
        task = await creating
    finally:
        relabelling.rollback()
        relabelling.close()
        watcher.close()
    assert await runs_on(store, task.task_id) == {A_URL}
    await store.stop()
