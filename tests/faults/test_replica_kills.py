"""Scenario 6: two server replicas on one PostgreSQL, three agents listing both; SIGKILL a
replica (a) under a stream of results, (b) while tasks are being created through both,
(c) while once-only work is going on (run-on-one instants, webhooks, a task's removal,
the dead replica's agents taken over through their leases).

The fleet is :class:`tests.integration.replicas.ReplicaFleet`: agent ``i`` lists replica
``i % 2`` first, so a death moves some agents and leaves the others where they were.

It runs past 400 lines because its three scenarios share one fleet's helpers and a
webhook receiver that belong to no other test; split, each file would repeat them.
"""

from __future__ import annotations

import collections
import http.server
import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from taskscheduler.schedule import format_instant, parse_instant
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
    query,
    replica_id_of,
    start_replica_fleet,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: Replica kills under the stream of results (each replica twice, in turn).
KILLS = 4
#: The issue's promise: an agent whose replica died reports again within this.
FAILOVER_SECONDS = 5.0
#: Within this a change made through one replica reaches the agents another one links
#: (AgentLink reconciles every 30 s; the change notice is what makes it sooner).
NOTICE = 10.0
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


def create_at(fleet: ReplicaFleet, replica: int) -> str:
    """A task that runs hourly (never, in a test), created through ``replica``; its id."""
    code, body = fleet.api_at(
        replica, "POST", "/api/v1/tasks/create", {"command": "true", "frequency": "every 1 hour"}
    )
    assert code == 201, body
    return str(body["command_id"])


def wait_leases_shared(fleet: ReplicaFleet) -> None:
    """Until every agent's lease is held, by both replicas between them (fair shares)."""
    named = {replica_id_of(fleet.database, replica) for replica in fleet.replicas}

    def shared() -> bool:
        holders = agent_lease_holders(fleet.database)
        return len(holders) == len(fleet.agents) and set(holders.values()) == named

    wait_for(shared, 30, "the agents' leases shared out between the replicas")


def test_a_replica_killed_under_a_stream_of_results_loses_nothing_and_agents_move_within_5_s(
    tmp_path: Path, database_dsn: str
) -> None:
    rng, seed = seeded_random("replica-sigkill-stream")
    fleet = start_replica_fleet(tmp_path, database_dsn)
    try:
        task_id = create_witnessed_task(fleet)
        ids = agent_ids(fleet)
        failovers: list[float] = []
        started = time.monotonic()
        # Kill one, bring it back, then the other, and so on: every agent moves.
        for kill in range(KILLS):
            victim = kill % 2
            wait_for_runs(fleet, 2, "two more runs on every agent")
            killed_at = kill_replica(fleet, victim, rng)
            moved = wait_agents_report_after(fleet, ids, killed_at)
            failovers += moved.values()
            slow = {a: s for a, s in moved.items() if s > FAILOVER_SECONDS}
            assert not slow, f"agents reporting again later than {FAILOVER_SECONDS}s: {slow}"
            fleet.start_replica(victim)
        wait_for_runs(fleet, 2, "two more runs on every agent after the kills")
        faults_took = time.monotonic() - started
        cutoff = cutoff_now()
        figures, drained = drain(fleet, task_id, ids, cutoff, timeout=60)
        report(
            f"6a replica SIGKILL x{KILLS} under results",
            seed,
            figures,
            drained,
            faults_seconds=f"{faults_took:.0f}",
            failover_max=f"{max(failovers):.2f}s",
        )
        assert_sound(fleet, figures, cutoff)
        assert figures.lost == 0, "no agent died: no run was lost"
        # Three agents, a run a second each, through every kill: 80% of them at least.
        assert figures.witnessed >= 3 * faults_took * 0.8, "the agents ran through it all"
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
        wait_leases_shared(fleet)
        thread.start()
        wait_for(lambda: len(answered) >= 20, 60, "20 creates answered")
        # Each replica links only the agents whose leases it holds; a create the other
        # one answered reaches them soon (its change notice, or the link woken by a
        # create of its own), well before the 30 s reconciliation would bring it.
        wait_agents_hold(fleet, {task_id for _, _, task_id in answered[:20]}, timeout=NOTICE)
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
    """A webhook receiver that counts what it is sent, and answers each notification's
    first attempt 503: every webhook is then retried, by the replica that claims it."""

    def __init__(self, port: int) -> None:
        self.received: list[dict[str, Any]] = []  # every attempt, answered 503 or 200
        self.accepted: list[dict[str, Any]] = []  # the attempts answered 200
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def payloads(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.accepted)

    def attempts(self) -> int:
        with self.lock:
            return len(self.received)

    def take(self, payload: dict[str, Any]) -> int:
        """Record an attempt; the status to answer it with."""
        with self.lock:
            seen = any(p["notification_id"] == payload["notification_id"] for p in self.received)
            self.received.append(payload)
            if not seen:
                return 503
            self.accepted.append(payload)
            return 200


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(self.server.take(json.loads(body)))
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


