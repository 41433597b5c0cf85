"""Server replicas on real processes (issue 14): N ``twistd taskscheduler-server`` on one
PostgreSQL and some agents, each listing every replica in ``--server a,b``.

The replicas share what production replicas must share (README: Production layout): the
signing key file, the operators' tokens file, the join secrets file and the webhook secret
file, all made here before any replica starts (two replicas creating a missing key at
once would each sign with their own). Each replica has its own port, working folder and
log. The agents list the replicas in a rotated order (agent ``i`` starts with replica
``i % N``), so that a replica's death leaves some agents on their first choice and moves
the others.

:class:`ReplicaFleet` is a :class:`~tests.integration.daemons.Fleet` (its ``server`` is
replica 0), so that the fault harness's helpers (``history``, ``drain``, ``compare``,
``agent_health``) work on it unchanged; its :meth:`ReplicaFleet.api` asks the first
replica that is running, as a client behind a load balancer would be answered.
"""

from __future__ import annotations

import secrets
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg2

from taskscheduler.auth import hash_token
from taskscheduler.signing import (
    InstructionSigner,
    load_or_create_signing_key,
    load_signing_key,
    write_private_file,
)
from tests.integration.daemons import (
    Daemon,
    Fleet,
    free_port,
    http,
    listening_on_their_ports,
    wait_for,
)


