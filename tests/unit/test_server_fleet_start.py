"""AVAILABLE_SERVERS at start (server/tap.py: DatabaseConnection): authoritative when set,
audited as its own; unset or empty, the fleet stored in the database stands."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from taskscheduler.server.database import DatabaseConnection
from taskscheduler.server.store.memory import MemoryStore
from tests.unit.test_server_options import parse

A, B, C = "http://agent-a:8081", "http://agent-b:8081", "http://agent-c:8081"


async def start(store: MemoryStore, fleet: list[str]) -> None:
    service: Any = DatabaseConnection(store, Clock(), 5, fleet)  # type: ignore[arg-type]
    await service.startService()


@pytest_twisted.ensureDeferred
async def test_available_servers_unset_leaves_the_stored_fleet_as_it_is() -> None:
    store = MemoryStore()
    await store.set_fleet([A, B])
    await start(store, [])
    assert [m.url for m in await store.list_fleet()] == [A, B]
    assert await store.audit_events(10) == []


@pytest_twisted.ensureDeferred
async def test_available_servers_set_is_the_fleet_at_start_and_audited_as_its_own() -> None:
    store = MemoryStore()
    await store.set_fleet([A, B])
    await start(store, [B, C])
    assert sorted(m.url for m in await store.list_fleet()) == [B, C]
    events = [(e.actor, e.action, e.target) for e in await store.audit_events(10)]
    assert sorted(events) == [
        ("AVAILABLE_SERVERS", "fleet.added", C),
        ("AVAILABLE_SERVERS", "fleet.removed", A),
    ]


def test_the_heartbeat_interval_is_an_option_with_a_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse([], monkeypatch)["heartbeat-interval"] == 10
    changed = parse([], monkeypatch, TASKSCHEDULER_HEARTBEAT_INTERVAL="2.5")
    assert changed["heartbeat-interval"] == 2.5
