"""Scenario 6: two server replicas on one PostgreSQL, three agents listing both; SIGKILL a
replica (a) under a stream of results, (b) while tasks are being created through both,
(c) while once-only work is going on (run-on-one instants, webhooks, a task's removal,
the dead replica's agents taken over through their leases).

The fleet is :class:`tests.integration.replicas.ReplicaFleet`: agent ``i`` lists replica
``i % 2`` first, so a death moves some agents and leaves the others where they were.
"""

from __future__ import annotations

import collections
import http.server
import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import (
    WITNESSED_COMMAND,
    agent_health,
    assert_sound,
    create_task,
    create_witnessed_task,
    cutoff_now,
    drain,
    history,
    read_witness,
    report,
    seeded_random,
    soundness_problems,
)
from tests.integration.daemons import free_port, wait_for
from tests.integration.replicas import (
    ReplicaFleet,
    agent_lease_holders,
    first_results_since,
    replica_id_of,
    start_replica_fleet,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: The issue's promise: an agent whose replica died reports again within this.
FAILOVER_SECONDS = 5.0
#: A dead replica's leases expire after ~10 s (LEASES' default ttl); taken over after that.
TAKEOVER_SECONDS = 20.0


def agent_ids(fleet: ReplicaFleet) -> list[str]:
    return [str((agent_health(fleet, i) or {})["agent_id"]) for i in range(len(fleet.agents))]


def runs_ended(fleet: ReplicaFleet, index: int) -> int:
    return sum(read_witness(fleet, index).ended.values())


def wait_for_runs(fleet: ReplicaFleet, more: int, what: str) -> None:
    """Until every agent has ended ``more`` runs beyond what it has now."""
    now = [runs_ended(fleet, i) for i in range(len(fleet.agents))]
    wait_for(
        lambda: all(runs_ended(fleet, i) >= now[i] + more for i in range(len(fleet.agents))),
        30,
        what,
    )


def kill_replica(fleet: ReplicaFleet, index: int, rng: random.Random) -> datetime:
    """SIGKILL replica ``index`` at a random moment of the next second; when it died."""
    time.sleep(rng.uniform(0, 1))  # the fault's moment, not a wait for an event
    fleet.replicas[index].kill()
    return datetime.now(UTC)


def wait_agents_report_after(
    fleet: ReplicaFleet, ids: list[str], killed_at: datetime
) -> dict[str, float]:
    """agent id -> seconds from the kill to its first result received (by the survivor)."""

    def every_agent() -> dict[str, datetime] | None:
        firsts = first_results_since(fleet.database, killed_at)
        return firsts if set(ids) <= set(firsts) else None

    firsts = wait_for(every_agent, 30, "every agent to report to the surviving replica")
    return {agent: (firsts[agent] - killed_at).total_seconds() for agent in ids}


def wait_agents_hold(
    fleet: ReplicaFleet,
    wanted: set[str],
    gone: frozenset[str] = frozenset(),
    timeout: float = 30,
) -> None:
    """Until every agent holds the tasks ``wanted`` and none of ``gone``; says what is
    missing when the deadline passes."""
    for index in range(len(fleet.agents)):
        try:
            wait_for(
                lambda i=index: (
                    (held := fleet.agent_task_ids(i)) is not None
                    and wanted <= held
                    and not gone & held
                ),
                timeout,
                f"agent {index} to hold {len(wanted)} tasks and drop {len(gone)}",
            )
        except AssertionError as e:
            held = fleet.agent_task_ids(index) or set()
            raise AssertionError(
                f"{e}: missing {sorted(wanted - held)[:5]} ({len(wanted - held)}), "
                f"still held {sorted(gone & held)}"
            ) from None


def test_a_replica_killed_under_a_stream_of_results_loses_nothing_and_agents_move_within_5_s(
    tmp_path: Path, database_dsn: str
) -> None:
    rng, seed = seeded_random("replica-sigkill-stream")
    fleet = start_replica_fleet(tmp_path, database_dsn)
    try:
        task_id = create_witnessed_task(fleet)
        ids = agent_ids(fleet)
        failovers: list[float] = []
        # Kill one, bring it back, then kill the other: every agent moves at least once.
        for victim in (0, 1):
            wait_for_runs(fleet, 2, "two more runs on every agent")
            killed_at = kill_replica(fleet, victim, rng)
            moved = wait_agents_report_after(fleet, ids, killed_at)
            failovers += moved.values()
            slow = {a: s for a, s in moved.items() if s > FAILOVER_SECONDS}
            assert not slow, f"agents reporting again later than {FAILOVER_SECONDS}s: {slow}"
            fleet.start_replica(victim)
        wait_for_runs(fleet, 2, "two more runs on every agent after the kills")
        cutoff = cutoff_now()
        figures, drained = drain(fleet, task_id, ids, cutoff, timeout=60)
        report(
            "6a replica SIGKILL x2 under results",
            seed,
            figures,
            drained,
            failover_max=f"{max(failovers):.2f}s",
        )
        assert_sound(fleet, figures, cutoff)
        assert figures.lost == 0, "no agent died: no run was lost"
        assert figures.witnessed >= 3 * 6, "the agents ran through it all"
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()


def test_every_create_a_replica_answered_before_its_death_exists_once_and_reaches_the_agents(
    tmp_path: Path, database_dsn: str
) -> None:
    rng, seed = seeded_random("replica-sigkill-creates")
    # No create rate limit: the client creates as fast as the replicas answer.
    fleet = start_replica_fleet(
        tmp_path, database_dsn, server_env={"TASKSCHEDULER_CREATE_RATE": "0"}
    )
    answered: list[tuple[int, str, str]] = []  # (replica, command, task id)
    unanswered: list[tuple[int, str, str]] = []  # (replica, command, why)
    stop = threading.Event()

    def client() -> None:
        """Alternates between the replicas, one create at a time, each command unique."""
        n = 0
        while not stop.is_set():
            replica, command = n % 2, f"true # create {n}"
            n += 1
            try:
                code, body = fleet.api_at(
                    replica,
                    "POST",
                    "/api/v1/tasks/create",
                    {"command": command, "frequency": "every 1 hour"},
                )
            except OSError as e:
                unanswered.append((replica, command, repr(e)))
                continue
            if code == 201:
                answered.append((replica, command, str(body["command_id"])))
            else:
                unanswered.append((replica, command, f"{code} {body}"))

    thread = threading.Thread(target=client, daemon=True)
    try:
        thread.start()
        wait_for(lambda: len(answered) >= 20, 60, "20 creates answered")
        kill_replica(fleet, 1, rng)
        before = len(answered)
        wait_for(lambda: len(answered) >= before + 20, 60, "20 more creates answered")
        stop.set()
        thread.join(timeout=30)
        by_replica = collections.Counter(replica for replica, _, _ in answered)
        assert by_replica[0] and by_replica[1], by_replica
        # Each answered create is one task, listed once under its id and its command.
        tasks: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            path = "/api/v1/tasks?limit=100" + (f"&cursor={cursor}" if cursor else "")
            code, page = fleet.api("GET", path)
            assert code == 200, page
            tasks += page["tasks"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        listed_ids = collections.Counter(t["task_id"] for t in tasks)
        listed_commands = collections.Counter(t["command"] for t in tasks)
        problems = [
            (replica, command, task_id, listed_ids[task_id], listed_commands[command])
            for replica, command, task_id in answered
            if listed_ids[task_id] != 1 or listed_commands[command] != 1
        ]
        assert not problems, f"answered creates not stored exactly once: {problems[:10]}"
        # ... and reaches every agent, whichever replica answered it.
        wait_agents_hold(fleet, {task_id for _, _, task_id in answered})
        print(
            f"[6b] seed {seed}: creates answered {len(answered)} ({dict(by_replica)}), "
            f"unanswered {len(unanswered)}"
        )
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        stop.set()
        fleet.stop()


class Receiver(http.server.ThreadingHTTPServer):
    """A webhook receiver that counts what it is sent."""

    def __init__(self, port: int) -> None:
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def payloads(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            self.server.received.append(json.loads(body))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


#: Witnessed, and failing when its instant's seconds end in 0-3: its state flips every
#: few seconds, and each flip is a webhook (failed, then recovered).
FLIPPING_COMMAND = (
    WITNESSED_COMMAND + '; case "$TASKSCHEDULER_SCHEDULED_AT" in *[0-3].*) exit 1;; esac'
)


def test_once_only_work_is_done_once_across_a_replica_death(
    tmp_path: Path, database_dsn: str, receiver: Receiver
) -> None:
    rng, seed = seeded_random("replica-sigkill-once")
    fleet = start_replica_fleet(
        tmp_path,
        database_dsn,
        server_env={"TASKSCHEDULER_HEARTBEAT_INTERVAL": "2"},
        agent_env={"TASKSCHEDULER_AGENT_HEARTBEAT_INTERVAL": "2"},
    )
    try:
        ids = agent_ids(fleet)
        hook = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
        flipping = create_task(
            fleet,
            {
                "command": FLIPPING_COMMAND,
                "frequency": "every 2 seconds",
                "run_on": "one",
                "notify": {"url": hook},
            },
        )
        doomed = create_task(fleet, {"command": "true", "frequency": "every 1 hour"})
        wait_for(lambda: len(receiver.payloads()) >= 1, 60, "a first webhook")
        # The victim: the replica holding the most agents' leases (replica 0 if none).
        holders = collections.Counter(agent_lease_holders(fleet.database).values())
        named = [replica_id_of(fleet.database, r) for r in fleet.replicas]
        victim = max(range(2), key=lambda i: holders[named[i]])
        survivor = 1 - victim
        survivor_id = named[survivor]
        killed_at = kill_replica(fleet, victim, rng)
        started = time.monotonic()
        # Work the dead replica would have done for its agents: a removal and a new task.
        code, body = fleet.api_at(survivor, "DELETE", f"/api/v1/tasks/{doomed}")
        assert code in (200, 202, 204), body
        code, body = fleet.api_at(
            survivor,
            "POST",
            "/api/v1/tasks/create",
            {"command": "true", "frequency": "every 1 hour"},
        )
        assert code == 201, body
        born = str(body["command_id"])
        wait_agents_hold(fleet, {born}, frozenset({doomed}), TAKEOVER_SECONDS + 10)
        reached = time.monotonic() - started

        def taken_over() -> bool:
            holders = agent_lease_holders(fleet.database)
            return len(holders) == len(ids) and set(holders.values()) == {survivor_id}

        wait_for(taken_over, TAKEOVER_SECONDS, "the survivor to hold every agent's lease")
        takeover = time.monotonic() - started
        wait_for(lambda: len(receiver.payloads()) >= 3, 60, "webhooks after the kill")
        cutoff = cutoff_now()
        figures, drained = drain(fleet, flipping, ids, cutoff, timeout=60)
        report(
            "6c replica SIGKILL, once-only work",
            seed,
            figures,
            drained,
            takeover=f"{takeover:.1f}s",
            removal_reached=f"{reached:.1f}s",
            killed_at=killed_at.isoformat(),
        )
        problems = soundness_problems(
            fleet, figures, cutoff, frozenset({"succeeded", "failed", "skipped"})
        )
        assert not problems, "\n".join(problems)
        # Run on one: each instant ran on one agent of the three, and has one result.
        ran = collections.Counter(
            at for i in range(len(fleet.agents)) for at in read_witness(fleet, i).started
        )
        assert not [at for at, n in ran.items() if n > 1], f"instants run twice: {ran}"
        outcomes = collections.Counter(
            r["scheduled_at"]
            for r in history(fleet, flipping)
            if r["status"] in ("succeeded", "failed")
        )
        assert not [at for at, n in outcomes.items() if n > 1], outcomes
        # Webhooks: each notification the replicas recorded was sent once, none other.
        code, listed = fleet.api("GET", f"/api/v1/tasks/{flipping}/notifications")
        assert code == 200, listed
        delivered = {
            n["notification_id"] for n in listed["notifications"] if n["status"] == "delivered"
        }
        wait_for(
            lambda: delivered <= {p["notification_id"] for p in receiver.payloads()},
            30,
            "every delivered notification to have reached the receiver",
        )
        sent = collections.Counter(p["notification_id"] for p in receiver.payloads())
        assert not [n for n, times in sent.items() if times > 1], f"webhooks sent twice: {sent}"
        assert set(sent) <= {n["notification_id"] for n in listed["notifications"]}
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
