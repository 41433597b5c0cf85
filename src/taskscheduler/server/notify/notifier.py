"""The service that sends webhooks, off the result ingest path.

The results routes hand it the results they stored (:meth:`Notifier.results_stored`:
no I/O, the request answers at once). A single worker then takes them in order: looks
the task up (cached a few seconds, and told of changes any replica makes: a task with
no webhook and no server default costs no query per result), moves the webhook state in
the store, which says whether a notification is due, and hands each due one to a
sender. Senders POST the signed body with treq, bounded by a timeout, retried with
back-off (:func:`taskscheduler.retry.retry_until`) on no answer, 408, 429 and 5xx, and
given up on any other answer or after ``give_up_after`` seconds. At most
``max_sending`` run at once; each attempt is recorded in the store. Notifications still
pending when the server stops are sent again when it starts; among replicas (a
``claimant`` given), by the one that claims them (:mod:`taskscheduler.server.notify.claims`).

A receiver that never answers only ties up senders: the queue of results waiting to be
judged is bounded (``max_queued``; past it results are dropped, with a warning), and
nothing here is awaited by a request.
"""

from __future__ import annotations

import collections
import ipaddress
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorTime, IResolutionReceiver
from twisted.logger import Logger
from zope.interface import implementer

from taskscheduler.httpclient import NoAnswer, exchange
from taskscheduler.protocol import RunResult
from taskscheduler.protocol.notify import NotifyConfig, refused_address, refused_host
from taskscheduler.retry import Backoff, OutOfTime, retry_until
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.notify.claims import ClaimLapsing, Claims
from taskscheduler.server.notify.payload import body_bytes, signed_headers
from taskscheduler.server.notify.rules import (
    DeliveryStatus,
    Notification,
    Observed,
    agent_key,
    watched,
)
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.leases import Claimant
from taskscheduler.server.store.records import Task

DEFAULT_TIMEOUT = 10.0
DEFAULT_BACKOFF = (10.0, 600.0)  # seconds: first wait, longest wait
DEFAULT_GIVE_UP_AFTER = 3600.0
DEFAULT_MAX_QUEUED = 10_000
DEFAULT_MAX_SENDING = 8
#: Most results judged in one transaction.
BATCH = 1000
#: How long a task looked up is trusted (changes made through any replica: at once).
DEFAULT_CACHE_SECONDS = 10.0
#: Answers worth another try; any other non-2xx is the receiver refusing.
RETRIED_STATUSES = frozenset({408, 425, 429})
MAX_ANSWER_BYTES = 64 * 1024
_MAX_CACHED_TASKS = 100_000

Resolver = Callable[[str], Awaitable[list[str]]]


class _Retry(Exception):
    """This attempt failed in a way worth trying again."""


class _Refused(Exception):
    """The receiver refused it, or its address is one webhooks may not reach."""