class ReplicaFleet(Fleet):
    """``replicas`` servers on the database ``database`` and ``agents`` agents."""

    def __init__(self, root: Path, database: str, replicas: int = 2, agents: int = 3) -> None:
        super().__init__(root, agents, database)
        self.database = database
        shared = root / "shared"
        shared.mkdir(parents=True, exist_ok=True)
        self.signing_key_file = shared / "signing_key.pem"
        load_or_create_signing_key(self.signing_key_file)
        self.tokens_file = shared / "tokens"
        write_private_file(self.tokens_file, f"tests {hash_token(self.operator_token)}\n".encode())
        self.join_secrets_file = shared / "join-secrets"
        write_private_file(
            self.join_secrets_file, f"fleet {hash_token(self.join_secret)}\n".encode()
        )
        self.notify_secret_file = shared / "notify-secret"
        write_private_file(self.notify_secret_file, (secrets.token_hex(32) + "\n").encode())
        env = {
            k: v
            for k, v in self.server.env.items()
            if k not in ("TASKSCHEDULER_TOKENS", "TASKSCHEDULER_JOIN_SECRETS")
        }
        self.replica_ports = [free_port() for _ in range(replicas)]
        self.replica_urls = [f"http://127.0.0.1:{p}" for p in self.replica_ports]
        self.replicas = [
            Daemon(
                f"replica-{i}",
                [
                    "taskscheduler-server",
                    "--listen",
                    f"tcp:{port}:interface=127.0.0.1",
                    "--data-dir",
                    str(root / f"replica-{i}" / "data"),
                    "--signing-key-file",
                    str(self.signing_key_file),
                    "--tokens-file",
                    str(self.tokens_file),
                    "--join-secrets-file",
                    str(self.join_secrets_file),
                    "--notify-secret-file",
                    str(self.notify_secret_file),
                ],
                root / f"replica-{i}",
                dict(env),
            )
            for i, port in enumerate(self.replica_ports)
        ]
        # Fleet's own single server is never started: replica 0 stands in for it.
        self.server = self.replicas[0]
        self.server_port = self.replica_ports[0]
        self.server_url = self.replica_urls[0]
        for index, agent in enumerate(self.agents):
            agent.args[agent.args.index("--server") + 1] = ",".join(self.server_order(index))

    def server_order(self, agent: int) -> list[str]:
        """The replicas' URLs as agent ``agent`` lists them (rotated by its index)."""
        first = agent % len(self.replicas)
        return self.replica_urls[first:] + self.replica_urls[:first]

    def set_env(self, name: str, value: str) -> None:
        """Set a server environment variable on every replica (before they start)."""
        for replica in self.replicas:
            replica.env[name] = value

    def set_agent_env(self, name: str, value: str) -> None:
        for agent in self.agents:
            agent.env[name] = value

    def running(self) -> list[int]:
        """Indexes of the replicas whose process is alive."""
        return [
            i
            for i, r in enumerate(self.replicas)
            if r.process is not None and r.process.poll() is None
        ]

    def start(self) -> None:
        for agent in self.agents:
            agent.start()
        for replica in self.replicas:
            replica.start()
        self.wait_until_healthy()

    def wait_until_healthy(self, timeout: float = 90) -> None:
        """Every running replica answers, every agent answers and has enrolled."""

        def healthy() -> bool:
            for agent in self.agents:
                agent.assert_running()
            live = self.running()
            assert live, "no replica is running:\n" + self.logs()
            if not all(self.api_at(i, "GET", "/api/v1/health")[0] == 200 for i in live):
                return False
            answers = [http("GET", f"{url}/api/v1/health", timeout=2) for url in self.agent_urls]
            return all(code == 200 and body.get("enrolled") for code, body in answers)

        wait_for(healthy, timeout, "every replica and agent to answer, the agents enrolled")

    def start_replica(self, index: int, timeout: float = 90) -> None:
        """(Re)start replica ``index`` and wait until it answers."""
        self.replicas[index].start()

        def answers() -> bool:
            self.replicas[index].assert_running()
            return self.api_at(index, "GET", "/api/v1/health")[0] == 200

        wait_for(answers, timeout, f"replica {index} to answer")

    def api_at(self, index: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A request to replica ``index`` with the operator's token."""
        return http(
            method,
            self.replica_urls[index] + path,
            body,
            headers={"Authorization": f"Bearer {self.operator_token}"},
            timeout=5,
        )

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """A request to the first running replica (as a load balancer would route it)."""
        live = self.running()
        assert live, "no replica is running"
        return self.api_at(live[0], method, path, body)

    def agent_task_ids(self, index: int) -> set[str] | None:
        """The tasks agent ``index`` holds (asked as its server asks: signed with the
        shared key), or None while it does not answer."""
        path = "/api/v1/agent/tasks"
        try:
            code, health = http("GET", f"{self.agent_urls[index]}/api/v1/health", timeout=2)
            if code != 200:
                return None
            signer = InstructionSigner(load_signing_key(self.signing_key_file), _WallClock())
            signed = signer.authorization("GET", path, uuid.UUID(health["agent_id"]), b"")
            code, body = http(
                "GET", self.agent_urls[index] + path, headers={"Authorization": signed}, timeout=2
            )
        except OSError:
            return None
        return set(body["task_ids"]) if code == 200 else None

    def stop(self) -> None:
        for daemon in [*self.replicas, *self.agents]:
            daemon.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {d.name}\n{d.log()}" for d in [*self.replicas, *self.agents])


def start_replica_fleet(
    root: Path,
    database: str,
    replicas: int = 2,
    agents: int = 3,
    server_env: dict[str, str] | None = None,
    agent_env: dict[str, str] | None = None,
    attempts: int = 3,
) -> ReplicaFleet:
    """A started replica fleet whose daemons really listen on their own ports (a port
    :func:`free_port` chose may be taken by a concurrent test run meanwhile: then afresh,
    as ``tests.faults.harness.start_fleet`` does)."""
    for attempt in range(attempts):
        fleet = ReplicaFleet(root / f"fleet-{attempt}", database, replicas, agents)
        for name, value in (server_env or {}).items():
            fleet.set_env(name, value)
        for name, value in (agent_env or {}).items():
            fleet.set_agent_env(name, value)
        ports = [*fleet.replica_ports, *fleet.agent_ports]
        if len(set(ports)) != len(ports):
            continue
        try:
            fleet.start()
        except BaseException:
            print(fleet.logs())
            fleet.stop()
            raise
        daemons = [
            *zip(fleet.replicas, fleet.replica_ports, strict=True),
            *zip(fleet.agents, fleet.agent_ports, strict=True),
        ]
        if not listening_on_their_ports(fleet, daemons):
            continue
        return fleet
    raise AssertionError(f"could not start a replica fleet on free ports in {attempts} attempts")


# -- what the database says (read directly: the replicas' shared state) ---------------------


class _WallClock:
    """The ``seconds()`` a signer dates its signatures with."""

    def seconds(self) -> float:
        return time.time()


def query(dsn: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(sql, args)
            return list(cursor.fetchall())
    finally:
        conn.close()


def replica_id_of(dsn: str, daemon: Daemon) -> str | None:
    """The replica id (``host:pid:random``) the running ``daemon`` registered, if any."""
    assert daemon.process is not None
    pid = f":{daemon.process.pid}:"
    ids = [row[0] for row in query(dsn, "SELECT replica_id FROM replicas")]
    return next((replica_id for replica_id in ids if pid in replica_id), None)


def agent_lease_holders(dsn: str) -> dict[str, str | None]:
    """``agent:<url>`` lease -> its holder (None: free), expired leases as None."""
    rows = query(
        dsn,
        "SELECT name, CASE WHEN expires_at > now() THEN holder END FROM leases"
        " WHERE name LIKE 'agent:%%'",
    )
    return {name.removeprefix("agent:"): holder for name, holder in rows}


def first_results_since(dsn: str, since: datetime) -> dict[str, datetime]:
    """agent id -> when the first result received after ``since`` was received."""
    rows = query(
        dsn,
        "SELECT agent_id::text, min(received_at) FROM results WHERE received_at > %s"
        " GROUP BY agent_id",
        (since,),
    )
    return dict(rows)


def seconds_since(moment: float) -> float:
    return time.time() - moment
