"""Run on one, on the agent: before it starts an instant of a ``run_on: one`` task, the
agent claims it from the server (``POST /api/v1/tasks/{id}/claims``), which grants each
instant to one agent of the task.

- **granted**: the instant runs as any other (the admission rules still apply; a skip is
  recorded, since this agent is the one the execution expects).
- **held** by another agent: nothing is recorded here for that instant.
- **wait**: another agent is preferred; ask again when the server says (a timer: the
  reactor never waits), unless that is at or past the task's next instant.
- **refused**, or **no answer** (the server is unreachable, or answers what no
  taskscheduler server does): the instant is not run, and nothing is recorded. A
  run-on-one task needs the server: without it no agent can know it is the only one.

Lateness is counted from when the agent may ask (the instant, or the end of a wait), to
when it asks: an agent that is on time is not held back by the server's round trip. An
agent that comes to ask later than its starting deadline gives up (it is overloaded: the
rule of :func:`~taskscheduler.agent.admission.refusal`), leaving the instant to another.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from taskscheduler.agent.server_client import Claimed, Refused, RetryLater
from taskscheduler.protocol import TaskSpec, Trigger
from taskscheduler.protocol.claims import GRANTED, HELD, WAIT
from taskscheduler.protocol.options import RunOn
from taskscheduler.schedule import format_instant

#: Shortest wait for a claim's answer, however close the task's next instant is.
MIN_CLAIM_TIMEOUT = 0.5


class ClaimClient(Protocol):
    """What :class:`~taskscheduler.agent.server_client.ServerClient` provides."""

    async def claim(
        self, task_id: uuid.UUID, scheduled_at: datetime, revision: int, *, timeout: float
    ) -> Claimed | Refused | RetryLater: ...


def needs_claim(spec: TaskSpec, trigger: Trigger) -> bool:
    """Whether this instant is claimed before it runs: a scheduled instant of a
    run-on-one task (a run-now is delivered to one agent only: never claimed)."""
    return trigger is Trigger.SCHEDULE and spec.options.run_on is RunOn.ONE


class Claims:
    """Claims instants, each on its own; ``now`` is the label timeline's clock, and
    ``deadline(spec)`` the seconds late past which an instant of ``spec`` is not started."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        client: ClaimClient,
        now: Callable[[], datetime],
        deadline: Callable[[TaskSpec], float],
    ) -> None:
        self._clock = clock
        self._client = client
        self._now = now
        self._deadline = deadline
        self._pending: dict[tuple[uuid.UUID, datetime], Deferred[None]] = {}
        #: Instants this agent did not run because it could not ask the server.
        self.unreachable = 0

    def claim(
        self, spec: TaskSpec, scheduled_at: datetime, granted: Callable[[float], None]
    ) -> None:
        """Claim ``scheduled_at`` of ``spec``; once granted, call ``granted`` with the
        seconds the agent was late when it asked (never raises)."""
        key = (spec.task_id, scheduled_at)
        if key in self._pending:
            return  # (an instant fires once; a second claim would change nothing)
        d = Deferred.fromCoroutine(self._claim(spec, scheduled_at, granted))
        if not d.called:
            self._pending[key] = d

            def done(_: object) -> None:
                self._pending.pop(key, None)

            d.addBoth(done)

    def stop(self) -> None:
        """Claim no more, and start nothing a claim under way would be granted."""
        for d in list(self._pending.values()):
            d.cancel()
        self._pending.clear()

    async def _claim(
        self, spec: TaskSpec, scheduled_at: datetime, granted: Callable[[float], None]
    ) -> None:
        try:
            await self._ask(spec, scheduled_at, granted)
        except CancelledError:
            pass  # stopped
        except Exception:
            self.log.failure(
                "task {task_id}: claiming {scheduled_at} failed; not run",
                task_id=str(spec.task_id),
                scheduled_at=format_instant(scheduled_at),
            )

    async def _ask(
        self, spec: TaskSpec, scheduled_at: datetime, granted: Callable[[float], None]
    ) -> None:
        task_id, at = str(spec.task_id), format_instant(scheduled_at)
        next_instant = spec.schedule.next_after(scheduled_at)
        may_ask_from = scheduled_at
        while True:
            asked = self._now()
            late = (asked - may_ask_from).total_seconds()
            if late > self._deadline(spec):
                self.log.warn(
                    "task {task_id}: did not claim {scheduled_at}: the agent came to it "
                    "{late:.1f}s late (overloaded); another agent may run it",
                    task_id=task_id,
                    scheduled_at=at,
                    late=late,
                )
                return
            timeout = max(MIN_CLAIM_TIMEOUT, (next_instant - asked).total_seconds())
            answer = await self._client.claim(
                spec.task_id, scheduled_at, spec.revision, timeout=timeout
            )
            if isinstance(answer, Claimed) and answer.status == GRANTED:
                granted(late)
                return
            if isinstance(answer, Claimed) and answer.status == HELD:
                self.log.debug(
                    "task {task_id}: {scheduled_at} runs on another agent",
                    task_id=task_id,
                    scheduled_at=at,
                )
                return
            if isinstance(answer, Claimed) and answer.status == WAIT:
                if self._now() + timedelta(seconds=answer.retry_after) >= next_instant:
                    return  # the next instant comes first: this one is not ours
                await deferLater(self._clock, answer.retry_after, lambda: None)
                may_ask_from = self._now()
                continue
            if isinstance(answer, Refused):
                self.log.warn(
                    "task {task_id}: not run at {scheduled_at}: the server refused the "
                    "claim ({reason})",
                    task_id=task_id,
                    scheduled_at=at,
                    reason=answer.reason,
                )
                return
            self.unreachable += 1
            self.log.warn(
                "task {task_id}: not run at {scheduled_at}: it runs on one agent and the "
                "server, which chooses it, could not be asked ({reason})",
                task_id=task_id,
                scheduled_at=at,
                reason=getattr(answer, "reason", repr(answer)),
            )
            return
