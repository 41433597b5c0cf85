"""Run on one, the pure rules: which agent is chosen for an instant (deterministic, spread,
never an offline one), the grace after which another may take it, and the agent's own
rules for asking (it gives up rather than run late)."""

from __future__ import annotations

import collections
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet.task import Clock

from taskscheduler.agent.claims import Claims
from taskscheduler.agent.server_client import Claimed, RetryLater
from taskscheduler.protocol.options import RunOn, TaskOptions
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.store.claim_rules import (
    chosen_agent,
    claim_grace,
    claim_verdict,
    claimed_expected,
    manual_choice,
)
from taskscheduler.server.store.records import Claim, ClaimRefusal, ClaimStatus, RecordOutcome, Task
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, spec

URLS = [f"http://agent-{n}:8081" for n in range(3)]
TASK_ID = uuid.UUID("12345678-0000-4000-8000-000000000001")
START = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
GRACE = timedelta(seconds=5)


def instants(count: int) -> list[datetime]:
    return [START + timedelta(seconds=10 * k) for k in range(count)]


def test_the_choice_is_deterministic_whatever_the_order_of_the_agents() -> None:
    for at in instants(50):
        first = chosen_agent(TASK_ID, at, URLS)
        assert first in URLS
        assert chosen_agent(TASK_ID, at, list(reversed(URLS))) == first
        # Another server (same rule) and another zone for the same instant agree.
        assert chosen_agent(TASK_ID, at.astimezone(UTC), sorted(URLS)) == first
    assert chosen_agent(TASK_ID, START, []) is None


def test_the_choice_spreads_the_instants_over_the_agents() -> None:
    shares = collections.Counter(chosen_agent(TASK_ID, at, URLS) for at in instants(3000))
    assert set(shares) == set(URLS)
    assert all(850 <= count <= 1150 for count in shares.values()), shares
    # Another task's instants are spread independently (not all on one agent).
    other = collections.Counter(chosen_agent(uuid.uuid4(), START, URLS) for _ in range(300))
    assert len(other) == 3


def test_an_agent_going_away_moves_only_its_own_instants() -> None:
    for at in instants(200):
        before = chosen_agent(TASK_ID, at, URLS)
        after = chosen_agent(TASK_ID, at, URLS[:2])
        if before != URLS[2]:
            assert after == before
        else:
            assert after in URLS[:2]


def test_the_grace_is_at_most_half_the_interval() -> None:
    assert claim_grace(GRACE, timedelta(minutes=1)) == GRACE
    assert claim_grace(GRACE, timedelta(seconds=2)) == timedelta(seconds=1)


def one_task(every: str = "every 10 seconds") -> Task:
    spec_ = dataclasses.replace(
        spec(every=every, task_id=TASK_ID), options=TaskOptions(run_on=RunOn.ONE)
    )
    return Task(spec_, ANCHOR)


def answer(url: str, at: datetime, now: datetime, online: list[str], **kw: Any) -> Any:
    claim = Claim(TASK_ID, at, uuid.UUID(int=URLS.index(url) + 1), url, 1)
    task = kw.pop("task", one_task())
    options = {"assigned": URLS, "online": online, "holder": None, "now": now, "grace": GRACE}
    options.update(kw)
    return claim_verdict(task, None, claim, **options)


def test_the_chosen_agent_is_granted_the_others_wait_until_the_grace_is_over() -> None:
    at = ANCHOR + timedelta(seconds=10)
    chosen = chosen_agent(TASK_ID, at, URLS)
    assert chosen is not None
    other = next(u for u in URLS if u != chosen)
    assert answer(chosen, at, at, URLS).status is ClaimStatus.GRANTED
    waiting = answer(other, at, at, URLS)
    assert (waiting.status, waiting.retry_at) == (ClaimStatus.WAIT, at + GRACE)
    just_before = at + GRACE - timedelta(microseconds=1)
    assert answer(other, at, just_before, URLS).status is ClaimStatus.WAIT
    assert answer(other, at, at + GRACE, URLS).status is ClaimStatus.GRANTED
    # A task run every 4 s: the grace is 2 s, so another agent still starts before the next.
    fast = one_task("every 4 seconds")
    fast_at = ANCHOR + timedelta(seconds=4)
    fast_chosen = chosen_agent(TASK_ID, fast_at, URLS)
    fast_other = next(u for u in URLS if u != fast_chosen)
    fast_wait = answer(fast_other, fast_at, fast_at, URLS, task=fast)
    assert fast_wait.retry_at == fast_at + timedelta(seconds=2)


def test_an_offline_agent_is_never_chosen_and_with_none_online_the_first_asker_wins() -> None:
    at = ANCHOR + timedelta(seconds=10)
    chosen = chosen_agent(TASK_ID, at, URLS)
    others = [u for u in URLS if u != chosen]
    # The chosen one is offline: the choice falls among the others, at once.
    second = chosen_agent(TASK_ID, at, others)
    assert answer(str(second), at, at, others).status is ClaimStatus.GRANTED
    assert answer(chosen, at, at, others).status is ClaimStatus.WAIT
    assert answer(str(chosen), at, at, []).status is ClaimStatus.GRANTED


