"""Changes one server replica makes, told to the others through PostgreSQL's LISTEN/NOTIFY.

Every replica runs one :class:`ChangeBus`: a txpostgres connection of its own, outside the
store's pool, that LISTENs on :data:`CHANNEL`. A replica that changed something (a task,
the fleet, an agent) :meth:`~ChangeBus.publish`\\ es a :class:`Change` once the change is
committed: a small JSON notice (its kind, an id or URL, and the sender's replica id, so
that the sender, which hears its own notices, ignores them). The others act on it as if
the change were their own (:mod:`taskscheduler.server.cache_sync`).

A notice is a hint, never the truth: the database is. Notices are lost when a listener's
connection breaks (LISTEN lasts as long as the session), so the bus reconnects with
back-off, LISTENs again, and then tells its subscribers "resync: anything may have
changed" (:meth:`ChangeSubscriber.resync`): they drop what they cached and read again.
It does so after the first LISTEN too, which closes the window between the services'
first reads at start and the LISTEN. A replica whose own notices could not be sent (its
listener was down) asks every replica to resync once it is back.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg2
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres.txpostgres import Connection

from taskscheduler.retry import Backoff, RetryLoop
from taskscheduler.server.store.failover import session_params
from taskscheduler.server.store.pool import first_line
from taskscheduler.server.store.records import StoreUnavailable

#: The channel every replica LISTENs on (NOTIFY is scoped to the database).
CHANNEL = "taskscheduler_changes"
#: Notices waiting for the connection; past it, they are dropped (and a resync asked).
MAX_OUTBOX = 10_000
#: Notices sent in one statement.
BATCH = 500
CONNECT_TIMEOUT = 5.0
#: The listener's name in ``pg_stat_activity``.
APPLICATION_NAME = "taskscheduler-changes"
#: Past this, a LISTEN or NOTIFY that has not returned is given up, its connection closed.
SEND_TIMEOUT = 10.0


class Kind(enum.StrEnum):
    TASK_CREATED = "task.created"
    TASK_CHANGED = "task.changed"  # PATCH, pause, resume, run now
    TASK_DELETED = "task.deleted"
    FLEET_CHANGED = "fleet.changed"  # a member added or removed, an agent revoked
    AGENT_ENROLLED = "agent.enrolled"
    AGENT_RELABELLED = "agent.relabelled"
    AGENT_REVOKED = "agent.revoked"
    RESYNC = "resync"  # the sender could not announce everything: anything may have changed


#: The fields each kind carries ("id": a task's or an agent's).
_FIELDS = {
    Kind.TASK_CREATED: ("id",),
    Kind.TASK_CHANGED: ("id",),
    Kind.TASK_DELETED: ("id",),
    Kind.FLEET_CHANGED: (),
    Kind.AGENT_ENROLLED: ("id", "url"),
    Kind.AGENT_RELABELLED: ("url",),
    Kind.AGENT_REVOKED: ("id",),
    Kind.RESYNC: (),
}


@dataclass(frozen=True)
class Change:
    """One change a replica made. ``id`` is a task's or an agent's (a UUID), ``url`` an
    agent's; ``replica`` the sender (set by the bus)."""

    kind: Kind
    id: uuid.UUID | None = None
    url: str | None = None
    replica: str = ""

    def to_payload(self, replica: str) -> str:
        body: dict[str, str] = {"k": self.kind.value, "r": replica}
        if self.id is not None:
            body["id"] = str(self.id)
        if self.url is not None:
            body["url"] = self.url
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_payload(cls, payload: str) -> Change | None:
        """The change in a notice, or None if it is not one this server understands (a
        newer replica's, or garbage: the caller resyncs)."""
        try:
            body = json.loads(payload)
            kind = Kind(body["k"])
            replica = body["r"]
            wanted = _FIELDS[kind]
            id_ = uuid.UUID(body["id"]) if "id" in wanted else None
            url = body["url"] if "url" in wanted else None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if not isinstance(replica, str) or ("url" in wanted and not isinstance(url, str)):
            return None
        return cls(kind, id_, url, replica)


class ChangeSubscriber(Protocol):
    def changed(self, change: Change) -> None:
        """Another replica made ``change`` (committed)."""

    def resync(self) -> None:
        """Notices may have been missed: anything may have changed."""


