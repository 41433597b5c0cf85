"""Pushes tasks to agents until each agent has acknowledged every task assigned to it,
and tells them to drop deleted tasks until each has confirmed it did.

The store remembers, per (task, agent), whether the agent acknowledged the task and
whether it still has to drop it, so nothing here needs to survive a restart. For each
agent an :class:`AgentLink`:

- delivers undelivered tasks (``POST {agent}/api/v1/tasks/schedule``) and removals of
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
from taskscheduler.server.store import Store, Task
from taskscheduler.signing import InstructionSigner

#: Seconds to wait for an agent's answer.
REQUEST_TIMEOUT = 10.0


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
        batch_size: int = 100,
        concurrency: int = 8,
        jitter: Callable[[], float] = random.random,
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
        self._semaphore = DeferredSemaphore(concurrency)
        self._jitter = jitter
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
                tasks = await self._store.undelivered_tasks(self.url, self._batch_size)
                removals = await self._store.pending_removals(self.url, self._batch_size)
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
        results: list[tuple[bool, Any]] = await DeferredList(
            [self._semaphore.run(self._send_one, task, audience) for task in tasks],
            consumeErrors=True,
        )
        agent_id: uuid.UUID | None = None
        delivered: list[uuid.UUID] = []
        errors: list[BaseException] = []
        for task, (ok, value) in zip(tasks, results, strict=True):
            if ok:
                agent_id = value
                delivered.append(task.task_id)
            else:
                errors.append(value.value)
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

    def _send_one(self, task: Task, audience: uuid.UUID | None) -> Deferred[uuid.UUID]:
        return Deferred.fromCoroutine(self._send(task, audience))

    async def _send(self, task: Task, audience: uuid.UUID | None) -> uuid.UUID:
        body = json.dumps(protocol.task_spec_to_json(task.spec)).encode("utf-8")
        answer = await self._instruct("POST", "/api/v1/tasks/schedule", body, audience)
        return protocol.parse_uuid(answer.get("agent_id"), "agent_id")

    async def _instruct(
        self, method: str, path: str, body: bytes, audience: uuid.UUID | None
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
        )
        answer = await self._http.json_content(response)
        if response.code != 200:
            error = _Refused if _is_refusal(response.code) else _DeliveryFailed
            raise error(f"agent answered {response.code}: {_error_message(answer)}")
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
        body = await self._instruct("GET", "/api/v1/agent/tasks", b"", audience)
        has = {protocol.parse_uuid(t, "task_ids[]") for t in body.get("task_ids", [])}
        assigned = await self._store.assigned_task_ids(self.url)
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
    """The agent answered, and said no to this one request."""


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
