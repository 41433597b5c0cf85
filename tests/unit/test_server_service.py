"""The server's service tree on a real PostgreSQL: the port is bound first, but serves
only once the database is ready; a database that never answers stops the server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import deferLater

from taskscheduler.server.options import Options
from taskscheduler.server.tap import server_service
from taskscheduler.services import ListeningPort, StartInOrder
from tests.integration.daemons import free_port

reactor: Any = _reactor


def options_for(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str) -> Options:
    for name in ["TASKSCHEDULER_TOKENS", "TASKSCHEDULER_TOKENS_FILE", "AVAILABLE_SERVERS"]:
        monkeypatch.delenv(name, raising=False)
    options = Options()
    options.parseOptions(
        ["--listen", "tcp:0:interface=127.0.0.1", "--data-dir", str(tmp_path / "data"), *args]
    )
    return options


def listening_port(tree: StartInOrder) -> ListeningPort:
    [port] = [child for child in tree if isinstance(child, ListeningPort)]
    return port


@pytest_twisted.ensureDeferred
async def test_the_port_serves_only_once_the_database_is_ready(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_dsn: str
) -> None:
    fatal: list[str] = []
    tree = server_service(
        options_for(monkeypatch, tmp_path, "--database", database_dsn),
        reactor,
        fatal.append,
        lambda: True,
    )
    tree.privilegedStartService()
    tree.startService()
    try:
        port = listening_port(tree).port
        assert port is not None, "bound before anything else starts"
        # Connecting to the database takes turns of the reactor: it is under way.
        assert port not in reactor.getReaders(), "no connection accepted before the database"
        await until(lambda: port in reactor.getReaders() or bool(fatal))
        assert fatal == []
        response = await treq.get(f"http://127.0.0.1:{port.getHost().port}/api/v1/health")
        assert response.code == 200
        await response.content()
    finally:
        await tree.stopService()
    assert port not in reactor.getReaders()


@pytest_twisted.ensureDeferred
async def test_a_database_that_never_answers_stops_the_server_unserved(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nowhere = f"host=127.0.0.1 port={free_port()} dbname=tasks connect_timeout=1"
    failed: Deferred[str] = Deferred()
    tree = server_service(
        options_for(monkeypatch, tmp_path, "--database", nowhere, "--database-wait", "0.1"),
        reactor,
        failed.callback,
        lambda: True,
    )
    tree.privilegedStartService()
    tree.startService()
    try:
        port = listening_port(tree).port
        assert port is not None and port not in reactor.getReaders()
        reason = await failed.addTimeout(30, reactor)
        assert "the database did not answer within 0.1 s" in reason
        assert port not in reactor.getReaders(), "it never served"
        address = port.getHost()
    finally:
        await tree.stopService()
    with pytest.raises(ConnectionRefusedError):
        await treq.get(f"http://127.0.0.1:{address.port}/api/v1/health")


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    """Wait for ``condition``, checking every 10 ms, for at most ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while not condition():
        assert reactor.seconds() < deadline, "timed out"
        await deferLater(reactor, 0.01, lambda: None)