class Listener(Protocol):
    """What the bus uses of its connection (a txpostgres ``Connection``)."""

    def addNotifyObserver(self, observer: Callable[[Any], object]) -> None: ...

    def runOperation(self, sql: str, params: Any = None) -> Deferred[None]: ...

    def close(self) -> None: ...


#: Opens a listener to ``dsn``; ``on_lost(reason)`` is called if it breaks (not on close).
Connect = Callable[[str, Callable[[Failure], None]], Awaitable[Listener]]


class _ListenerConnection(Connection):  # type: ignore[misc]
    """A txpostgres connection that says when it breaks: an idle LISTEN connection has
    no query under way whose failure would say so."""

    def __init__(self, reactor: Any, on_lost: Callable[[Failure], None]) -> None:
        super().__init__(reactor)
        self._on_lost: Callable[[Failure], None] | None = on_lost

    def doRead(self) -> Any:
        try:
            return super().doRead()
        except psycopg2.Error as e:
            # Returned, the reactor calls connectionLost with it (raised, it would also
            # log an "Unhandled Error" for what is an ordinary lost connection).
            return e

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        on_lost, self._on_lost = self._on_lost, None
        if on_lost is not None:
            on_lost(reason)

    def close(self) -> None:
        self._on_lost = None  # closed on purpose: not a loss
        if self.pollable() is not None:
            super().close()


def postgres_connect(reactor: Any, timeout: float = CONNECT_TIMEOUT) -> Connect:
    """Opens listeners as the store's pool opens connections (its DSN handling,
    keepalives, so that a vanished server is noticed within ~15 s, and a writable session:
    a listener on a standby would hear nothing the primary notifies), within ``timeout``."""

    async def connect(dsn: str, on_lost: Callable[[Failure], None]) -> Listener:
        params = session_params(dsn, timeout)
        if "application_name" in params:  # unless the DSN names it: told apart from the pool
            params["application_name"] = APPLICATION_NAME
        conn = _ListenerConnection(reactor, on_lost)
        timed_out = []

        def give_up() -> None:
            timed_out.append(True)
            conn.close()

        timer = reactor.callLater(timeout, give_up)  # libpq's timeout is not async
        try:
            await conn.connect(dsn, **params)
        except BaseException as e:
            conn.close()
            if timed_out:
                raise StoreUnavailable(f"PostgreSQL did not answer within {timeout:g} s") from e
            raise
        finally:
            if timer.active():
                timer.cancel()
        return conn

    return connect


