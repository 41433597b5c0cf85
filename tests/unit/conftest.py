"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.postgres import PostgresStore
from tests.unit.test_store_contract import A_URL, B_URL


@pytest_twisted.async_yield_fixture(params=["memory", "postgres"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each Store contract test runs on both stores: MemoryStore and a real PostgreSQL."""
    if request.param == "memory":
        instance: Store = MemoryStore()
    else:
        instance = PostgresStore(request.getfixturevalue("database_dsn"), reactor=reactor)
    await instance.start()
    await instance.set_fleet([A_URL, B_URL])
    yield instance
    await instance.stop()
