"""Shared fixtures: a real PostgreSQL for the session, a fresh database for each test.

``TASKSCHEDULER_TEST_DSN`` points the tests at an existing PostgreSQL (a role allowed to
create databases); without it an embedded one (``pgserver``) is started in a temporary
folder for the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg2
import pytest
from psycopg2.extensions import make_dsn

from taskscheduler.embedded_pg import EmbeddedPostgres


@pytest.fixture(scope="session")
def private_folder() -> Iterator[Callable[[], Path]]:
    """Makes temporary folders outside pytest's ``tmp_path`` tree, removed at the end.

    pytest deletes all but its three newest ``tmp_path`` trees whenever a session
    starts; a concurrent pytest run (another checkout, CI on the same host) would delete
    the data folder of a PostgreSQL that is still running.
    """
    made: list[Path] = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="taskscheduler-test-")))
        return made[-1]

    yield make
    for folder in made:
        _stop_leftover_postmasters(folder)
        shutil.rmtree(folder, ignore_errors=True)


def _stop_leftover_postmasters(folder: Path) -> None:
    """Shut down a PostgreSQL a failed test left running in ``folder`` (SIGQUIT: at once)."""
    for pidfile in folder.rglob("postmaster.pid"):
        with contextlib.suppress(OSError, ValueError, IndexError, psutil.Error):
            process = psutil.Process(int(pidfile.read_text().splitlines()[0]))
            if process.name() == "postgres":
                process.send_signal(signal.SIGQUIT)


@pytest.fixture(scope="session")
def embedded_postgres(private_folder: Callable[[], Path]) -> Iterator[EmbeddedPostgres]:
    """An embedded PostgreSQL for the session, started on first use."""
    server = EmbeddedPostgres(private_folder() / "pgdata")
    server.start_blocking()
    yield server
    server.stop_blocking()


@pytest.fixture(scope="session")
def postgres_dsn(request: pytest.FixtureRequest) -> str:
    """A DSN of a PostgreSQL server (not a database) the tests may create databases on."""
    dsn = os.environ.get("TASKSCHEDULER_TEST_DSN")
    if dsn:
        return dsn
    embedded: EmbeddedPostgres = request.getfixturevalue("embedded_postgres")
    assert embedded.dsn is not None
    return embedded.dsn


def _create_database(server_dsn: str) -> tuple[str, str]:
    name = f"ts_test_{uuid.uuid4().hex[:16]}"
    conn = psycopg2.connect(server_dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            # template0: nothing anyone added to template1 leaks in; a few ms for a new db.
            cursor.execute(f"CREATE DATABASE {name} TEMPLATE template0")
    finally:
        conn.close()
    return name, make_dsn(server_dsn, dbname=name)


def _drop_database(server_dsn: str, name: str) -> None:
    try:
        conn = psycopg2.connect(server_dsn)
    except psycopg2.OperationalError:
        return  # the server is gone; so is the database, for our purposes
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        conn.close()


@pytest.fixture
def database_dsn(postgres_dsn: str) -> Iterator[str]:
    """A DSN of a new, empty database, dropped after the test."""
    name, dsn = _create_database(postgres_dsn)
    yield dsn
    _drop_database(postgres_dsn, name)


class RestartablePostgres:
    """An embedded PostgreSQL a test may stop and start again; ``dsn`` stays valid."""

    def __init__(self, server: EmbeddedPostgres) -> None:
        self._server = server
        assert server.dsn is not None
        self.server_dsn: str = server.dsn

    async def stop(self) -> None:
        await self._server.stop()

    async def start(self) -> None:
        dsn = await self._server.start()
        assert dsn == self.server_dsn, "the restarted server moved"


@pytest.fixture
def restartable_postgres(
    request: pytest.FixtureRequest, private_folder: Callable[[], Path]
) -> Iterator[RestartablePostgres]:
    """The session's embedded PostgreSQL, or a private one when the session uses a DSN.

    Whatever the test does, the server is running again afterwards.
    """
    if os.environ.get("TASKSCHEDULER_TEST_DSN"):
        server = EmbeddedPostgres(private_folder() / "pgdata")
        server.start_blocking()
        owned = True
    else:
        server = request.getfixturevalue("embedded_postgres")
        owned = False
    yield RestartablePostgres(server)
    if owned:
        server.stop_blocking()
    elif server.dsn is None or not _reachable(server.dsn):
        server.start_blocking()


def _reachable(dsn: str) -> bool:
    try:
        psycopg2.connect(dsn, connect_timeout=2).close()
    except psycopg2.OperationalError:
        return False
    return True
