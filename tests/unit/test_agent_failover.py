"""An agent listing several server replicas (``--server a,b,c``), against the server's
real Klein app behind StubTreq, one app per replica on one shared MemoryStore (one
database): it talks to one at a time, fails over to the next on no connection, no answer
within the failover timeout or a 5xx, never on a 4xx, stays on one that works, comes back
round the list; nothing spooled is lost or stored twice on the way. Time is a task.Clock.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import Deferred

from taskscheduler.agent.server_client import HeartbeatAnswer
from taskscheduler.agent.servers import FAILOVER_TIMEOUT
from tests.unit.agent_fakes import fired, result
from tests.unit.replica_fakes import AGENT_ID, FIVE_SECONDS, TASK, A, B, C, Setup, instant

# -- when to fail over ------------------------------------------------------------------


def test_the_first_server_refusing_connections_the_second_takes_the_results_at_once(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    s.http.refused.add(A)
    s.spool_results(1)
    started = s.clock.seconds()
    s.reporter.start()
    s.settle()
    assert len(s.stored()) == 1 and len(s.spool) == 0
    assert s.clock.seconds() - started < FIVE_SECONDS
    assert s.http.asked == [A, B]
    assert s.client.url == B and s.client.servers.failovers == 1
    assert s.reporter.acknowledged == 1


def test_a_503_sends_the_request_to_the_next_server(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.site(A).down = True
    s.spool_results(1, 2, 3)
    s.reporter.start()
    s.settle()
    assert len(s.stored()) == 3 and len(s.spool) == 0
    assert s.site(A).results == [instant(1), instant(2), instant(3)]  # the batch, refused
    assert s.site(B).results == [instant(1), instant(2), instant(3)]
    assert s.client.url == B


@pytest.mark.parametrize("status", [500, 502, 504])
def test_any_5xx_is_trouble(tmp_path: Path, status: int) -> None:
    s = Setup(tmp_path)
    s.site(A).answer = (status, b"<html>bad gateway</html>")
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert len(s.stored()) == 1
    assert s.client.url == B


def test_a_server_that_does_not_answer_is_left_within_5_seconds(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.site(A).hang = True
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert s.stored() == [] and len(s.site(A).held) == 1
    s.settle(FAILOVER_TIMEOUT - 0.1)
    assert s.stored() == [], "waited less than the failover timeout"
    s.settle(FIVE_SECONDS - FAILOVER_TIMEOUT + 0.1)
    assert len(s.stored()) == 1 and len(s.spool) == 0
    assert s.client.url == B


@pytest.mark.parametrize(
    ("status", "body"),
    [
        # Verdicts of the server's: refused for good, whichever replica is asked.
        (404, b'{"error": {"code": "unknown_task", "message": "no such task"}}'),
        (409, b'{"error": {"code": "conflict", "message": "another result"}}'),
        # No verdict, but the server answered: the credential, a proxy's page.
        (401, b'{"error": {"code": "unauthorized", "message": "who are you"}}'),
        (404, b"<html>not found</html>"),
        (429, b'{"error": {"code": "rate_limited", "message": "slow down"}}'),
    ],
)
def test_a_4xx_is_an_answer_not_a_failover(tmp_path: Path, status: int, body: bytes) -> None:
    s = Setup(tmp_path)
    s.site(A).answer = (status, body)
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    s.settle(60)  # retried or not, always on A
    assert set(s.http.asked) == {A}
    assert s.client.url == A and s.client.servers.failovers == 0
    assert s.warnings() == []


def test_only_a_single_server_keeps_the_callers_timeout(tmp_path: Path) -> None:
    # With nowhere to go, a slow server is waited for as before (30 s).
    s = Setup(tmp_path, urls=(A,))
    s.site(A).hang = True
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    s.settle(FAILOVER_TIMEOUT + 1)
    assert len(s.site(A).requests) == 1, "no second attempt"
    assert s.reporter._sending.failures == 0, "still waiting for the answer"
    s.site(A).hang = False
    s.settle(30)
    s.settle(30)
    assert len(s.stored()) == 1


# -- staying, and coming back round -----------------------------------------------------


def test_the_agent_stays_on_the_server_that_works(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.http.refused.add(A)
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    s.http.refused.clear()  # A is back: no reason to move
    for k in range(2, 6):
        s.spool_results(k)
        s.settle(1)
    assert s.http.asked == [A, B, B, B, B, B]
    assert len(s.stored()) == 5


def test_back_to_the_first_when_the_second_dies(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.http.refused.add(A)
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert s.client.url == B
    s.http.refused = {B}  # A came back, B died
    s.spool_results(2)
    s.settle()
    assert s.http.asked == [A, B, B, A]
    assert s.client.url == A and s.client.servers.failovers == 2
    assert len(s.stored()) == 2 and len(s.spool) == 0


def test_round_the_list_of_three(tmp_path: Path) -> None:
    s = Setup(tmp_path, urls=(A, B, C))
    s.reporter.start()
    for k, dead in enumerate([A, B, C], start=1):
        s.http.refused = {dead}
        s.spool_results(k)
        s.settle()
    assert s.http.asked == [A, B, B, C, C, A]
    assert len(s.stored()) == 3 and len(s.spool) == 0


def test_two_requests_failing_on_one_server_move_the_agent_once(tmp_path: Path) -> None:
    # A heartbeat and a report both under way when A dies: one switch, to B, not to C.
    s = Setup(tmp_path, urls=(A, B, C))
    s.site(A).hang = True
    beat = Deferred.fromCoroutine(s.client.heartbeat({"agent_id": str(AGENT_ID)}))
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert s.http.asked == [A, A]
    s.settle(FAILOVER_TIMEOUT + 0.1)
    assert isinstance(fired(beat), HeartbeatAnswer)
    assert s.client.url == B and s.client.servers.failovers == 1
    assert len(s.stored()) == 1 and s.http.asked == [A, A, B, B]


def test_every_server_down_the_results_wait_and_back_off_as_with_one(tmp_path: Path) -> None:
    s = Setup(tmp_path, urls=(A, B, C))
    s.http.refused = {A, B, C}
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert s.http.asked == [A, B, C], "each replica once a request"
    assert s.reporter._sending.failures == 1
    s.settle(1)  # the first back-off (1 s, no jitter)
    assert s.http.asked[3:] == [A, B, C]
    s.http.refused = {A, C}
    s.settle(2)
    assert len(s.stored()) == 1 and s.client.url == B


# -- lossless ---------------------------------------------------------------------------


def test_a_result_spooled_during_a_failover_goes_once_to_the_new_server(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    s.site(A).hang = True
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    s.spool_results(2)  # while the first waits on A
    s.settle(FIVE_SECONDS)
    assert s.site(B).results == [instant(1), instant(2)]
    assert sorted(r.scheduled_at for r in s.stored()) == [
        result(TASK, k, AGENT_ID).scheduled_at for k in (1, 2)
    ]
    assert len(s.spool) == 0 and s.reporter.acknowledged == 2


def test_a_result_stored_by_a_replica_that_lost_its_answer_is_not_doubled(
    tmp_path: Path,
) -> None:
    s = Setup(tmp_path)
    s.site(A).lose_answers = True
    s.spool_results(1)
    s.reporter.start()
    s.settle()
    assert len(s.stored()) == 1 and len(s.spool) == 1  # stored, not acknowledged
    s.settle(FIVE_SECONDS)
    assert len(s.stored()) == 1, "the second replica took it as a duplicate"
    assert len(s.spool) == 0 and s.reporter.acknowledged == 1 and s.reporter.rejected == 0
