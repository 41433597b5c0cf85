"""The embedded PostgreSQL: its data kept across restarts and crashes (a real one),
restarted with back-off when it dies, and the pgserver it relies on (private names
included) checked, so that an upgrade fails loudly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tomllib
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import pytest
from packaging.requirements import Requirement
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from taskscheduler.embedded_pg import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    pgserver_incompatibilities,
)
from taskscheduler.embedded_pg_supervisor import PostgresSupervisor
from tests.integration.daemons import wait_for
from tests.unit.test_store_postgres import _query

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


class FakePostgres:
    """An embedded PostgreSQL whose starts the test finishes, with success or an error."""

    def __init__(self) -> None:
        self.data_dir = Path("/srv/ts/postgres")
        self.running = True
        self.pid = 100
        self.starts: list[Deferred[None]] = []
        self.broken_checks = 0

    def alive(self) -> bool:
        if self.broken_checks:
            self.broken_checks -= 1
            raise OSError("cannot read /proc")
        return self.running

    async def start(self) -> str:
        waiting: Deferred[None] = Deferred()
        self.starts.append(waiting)
        await waiting
        self.running = True
        self.pid += 1
        return "host=/srv/ts/postgres port=5432"

    @property
    def postmaster_pid(self) -> int | None:
        return self.pid if self.running else None

    def finish_start(self, error: Exception | None = None) -> None:
        pending = self.starts[-1]
        if error is None:
            pending.callback(None)
        else:
            pending.errback(error)


def supervised() -> tuple[PostgresSupervisor, FakePostgres, Clock]:
    clock = Clock()
    postgres = FakePostgres()
    supervisor = PostgresSupervisor(postgres, clock, jitter=lambda: 1.0)
    supervisor.startService()
    return supervisor, postgres, clock


def lines(events: list[dict[str, Any]], level: LogLevel) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == level]


def test_a_dead_postgres_is_started_again_with_back_off_and_each_attempt_is_logged() -> None:
    supervisor, postgres, clock = supervised()
    with capturedLogs() as events:
        clock.advance(5)
        assert postgres.starts == []  # alive: left alone
        postgres.running = False
        clock.advance(1)
        assert len(postgres.starts) == 1
        clock.advance(10)
        assert len(postgres.starts) == 1, "one restart at a time"
        postgres.finish_start(EmbeddedPostgresError("shared memory still in use"))
        clock.advance(0.99)
        assert len(postgres.starts) == 1, "the first retry waits 1 s"
        clock.advance(0.01)
        assert len(postgres.starts) == 2
        postgres.finish_start(EmbeddedPostgresError("shared memory still in use"))
        clock.advance(1.99)
        assert len(postgres.starts) == 2, "the second retry waits 2 s"
        clock.advance(0.01)
        assert len(postgres.starts) == 3
        postgres.finish_start()
    warnings = lines(events, LogLevel.warn)
    infos = lines(events, LogLevel.info)
    assert len(warnings) == 3, warnings  # one per attempt
    assert "/srv/ts/postgres is not running; starting it again" in warnings[0]
    assert "shared memory still in use" in warnings[1] and "next attempt in 1.0 s" in warnings[1]
    assert "next attempt in 2.0 s" in warnings[2]
    assert len(infos) == 1 and "is back (pid 101)" in infos[0], infos
    assert "3.0 s after" in infos[0]
    assert supervisor.restarts == 1
    # Watched again afterwards: the next death is noticed too.
    postgres.running = False
    clock.advance(1)
    assert len(postgres.starts) == 4


def test_stopping_waits_for_a_start_under_way_and_starts_nothing_more() -> None:
    supervisor, postgres, clock = supervised()
    postgres.running = False
    clock.advance(1)
    stopped = supervisor.stopService()
    assert not stopped.called, "whoever stops PostgreSQL next must find it started"
    postgres.finish_start(EmbeddedPostgresError("no"))
    assert stopped.called
    clock.advance(100)
    assert len(postgres.starts) == 1


def test_stopping_during_the_back_off_ends_it_at_once() -> None:
    supervisor, postgres, clock = supervised()
    postgres.running = False
    clock.advance(1)
    postgres.finish_start(EmbeddedPostgresError("no"))
    stopped = supervisor.stopService()
    assert stopped.called
    clock.advance(100)
    assert len(postgres.starts) == 1
    assert clock.getDelayedCalls() == []


def test_the_watch_survives_an_error_while_looking() -> None:
    _, postgres, clock = supervised()
    postgres.broken_checks = 2
    with capturedLogs() as events:
        clock.advance(1)
        clock.advance(1)
    assert len(lines(events, LogLevel.critical)) == 2
    postgres.running = False
    clock.advance(1)
    assert len(postgres.starts) == 1


# -- pgserver -------------------------------------------------------------------------------


def test_the_installed_pgserver_is_in_the_pinned_range() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    pins = [Requirement(d) for d in project["dependencies"] if d.startswith("pgserver")]
    assert len(pins) == 1 and pins[0].specifier, "pgserver must have a version range"
    assert pins[0].specifier.contains(version("pgserver")), (pins[0], version("pgserver"))
    assert any(spec.operator == "<" for spec in pins[0].specifier), "no upper bound"


def test_pgserver_still_has_every_private_name_embedded_pg_uses(
    embedded_postgres: EmbeddedPostgres,
) -> None:
    missing = pgserver_incompatibilities(embedded_postgres._server)
    assert missing == [], (
        f"pgserver {version('pgserver')} no longer has {missing}, which "
        "taskscheduler.embedded_pg relies on: adapt it, or pin pgserver back in pyproject.toml"
    )


@pytest.mark.parametrize("name", ["_instances", "_lock", "_cleanup"])
def test_a_pgserver_without_one_of_them_is_refused_by_name(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pgserver.postgres_server import PostgresServer

    monkeypatch.delattr(PostgresServer, name)
    assert pgserver_incompatibilities() == [f"PostgresServer.{name}"]
    with pytest.raises(EmbeddedPostgresError, match=f"PostgresServer.{name}") as info:
        EmbeddedPostgres(tmp_path / "postgres").start_blocking()
    assert "pyproject.toml" in str(info.value)
    assert not (tmp_path / "postgres").exists(), "refused before touching anything"


# -- the embedded PostgreSQL -----------------------------------------------------------------


def running(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_embedded_postgres_keeps_its_data_and_survives_being_killed(
    private_folder: Callable[[], Path],
) -> None:
    # Deep enough that the unix socket cannot live in the data folder itself.
    folder = private_folder() / ("d" * 60) / ("e" * 60) / "postgres"
    server = EmbeddedPostgres(folder)
    dsn = server.start_blocking()
    try:
        _query(dsn, "CREATE TABLE kept (x text); INSERT INTO kept VALUES ('still here')")
        server.stop_blocking()
        assert not (folder / "postmaster.pid").exists(), "stop left PostgreSQL running"
        dsn = server.start_blocking()
        assert _query(dsn, "SELECT x FROM kept") == [("still here",)]

        # After a crash, postmaster.pid may name a pid that is now some other process.
        server.stop_blocking()
        (folder / "postmaster.pid").write_text(
            f"{os.getpid()}\n{folder}\n1\n5432\n{folder}\n\n  0 0\nready\n"
        )
        dsn = server.start_blocking()
        assert _query(dsn, "SELECT x FROM kept") == [("still here",)]

        assert server.postmaster_pid is not None
        postmaster = psutil.Process(server.postmaster_pid)
        postmaster.send_signal(signal.SIGKILL)
        wait_for(lambda: not running(postmaster), 10, "the postmaster to die", interval=0.01)
        dsn = server.start_blocking()
        assert _query(dsn, "SELECT x FROM kept") == [("still here",)]

        # A server that died while using the folder must not keep PostgreSQL running.
        dead = subprocess.Popen(["true"])
        dead.wait()
        handles = folder / ".handle_pids.json"
        handles.write_text(json.dumps([dead.pid, *json.loads(handles.read_text())]))
        server.stop_blocking()
        assert not (folder / "postmaster.pid").exists(), "a dead user kept PostgreSQL running"
    finally:
        server.stop_blocking()