def test_a_held_instant_is_granted_to_its_holder_only() -> None:
    at = ANCHOR + timedelta(seconds=10)
    holder = uuid.UUID(int=1)  # URLS[0]'s agent
    assert answer(URLS[0], at, at, URLS, holder=holder).status is ClaimStatus.GRANTED
    held = answer(URLS[1], at, at + GRACE, URLS, holder=holder)
    assert (held.status, held.holder) == (ClaimStatus.HELD, holder)


def test_claims_are_refused_before_any_choice() -> None:
    at = ANCHOR + timedelta(seconds=10)
    claim = Claim(TASK_ID, at, uuid.uuid4(), URLS[0], 1)
    kw: dict[str, Any] = {"assigned": URLS, "online": URLS, "holder": None, "now": at}
    assert claim_verdict(None, None, claim, grace=GRACE, **kw).refused is (
        ClaimRefusal.UNKNOWN_TASK
    )
    paused = claim_verdict(one_task(), RecordOutcome.TASK_PAUSED, claim, grace=GRACE, **kw)
    assert paused.refused is ClaimRefusal.TASK_PAUSED
    everywhere = Task(spec(task_id=TASK_ID), ANCHOR)
    assert claim_verdict(everywhere, None, claim, grace=GRACE, **kw).refused is (
        ClaimRefusal.NOT_RUN_ON_ONE
    )
    kw["assigned"] = URLS[1:]
    assert claim_verdict(one_task(), None, claim, grace=GRACE, **kw).refused is (
        ClaimRefusal.NOT_ASSIGNED
    )


def test_a_run_now_goes_to_an_online_agent_else_to_any_and_expects_its_holder() -> None:
    assert manual_choice(TASK_ID, START, URLS, {URLS[1]}) == URLS[1]
    assert manual_choice(TASK_ID, START, URLS, set()) == chosen_agent(TASK_ID, START, URLS)
    assert manual_choice(TASK_ID, START, [], set()) is None
    assert claimed_expected(tuple(URLS), URLS[2]) == (URLS[2],)
    assert claimed_expected(tuple(URLS), None) == tuple(URLS)


# -- the agent's rules for asking ------------------------------------------------------------


class ScriptedClient:
    """Answers claims from a script, and records when each was asked."""

    def __init__(self, clock: Clock, *answers: Any) -> None:
        self.clock = clock
        self.answers = list(answers)
        self.asked: list[float] = []
        self.timeouts: list[float] = []

    async def claim(
        self, task_id: uuid.UUID, scheduled_at: datetime, revision: int, *, timeout: float
    ) -> Any:
        self.asked.append(self.clock.seconds())
        self.timeouts.append(timeout)
        return self.answers.pop(0)


def asking(*answers: Any, deadline: float = 2.5) -> tuple[Clock, ScriptedClient, Claims]:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 10)  # at instant 1 of a task every 10 s
    client = ScriptedClient(clock, *answers)
    claims = Claims(clock, client, lambda: utc_now_from(clock.seconds()), lambda _: deadline)
    return clock, client, claims


def test_told_to_wait_the_agent_asks_again_then_runs_as_if_on_time() -> None:
    clock, client, claims = asking(Claimed("wait", 5.0), Claimed("granted"))
    granted: list[float] = []
    task = spec(task_id=TASK_ID)
    claims.claim(task, ANCHOR + timedelta(seconds=10), granted.append)
    clock.advance(4.9)
    assert client.asked == [ANCHOR_SECONDS + 10] and granted == []
    clock.advance(0.1)
    assert client.asked[-1] == ANCHOR_SECONDS + 15 and granted == [0.0]
    assert client.timeouts == [10.0, 5.0], "an answer is awaited until the next instant"


def test_the_agent_gives_up_when_the_wait_ends_at_the_next_instant_or_it_is_late() -> None:
    clock, client, claims = asking(Claimed("wait", 10.0))
    granted: list[float] = []
    claims.claim(spec(task_id=TASK_ID), ANCHOR + timedelta(seconds=10), granted.append)
    clock.advance(20)
    assert len(client.asked) == 1 and granted == []

    clock, client, claims = asking(Claimed("granted"))
    clock.advance(2.6)  # later than the starting deadline (2.5 s): it does not even ask
    claims.claim(spec(task_id=TASK_ID), ANCHOR + timedelta(seconds=10), granted.append)
    assert client.asked == [] and granted == []


def test_held_refused_or_unanswered_the_agent_runs_nothing() -> None:
    for reply in (Claimed("held"), RetryLater("connection refused")):
        clock, client, claims = asking(reply)
        granted: list[float] = []
        claims.claim(spec(task_id=TASK_ID), ANCHOR + timedelta(seconds=10), granted.append)
        clock.advance(10)
        assert len(client.asked) == 1 and granted == []
    assert claims.unreachable == 1


def test_stopping_cancels_a_wait_and_nothing_is_granted() -> None:
    clock, client, claims = asking(Claimed("wait", 5.0), Claimed("granted"))
    granted: list[float] = []
    claims.claim(spec(task_id=TASK_ID), ANCHOR + timedelta(seconds=10), granted.append)
    claims.stop()
    clock.advance(10)
    assert len(client.asked) == 1 and granted == [] and clock.getDelayedCalls() == []
