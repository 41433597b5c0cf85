"""What simulated agents (:mod:`bench.fleetsim`) run and report: each instant of each
task an agent holds becomes a synthetic result (nothing is spawned), reported like the
real agent's :class:`~taskscheduler.agent.reporter.Reporter` does.

- :class:`SimRuns`: one timer per task, shared by the agents holding it. At each of the
  task's instants (its schedule, as :func:`protocol.parse_task_spec` read it), every
  agent that held the task before that instant "runs" it: ``run_seconds`` later a
  ``succeeded`` result (exit code 0, a line of output) of the revision it holds is
  handed to the reporter. An agent that got the task after the instant does not run it,
  as a real agent schedules from the moment a task arrives.
- :class:`SimReporter`: per agent, an outbox (the real agent's spool, in memory) and one
  request in flight, with the agent's own credential: one result waiting goes alone
  (``POST /api/v1/tasks/{id}/complete``), more go as one batch (``POST /api/v1/results``,
  at most ``MAX_BATCH``), as the real reporter chooses, through the agent's own
  :class:`~taskscheduler.agent.server_client.ServerClient`, which reads the answers and
  fails over between the replicas it was given as a real agent's does (no connection,
  no answer in time, a 5xx: the next replica, at once). A request no replica gave a
  verdict on keeps its results for a retry after the real reporter's back-off (1 s
  doubling to 30 s, jittered).

The bodies are :func:`taskscheduler.agent.spool.encode_result` of a
:class:`~taskscheduler.protocol.RunResult`, so the server reads exactly what a real
agent sends (a unit test parses them back with the server's own parser).
"""

from __future__ import annotations

import collections
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from taskscheduler.agent.server_client import (
    Acknowledged,
    BatchAnswered,
    Refused,
    RetryLater,
    SendSingly,
    ServerClient,
    TooLarge,
)
from taskscheduler.agent.spool import encode_result
from taskscheduler.protocol import MAX_BATCH, Output, ResultStatus, RunResult
from taskscheduler.retry import Backoff
from taskscheduler.schedule import Schedule, utc_now_from

#: The real reporter's back-off: 1 s doubling up to 30 s.
RETRY_BASE = 1.0
RETRY_CAP = 30.0


def result_body(
    agent_id: uuid.UUID,
    task_id: uuid.UUID,
    scheduled_at: datetime,
    revision: int,
    run_seconds: float,
    finished_at: datetime | None = None,
) -> bytes:
    """The wire body of a synthetic successful run of ``scheduled_at`` (as the agent's
    spool encodes it), ended ``run_seconds`` after its instant, or at ``finished_at``."""
    started = scheduled_at
    ended = finished_at if finished_at is not None else started + timedelta(seconds=run_seconds)
    line = f"sim {scheduled_at.isoformat()}\n".encode()
    result = RunResult(
        task_id=task_id,
        agent_id=agent_id,
        scheduled_at=scheduled_at,
        status=ResultStatus.SUCCEEDED,
        exit_code=0,
        started_at=started,
        finished_at=max(started, ended),
        stdout=Output.of(line),
        revision=revision,
    )
    return encode_result(result)


class Agent(Protocol):
    """What runs and reports need of a simulated agent (:class:`bench.fleetsim.SimAgent`)."""

    index: int
    agent_id: uuid.UUID
    client: ServerClient
    tasks: dict[uuid.UUID, int]
    arrived: dict[uuid.UUID, float]


@dataclass
class Outbox:
    """One agent's results not yet acknowledged (its spool), oldest first."""

    pending: collections.deque[tuple[uuid.UUID, datetime, bytes]] = field(
        default_factory=collections.deque
    )
    sending: bool = False
    backoff: Backoff = field(default_factory=lambda: Backoff(RETRY_BASE, RETRY_CAP))


@dataclass
class ReportStats:
    requests: int = 0
    single: int = 0
    batches: int = 0
    acknowledged: int = 0
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    failed_requests: int = 0
    #: (agent index, instant, acknowledged) of each acknowledged result, POSIX seconds.
    acks: list[tuple[int, float, float]] = field(default_factory=list)

    def counters(self) -> dict[str, Any]:
        return {
            "report_requests": self.requests,
            "report_single": self.single,
            "report_batches": self.batches,
            "acknowledged": self.acknowledged,
            "refused": sum(self.refused.values()),
            "refused_by": dict(self.refused.most_common(5)),
            "failed_requests": self.failed_requests,
        }


