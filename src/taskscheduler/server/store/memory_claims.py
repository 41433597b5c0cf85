"""Claims of :class:`~taskscheduler.server.store.memory.MemoryStore`: the in-memory twin
of :mod:`~taskscheduler.server.store.claims`."""

from __future__ import annotations

from datetime import datetime, timedelta

from taskscheduler.server.store.claim_rules import claim_verdict, online_urls
from taskscheduler.server.store.fleet import expected_urls
from taskscheduler.server.store.memory_state import MemoryState
from taskscheduler.server.store.records import Claim, ClaimAnswer, ClaimStatus
from taskscheduler.server.store.rules import scheduled_verdict, utc


class MemoryClaims(MemoryState):
    """Grants each instant of a run-on-one task to one agent, in a dictionary."""

    async def claim_instant(
        self, claim: Claim, now: datetime, grace: timedelta, online_since: datetime
    ) -> ClaimAnswer:
        at = utc(claim.scheduled_at)
        task = self._tasks.get(claim.task_id)
        verdict = None
        assigned: tuple[str, ...] = ()
        if task is not None:
            verdict, _ = scheduled_verdict(
                self._revisions[claim.task_id],
                self._pauses[claim.task_id],
                task.deleted_at,
                at,
                claim.revision,
            )
            assigned = expected_urls(self._matched_urls(claim.task_id), self._agents.values())
        held = self._claims.get((claim.task_id, at))
        answer = claim_verdict(
            task,
            verdict,
            claim,
            assigned=assigned,
            online=online_urls(self._agents.values(), online_since),
            holder=None if held is None else held[0],
            now=now,
            grace=grace,
        )
        if answer.status is ClaimStatus.GRANTED and held is None:
            self._claims[(claim.task_id, at)] = (claim.agent_id, claim.agent_url)
        return answer
