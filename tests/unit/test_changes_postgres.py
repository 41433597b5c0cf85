"""Replicas on one real PostgreSQL: change buses hear each other through LISTEN/NOTIFY,
a listener whose backend is terminated listens again and resyncs, and an agent revoked
through one replica (a whole server tree) is refused by another at once."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from psycopg2.extensions import make_dsn
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol

from taskscheduler.auth import AGENT_PREFIX, OPERATOR_PREFIX, hash_token, new_token
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.changes import Change, ChangeBus, Kind, postgres_connect
from taskscheduler.server.options import Options
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.records import AuditEvent, StoreUnavailable
from taskscheduler.server.tap import server_service
from taskscheduler.services import ListeningPort, StartInOrder
from tests.conftest import RestartablePostgres, _create_database, _drop_database
from tests.unit.test_changes import Recorder
from tests.unit.test_server_service import until
from tests.unit.test_store_postgres import _query

reactor: Any = _reactor
TASK = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")


def bus_on(dsn: str, name: str) -> tuple[ChangeBus, Recorder]:
    """A bus named ``name`` in pg_stat_activity too."""
    named = make_dsn(dsn, application_name=name)
    bus = ChangeBus(lambda: named, reactor, name, postgres_connect(reactor))
    seen = Recorder()
    bus.subscribe(seen)
    return bus, seen


def backend_of(dsn: str, name: str) -> int | None:
    rows = _query(dsn, "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))
    return rows[0][0] if len(rows) == 1 else None


@pytest_twisted.ensureDeferred
async def test_a_change_published_on_one_replica_reaches_the_other(database_dsn: str) -> None:
    (a, a_seen), (b, b_seen) = bus_on(database_dsn, "bus-a"), bus_on(database_dsn, "bus-b")
    a.startService()
    b.startService()
    try:
        await until(lambda: a.listening and b.listening, 10)
        a.publish(Change(Kind.TASK_CHANGED, TASK))
        await until(lambda: bool(b_seen.changes), 10)
        assert b_seen.changes == [Change(Kind.TASK_CHANGED, TASK, replica="bus-a")]
        b.publish(Change(Kind.FLEET_CHANGED))
        await until(lambda: bool(a_seen.changes), 10)
        assert a_seen.changes == [Change(Kind.FLEET_CHANGED, replica="bus-b")]
        assert b_seen.changes == [Change(Kind.TASK_CHANGED, TASK, replica="bus-a")], "not its own"
    finally:
        a.stopService()
        b.stopService()
    assert backend_of(database_dsn, "bus-a") is None, "the listener is closed on stop"


@pytest_twisted.ensureDeferred
async def test_a_terminated_listener_listens_again_resyncs_and_hears_later_changes(
    database_dsn: str,
) -> None:
    (a, _), (b, b_seen) = bus_on(database_dsn, "bus-a"), bus_on(database_dsn, "bus-b")
    a.startService()
    b.startService()
    try:
        await until(lambda: a.listening and b.listening and b_seen.resyncs == 1, 10)
        first = backend_of(database_dsn, "bus-b")
        assert first is not None
        _query(database_dsn, "SELECT pg_terminate_backend(%s)", (first,))
        await until(lambda: b_seen.resyncs == 2 and b.listening, 15)
        second = backend_of(database_dsn, "bus-b")
        assert second is not None and second != first
        a.publish(Change(Kind.TASK_DELETED, TASK))
        await until(lambda: bool(b_seen.changes), 10)
        assert b_seen.changes == [Change(Kind.TASK_DELETED, TASK, replica="bus-a")]
        assert a.dropped == 0
    finally:
        a.stopService()
        b.stopService()


def replica_options(tmp_path: Path, name: str, dsn: str, operator: str) -> Options:
    args = ["--listen", "tcp:0:interface=127.0.0.1", "--database", dsn]
    options = Options()
    options.parseOptions([*args, "--data-dir", str(tmp_path / name)])
    options["tokens"] = f"alice {hash_token(operator)}"
    return options


class Replica:
    """A whole server tree (server/tap.py), listening on a free loopback port."""

    def __init__(self, tmp_path: Path, name: str, dsn: str, operator: str) -> None:
        self.fatal: list[str] = []
        self.tree: StartInOrder = server_service(
            replica_options(tmp_path, name, dsn, operator), reactor, self.fatal.append, lambda: True
        )
        [self.bus] = [child for child in self.tree if isinstance(child, ChangeBus)]
        [self.port] = [child for child in self.tree if isinstance(child, ListeningPort)]

    async def start(self) -> None:
        self.tree.privilegedStartService()
        self.tree.startService()
        port = self.port
        await until(lambda: port.port in reactor.getReaders() or bool(self.fatal))
        assert self.fatal == []
        await until(lambda: self.bus.listening, 10)

    def url(self, path: str) -> str:
        assert self.port.port is not None
        return f"http://127.0.0.1:{self.port.port.getHost().port}{path}"


async def heartbeat(replica: Replica, agent_id: uuid.UUID, credential: str) -> int:
    body = {"agent_id": str(agent_id), "version": "0.1.0", "hostname": "host", "tasks": 0}
    response = await treq.post(
        replica.url("/api/v1/agents/heartbeat"),
        json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {credential}", "Content-Type": "application/json"},
    )
    await response.content()
    return int(response.code)


@pytest_twisted.ensureDeferred
async def test_an_agent_revoked_through_one_replica_is_refused_by_the_other_at_once(
    tmp_path: Path, database_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ["TASKSCHEDULER_TOKENS", "TASKSCHEDULER_TOKENS_FILE", "AVAILABLE_SERVERS"]:
        monkeypatch.delenv(name, raising=False)
    operator = new_token(OPERATOR_PREFIX)
    a = Replica(tmp_path, "a", database_dsn, operator)
    b = Replica(tmp_path, "b", database_dsn, operator)
    await a.start()
    await b.start()
    try:
        agent_id, credential = uuid.uuid4(), new_token(AGENT_PREFIX)
        store = PostgresStore(database_dsn, reactor=reactor)
        await store.start()
        now = utc_now_from(reactor.seconds())
        event = AuditEvent(now, "join:test", "agent.enrolled", str(agent_id), "")
        await store.enrol_agent(agent_id, "http://agent:8081", hash_token(credential), now, event)
        await store.stop()
        # B knows the credential now (cached for seconds).
        assert await heartbeat(b, agent_id, credential) == 200
        heard = b.bus.received
        response = await treq.delete(
            a.url(f"/api/v1/agents/{agent_id}"), headers={"Authorization": f"Bearer {operator}"}
        )
        await response.content()
        assert response.code == 200
        # As soon as B's listener hears of it (the revocation and the fleet change).
        await until(lambda: b.bus.received >= heard + 2, 10)
        assert await heartbeat(b, agent_id, credential) == 401
        assert await heartbeat(a, agent_id, credential) == 401
    finally:
        await a.tree.stopService()
        await b.tree.stopService()


@pytest_twisted.ensureDeferred
async def test_a_database_restart_is_ridden_out_with_back_off_then_a_resync(
    restartable_postgres: RestartablePostgres,
) -> None:
    name, dsn = _create_database(restartable_postgres.server_dsn)
    (a, _), (b, b_seen) = bus_on(dsn, "bus-a"), bus_on(dsn, "bus-b")
    a.startService()
    b.startService()
    try:
        await until(lambda: a.listening and b.listening and b_seen.resyncs == 1, 10)
        await restartable_postgres.stop()
        await until(lambda: not a.listening and not b.listening, 15)
        a.publish(Change(Kind.FLEET_CHANGED))  # down: dropped, never raised
        assert a.dropped == 1
        await restartable_postgres.start()
        await until(lambda: a.listening and b.listening and b_seen.resyncs >= 2, 30)
        # A also asks the others to resync for the change it could not announce. Whether B
        # hears that notice depends on which listener came back first (if B's came later,
        # its own resync came after A's change): test_changes.py shows the notice heard.
        await until(lambda: a.published >= 1, 10)
        a.publish(Change(Kind.TASK_CREATED, TASK))
        await until(lambda: bool(b_seen.changes), 10)
        assert b_seen.changes == [Change(Kind.TASK_CREATED, TASK, replica="bus-a")]
    finally:
        a.stopService()
        b.stopService()
        _drop_database(restartable_postgres.server_dsn, name)


@pytest_twisted.ensureDeferred
async def test_a_database_that_accepts_but_never_answers_is_given_up() -> None:
    silent = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    try:
        port = silent.getHost().port
        connect = postgres_connect(reactor, timeout=0.5)
        with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.5 s"):
            opening = connect(f"host=127.0.0.1 port={port} dbname=x", lambda reason: None)
            await Deferred.fromCoroutine(opening).addTimeout(5, reactor)  # type: ignore[arg-type]
    finally:
        await silent.stopListening()
