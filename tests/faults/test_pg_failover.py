"""Scenario: the database fails over. A primary and a synchronous streaming standby
(:mod:`tests.faults.pgpair`); the server is given both in one multi-host DSN. Under a
stream of results and of task creations, the primary is killed (every process at once,
SIGKILL) and the standby promoted: the server answers 503 meanwhile, never crashes or
hangs, reconnects to the new primary by itself, and loses nothing it acknowledged: every
run the agents witnessed is stored once, and every task whose creation was answered 201
is there."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg2.extensions import parse_dsn

from tests.faults.harness import (
    agent_health,
    assert_sound,
    create_database,
    create_witnessed_task,
    cutoff_now,
    drain,
    report,
    seeded_random,
    start_fleet,
)
from tests.faults.pgpair import StreamingPair
from tests.integration.daemons import Fleet, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: Agents reporting a run every second each, beside streams of task creations (one per
#: creator, back to back, unlimited: the server always has some under way when the
#: primary dies).
AGENTS = 3
CREATORS = 3


#: The primary's ``synchronous_commit``: ``on`` (the standby has flushed each commit before
#: it is acknowledged). ``TASKSCHEDULER_FAULT_SYNC_COMMIT=local`` replicates asynchronously,
#: to watch the test catch what that loses (an acknowledged task gone: 2 runs of 7 here).
SYNCHRONOUS_COMMIT = os.environ.get("TASKSCHEDULER_FAULT_SYNC_COMMIT", "on")


@pytest.fixture
def streaming_pair() -> Iterator[StreamingPair]:
    pair = StreamingPair()
    try:
        pair.start(synchronous_commit=SYNCHRONOUS_COMMIT)
        yield pair
    except BaseException:
        print(pair.logs())
        raise
    finally:
        pair.close()


def _health(fleet: Fleet) -> tuple[int, Any, float]:
    """The server's health answer and how long it took; a hang fails the test."""
    started = time.monotonic()
    code, body = fleet.api("GET", "/api/v1/health")  # times out (an error) after 5 s
    return code, body, time.monotonic() - started


class Creator(threading.Thread):
    """Creates tasks one after another until told to stop; keeps the ids the server
    answered 201 for (it stored them) and counts the 503s (it did not say)."""

    def __init__(self, fleet: Fleet, name: str) -> None:
        super().__init__(daemon=True)
        self.fleet = fleet
        self.label = name
        self.acknowledged: list[str] = []
        self.unavailable = 0
        self.other: list[tuple[int, Any]] = []
        self.done = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.done.is_set():
            n += 1
            body = {"command": f"echo {self.label} {n}", "frequency": "every 24 hours"}
            try:
                code, answer = self.fleet.api("POST", "/api/v1/tasks/create", body)
            except Exception as e:  # told in the test's failure, not lost
                self.other.append((0, repr(e)))
                self.done.wait(0.2)  # pacing after a failure, not waiting for an event
                continue
            if code == 201:
                self.acknowledged.append(str(answer["command_id"]))
            elif code == 503:
                self.unavailable += 1
            else:
                self.other.append((code, answer))


def test_a_primary_killed_under_load_fails_over_with_nothing_acknowledged_lost(
    tmp_path: Path, streaming_pair: StreamingPair
) -> None:
    rng, seed = seeded_random("pg-failover")
    pair = streaming_pair
    dbname = parse_dsn(create_database(pair.primary.dsn))["dbname"]
    fleet = start_fleet(
        tmp_path,
        AGENTS,
        pair.multi_host_uri(dbname),
        server_env={"TASKSCHEDULER_CREATE_RATE": "0"},
    )
    creators = [Creator(fleet, f"creator-{i}") for i in range(CREATORS)]
    try:
        server_pid = fleet.server.process.pid if fleet.server.process else None
        task_id = create_witnessed_task(fleet)
        agent_ids = [str((agent_health(fleet, i) or {})["agent_id"]) for i in range(AGENTS)]
        for creator in creators:
            creator.start()
        time.sleep(rng.uniform(2.0, 4.0))  # the fault's moment, not a wait for an event
        pair.primary.kill()
        killed = time.monotonic()
        # No primary for a while: every answer is a prompt 503, and the server stays up.
        unavailable, slowest = 0, 0.0
        down_until = killed + rng.uniform(1.5, 3.0)
        while time.monotonic() < down_until:
            code, body, took = _health(fleet)
            assert code == 503, (code, body)
            assert body["error"]["code"] == "database_unavailable", body
            slowest = max(slowest, took)
            unavailable += 1
            fleet.server.assert_running()
            time.sleep(0.2)  # pacing the probes, not waiting for an event
        pair.standby.promote()
        promoted = time.monotonic()
        wait_for(lambda: _health(fleet)[0] == 200, 30, "the server to reach the new primary")
        recovered = time.monotonic() - promoted
        moved = f"connected to PostgreSQL at 127.0.0.1:{pair.standby.port}"
        assert moved in fleet.server.whole_log(), "the server says where it writes now"
        # The load goes on against the new primary for a moment.
        creations = sum(len(c.acknowledged) for c in creators)
        wait_for(
            lambda: sum(len(c.acknowledged) for c in creators) >= creations + 10,
            20,
            "creations to go on",
        )
        for creator in creators:
            creator.done.set()
            creator.join(10)
        acknowledged = [task for c in creators for task in c.acknowledged]
        others = [answer for c in creators for answer in c.other]
        assert fleet.server.process is not None and fleet.server.process.pid == server_pid, (
            "the server rode out the failover without a restart"
        )
        cutoff = cutoff_now()
        figures, drained = drain(fleet, task_id, agent_ids, cutoff, timeout=40)
        # Every task the server said it created is on the new primary.
        missing = [
            task for task in acknowledged if fleet.api("GET", f"/api/v1/tasks/{task}")[0] != 200
        ]
        report(
            f"pg failover (standby promoted, synchronous_commit={SYNCHRONOUS_COMMIT})",
            seed,
            figures,
            drained,
            answers_503=unavailable,
            slowest_503=f"{slowest:.2f}s",
            reconnect=f"{recovered:.1f}s",
            creates_acknowledged=len(acknowledged),
            creates_503=sum(c.unavailable for c in creators),
            commits_in_doubt=fleet.server.whole_log().count("commit in doubt"),
            run_again=fleet.server.whole_log().count("running the operation again"),
        )
        assert_sound(fleet, figures, cutoff)
        assert figures.lost == 0, "the agents never died: no run was lost"
        assert not missing, f"tasks acknowledged as created, gone after the failover: {missing}"
        assert not others, f"answers neither 201 nor 503: {others[:5]}"
        assert slowest < 5, "answers while there is no primary are prompt"
    except BaseException:
        print(fleet.logs())
        print(pair.logs())
        for c in creators:
            print(
                f"{c.label}: {len(c.acknowledged)} acknowledged, {c.unavailable} 503, {c.other[:5]}"
            )
        raise
    finally:
        for creator in creators:
            creator.done.set()
        fleet.stop()
