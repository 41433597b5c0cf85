"""The server's database: the service that brings the store's connection up (embedded
PostgreSQL first, then connect with a wait, migrate, tell the fleet) and down, and the
checks on how its DSN was given (``--database`` on the command line, ``--database-file``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from psycopg2.extensions import parse_dsn
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from taskscheduler.embedded_pg import EmbeddedPostgres
from taskscheduler.hardening import private_file_problem
from taskscheduler.retry import Backoff, OutOfTime, no_jitter, retry_until
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.store.fleet import CONFIG_ACTOR
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.records import StoreUnavailable


class DatabaseConnection(Service):
    """The store's connection: the embedded PostgreSQL first (when there is one), then the
    store connected, waiting up to ``wait`` seconds for the database to answer, migrated,
    and told the fleet when AVAILABLE_SERVERS is set (it is then authoritative: members
    added and removed, audited as its own; unset or empty, the stored fleet stands).
    Stopping closes the store, then lets go of the embedded server."""

    log = Logger()

    def __init__(
        self,
        store: PostgresStore,
        clock: IReactorTime,
        wait: float,
        fleet: Sequence[str],
        embedded: EmbeddedPostgres | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._wait = wait
        self._fleet = list(fleet)
        self._embedded = embedded

    def startService(self) -> Deferred[None]:  # type: ignore[override]
        super().startService()
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self._embedded is not None:
            dsn = await self._embedded.start()
            self.log.info("embedded PostgreSQL is up in {path}", path=self._embedded.data_dir)
            self._store.use_dsn(dsn)
        await connect_with_wait(self._store, self._clock, self._wait, self.log)
        if not self._fleet:
            return
        added, removed = await self._store.set_fleet(
            self._fleet, utc_now_from(self._clock.seconds()), CONFIG_ACTOR
        )
        for url in added:
            self.log.info("AVAILABLE_SERVERS added {url} to the fleet", url=url)
        for url in removed:
            self.log.info("AVAILABLE_SERVERS removed {url} from the fleet", url=url)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await self._store.stop()
        if self._embedded is not None:
            await self._embedded.stop()


async def connect_with_wait(store: Any, clock: IReactorTime, wait: float, log: Logger) -> None:
    """``store.start()``, tried again with back-off (0.5 s doubling to 5 s) while the
    database does not answer, for up to ``wait`` seconds."""
    try:
        await retry_until(
            clock,
            store.start,
            Backoff(0.5, 5.0, no_jitter),
            retry_on=(StoreUnavailable,),
            within=wait,
            on_failure=lambda error, delay: log.warn(
                "database not reachable yet ({error}); retrying", error=str(error)
            ),
        )
    except OutOfTime as e:
        raise StoreUnavailable(
            f"the database did not answer within {wait:g} s (--database-wait): {e.last}"
        ) from e.last


def database_warnings(dsn: str, on_command_line: bool) -> list[str]:
    """What is unsafe in how the database DSN was given."""
    if not on_command_line:
        return []
    try:
        given = parse_dsn(dsn)
    except Exception:
        # Unparseable: the connection will say so; the password may be in it all the same.
        given = {"password": "?"}
    if "password" not in given:
        return []
    return [
        "the database password is on the command line (--database), where `ps` shows it "
        "to every local user: use --database-file, TASKSCHEDULER_DATABASE or libpq's "
        "passfile (PGPASSFILE or ~/.pgpass) instead"
    ]


def read_database_file(path: Path) -> str:
    """The DSN in ``--database-file``, a file only its owner may read."""
    try:
        problem = private_file_problem(path)
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise usage.UsageError(f"cannot read --database-file {str(path)!r}: {e}") from None
    if problem is not None:
        raise usage.UsageError(problem)
    if not text:
        raise usage.UsageError(f"--database-file {str(path)!r} is empty")
    return text
