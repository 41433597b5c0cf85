"""``twistd taskscheduler-server``: options and service wiring.

``makeService`` only builds objects. Start-up I/O (the embedded PostgreSQL, schema
migrations, the fleet list) happens in :class:`ServerService`, which opens the HTTP port
only once the database is ready, and stops the process cleanly if it never is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import treq
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage

from taskscheduler.embedded_pg import EmbeddedPostgres
from taskscheduler.server.api import DEFAULT_REPORT_GRACE, ServerAPI
from taskscheduler.server.dispatch import Dispatcher
from taskscheduler.server.pgstore import PostgresStore
from taskscheduler.server.store import StoreUnavailable
from taskscheduler.web import DEFAULT_MAX_BODY_BYTES, make_site


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Runs the taskscheduler API server. Every option can also be set by the "
        "environment variable named in brackets; the command line wins."
    )
    optParameters = [
        [
            "listen",
            "l",
            None,
            "Where to listen, as a Twisted endpoint string [TASKSCHEDULER_LISTEN] "
            "(default: tcp:8080; e.g. tcp:8080:interface=127.0.0.1).",
        ],
        [
            "database",
            "d",
            None,
            "PostgreSQL DSN, e.g. postgresql://user:pass@host/db [TASKSCHEDULER_DATABASE]. "
            "Without one, an embedded PostgreSQL is kept in <data-dir>/postgres.",
        ],
        [
            "data-dir",
            None,
            None,
            "Folder for the server's own data [TASKSCHEDULER_DATA_DIR] "
            "(default: ./taskscheduler-data).",
        ],
        [
            "available-servers",
            None,
            None,
            "Comma-separated agent base URLs every task runs on [AVAILABLE_SERVERS], "
            "e.g. http://127.0.0.1:8081,http://127.0.0.1:8082.",
        ],
        [
            "report-grace",
            None,
            None,
            "Seconds after a run's time limit to wait for missing agents before an "
            "execution counts as complete without them [TASKSCHEDULER_REPORT_GRACE] "
            f"(default: {int(DEFAULT_REPORT_GRACE.total_seconds())}).",
        ],
        [
            "database-wait",
            None,
            None,
            "Seconds to keep trying to reach the database at start-up "
            "[TASKSCHEDULER_DATABASE_WAIT] (default: 60).",
        ],
        [
            "max-body-bytes",
            None,
            None,
            "Largest request body accepted [TASKSCHEDULER_MAX_BODY_BYTES] "
            f"(default: {DEFAULT_MAX_BODY_BYTES}).",
        ],
    ]

    def postOptions(self) -> None:
        self["listen"] = self["listen"] or _env("TASKSCHEDULER_LISTEN", "tcp:8080")
        self["database"] = self["database"] or _env("TASKSCHEDULER_DATABASE")
        self["data-dir"] = self["data-dir"] or _env("TASKSCHEDULER_DATA_DIR", "taskscheduler-data")
        servers = self["available-servers"] or _env("AVAILABLE_SERVERS", "")
        self["agents"] = parse_agent_urls(servers or "")
        self["report-grace"] = _positive_number(
            self["report-grace"] or _env("TASKSCHEDULER_REPORT_GRACE", "30"), "report-grace"
        )
        self["database-wait"] = _positive_number(
            self["database-wait"] or _env("TASKSCHEDULER_DATABASE_WAIT", "60"), "database-wait"
        )
        self["max-body-bytes"] = int(
            _positive_number(
                self["max-body-bytes"]
                or _env("TASKSCHEDULER_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES)),
                "max-body-bytes",
            )
        )


def parse_agent_urls(text: str) -> list[str]:
    """``AVAILABLE_SERVERS``: comma-separated http(s) base URLs, duplicates removed."""
    urls: list[str] = []
    for item in text.split(","):
        url = item.strip().rstrip("/")
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise usage.UsageError(
                f"AVAILABLE_SERVERS entry {url!r} must be a base URL like http://host:8081"
            )
        if url not in urls:
            urls.append(url)
    return urls


def _positive_number(text: str | None, name: str) -> float:
    try:
        value = float(text or "")
    except ValueError:
        raise usage.UsageError(f"--{name} must be a number of seconds") from None
    if value <= 0:
        raise usage.UsageError(f"--{name} must be positive")
    return value


class ServerService(MultiService):
    """Brings the database up, then the dispatcher and the HTTP port; tears down in reverse."""

    log = Logger()

    def __init__(self, options: Options, reactor: Any) -> None:
        super().__init__()
        self._options = options
        self._reactor = reactor
        self._embedded: EmbeddedPostgres | None = None
        self._store: PostgresStore | None = None
        self._started: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._started = Deferred.fromCoroutine(self._start())
        self._started.addErrback(self._failed_to_start)

    def _failed_to_start(self, failure: Any) -> None:
        self.log.failure("taskscheduler server could not start", failure)
        # Also when this happens before the reactor runs: stop it as soon as it does.
        self._reactor.callWhenRunning(self._reactor.stop)

    async def _start(self) -> None:
        options = self._options
        dsn = options["database"]
        if not dsn:
            self._embedded = EmbeddedPostgres(os.path.join(options["data-dir"], "postgres"))
            dsn = await self._embedded.start()
            self.log.info("embedded PostgreSQL is up in {path}", path=self._embedded.data_dir)
        store = PostgresStore(dsn, reactor=self._reactor)
        await self._connect(store, options["database-wait"])
        self._store = store
        await store.set_fleet(options["agents"])
        if not options["agents"]:
            self.log.warn("AVAILABLE_SERVERS is empty: tasks will be stored but run nowhere")
        dispatcher = Dispatcher(store, treq, self._reactor, options["agents"])
        api = ServerAPI(
            store,
            self._reactor,
            on_task_created=dispatcher.task_created,
            report_grace=timedelta(seconds=options["report-grace"]),
        )
        dispatcher.setServiceParent(self)
        site = make_site(api.resource(), options["max-body-bytes"])
        strports.service(options["listen"], site, reactor=self._reactor).setServiceParent(self)
        self.log.info(
            "taskscheduler server listening on {listen} with {count} agents",
            listen=options["listen"],
            count=len(options["agents"]),
        )

    async def _connect(self, store: PostgresStore, wait: float) -> None:
        deadline = self._reactor.seconds() + wait
        delay = 0.5
        while True:
            try:
                await store.start()
                return
            except StoreUnavailable as e:
                if self._reactor.seconds() + delay > deadline:
                    raise
                self.log.warn("database not reachable yet ({error}); retrying", error=str(e))
                await deferLater(self._reactor, delay, lambda: None)
                delay = min(delay * 2, 5.0)

    async def _stop(self) -> None:
        if self._started is not None and not self._started.called:
            self._started.cancel()
        await super().stopService()
        if self._store is not None:
            await self._store.stop()
        if self._embedded is not None:
            await self._embedded.stop()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def makeService(options: Options) -> IService:
    return ServerService(options, global_reactor)


__all__: Sequence[str] = ["Options", "makeService"]