#: The run-on-one task's interval, in seconds.
EVERY = 2


def instants_run(fleet: ReplicaFleet) -> collections.Counter[str]:
    """Instant -> how many agents began a run of it (every agent's witness file)."""
    return collections.Counter(
        at for i in range(len(fleet.agents)) for at in read_witness(fleet, i).started
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
                "frequency": f"every {EVERY} seconds",
                "run_on": "one",
                "notify": {"url": hook},
            },
        )
        wait_for(lambda: receiver.attempts() >= 1, 60, "a first webhook")
        # The victim: the replica holding the most agents' leases.
        wait_leases_shared(fleet)
        holders = collections.Counter(agent_lease_holders(fleet.database).values())
        named = [replica_id_of(fleet.database, r) for r in fleet.replicas]
        victim = max(range(2), key=lambda i: holders[named[i]])
        survivor = 1 - victim
        survivor_id = named[survivor]
        # A task created through the survivor reaches the victim's agents too: its
        # change notice wakes the victim's links, well before their reconciliation.
        doomed = create_at(fleet, survivor)
        wait_agents_hold(fleet, {doomed}, timeout=NOTICE)
        killed_at = kill_replica(fleet, victim, rng)
        started = time.monotonic()
        # Work the dead replica would have done for its agents: a removal and a new task.
        code, body = fleet.api_at(survivor, "DELETE", f"/api/v1/tasks/{doomed}")
        assert code in (200, 202, 204), body
        born = create_at(fleet, survivor)
        wait_agents_hold(fleet, {born}, frozenset({doomed}), TAKEOVER_SECONDS + 10)
        reached = time.monotonic() - started

        def taken_over() -> bool:
            holders = agent_lease_holders(fleet.database)
            return len(holders) == len(ids) and set(holders.values()) == {survivor_id}

        wait_for(taken_over, TAKEOVER_SECONDS, "the survivor to hold every agent's lease")
        takeover = time.monotonic() - started
        # Carry on under the survivor alone: more instants, and a webhook it sends.
        ran_then, sent_then = len(instants_run(fleet)), receiver.attempts()
        wait_for(lambda: len(instants_run(fleet)) >= ran_then + 3, 30, "3 instants after it")
        wait_for(lambda: receiver.attempts() > sent_then, 30, "a webhook after it")
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
        # Run on one: each instant ran on one agent of the three, and has one result;
        # none of the grid's instants from the first to the cut-off was left out.
        ran = instants_run(fleet)
        assert not [at for at, n in ran.items() if n > 1], f"instants run twice: {ran}"
        first = parse_instant(min(ran))
        grid = {
            format_instant(first + timedelta(seconds=EVERY * n))
            for n in range(int((parse_instant(cutoff) - first).total_seconds() // EVERY) + 1)
        }
        assert not grid - set(ran), f"instants no agent ran: {sorted(grid - set(ran))}"
        outcomes = collections.Counter(
            r["scheduled_at"]
            for r in history(fleet, flipping)
            if r["status"] in ("succeeded", "failed")
        )
        assert not [at for at, n in outcomes.items() if n > 1], outcomes

        # Webhooks: each notification the replicas recorded, retried after its first
        # attempt was refused, was delivered once; none other was sent.
        code, body = fleet.api("POST", f"/api/v1/tasks/{flipping}/pause")
        assert code == 200, body  # no new webhooks from here on

        def all_delivered() -> list[dict[str, Any]] | None:
            code, listed = fleet.api("GET", f"/api/v1/tasks/{flipping}/notifications")
            assert code == 200, listed
            notes = list(listed["notifications"])
            return notes if all(n["status"] == "delivered" for n in notes) else None

        notes = wait_for(all_delivered, 60, "every webhook delivered (retries wait 10 s)")
        delivered = collections.Counter(p["notification_id"] for p in receiver.payloads())
        assert not [n for n, times in delivered.items() if times > 1], (
            f"webhooks delivered twice: {delivered}"
        )
        assert set(delivered) == {n["notification_id"] for n in notes}
        # ... and none is sent again once the claims on them lapse (a delivered webhook
        # is nobody's to send: two claim ticks past the last claim, nothing more came).
        attempts = receiver.attempts()

        def claims_lapsed() -> bool:
            assert receiver.attempts() == attempts, "a delivered webhook was sent again"
            [(lapsed,)] = query(
                fleet.database,
                "SELECT coalesce(now() > max(claimed_until) + interval '5 seconds', true)"
                " FROM notifications",
            )
            return bool(lapsed)

        wait_for(claims_lapsed, 60, "the webhooks' claims to lapse", interval=0.5)
        print(f"[6c] webhooks: {len(notes)} delivered, {attempts} attempts")
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
