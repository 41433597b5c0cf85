"""Pushes tasks to agents until each agent has acknowledged every task assigned to it,
and tells them to drop deleted tasks until each has confirmed it did.

The store remembers, per (task, agent), whether the agent acknowledged the task and
whether it still has to drop it, so nothing here needs to survive a restart. For each
agent an :class:`AgentLink`:

- delivers undelivered tasks, oldest first, in batches (``POST {agent}/api/v1/tasks/schedule``
  with ``{"tasks": [...]}``: one signature and one round trip for up to ``batch_size``
  tasks or ``batch_bytes`` of them) and removals of
  deleted tasks (``DELETE {agent}/api/v1/tasks/{task_id}``) as soon as it is kicked (a
  task was created or deleted) and again after failures, with exponential back-off and
  jitter while the agent is unreachable. Deliveries and removals go out together and
  neither waits on the other: a task the agent refuses (a 4xx answer) is offered again
  after the back-off, but removals and other tasks go on, and an agent that answers is
  sent a new task at once rather than after the back-off;
- reconciles every ``reconcile_interval`` seconds (``GET {agent}/api/v1/agent/tasks``):
  a task the agent should have but does not (its data folder was wiped, say) is marked
  undelivered and sent again; a deleted task it still has is removed again. An agent
  that was down when a task was created or deleted hears of it on the first pass after
  it comes back.

Every request is signed (:mod:`taskscheduler.signing`) for the agent enrolled at the
link's URL, the only identity that accepts it; until an agent has enrolled there, the
link has nobody to send to and backs off.

An agent is not trusted with the server's memory: an answer is read up to a bound
(:func:`taskscheduler.httpclient.read_body`) and refused past it, the connection dropped.
An instruction's answer gets ``max_answer_bytes``; the task list, which grows with the
agent's tasks, gets ``list_answer_floor_bytes`` plus ``LIST_BYTES_PER_TASK`` for each
task assigned to the agent.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler import protocol
from taskscheduler.backoff import backoff_delay
from taskscheduler.httpclient import read_body
from taskscheduler.server.store.interface import Store, Task
from taskscheduler.signing import InstructionSigner

#: Seconds to wait for an agent's answer.
REQUEST_TIMEOUT = 10.0
#: Most tasks in one delivery request (the agent takes up to 1000).
DEFAULT_BATCH_SIZE = 200
#: Most bytes of task specs in one delivery request (the agent takes a 1 MiB body); a
#: larger task goes alone.
DEFAULT_BATCH_BYTES = 512 * 1024
#: Largest answer read from an agent to an instruction (a batch's answer is ~100 bytes a task).
DEFAULT_MAX_ANSWER_BYTES = 1024 * 1024
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
        self.url = url.rstrip("/")
        self._store = store
        self._http = http
        self._clock = clock
        self._signer = signer
        self._reconcile_interval = reconcile_interval
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        # A pass takes enough undelivered tasks to keep every concurrent request busy.
        self._page_size = batch_size * concurrency
        self._max_answer_bytes = max_answer_bytes
        self._list_answer_floor_bytes = list_answer_floor_bytes
        self._semaphore = DeferredSemaphore(concurrency)
        self._jitter = jitter
        #: The agent refused a batch whole: it predates them (an upgrade under way), so
        #: it is sent one task a request until a new agent enrols at the URL.
        self._one_by_one = False
        self._failures = 0
        #: The last pass failed only because the agent refused some requests: it answers,
        #: so a kick need not wait for the back-off.
        self._only_refused = False
        self._pending: IDelayedCall | None = None
        self._delivering = False
        self._again = False
        self._reconciler = LoopingCall(self._reconcile_safely)
        self._reconciler.clock = clock
        self._stopped = True

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self._reconciler.start(self._reconcile_interval, now=True)

    def stop(self) -> None:
        self._stopped = True
        if self._reconciler.running:
            self._reconciler.stop()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    def kick(self) -> None:
        """Deliver what is undelivered now (or right after the pass under way)."""
        if self._stopped:
            return
        if self._delivering:
            self._again = True
            return
        if self._pending is not None and self._pending.active():
            if self._failures and not self._only_refused:
                return  # backing off: an unreachable agent is not hammered on every create
            self._pending.cancel()
        self._pending = self._clock.callLater(0, self._deliver_safely)

    async def new_identity(self) -> None:
        """A new agent enrolled at this URL: it has none of the URL's tasks yet."""
        assigned = await self._store.assigned_task_ids(self.url)
        await self._store.mark_undelivered(self.url, sorted(assigned))
        self._one_by_one = False
        self.retry_now()

    def retry_now(self) -> None:
        """Forget the back-off and deliver now."""
        self._failures = 0
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self.kick()

    # -- signed requests ---------------------------------------------------------------

    async def _audience(self) -> uuid.UUID | None:
        """The identity enrolled at this URL, the only one our requests are signed for."""
        if self._signer is None:
            return None
        agent = await self._store.agent_for_url(self.url)
        if agent is None:
            raise _DeliveryFailed("no agent has enrolled at this URL yet")
        return agent.agent_id

    def _headers(
        self, method: str, url: str, body: bytes, audience: uuid.UUID | None
    ) -> dict[bytes, list[bytes]]:
        headers = {b"Content-Type": [b"application/json"]}
        if self._signer is None or audience is None:
            return headers
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authorization = self._signer.authorization(method, path, audience, body)
        headers[b"Authorization"] = [authorization.encode("ascii")]
        return headers

    # -- delivery ----------------------------------------------------------------------

    def _deliver_safely(self) -> Deferred[None]:
        self._pending = None
        return Deferred.fromCoroutine(self._deliver())

    async def _deliver(self) -> None:
        self._delivering = True
        try:
            while not self._stopped:
                self._again = False
                tasks = await self._store.undelivered_tasks(self.url, self._page_size)
                removals = await self._store.pending_removals(self.url, self._page_size)
                if not tasks and not removals:
                    break
                audience = await self._audience()
                # Both are sent whatever becomes of the other: a task the agent refuses
                # must not keep a deleted task running there, nor the reverse.
                task_errors = await self._deliver_tasks(tasks, audience)
                removal_errors = await self._deliver_removals(removals, audience)
                if task_errors or removal_errors:
                    raise _PassFailed(
                        [
                            problem
                            for problem in (
                                _summary(task_errors, len(tasks), "tasks not accepted"),
                                _summary(removal_errors, len(removals), "removals not confirmed"),
                            )
                            if problem
                        ],
                        only_refused=all(
                            isinstance(e, _Refused) for e in task_errors + removal_errors
                        ),
                    )
            self._failures = 0
            self._only_refused = False
        except Exception as e:
            self._failures += 1
            self._only_refused = isinstance(e, _PassFailed) and e.only_refused
            delay = self._backoff()
            self.log.warn(
                "could not deliver tasks to agent {url} ({error}); retrying in {delay:.1f}s",
                url=self.url,
                error=_describe(e),
                delay=delay,
            )
            if not self._stopped:
                self._pending = self._clock.callLater(delay, self._deliver_safely)
            return
        finally:
            self._delivering = False
        if self._again:
            self.kick()

    async def _deliver_tasks(
        self, tasks: Sequence[Task], audience: uuid.UUID | None
    ) -> list[BaseException]:
        """Send ``tasks`` and record those the agent accepted; the errors of the others."""
        if not tasks:
            return []
        batches = self._batches(tasks)
        results: list[tuple[bool, Any]] = await DeferredList(
            [self._semaphore.run(self._send_batch, batch, audience) for batch in batches],
            consumeErrors=True,
        )
        agent_id: uuid.UUID | None = None
        delivered: list[uuid.UUID] = []
        errors: list[BaseException] = []
        for batch, (ok, value) in zip(batches, results, strict=True):
            if not ok:
                errors.extend(value.value for _ in batch)
                continue
            answered_as, outcomes = value
            for (task, _), outcome in zip(batch, outcomes, strict=True):
                if outcome is None:
                    agent_id = answered_as
                    delivered.append(task.task_id)
                else:
                    errors.append(outcome)
        if delivered and agent_id is not None:
            await self._store.mark_delivered(self.url, delivered, agent_id)
            self.log.info(
                "delivered {count} tasks to agent {url}", count=len(delivered), url=self.url
            )
        return errors

    async def _deliver_removals(
        self, task_ids: Sequence[uuid.UUID], audience: uuid.UUID | None
    ) -> list[BaseException]:
        """Tell the agent to drop these deleted tasks and record those it confirmed; the
        errors of the others."""
        if not task_ids:
            return []
        results: list[tuple[bool, Any]] = await DeferredList(
            [self._semaphore.run(self._remove_one, task_id, audience) for task_id in task_ids],
            consumeErrors=True,
        )
        removed = [task_id for task_id, (ok, _) in zip(task_ids, results, strict=True) if ok]
        if removed:
            await self._store.mark_removed(self.url, removed)
            self.log.info(
                "agent {url} dropped {count} deleted tasks", count=len(removed), url=self.url
            )
        return [value.value for ok, value in results if not ok]

    def _remove_one(self, task_id: uuid.UUID, audience: uuid.UUID | None) -> Deferred[None]:
        return Deferred.fromCoroutine(self._remove(task_id, audience))

    async def _remove(self, task_id: uuid.UUID, audience: uuid.UUID | None) -> None:
        """Tell the agent to drop a deleted task (it answers 200 whether it had it or not)."""
        await self._instruct("DELETE", f"/api/v1/tasks/{task_id}", b"", audience)

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

    def _send_batch(
        self, batch: list[tuple[Task, bytes]], audience: uuid.UUID | None
    ) -> Deferred[tuple[uuid.UUID, list[BaseException | None]]]:
        return Deferred.fromCoroutine(self._send(batch, audience))

    async def _send(
        self, batch: list[tuple[Task, bytes]], audience: uuid.UUID | None
    ) -> tuple[uuid.UUID, list[BaseException | None]]:
        """Send a batch; who answered, and per task None (taken) or why not."""
        if self._one_by_one:
            return await self._send_singly(batch, audience)
        body = b'{"tasks":[' + b",".join(encoded for _, encoded in batch) + b"]}"
        try:
            answer = await self._instruct("POST", "/api/v1/tasks/schedule", body, audience)
        except _Refused as e:
            if e.status != 400:
                raise
            # An agent from before batches reads one as a malformed task (a signature it
            # refused, say, is 401: nothing to do with batches).
            self.log.warn(
                "agent {url} refused a batch of tasks ({error}); sending them one by one",
                url=self.url,
                error=str(e),
            )
            self._one_by_one = True
            return await self._send_singly(batch, audience)
        answered_as = protocol.parse_uuid(answer.get("agent_id"), "agent_id")
        results = answer.get("results")
        if not isinstance(results, list) or len(results) != len(batch):
            raise _DeliveryFailed("the agent's answer to a batch does not list every task")
        outcomes: list[BaseException | None] = []
        for (task, _), result in zip(batch, results, strict=True):
            if not isinstance(result, dict) or result.get("task_id") != str(task.task_id):
                outcomes.append(_DeliveryFailed("the agent's answer to a batch is out of order"))
            elif result.get("status") == "scheduled":
                outcomes.append(None)
            else:
                message = f"agent refused task {task.task_id}: {_error_message(result)}"
                error_field = result.get("error")
                code = error_field.get("code") if isinstance(error_field, dict) else None
                # A disk the agent could not write is its trouble, not the task's: back off.
                error = _DeliveryFailed if code == "storage_unavailable" else _Refused
                outcomes.append(error(message))
        return answered_as, outcomes

    async def _send_singly(
        self, batch: list[tuple[Task, bytes]], audience: uuid.UUID | None
    ) -> tuple[uuid.UUID, list[BaseException | None]]:
        """Send each task of a batch in a request of its own, as before batches."""
        answered_as: uuid.UUID | None = None
        outcomes: list[BaseException | None] = []
        for _, encoded in batch:
            try:
                answer = await self._instruct("POST", "/api/v1/tasks/schedule", encoded, audience)
                answered_as = protocol.parse_uuid(answer.get("agent_id"), "agent_id")
                outcomes.append(None)
            except Exception as e:
                outcomes.append(e)
        if answered_as is None:
            first = next(e for e in outcomes if e is not None)
            raise first
        return answered_as, outcomes

    async def _instruct(
        self,
        method: str,
        path: str,
        body: bytes,
        audience: uuid.UUID | None,
        max_answer_bytes: int | None = None,
    ) -> dict[str, Any]:
        """Send one signed instruction; its JSON answer, from the agent it was meant for.

        Raises _DeliveryFailed unless the agent answered 200 as ``audience`` (when known).
        """
        url = f"{self.url}{path}"
        response = await self._http.request(
            method,
            url,
            data=body or None,
            headers=self._headers(method, url, body, audience),
            timeout=REQUEST_TIMEOUT,
            reactor=self._clock,
            unbuffered=True,  # read_body bounds what is read; treq would read it all
        )
        try:
            raw = await read_body(
                response, max_answer_bytes or self._max_answer_bytes, self._clock, REQUEST_TIMEOUT
            )
        except Exception as e:
            raise _DeliveryFailed(f"{method} {path}: {type(e).__name__}: {e}") from e
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if response.code != 200:
            message = f"agent answered {response.code}: {_error_message(answer)}"
            if _is_refusal(response.code):
                raise _Refused(message, response.code)
            raise _DeliveryFailed(message)
        if not isinstance(answer, dict):
            raise _DeliveryFailed("the agent's answer is not a JSON object")
        answered = protocol.parse_uuid(answer.get("agent_id"), "agent_id")
        if audience is not None and answered != audience:
            raise _DeliveryFailed(f"the agent answered as {answered}, not as {audience}")
        return answer

    def _backoff(self) -> float:
        return backoff_delay(self._failures, self._retry_base, self._retry_cap, self._jitter)

    # -- reconciliation ----------------------------------------------------------------

    def _reconcile_safely(self) -> Deferred[None]:
        # A LoopingCall stops for good when its function fails: never let it.
        d = Deferred.fromCoroutine(self._reconcile())
        d.addErrback(self._reconcile_failed)
        return d

    def _reconcile_failed(self, failure: Failure) -> None:
        self.log.warn(
            "could not reconcile tasks with agent {url}: {error}",
            url=self.url,
            error=_describe(failure.value),
        )

    async def _reconcile(self) -> None:
        audience = await self._audience()
        assigned = await self._store.assigned_task_ids(self.url)
        # Read before the answer, to bound it by what the agent should hold. A task created
        # or deleted meanwhile is the business of the delivery it caused, not of this pass.
        bound = self._list_answer_floor_bytes + LIST_BYTES_PER_TASK * len(assigned)
        body = await self._instruct("GET", "/api/v1/agent/tasks", b"", audience, bound)
        has = {protocol.parse_uuid(t, "task_ids[]") for t in body.get("task_ids", [])}
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
                "agent {url} still has {count} deleted tasks; removing them again",
                url=self.url,
                count=len(deleted),
            )
        if missing or deleted or self._failures:
            # The agent answers again: deliver now rather than at the end of a back-off.
            self._failures = 0
            if self._pending is not None and self._pending.active():
                self._pending.cancel()
                self._pending = None
            self.kick()