class ChangeBus(Service):
    """Tells the other replicas of this replica's changes, and subscribers of theirs.

    ``dsn()`` is read at each connection (the embedded PostgreSQL's is known only once it
    runs). ``replica`` is this replica's id (:func:`taskscheduler.server.replica.new_replica_id`).
    """

    log = Logger()

    def __init__(
        self,
        dsn: Callable[[], str],
        clock: IReactorTime,
        replica: str,
        connect: Connect,
        backoff: Backoff | None = None,
        send_timeout: float = SEND_TIMEOUT,
    ) -> None:
        self.replica = replica
        self._dsn = dsn
        self._clock = clock
        self._connect = connect
        self._send_timeout = send_timeout
        self._subscribers: list[ChangeSubscriber] = []
        self._conn: Listener | None = None
        self._loop = RetryLoop(clock, self._listen, backoff or Backoff(0.5, 10.0), self._failed)
        self._outbox: list[str] = []
        self._sending = False
        #: A change of ours went unannounced: ask everyone to resync once listening again.
        self._missed = False
        #: Notices sent, dropped unsent, and heard from other replicas.
        self.published = 0
        self.dropped = 0
        self.received = 0

    @property
    def listening(self) -> bool:
        return self._conn is not None

    def subscribe(self, subscriber: ChangeSubscriber) -> None:
        self._subscribers.append(subscriber)

    def startService(self) -> None:
        super().startService()
        self._loop.start()

    def stopService(self) -> None:
        super().stopService()
        self._loop.stop()
        self._close()

    # -- publishing ----------------------------------------------------------------------

    def publish(self, change: Change) -> None:
        """Tell the other replicas of ``change``; call it once the change is committed.

        Never raises and never waits: the request that made the change has done its part
        once it committed. A notice that cannot be sent (the database or this listener is
        down) is dropped; the others still learn, late: their periodic reconciliation
        and the resync each replica runs after its listener reconnects read the
        database again, and this replica asks every one to resync once it listens again.
        """
        if not self.running:
            return
        if self._conn is None or len(self._outbox) >= MAX_OUTBOX:
            self._drop(1)
            return
        self._outbox.append(change.to_payload(self.replica))
        if not self._sending:
            self._sending = True
            Deferred.fromCoroutine(self._send())

    async def _send(self) -> None:
        # One statement per batch; what queued meanwhile goes in the next.
        try:
            while self._outbox and self._conn is not None:
                conn = self._conn
                batch, self._outbox = self._outbox[:BATCH], self._outbox[BATCH:]
                sent = conn.runOperation(
                    "SELECT pg_notify(%s, p) FROM unnest(%s::text[]) AS p", (CHANNEL, batch)
                )
                timer = self._clock.callLater(self._send_timeout, self._lost, conn, None)
                try:
                    await sent
                except Exception as e:
                    self._drop(len(batch))
                    self.log.warn(
                        "could not announce {count} change(s) to the other replicas: {error}",
                        count=len(batch),
                        error=first_line(e),
                    )
                    # A connection that cannot notify is not trusted to listen either.
                    self._lost(conn, None)
                else:
                    self.published += len(batch)
                finally:
                    if timer.active():
                        timer.cancel()
            if self._conn is None and self._outbox:
                self._drop(len(self._outbox))
                self._outbox = []
        finally:
            self._sending = False

    def _drop(self, count: int) -> None:
        self.dropped += count
        self._missed = True

    # -- listening -----------------------------------------------------------------------

    async def _listen(self) -> None:
        if self._conn is not None or not self.running:
            return
        opened: list[Listener] = []

        def lost(reason: Failure) -> None:
            if opened:  # (before: the attempt fails by itself)
                self._lost(opened[0], reason)

        conn = await self._connect(self._dsn(), lost)
        opened.append(conn)
        timer = self._clock.callLater(self._send_timeout, conn.close)  # LISTEN must answer
        try:
            conn.addNotifyObserver(self._notified)
            await conn.runOperation(f"LISTEN {CHANNEL}")
        except BaseException:
            conn.close()
            raise
        finally:
            if timer.active():
                timer.cancel()
        if not self.running:
            conn.close()
            return
        self._conn = conn
        self.log.info("listening for other replicas' changes on {channel}", channel=CHANNEL)
        self._resync()
        if self._missed:
            self._missed = False
            self.publish(Change(Kind.RESYNC))

    def _failed(self, error: Exception, delay: float) -> None:
        self.log.warn(
            "cannot listen for other replicas' changes ({error}); trying again in {delay:.1f} s",
            error=first_line(error),
            delay=delay,
        )

    def _lost(self, conn: Listener, reason: Failure | None) -> None:
        """``conn`` broke (or is given up): listen again, on a new connection."""
        if conn is not self._conn:
            return  # an attempt's connection: the attempt fails by itself
        self._close()
        if not self.running:
            return
        error = None if reason is None else reason.value
        self.log.warn(
            "lost the connection listening for other replicas' changes ({why}); "
            "reconnecting, then resynchronising",
            why="it did not answer" if error is None else first_line(error),
        )
        self._loop.kick()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _notified(self, notify: Any) -> None:
        if notify.channel != CHANNEL:
            return
        change = Change.from_payload(notify.payload)
        if change is None:
            self.log.warn(
                "a change notice this server does not understand: resynchronising ({payload!r})",
                payload=str(notify.payload)[:200],
            )
            self._resync()
            return
        if change.replica == self.replica:
            return  # ours: done already
        self.received += 1
        if change.kind is Kind.RESYNC:
            self._resync()
            return
        for subscriber in list(self._subscribers):
            try:
                subscriber.changed(change)
            except Exception:
                self.log.failure("acting on another replica's change {kind}", kind=change.kind)

    def _resync(self) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber.resync()
            except Exception:
                self.log.failure("resynchronising after missed changes")
