"""The Store contract for enrolled agents and the audit log, on MemoryStore and PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest
import pytest_twisted
from twisted.internet import reactor

from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.records import AgentConflict, AuditEvent
from tests.unit.test_store_contract import A_ID, A_URL, ANCHOR, B_ID, B_URL, make_spec

HASH_A = "sha256:" + "a" * 64
HASH_B = "sha256:" + "b" * 64
HASH_C = "sha256:" + "c" * 64


def event(action: str, target: str = "x") -> AuditEvent:
    return AuditEvent(at=ANCHOR, actor="operator:alice", action=action, target=target, peer="::1")


@pytest_twisted.ensureDeferred
async def test_an_enrolled_agent_is_found_by_credential_hash_and_url(store: Store) -> None:
    record = await store.enrol_agent(A_ID, A_URL, HASH_A, ANCHOR, event("agent.enrolled"))
    assert (record.agent_id, record.url, record.revoked) == (A_ID, A_URL, False)
    assert await store.agent_by_credential(HASH_A) == record
    assert await store.agent_by_credential(HASH_B) is None
    assert await store.agent_for_url(A_URL) == record
    assert await store.agent_for_url(B_URL) is None
    assert await store.list_agents() == [record]


@pytest_twisted.ensureDeferred
async def test_an_identity_is_never_enrolled_twice_even_after_revocation(store: Store) -> None:
    await store.enrol_agent(A_ID, A_URL, HASH_A, ANCHOR, event("agent.enrolled"))
    with pytest.raises(AgentConflict) as e:
        await store.enrol_agent(A_ID, A_URL, HASH_B, ANCHOR, event("agent.enrolled"))
    assert e.value.code == "agent_exists"
    await store.revoke_agent(A_ID, ANCHOR, event("agent.revoked"))
    with pytest.raises(AgentConflict):
        await store.enrol_agent(A_ID, B_URL, HASH_B, ANCHOR, event("agent.enrolled"))
    # The refused enrolments left nothing behind.
    assert await store.agent_by_credential(HASH_B) is None
    assert [e.action for e in await store.audit_events(10)] == ["agent.revoked", "agent.enrolled"]


@pytest_twisted.ensureDeferred
async def test_a_url_has_one_live_agent_until_it_is_revoked(store: Store) -> None:
    await store.enrol_agent(A_ID, A_URL, HASH_A, ANCHOR, event("agent.enrolled"))
    with pytest.raises(AgentConflict) as e:
        await store.enrol_agent(B_ID, A_URL, HASH_B, ANCHOR, event("agent.enrolled"))
    assert e.value.code == "url_taken"
    revoked = await store.revoke_agent(A_ID, ANCHOR + timedelta(seconds=1), event("r"))
    assert revoked is not None and revoked.revoked
    assert await store.revoke_agent(A_ID, ANCHOR, event("r")) is None, "already revoked"
    assert await store.revoke_agent(B_ID, ANCHOR, event("r")) is None, "unknown"
    found = await store.agent_by_credential(HASH_A)
    assert found is not None and found.revoked, "a revoked credential is still recognised"
    assert await store.agent_for_url(A_URL) is None
    # The revoked agent keeps its URL until an operator releases it.
    with pytest.raises(AgentConflict) as e:
        await store.enrol_agent(B_ID, A_URL, HASH_B, ANCHOR, event("agent.enrolled"))
    assert e.value.code == "url_revoked"
    await store.release_agent_url(A_ID, ANCHOR + timedelta(seconds=2), event("agent.url_released"))
    record = await store.enrol_agent(B_ID, A_URL, HASH_B, ANCHOR, event("agent.enrolled"))
    assert await store.agent_for_url(A_URL) == record


@pytest_twisted.ensureDeferred
async def test_only_an_operator_release_lets_another_agent_enrol_at_a_revoked_url(
    store: Store,
) -> None:
    C_ID = uuid.UUID("cccccccc-0000-4000-8000-00000000000c")
    await store.enrol_agent(A_ID, A_URL, HASH_A, ANCHOR, event("agent.enrolled"))
    with pytest.raises(AgentConflict) as e:
        await store.release_agent_url(A_ID, ANCHOR, event("agent.url_released"))
    assert e.value.code == "agent_live", "a live agent's URL is not released"
    assert await store.release_agent_url(B_ID, ANCHOR, event("x")) is None, "unknown"
    await store.revoke_agent(A_ID, ANCHOR + timedelta(seconds=1), event("agent.revoked"))
    # Another URL is free; this one is not, and a refusal leaves nothing behind.
    await store.enrol_agent(B_ID, B_URL, HASH_B, ANCHOR, event("agent.enrolled"))
    with pytest.raises(AgentConflict) as e:
        await store.enrol_agent(C_ID, A_URL, HASH_C, ANCHOR, event("agent.enrolled"))
    assert e.value.code == "url_revoked"
    assert await store.agent_by_credential(HASH_C) is None
    released_at = ANCHOR + timedelta(seconds=3)
    released = await store.release_agent_url(A_ID, released_at, event("agent.url_released"))
    assert released is not None and released.url_released_at == released_at
    again = await store.release_agent_url(A_ID, ANCHOR + timedelta(seconds=9), event("x"))
    assert again == released, "releasing twice changes nothing and is audited once"
    assert [e.action for e in await store.audit_events(10)][:2] == [
        "agent.url_released",
        "agent.enrolled",
    ]
    [listed] = [a for a in await store.list_agents() if a.agent_id == A_ID]
    assert listed == released
    record = await store.enrol_agent(C_ID, A_URL, HASH_C, ANCHOR, event("agent.enrolled"))
    assert await store.agent_for_url(A_URL) == record
    # The new agent, revoked in turn, holds the URL again until its own release.
    await store.revoke_agent(C_ID, ANCHOR + timedelta(seconds=4), event("agent.revoked"))
    with pytest.raises(AgentConflict) as e:
        await store.enrol_agent(uuid.uuid4(), A_URL, "sha256:" + "d" * 64, ANCHOR, event("e"))
    assert e.value.code == "url_revoked"


@pytest_twisted.ensureDeferred
async def test_task_creation_is_audited_and_the_log_pages_newest_first(store: Store) -> None:
    specs = [make_spec(f"echo {i}") for i in range(3)]
    for spec in specs:
        await store.create_task(spec, ANCHOR, event("task.created", str(spec.task_id)))
    newest = await store.audit_events(2)
    assert [e.target for e in newest] == [str(specs[2].task_id), str(specs[1].task_id)]
    assert newest[0].at == ANCHOR.astimezone(UTC) and newest[0].actor == "operator:alice"
    assert newest[0].event_id is not None
    rest = await store.audit_events(10, before=newest[-1].event_id)
    assert [e.target for e in rest] == [str(specs[0].task_id)]


@pytest_twisted.ensureDeferred
async def test_assigned_among_is_per_agent_url(store: Store) -> None:
    task = await store.create_task(make_spec(), ANCHOR)
    other = uuid.uuid4()
    assert await store.assigned_among(A_URL, [task.task_id, other]) == {task.task_id}
    assert await store.assigned_among("http://elsewhere:1", [task.task_id]) == set()


@pytest_twisted.ensureDeferred
async def test_the_audit_log_is_append_only_in_postgresql(database_dsn: str) -> None:
    store = PostgresStore(database_dsn, reactor=reactor)
    await store.start()
    await store.create_task(make_spec(), datetime.now(UTC), event("task.created"))
    await store.stop()
    conn = psycopg2.connect(database_dsn)
    try:
        for statement in ("UPDATE audit_events SET actor = 'x'", "DELETE FROM audit_events"):
            with conn.cursor() as cursor, pytest.raises(psycopg2.Error, match="append-only"):
                cursor.execute(statement)
            conn.rollback()
    finally:
        conn.close()