class Dispatcher(Service):
    """One :class:`AgentLink` per agent of the fleet."""

    def __init__(
        self,
        store: Store,
        http: Any,
        clock: IReactorTime,
        agent_urls: Sequence[str],
        **link_options: Any,
    ) -> None:
        self.links = [AgentLink(url, store, http, clock, **link_options) for url in agent_urls]

    def startService(self) -> None:
        super().startService()
        for link in self.links:
            link.start()
            link.kick()

    def stopService(self) -> None:
        for link in self.links:
            link.stop()
        return super().stopService()

    def task_created(self, task: Task) -> None:
        for link in self.links:
            link.kick()

    def task_deleted(self, task: Task) -> None:
        for link in self.links:
            link.kick()

    def agent_enrolled(self, url: str) -> None:
        """An agent enrolled at ``url``: deliver it every task of its URL now, rather than
        after a back-off or at the next reconciliation."""
        for link in self.links:
            if link.url == url.rstrip("/"):
                d = Deferred.fromCoroutine(link.new_identity())
                d.addErrback(link._reconcile_failed)


class _DeliveryFailed(Exception):
    pass


class _Refused(_DeliveryFailed):
    """The agent answered, and said no to this one request (``status``, if the whole
    request was refused)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _PassFailed(Exception):
    """Some requests of a delivery pass failed; the others were recorded."""

    def __init__(self, problems: list[str], only_refused: bool) -> None:
        super().__init__("; ".join(problems))
        self.only_refused = only_refused


def _is_refusal(code: int) -> bool:
    """A 4xx that is about the request, not about the agent being busy or slow."""
    return 400 <= code < 500 and code not in (408, 429)


def _summary(errors: Sequence[BaseException], out_of: int, what: str) -> str | None:
    """One line for the log about ``errors`` among ``out_of`` requests, or None."""
    if not errors:
        return None
    return f"{len(errors)} of {out_of} {what} (first: {_describe(errors[0])})"


def _error_message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:200]
    return ""


def _describe(error: BaseException | None) -> str:
    return f"{type(error).__name__}: {error}"[:300]
