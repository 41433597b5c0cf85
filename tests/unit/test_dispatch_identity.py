"""The link's reads at fleet scale: who is enrolled at its URL is read once and kept
until the fleet changes or the agent there does, and a kick reads its work once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred

from taskscheduler.schedule import utc_now_from
from taskscheduler.server.store.records import AuditEvent
from tests.unit.test_dispatch import AGENT_ID, URL, real_setup, settle, spec


def counting(store: Any, name: str) -> list[int]:
    """Count the calls of ``store.name`` (a one-item list, bumped per call)."""
    calls = [0]
    original = getattr(store, name)

    async def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return await original(*args, **kwargs)

    setattr(store, name, counted)
    return calls


@pytest_twisted.ensureDeferred
async def test_the_enrolled_identity_is_read_once_not_once_a_pass(tmp_path: Path) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    identity_reads = counting(store, "agent_for_url")
    dispatcher.startService()
    settle(clock, http)
    for i in range(5):
        task = await store.create_task(spec(f"echo {i}"), utc_now_from(0))
        dispatcher.task_created(task)
        settle(clock, http)
    assert len(agent.tasks) == 5
    assert identity_reads[0] == 1
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_kick_reads_the_undelivered_tasks_once_when_they_fit_a_page(
    tmp_path: Path,
) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    settle(clock, http)
    reads = counting(store, "undelivered_tasks")
    task = await store.create_task(spec(), utc_now_from(0))
    dispatcher.task_created(task)
    settle(clock, http)
    assert set(agent.tasks) == {task.task_id}
    assert reads[0] == 1, "a short page is all there was: no second read"
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_revoked_agent_is_signed_for_no_more_once_the_fleet_is_told(
    tmp_path: Path,
) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    first = await store.create_task(spec("echo first"), utc_now_from(0))
    dispatcher.task_created(first)
    settle(clock, http)
    assert first.task_id in agent.tasks
    now = utc_now_from(clock.seconds())
    await store.revoke_agent(AGENT_ID, now, AuditEvent(now, "operator:o", "agent.revoked", "x", ""))
    dispatcher.fleet_changed()  # as the revoke route does
    settle(clock, http)
    before = agent.requests
    second = await store.create_task(spec("echo second"), utc_now_from(0))
    dispatcher.task_created(second)
    settle(clock, http)
    assert second.task_id not in agent.tasks
    assert [t.task_id for t in await store.undelivered_tasks(URL, 10)] == [second.task_id]
    assert agent.requests == before, "nothing signed for the revoked agent"
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_changes_while_the_fleet_is_read_cost_one_more_read_that_sees_them_all(
    tmp_path: Path,
) -> None:
    store, dispatcher, clock, http, _ = await real_setup(tmp_path)
    dispatcher.startService()
    settle(clock, http)
    reads: list[Deferred[None]] = []
    original = store.list_fleet

    async def slow_list_fleet() -> Any:
        gate: Deferred[None] = Deferred()
        reads.append(gate)
        await gate
        return await original()

    store.list_fleet = slow_list_fleet  # type: ignore[method-assign]
    urls = [f"http://agent-{i}:8081" for i in range(5)]
    for url in urls:
        now = utc_now_from(clock.seconds())
        await store.add_fleet_member(
            url, now, AuditEvent(now, "operator:o", "fleet.added", url, "")
        )
        dispatcher.fleet_changed()
    assert len(reads) == 1, "one read under way; the changes after it wait for it"
    reads[0].callback(None)
    assert len(reads) == 2, "one more read for every change made meanwhile"
    reads[1].callback(None)
    assert len(reads) == 2
    assert {link.url for link in dispatcher.links} == {URL, *urls}
    dispatcher.stopService()
