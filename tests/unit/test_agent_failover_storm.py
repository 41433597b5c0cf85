"""An agent listing replicas that are all overloaded (answering in 6 s, past the 4 s
failover timeout) moves once and then waits for them, instead of hopping between them
and resending every request (a failover storm); a hung replica is still left within
5 s once a replica has answered quickly, and no connection or a 5xx escalates nothing.
The server's real Klein app behind StubTreq (tests/unit/replica_fakes.py); time is a
task.Clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from taskscheduler.agent.heartbeat import HeartbeatLoop, Membership
from taskscheduler.agent.server_client import RetryLater
from taskscheduler.agent.servers import (
    FAILOVER_TIMEOUT,
    LONGEST_FAILOVER_TIMEOUT,
    ServerChooser,
)
from tests.unit.agent_fakes import ANCHOR
from tests.unit.replica_fakes import AGENT_ID, FIVE_SECONDS, TASK, A, B, Setup

#: How long an overloaded replica takes to answer: past the failover timeout.
OVERLOADED = 6.0
FIVE_MINUTES = 300.0


def run_for(s: Setup, seconds: float, step: float = 0.25) -> None:
    """Let ``seconds`` pass in small steps, each request and answer delivered as it goes."""
    for _ in range(round(seconds / step)):
        s.settle(step)


def heartbeats(s: Setup) -> HeartbeatLoop:
    loop = HeartbeatLoop(
        s.client, s.clock, Membership(), lambda: {"agent_id": str(AGENT_ID)}, interval=10
    )
    loop.start()
    return loop


def test_replicas_that_are_only_slow_see_the_agent_move_rarely(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.site(A).slow = s.site(B).slow = OVERLOADED
    loop = heartbeats(s)
    s.reporter.start()
    instants = range(1, 31)
    for k in instants:  # a result every 10 s for 5 minutes, heartbeats beside them
        s.spool_results(k)
        run_for(s, FIVE_MINUTES / len(instants))
    run_for(s, 60)
    loop.stop()
    assert s.client.servers.failovers <= 3, "a failover storm"
    stored = [r.scheduled_at for r in s.stored()]
    assert len(stored) == len(set(stored)) == len(instants), "each result stored once"
    assert len(s.spool) == 0
    assert s.reporter.acknowledged == len(instants)
    # Each resend left work behind on a replica: a few, not one per request.
    assert s.site(A).abandoned + s.site(B).abandoned <= 3


@pytest.mark.parametrize("escalated_by", ["a hung replica", "slow replicas"])
def test_a_hung_replica_is_left_within_5_seconds_again_once_one_answered_quickly(
    tmp_path: Path, escalated_by: str
) -> None:
    s = Setup(tmp_path)
    s.site(B).slow = OVERLOADED
    if escalated_by == "a hung replica":
        s.site(A).hang = True
    else:
        s.site(A).slow = OVERLOADED
    s.reporter.start()
    s.spool_results(1)
    run_for(s, 30)
    assert len(s.stored()) == 1 and len(s.spool) == 0
    assert s.client.servers.patience > FAILOVER_TIMEOUT, "escalated"
    s.site(A).hang = False
    s.site(A).slow = s.site(B).slow = 0
    s.spool_results(2)  # answered at once: the patience is back to 4 s
    run_for(s, 1)
    assert len(s.stored()) == 2 and s.client.servers.patience == FAILOVER_TIMEOUT
    hung = s.client.url
    s.site(hung).hang = True
    s.spool_results(3)
    run_for(s, FIVE_SECONDS)
    assert len(s.stored()) == 3 and len(s.spool) == 0
    assert s.client.url != hung


@pytest.mark.parametrize("trouble", ["refused", "503"])
def test_no_connection_or_a_5xx_escalates_nothing(tmp_path: Path, trouble: str) -> None:
    # A is dead (or without its database), B hangs: B is left within 5 s all the same.
    s = Setup(tmp_path)
    if trouble == "refused":
        s.http.refused.add(A)
    else:
        s.site(A).down = True
    s.site(B).hang = True
    s.reporter.start()
    s.spool_results(1)
    s.settle()
    assert s.http.asked == [A, B] and s.stored() == []
    s.http.refused.clear()  # A is back
    s.site(A).down = False
    run_for(s, FIVE_SECONDS)
    assert s.client.url == A, "B left within 5 s"
    # Both tried for this request: the reporter sends it again after its back-off.
    run_for(s, 2)
    assert len(s.stored()) == 1 and len(s.spool) == 0


def test_a_claims_own_short_wait_running_out_moves_nothing(tmp_path: Path) -> None:
    # A claim waits until its task's next instant (2 s here): a replica answering in 3 s
    # is not in trouble for missing it.
    s = Setup(tmp_path)
    s.site(A).slow = 3.0
    d = Deferred.fromCoroutine(s.client.claim(TASK, ANCHOR, 1, timeout=2))
    run_for(s, 2.5)
    assert d.called and isinstance(d.result, RetryLater)
    assert s.http.asked == [A]
    assert s.client.url == A and s.client.servers.failovers == 0


def test_patience_doubles_with_jitter_up_to_30_seconds_and_a_quick_answer_resets_it() -> None:
    chooser = ServerChooser([A, B], jitter=lambda: 0.0)
    steps = []
    for _ in range(4):
        chooser.failed(chooser.current, "no answer", timed_out=True)
        steps.append(chooser.attempt_timeout(0))
    assert steps == [8.0, 16.0, LONGEST_FAILOVER_TIMEOUT, LONGEST_FAILOVER_TIMEOUT]
    chooser.answered(chooser.current, quickly=False)  # a slow answer keeps the patience
    assert chooser.attempt_timeout(0) == LONGEST_FAILOVER_TIMEOUT
    chooser.answered(chooser.current)
    assert chooser.attempt_timeout(0) == FAILOVER_TIMEOUT
    stretched = ServerChooser([A, B], jitter=lambda: 1.0)
    stretched.failed(A, "no answer", timed_out=True)
    assert stretched.attempt_timeout(0) == 12.0  # half again: the fleet spreads out
