"""The rules of run on one, as pure functions (no I/O): which agent runs an instant of a
``run_on: one`` task. Every instant is claimed by the agents of the task before they start
it; the stores grant at most one claim per (task, instant), answering as
:func:`claim_verdict` says, and executions of a claimed instant expect its holder
(:func:`claimed_expected`)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Collection, Iterable, Sequence
from datetime import UTC, datetime, timedelta

from taskscheduler.protocol.options import RunOn
from taskscheduler.server.store.records import (
    AgentRecord,
    Claim,
    ClaimAnswer,
    ClaimRefusal,
    ClaimStatus,
    RecordOutcome,
    Task,
)
from taskscheduler.server.store.rules import utc

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rendezvous_score(task_id: uuid.UUID, scheduled_at: datetime, url: str) -> bytes:
    """How strongly the agent at ``url`` is preferred for this instant (highest wins):
    every server computes the same, and each agent is preferred for an even share of
    the instants whatever the other agents are (rendezvous hashing)."""
    micros = (scheduled_at - _EPOCH) // timedelta(microseconds=1)
    key = f"{task_id}|{micros}|{url}".encode()
    return hashlib.sha256(key).digest()


def chosen_agent(
    task_id: uuid.UUID, scheduled_at: datetime, candidates: Iterable[str]
) -> str | None:
    """The URL of the agent preferred to run this instant, among ``candidates`` (the
    online agents of the task); None when there is none."""
    return max(
        candidates, key=lambda url: rendezvous_score(task_id, scheduled_at, url), default=None
    )


def claim_grace(configured: timedelta, interval: timedelta) -> timedelta:
    """How long after an instant only its chosen agent may claim it (``--claim-grace``),
    at most half the task's interval: another agent that takes over still starts the
    run before the next instant is due."""
    return min(configured, interval / 2)


_CLAIM_REFUSALS = {
    RecordOutcome.MISALIGNED: ClaimRefusal.MISALIGNED,
    RecordOutcome.SUPERSEDED: ClaimRefusal.SUPERSEDED,
    RecordOutcome.DELETED: ClaimRefusal.DELETED,
    RecordOutcome.TASK_PAUSED: ClaimRefusal.TASK_PAUSED,
}


def claim_verdict(
    task: Task | None,
    verdict: RecordOutcome | None,
    claim: Claim,
    *,
    assigned: Sequence[str],
    online: Collection[str],
    holder: uuid.UUID | None,
    now: datetime,
    grace: timedelta,
) -> ClaimAnswer:
    """The answer to ``claim``, before anything is written.

    ``verdict`` is :func:`scheduled_verdict` for the instant at the claim's revision (a
    result of it would be refused: so is the claim). ``assigned``: the URLs of the
    task's agents (:func:`~taskscheduler.server.store.fleet.expected_urls`); ``online``:
    those of them heard from within the heartbeat window; ``holder``: the agent holding
    the instant's claim, if any; ``grace``: ``--claim-grace`` (:func:`claim_grace`).

    Once held, the holder is granted it again (its first answer may have been lost) and
    every other agent is told HELD. Otherwise the agent chosen by :func:`chosen_agent`
    among the online ones is granted it; another is told to WAIT until ``grace`` after
    the instant, after which any of the task's agents is granted it (the chosen one did
    not come: dead, cut off, or too busy). With no agent online, the first to ask wins.
    GRANTED here means "write the claim": the store does, and whoever writes it first
    holds it.
    """
    if task is None:
        return ClaimAnswer(None, refused=ClaimRefusal.UNKNOWN_TASK)
    if verdict is not None:
        return ClaimAnswer(None, refused=_CLAIM_REFUSALS[verdict])
    if task.spec.options.run_on is not RunOn.ONE:
        return ClaimAnswer(None, refused=ClaimRefusal.NOT_RUN_ON_ONE)
    if claim.agent_url not in assigned:
        return ClaimAnswer(None, refused=ClaimRefusal.NOT_ASSIGNED)
    if holder is not None:
        status = ClaimStatus.GRANTED if holder == claim.agent_id else ClaimStatus.HELD
        return ClaimAnswer(status, holder=holder)
    scheduled_at = utc(claim.scheduled_at)
    chosen = chosen_agent(task.task_id, scheduled_at, [u for u in assigned if u in online])
    open_at = scheduled_at + claim_grace(grace, task.spec.interval)
    if chosen is None or chosen == claim.agent_url or now >= open_at:
        return ClaimAnswer(ClaimStatus.GRANTED, holder=claim.agent_id)
    return ClaimAnswer(ClaimStatus.WAIT, retry_at=open_at)


def online_urls(agents: Iterable[AgentRecord], online_since: datetime) -> set[str]:
    """The URLs of live agents heard from at or after ``online_since`` (the fleet's
    ``online`` state: within its heartbeat window)."""
    return {
        a.url
        for a in agents
        if not a.revoked and a.last_seen_at is not None and a.last_seen_at >= online_since
    }


def manual_choice(
    task_id: uuid.UUID, scheduled_at: datetime, assigned: Sequence[str], online: Collection[str]
) -> str | None:
    """The one agent a run-now of a run-on-one task is delivered to: the chosen one
    among the task's online agents, else among all of them (none is known to be up: the
    delivery is retried until the run-now's deadline)."""
    live = [url for url in assigned if url in online]
    return chosen_agent(task_id, scheduled_at, live or assigned)


def claimed_expected(expected: tuple[str, ...], holder_url: str | None) -> tuple[str, ...]:
    """The agents an execution expects: the one holding its instant's claim, if it is
    claimed (a run-on-one task), else ``expected`` (every agent of the task)."""
    return expected if holder_url is None else (holder_url,)
