"""The agents' claims of the instants of run-on-one tasks: before it starts one, each
agent of the task asks here; the store grants each (task, instant) to one agent
(:func:`~taskscheduler.server.store.claim_rules.claim_verdict`)."""

from __future__ import annotations

from datetime import datetime, timedelta

from twisted.web.iweb import IRequest

from taskscheduler.protocol import InvalidMessage
from taskscheduler.protocol.claims import parse_claim
from taskscheduler.schedule import format_instant
from taskscheduler.server.access import principal_of
from taskscheduler.server.api.base import Routes, routes
from taskscheduler.server.api.fleet import ONLINE_INTERVALS
from taskscheduler.server.store.records import Claim, ClaimRefusal, ClaimStatus, UnknownTask
from taskscheduler.web.errors import (
    BAD_REQUEST,
    CLAIM_AFTER_DELETION,
    CLAIM_SUPERSEDED,
    CLAIM_TASK_PAUSED,
    MISALIGNED,
    NOT_ASSIGNED,
    NOT_RUN_ON_ONE,
    ErrorKind,
)
from taskscheduler.web.requests import path_task_id, read_json
from taskscheduler.web.responses import json_response

#: How long after an instant only its chosen agent may claim it (``--claim-grace``).
DEFAULT_CLAIM_GRACE = timedelta(seconds=5)

_REFUSALS: dict[ClaimRefusal, ErrorKind] = {
    ClaimRefusal.MISALIGNED: MISALIGNED,
    ClaimRefusal.SUPERSEDED: CLAIM_SUPERSEDED,
    ClaimRefusal.DELETED: CLAIM_AFTER_DELETION,
    ClaimRefusal.TASK_PAUSED: CLAIM_TASK_PAUSED,
    ClaimRefusal.NOT_ASSIGNED: NOT_ASSIGNED,
    ClaimRefusal.NOT_RUN_ON_ONE: NOT_RUN_ON_ONE,
}


def online_since(now: datetime, heartbeat_interval: float) -> datetime:
    """Agents heard from at or after this instant are online (the fleet's ``online``)."""
    return now - timedelta(seconds=ONLINE_INTERVALS * heartbeat_interval)


class ClaimRoutes(Routes):
    """Claims, as agents make them."""

    _claim_grace: timedelta

    @routes.route("/api/v1/tasks/<task_id>/claims", methods=["POST"])
    async def claim_instant(self, request: IRequest, task_id: str) -> bytes:
        """An agent asks to run an instant: ``{"scheduled_at", "revision"}``."""
        parsed_id = path_task_id(task_id)
        try:
            scheduled_at, revision = parse_claim(read_json(request))
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        agent = principal_of(request).agent
        assert agent is not None  # the gate let only an agent's credential in
        now = self._now()
        claim = Claim(parsed_id, scheduled_at, agent.agent_id, agent.url, revision)
        answer = await self._store.claim_instant(
            claim, now, self._claim_grace, online_since(now, self._heartbeat_interval)
        )
        if answer.refused is ClaimRefusal.UNKNOWN_TASK:
            raise UnknownTask(task_id)
        if answer.refused is not None:
            self.log.warn(
                "claim of task {task_id} at {scheduled_at} by agent {agent_id} refused: {refusal}",
                task_id=str(parsed_id),
                scheduled_at=format_instant(scheduled_at),
                agent_id=str(agent.agent_id),
                refusal=answer.refused.value,
            )
            raise _REFUSALS[answer.refused]()
        assert answer.status is not None
        body: dict[str, object] = {"status": answer.status.value}
        if answer.holder is not None:
            body["agent_id"] = str(answer.holder)
        if answer.status is ClaimStatus.WAIT and answer.retry_at is not None:
            body["retry_at"] = format_instant(answer.retry_at)
            body["retry_after_seconds"] = max(0.0, (answer.retry_at - now).total_seconds())
        return json_response(request, body)