class SimReporter:
    """Reports the simulated agents' results, each through its own client (its
    credential, its replicas)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        batch_size: int = MAX_BATCH,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._reactor = reactor
        self._batch_size = batch_size
        self._jitter = jitter
        self._outboxes: dict[uuid.UUID, Outbox] = {}
        self._timers: list[Any] = []
        self.stats = ReportStats()
        self.stopped = False

    def outbox(self, agent: Agent) -> Outbox:
        box = self._outboxes.get(agent.agent_id)
        if box is None:
            box = self._outboxes[agent.agent_id] = Outbox(
                backoff=Backoff(RETRY_BASE, RETRY_CAP, self._jitter)
            )
        return box

    def waiting(self) -> int:
        """Results not acknowledged yet, over every agent."""
        return sum(len(box.pending) for box in self._outboxes.values())

    def add(self, agent: Agent, task_id: uuid.UUID, scheduled_at: datetime, body: bytes) -> None:
        """Spool one result and send it (unless a send or a back-off is under way)."""
        box = self.outbox(agent)
        box.pending.append((task_id, scheduled_at, body))
        if not box.sending and not self.stopped:
            box.sending = True
            Deferred.fromCoroutine(self._drain(agent, box)).addErrback(self._crashed)

    def stop(self) -> None:
        self.stopped = True
        for timer in self._timers:
            if timer.active():
                timer.cancel()

    def _crashed(self, failure: Any) -> None:
        self.log.failure("the simulated reporter failed", failure)

    async def _drain(self, agent: Agent, box: Outbox) -> None:
        try:
            while box.pending and not self.stopped:
                batch = [box.pending[i] for i in range(min(self._batch_size, len(box.pending)))]
                if await self._send(agent, box, batch):
                    box.backoff.succeeded()
                else:
                    await self._sleep(box.backoff.failed())
        finally:
            box.sending = False

    def _sleep(self, seconds: float) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self._timers) > 1024:
            self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self._reactor.callLater(seconds, d.callback, None))
        return d

    async def _send(
        self, agent: Agent, box: Outbox, batch: list[tuple[uuid.UUID, datetime, bytes]]
    ) -> bool:
        """Send ``batch`` (the oldest pending results); whether all of it got a verdict."""
        self.stats.requests += 1
        verdicts: list[Any]
        if len(batch) == 1:
            self.stats.single += 1
            task_id, _, body = batch[0]
            verdicts = [await agent.client.report(task_id, body)]
        else:
            self.stats.batches += 1
            answer = await agent.client.report_batch([body for _, _, body in batch])
            if isinstance(answer, BatchAnswered):
                verdicts = list(answer.items)
            elif isinstance(answer, SendSingly | TooLarge):
                # Never for these small, well-formed bodies: counted as refused, loudly.
                verdicts = [Refused(f"batch refused whole: {answer.reason}")] * len(batch)
            else:
                verdicts = [answer]
        if len(verdicts) != len(batch) or (len(batch) == 1 and isinstance(verdicts[0], RetryLater)):
            # The request got no verdict: nothing leaves the outbox.
            self.stats.failed_requests += 1
            return False
        now = self._reactor.seconds()
        keep: list[tuple[uuid.UUID, datetime, bytes]] = []
        for item, verdict in zip(batch, verdicts, strict=True):
            if isinstance(verdict, Acknowledged):
                self.stats.acknowledged += 1
                self.stats.acks.append((agent.index, item[1].timestamp(), now))
            elif isinstance(verdict, Refused):
                self.stats.refused[verdict.reason[:80]] += 1
            else:
                keep.append(item)  # refused for now (too early): sent again after a back-off
        for _ in batch:
            box.pending.popleft()
        box.pending.extendleft(reversed(keep))
        return not keep


class SimRuns:
    """Runs the instants of the tasks the agents hold (synthetically), handing each
    result to ``reporter`` ``run_seconds`` after its instant."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        agents: Sequence[Agent],
        reporter: SimReporter,
        *,
        run_seconds: float = 0.01,
    ) -> None:
        self._reactor = reactor
        self._agents = agents  # the fleet's own list: agents made later are seen
        self._reporter = reporter
        self._run_seconds = run_seconds
        self._schedules: dict[uuid.UUID, Schedule] = {}
        self._timers: dict[uuid.UUID, Any] = {}
        self.instants = 0
        self.runs = 0

    def held(self, task_id: uuid.UUID, schedule: Schedule) -> None:
        """An agent was given ``task_id`` (or a revision of it): run its instants."""
        self._schedules[task_id] = schedule
        if task_id not in self._timers:
            self._arm(task_id)

    def stop(self) -> None:
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self._schedules.clear()

    def _arm(self, task_id: uuid.UUID) -> None:
        now = utc_now_from(self._reactor.seconds())
        at = self._schedules[task_id].next_after(now)
        delay = max(0.0, (at - now).total_seconds())
        self._timers[task_id] = self._reactor.callLater(delay, self._instant, task_id, at)

    def _instant(self, task_id: uuid.UUID, at: datetime) -> None:
        self.instants += 1
        moment = at.timestamp()
        runners = [
            (agent, agent.tasks[task_id])
            for agent in self._agents
            if task_id in agent.tasks and agent.arrived.get(task_id, moment) < moment
        ]
        if runners:
            # The run ends run_seconds after its instant (a late timer is not added to it).
            ends_in = max(0.0, moment + self._run_seconds - self._reactor.seconds())
            self._reactor.callLater(ends_in, self._finished, task_id, at, runners)
        if any(task_id in agent.tasks for agent in self._agents):
            self._arm(task_id)
        else:
            # Nobody holds it any more (deleted): no more instants until it comes back.
            del self._timers[task_id]

    def _finished(self, task_id: uuid.UUID, at: datetime, runners: list[tuple[Agent, int]]) -> None:
        ended = utc_now_from(self._reactor.seconds())
        for agent, revision in runners:
            self.runs += 1
            body = result_body(agent.agent_id, task_id, at, revision, 0.0, ended)
            self._reporter.add(agent, task_id, at, body)