class Notifier(Service):
    log = Logger()

    def __init__(
        self,
        store: Store,
        http: Any,
        clock: IReactorTime,
        secret: bytes,
        default: NotifyConfig | None = None,
        *,
        base_url: str | None = None,
        resolve: Resolver | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        backoff: tuple[float, float] = DEFAULT_BACKOFF,
        give_up_after: float = DEFAULT_GIVE_UP_AFTER,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_sending: int = DEFAULT_MAX_SENDING,
        cache_seconds: float = DEFAULT_CACHE_SECONDS,
        jitter: Callable[[], float] = random.random,
        claimant: Claimant | None = None,
        renew_every: float = 2.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._http = http
        self._clock = clock
        self._secret = secret
        self.default = default
        self._base_url = base_url
        self._resolve = resolve
        self._timeout = timeout
        self._backoff = backoff
        self._give_up_after = give_up_after
        self._max_queued = max_queued
        self._cache_seconds = cache_seconds
        self._jitter = jitter
        self._queue: collections.deque[RunResult] = collections.deque()
        self._draining: Deferred[None] | None = None
        self._slots = DeferredSemaphore(max_sending)
        self._sending: set[Deferred[None]] = set()
        self._tasks: dict[uuid.UUID, tuple[float, Task | None]] = {}
        self.dropped = 0
        self._claims = (
            None
            if claimant is None
            else Claims(store, clock, claimant, renew_every, monotonic, timeout, self._claimed)
        )

    # -- the ingest side: no I/O ---------------------------------------------------------

    def results_stored(self, results: Sequence[RunResult]) -> None:
        """Results just stored: judged later, in order, by the worker."""
        for result in results:
            if not watched(result):
                continue
            if len(self._queue) >= self._max_queued:
                self.dropped += 1
                if self.dropped == 1 or self.dropped % 1000 == 0:
                    self.log.warn(
                        "{count} result(s) dropped unjudged for webhooks: {queued} are "
                        "waiting already (is the database slow?)",
                        count=self.dropped,
                        queued=len(self._queue),
                    )
                continue
            self._queue.append(result)
        self._wake()

    def task_changed(self, task: Task) -> None:
        """This server created or changed ``task`` (or heard another replica did, and read
        it again): its webhook from now on."""
        self._tasks[task.task_id] = (self._clock.seconds() + self._cache_seconds, task)

    def forget_task(self, task_id: uuid.UUID) -> None:
        """``task_id`` may have changed (another replica's change): read it again."""
        self._tasks.pop(task_id, None)

    def forget_tasks(self) -> None:
        """Any task may have changed (changes of other replicas were missed)."""
        self._tasks.clear()

    # -- the service ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self._claims is None:
            self._track(Deferred.fromCoroutine(self._resume()))
        else:
            self._claims.start()  # claims what is pending, and sends it
        self._wake()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        # Among replicas, given back: another sends them at once.
        given_back = None if self._claims is None else self._claims.stop()
        for sending in list(self._sending):
            sending.cancel()  # still pending in the store: sent again at the next start
        if self._draining is not None:
            self._draining.cancel()
        return given_back

    def idle(self) -> bool:
        """Nothing queued, being judged or being sent (for tests)."""
        return not self._queue and self._draining is None and not self._sending

    async def _resume(self) -> None:
        """Send again what was pending when the server stopped."""
        try:
            for notification in await self._store.pending_notifications(1000):
                self._send(notification, await self._task(notification.task_id))
        except CancelledError:
            pass
        except Exception:
            self.log.failure("reading the webhooks still to send")

    async def _claimed(self, notification: Notification) -> None:
        if self.running:
            self._send(notification, await self._task(notification.task_id))

    def _wake(self) -> None:
        if not self.running or self._draining is not None or not self._queue:
            return
        draining = Deferred.fromCoroutine(self._drain())
        if not draining.called:  # (a store that answers at once has drained already)
            self._draining = draining

    async def _drain(self) -> None:
        try:
            while self._queue and self.running:
                # What queued meanwhile, judged in one transaction: a busy server's
                # results cost a round trip per batch, not per result.
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), BATCH))]
                try:
                    await self._observe(batch)
                except CancelledError:
                    return
                except Exception:
                    self.log.failure(
                        "judging {count} result(s) for webhooks (first: task {task_id})",
                        count=len(batch),
                        task_id=str(batch[0].task_id),
                    )
        finally:
            self._draining = None

    async def _task(self, task_id: uuid.UUID) -> Task | None:
        now = self._clock.seconds()
        cached = self._tasks.get(task_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        task = await self._store.get_task(task_id)
        if len(self._tasks) > _MAX_CACHED_TASKS:
            self._tasks.clear()
        self._tasks[task_id] = (now + self._cache_seconds, task)
        return task

    async def _observe(self, results: list[RunResult]) -> None:
        observed = []
        tasks: dict[uuid.UUID, Task] = {}
        for result in results:
            task = await self._task(result.task_id)
            config = None if task is None else task.spec.options.notify or self.default
            if task is None or config is None:
                continue
            tasks[task.task_id] = task
            observed.append(
                Observed(
                    task_id=result.task_id,
                    agent_id=result.agent_id,
                    agent_key=agent_key(task.spec.options.run_on, result.agent_id),
                    scheduled_at=result.scheduled_at,
                    status=result.status,
                    exit_code=result.exit_code,
                    config=config,
                )
            )
        if not observed:
            return  # no webhook for any of them: no store call at all
        if self._claims is None:
            made = await self._store.observe_results(observed, self._now())
        else:  # claimed at once by this replica, which sends them
            made = await self._store.observe_results(observed, self._now(), self._claims.claimant)
        for notification in made:
            self._send(notification, tasks.get(notification.task_id))

    # -- sending -------------------------------------------------------------------------

    def _now(self) -> datetime:
        return utc_now_from(self._clock.seconds())

    def _track(self, d: Deferred[None]) -> None:
        if d.called:
            return
        self._sending.add(d)

        def done(result: Any) -> None:
            self._sending.discard(d)

        d.addBoth(done)

    def _send(self, notification: Notification, task: Task | None) -> None:
        sending = Deferred.fromCoroutine(self._deliver(notification, task))
        if self._claims is not None:
            self._claims.sending(notification.notification_id, sending)
        self._track(sending)

    async def _deliver(self, notification: Notification, task: Task | None) -> None:
        try:
            await self._slots.acquire()
        except CancelledError:
            return
        try:
            await self._attempts(notification, task)
        except CancelledError:
            pass  # stopping: it stays pending, and is sent again at the next start
        except ClaimLapsing:
            self.log.warn(
                "webhook {id} left to another replica: this one could not renew its claim",
                id=notification.notification_id,
            )
        except Exception:
            self.log.failure("sending webhook {id}", id=notification.notification_id)
        finally:
            self._slots.release()

    async def _attempts(self, n: Notification, task: Task | None) -> None:
        body = body_bytes(n, task, self._base_url)
        attempts = n.attempts
        last: tuple[int | None, str | None] = (None, None)

        async def attempt() -> int:
            nonlocal attempts, last
            if self._claims is not None and not self._claims.may_attempt():
                raise ClaimLapsing()
            attempts += 1
            try:
                await self._check_address(n.url)
                headers = signed_headers(
                    self._secret, int(self._clock.seconds()), body, n.notification_id
                )
                answer = await exchange(
                    self._http,
                    self._clock,
                    "POST",
                    n.url,
                    body,
                    headers,
                    timeout=self._timeout,
                    max_answer_bytes=MAX_ANSWER_BYTES,
                    # A redirect is an answer, not a new target: it could lead anywhere,
                    # past the address check.
                    allow_redirects=False,
                )
            except (NoAnswer, CancelledError) as e:
                if not self.running:
                    raise  # stopping: the notification stays pending
                # (treq's own timeout may surface as a cancellation)
                why = str(e) if isinstance(e, NoAnswer) else f"no answer in {self._timeout:g}s"
                last = (None, why)
                await self._record(n, DeliveryStatus.PENDING, attempts, *last)
                raise _Retry() from e
            if 200 <= answer.status < 300:
                last = (answer.status, None)
                return answer.status
            last = (answer.status, f"the receiver answered {answer.status}")
            if answer.status in RETRIED_STATUSES or answer.status >= 500:
                await self._record(n, DeliveryStatus.PENDING, attempts, *last)
                raise _Retry()
            raise _Refused()

        base, cap = self._backoff
        try:
            await retry_until(
                self._clock,
                attempt,
                Backoff(base, cap, self._jitter),
                retry_on=(_Retry,),
                within=self._give_up_after,
            )
        except (OutOfTime, _Refused) as e:
            if isinstance(e, _Refused) and e.args:
                last = (None, str(e.args[0]))
            await self._record(n, DeliveryStatus.FAILED, attempts, *last)
            self.log.warn(
                "webhook {id} of task {task_id} ({event}) given up after {attempts} "
                "attempt(s): {error}",
                id=n.notification_id,
                task_id=str(n.task_id),
                event=n.event.value,
                attempts=attempts,
                error=last[1],
            )
            return
        await self._record(n, DeliveryStatus.DELIVERED, attempts, *last)

    async def _check_address(self, url: str) -> None:
        """Refuse a host that is, or resolves to, an address webhooks may not reach
        (:func:`taskscheduler.protocol.notify.refused_address`)."""
        host = urlsplit(url).hostname or ""
        why = refused_host(host)
        if why is None and self._resolve is not None:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                try:
                    addresses = await self._resolve(host)
                except Exception as e:
                    raise NoAnswer(f"cannot resolve {host}: {e}") from e
                reasons = (refused_address(ipaddress.ip_address(a)) for a in addresses)
                why = next((r for r in reasons if r is not None), None)
        if why is not None:
            raise _Refused(why)

    async def _record(
        self,
        n: Notification,
        status: DeliveryStatus,
        attempts: int,
        code: int | None,
        error: str | None,
    ) -> None:
        try:
            await self._store.update_notification(
                n.notification_id, status, attempts, code, error, self._now()
            )
        except Exception:
            self.log.failure("recording a delivery of webhook {id}", id=n.notification_id)


def host_resolver(reactor: Any) -> Resolver:
    """Every address ``reactor``'s name resolver gives a host (what its connections use)."""

    async def resolve(host: str) -> list[str]:
        found: list[str] = []
        done: Deferred[list[str]] = Deferred()

        @implementer(IResolutionReceiver)
        class Receiver:
            def resolutionBegan(self, resolution: Any) -> None:
                pass

            def addressResolved(self, address: Any) -> None:
                found.append(address.host)

            def resolutionComplete(self) -> None:
                done.callback(found)

        reactor.nameResolver.resolveHostName(Receiver(), host, portNumber=0)
        return await done

    return resolve
