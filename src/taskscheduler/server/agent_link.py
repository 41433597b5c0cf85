"""One agent's link (the :class:`~taskscheduler.server.dispatch.Dispatcher` keeps one per
member of the fleet): it pushes tasks to the agent until it has acknowledged every task
assigned to it (at its current revision), tells it to drop deleted and paused tasks until
it confirmed it did, and of run-nows until it acknowledged each or its deadline passed.

The store remembers, per (task, agent), whether the agent acknowledged the task and
whether it still has to drop it, so nothing here needs to survive a restart. For each
agent an :class:`AgentLink`:

- delivers undelivered tasks, oldest first, in batches (``POST {agent}/api/v1/tasks/schedule``
  with ``{"tasks": [...]}``: one signature and one round trip for up to ``batch_size``
  tasks or ``batch_bytes`` of them) and removals of deleted tasks (``DELETE
  {agent}/api/v1/tasks/{task_id}``) and run-nows (``POST {agent}/api/v1/tasks/{task_id}/run``)
  as soon as it is kicked (a task was created, changed, paused, resumed, run or
  deleted) and again after failures, with exponential back-off and jitter while the
  agent is unreachable. Deliveries and removals go out together and neither waits on
  the other: a task the agent refuses (a 4xx answer) is offered again after the
  back-off, but removals and other tasks go on, and an agent that answers is sent a new
  task at once rather than after the back-off;
- reconciles every ``reconcile_interval`` seconds (``GET {agent}/api/v1/agent/tasks``):
  a task the agent should have but does not (its data folder was wiped, say) is marked
  undelivered and sent again; a deleted task it still has is removed again. An agent
  that was down when a task was created or deleted hears of it on the first pass after
  it comes back.

Every request is signed (:mod:`taskscheduler.signing`) for the agent enrolled at the
link's URL, the only identity that accepts it; until an agent has enrolled there, the
link has nobody to send to and backs off.

The requests and the reading of their answers are
:class:`taskscheduler.server.agent_client.AgentClient`'s; what is here is the policy.
An instruction's answer is read within ``max_answer_bytes``; the task list, which grows
with the agent's tasks, within ``list_answer_floor_bytes`` plus ``LIST_BYTES_PER_TASK``
for each task assigned to the agent.

The module runs past 400 lines because delivering, removing, run-nows and reconciling are
one policy for one agent: they share its back-off, its identity and its pass; split, each
part would reach into the others' state.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler import protocol
from taskscheduler.httpclient import describe
from taskscheduler.retry import Backoff, RetryLoop
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.agent_client import (
    DEFAULT_MAX_ANSWER_BYTES,
    Accepted,
    AgentClient,
    BatchAnswered,
    Failed,
    Outcome,
    Refused,
    TaskList,
)
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import ManualRun, Task
from taskscheduler.signing import InstructionSigner

#: Most tasks in one delivery request (the agent takes up to 1000).
DEFAULT_BATCH_SIZE = 200
#: Most bytes of task specs in one delivery request (the agent takes a 1 MiB body); a
#: larger task goes alone.
DEFAULT_BATCH_BYTES = 512 * 1024
#: Room for the task list whatever the number of tasks: about 100,000 task ids.
DEFAULT_LIST_ANSWER_FLOOR_BYTES = 4 * 1024 * 1024
#: And per task assigned to the agent: an id takes 40 bytes in the list, twice that for
#: the tasks created or deleted while the answer was on its way.
LIST_BYTES_PER_TASK = 80


class AgentLink:
    """Delivery and reconciliation for one agent, identified by its base URL."""

    log = Logger()

    def __init__(
        self,
        url: str,
        store: Store,
        http: Any,  # a DaemonHTTP, or a treq.testing.StubTreq in tests
        clock: IReactorTime,
        *,
        signer: InstructionSigner | None = None,
        reconcile_interval: float = 30.0,
        retry_base: float = 1.0,
        retry_cap: float = 60.0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        concurrency: int = 8,
        jitter: Callable[[], float] = random.random,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        list_answer_floor_bytes: int = DEFAULT_LIST_ANSWER_FLOOR_BYTES,
    ) -> None:
        self.client = AgentClient(url, http, clock, signer, max_answer_bytes=max_answer_bytes)
        self.url = self.client.url
        self._store = store
        self._clock = clock
        self._signed = signer is not None
        self._reconcile_interval = reconcile_interval
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        # A pass takes enough undelivered tasks to keep every concurrent request busy.
        self._page_size = batch_size * concurrency
        self._list_answer_floor_bytes = list_answer_floor_bytes
        self._semaphore = DeferredSemaphore(concurrency)
        #: The agent refused a batch whole: it predates them (an upgrade under way), so
        #: it is sent one task a request until a new agent enrols at the URL.
        self._one_by_one = False
        #: The last pass failed only because the agent refused some requests: it answers,
        #: so a kick need not wait for the back-off.
        self._only_refused = False
        #: The identity enrolled at the URL, as last read (None: read it again). A stale
        #: one costs a failed request, never a delivery: the agent answers as itself.
        self._identity: uuid.UUID | None = None
        self._delivery = RetryLoop(
            clock, self._deliver, Backoff(retry_base, retry_cap, jitter), self._delivery_failed
        )
        self._reconciler = LoopingCall(self._reconcile_safely)
        self._reconciler.clock = clock

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        self._delivery.start()
        self._reconciler.start(self._reconcile_interval, now=True)

    def stop(self) -> None:
        self._delivery.stop()
        if self._reconciler.running:
            self._reconciler.stop()

    def kick(self) -> None:
        """Deliver what is undelivered now (or right after the pass under way); an
        unreachable agent is not hammered on every create, but one that only refused
        some requests answers, and is sent new tasks at once."""
        self._delivery.kick(through_backoff=self._only_refused)

    def new_identity(self) -> None:
        """A new agent enrolled at this URL: it has none of the URL's tasks yet."""
        Deferred.fromCoroutine(self._new_identity()).addErrback(self._reconcile_failed)

    def forget_identity(self) -> None:
        """The agent at this URL may have changed (enrolled, revoked): read it again."""
        self._identity = None

    async def _new_identity(self) -> None:
        self._identity = None
        assigned = await self._store.assigned_task_ids(self.url)
        await self._store.mark_undelivered(self.url, sorted(assigned))
        self._one_by_one = False
        self.retry_now()

    def retry_now(self) -> None:
        """Forget the back-off and deliver now."""
        self._delivery.retry_now()

    async def _audience(self) -> uuid.UUID | None:
        """The identity enrolled at this URL, the only one our requests are signed for."""
        if not self._signed:
            return None
        if self._identity is not None:
            return self._identity
        agent = await self._store.agent_for_url(self.url)
        if agent is None:
            raise _DeliveryFailed("no agent has enrolled at this URL yet")
        self._identity = agent.agent_id
        return agent.agent_id

    # -- delivery ----------------------------------------------------------------------

    async def _deliver(self) -> None:
        """One pass: every undelivered task and pending removal, page by page; raises if
        any was not done (the retry loop backs off)."""
        self._only_refused = False
        while not self._delivery.stopped:
            tasks = await self._store.undelivered_tasks(self.url, self._page_size)
            removals = await self._store.pending_removals(self.url, self._page_size)
            now = utc_now_from(self._clock.seconds())
            runs = await self._store.pending_manual_runs(self.url, now, self._page_size)
            if not tasks and not removals and not runs:
                return
            audience = await self._audience()
            # Each is sent whatever becomes of the others: a task the agent refuses
            # must not keep a deleted task running there, nor the reverse.
            task_errors = await self._deliver_tasks(tasks, audience)
            removal_errors = await self._deliver_removals(removals, audience)
            run_errors = await self._deliver_runs(runs, audience)
            if task_errors or removal_errors or run_errors:
                self._only_refused = all(
                    isinstance(e, Refused) for e in task_errors + removal_errors + run_errors
                )
                raise _PassFailed(
                    [
                        problem
                        for problem in (
                            _summary(task_errors, len(tasks), "tasks not accepted"),
                            _summary(removal_errors, len(removals), "removals not confirmed"),
                            _summary(run_errors, len(runs), "run-nows not acknowledged"),
                        )
                        if problem
                    ]
                )
            if max(len(tasks), len(removals), len(runs)) < self._page_size:
                # All there was: what becomes due meanwhile kicks another pass.
                return

    def _delivery_failed(self, error: Exception, delay: float) -> None:
        if not isinstance(error, _PassFailed):
            self._only_refused = False
        self._identity = None  # perhaps another agent answers at the URL now
        self.log.warn(
            "could not deliver tasks to agent {url} ({error}); retrying in {delay:.1f}s",
            url=self.url,
            error=describe(error),
            delay=delay,
        )

    async def _deliver_tasks(
        self, tasks: Sequence[Task], audience: uuid.UUID | None
    ) -> list[Refused | Failed]:
        """Send ``tasks`` and record those the agent accepted; why the others were not."""
        if not tasks:
            return []
        batches = self._batches(tasks)
        results: list[tuple[bool, Any]] = await DeferredList(
            [self._semaphore.run(self._send, batch, audience) for batch in batches],
            consumeErrors=True,
        )
        agent_id: uuid.UUID | None = None
        delivered: list[Task] = []
        errors: list[Refused | Failed] = []
        for batch, (ok, value) in zip(batches, results, strict=True):
            if not ok:
                errors.extend(Failed(describe(value.value)) for _ in batch)
                continue
            for (task, _), outcome in zip(batch, value, strict=True):
                if isinstance(outcome, Accepted):
                    agent_id = outcome.agent_id
                    delivered.append(task)
                else:
                    errors.append(outcome)
        if delivered and agent_id is not None:
            # At the revision sent: one changed meanwhile is still due.
            await self._store.mark_delivered(
                self.url,
                [t.task_id for t in delivered],
                agent_id,
                [t.spec.revision for t in delivered],
            )
            self.log.info(
                "delivered {count} tasks to agent {url}", count=len(delivered), url=self.url
            )
        return errors

    async def _deliver_removals(
        self, task_ids: Sequence[uuid.UUID], audience: uuid.UUID | None
    ) -> list[Refused | Failed]:
        """Tell the agent to drop these deleted tasks and record those it confirmed; why
        the others were not."""
        if not task_ids:
            return []
        results: list[tuple[bool, Any]] = await DeferredList(
            [self._semaphore.run(self.client.unschedule, t, audience) for t in task_ids],
            consumeErrors=True,
        )
        outcomes: list[Outcome] = [
            value if ok else Failed(describe(value.value)) for ok, value in results
        ]
        removed = [
            task_id
            for task_id, outcome in zip(task_ids, outcomes, strict=True)
            if isinstance(outcome, Accepted)
        ]
        if removed:
            await self._store.mark_removed(self.url, removed)
            self.log.info(
                "agent {url} dropped {count} tasks (deleted, paused or no longer targeted at it)",
                count=len(removed),
                url=self.url,
            )
        return [outcome for outcome in outcomes if not isinstance(outcome, Accepted)]

    async def _deliver_runs(
        self, runs: Sequence[ManualRun], audience: uuid.UUID | None
    ) -> list[Refused | Failed]:
        """Tell the agent of these run-nows and record those it acknowledged; why the
        others were not (they are sent again until their deadline)."""
        if not runs:
            return []
        results: list[tuple[bool, Any]] = await DeferredList(
            [
                self._semaphore.run(
                    self.client.run_now, run.spec, run.scheduled_at, run.revision, audience
                )
                for run in runs
            ],
            consumeErrors=True,
        )
        outcomes: list[Outcome] = [
            value if ok else Failed(describe(value.value)) for ok, value in results
        ]
        done = [
            (run.spec.task_id, run.scheduled_at)
            for run, outcome in zip(runs, outcomes, strict=True)
            if isinstance(outcome, Accepted)
        ]
        if done:
            await self._store.mark_manual_delivered(self.url, done)
            self.log.info("agent {url} took {count} run-nows", count=len(done), url=self.url)
        return [outcome for outcome in outcomes if not isinstance(outcome, Accepted)]

    def _batches(self, tasks: Sequence[Task]) -> list[list[tuple[Task, bytes]]]:
        """``tasks`` with their JSON, in order, cut into requests within the bounds."""
        batches: list[list[tuple[Task, bytes]]] = []
        size = 0
        for task in tasks:
            encoded = json.dumps(protocol.task_spec_to_json(task.spec)).encode("utf-8")
            if (
                not batches
                or len(batches[-1]) >= self._batch_size
                or size + len(encoded) > self._batch_bytes
            ):
                batches.append([])
                size = 0
            batches[-1].append((task, encoded))
            size += len(encoded) + 1
        return batches

    async def _send(
        self, batch: list[tuple[Task, bytes]], audience: uuid.UUID | None
    ) -> list[Outcome]:
        """Send a batch; the outcome for each of its tasks."""
        if self._one_by_one:
            return await self._send_singly(batch, audience)
        specs = [(task.task_id, encoded) for task, encoded in batch]
        answer = await self.client.schedule_batch(specs, audience)
        if isinstance(answer, BatchAnswered):
            return answer.outcomes
        if isinstance(answer, Refused) and answer.status == 400:
            # An agent from before batches reads one as a malformed task (a signature it
            # refused, say, is 401: nothing to do with batches).
            self.log.warn(
                "agent {url} refused a batch of tasks ({error}); sending them one by one",
                url=self.url,
                error=str(answer),
            )
            self._one_by_one = True
            return await self._send_singly(batch, audience)
        return [answer for _ in batch]

    async def _send_singly(
        self, batch: list[tuple[Task, bytes]], audience: uuid.UUID | None
    ) -> list[Outcome]:
        """Send each task of a batch in a request of its own, as before batches."""
        return [await self.client.schedule(encoded, audience) for _, encoded in batch]

    # -- reconciliation ----------------------------------------------------------------

    def _reconcile_safely(self) -> Deferred[None]:
        # A LoopingCall stops for good when its function fails: never let it.
        d = Deferred.fromCoroutine(self._reconcile())
        d.addErrback(self._reconcile_failed)
        return d

    def _reconcile_failed(self, failure: Failure) -> None:
        self._identity = None
        self.log.warn(
            "could not reconcile tasks with agent {url}: {error}",
            url=self.url,
            error=describe(failure.value),
        )

    async def _reconcile(self) -> None:
        audience = await self._audience()
        assigned = await self._store.assigned_task_ids(self.url)
        # Read before the answer, to bound it by what the agent should hold. A task created
        # or deleted meanwhile is the business of the delivery it caused, not of this pass.
        bound = self._list_answer_floor_bytes + LIST_BYTES_PER_TASK * len(assigned)
        listed = await self.client.list_tasks(audience, bound)
        if not isinstance(listed, TaskList):
            raise _DeliveryFailed(str(listed))
        has = listed.task_ids
        missing = sorted(assigned - has)
        if missing:
            self.log.info(
                "agent {url} lacks {count} of its tasks; sending them again",
                url=self.url,
                count=len(missing),
            )
            await self._store.mark_undelivered(self.url, missing)
        deleted = await self._store.request_removal(self.url, sorted(has - assigned))
        if deleted:
            self.log.info(
                "agent {url} still has {count} tasks it should not (deleted or no longer "
                "targeted at it); removing them again",
                url=self.url,
                count=len(deleted),
            )
        if missing or deleted or self._delivery.failures:
            # The agent answers again: deliver now rather than at the end of a back-off.
            self._delivery.retry_now()


class _DeliveryFailed(Exception):
    pass


class _PassFailed(Exception):
    """Some requests of a delivery pass failed; the others were recorded."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))


def _summary(errors: Sequence[Refused | Failed], out_of: int, what: str) -> str | None:
    """One line for the log about ``errors`` among ``out_of`` requests, or None."""
    if not errors:
        return None
    return f"{len(errors)} of {out_of} {what} (first: {type(errors[0]).__name__}: {errors[0]})"
