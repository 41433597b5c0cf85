"""Which pending webhooks this replica sends, among the server's replicas (issue 14).

Each pending notification is sent by one replica: the one that stored it claims it at
once (:meth:`~taskscheduler.server.store.interface.Store.observe_results`), and every
``renew_every`` seconds :class:`Claims` renews the claims of those it is sending and
claims those nobody sends (their replica died or stopped), to send them. A dead
replica's are taken over once their claims lapse (``claimant.ttl``, by the database's
clock); a replica that stops gives its claims back, to be taken at once.

A replica starts an attempt only if its claims, as last renewed, outlast the attempt's
``timeout`` (:meth:`Claims.may_attempt`, on a monotonic clock from the time the renewal
was sent, minus one renewal): otherwise it lets the notification go, still pending, to
whoever claims it next, so that two replicas never send it at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from taskscheduler.schedule import utc_now_from
from taskscheduler.server.notify.rules import Notification
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.leases import Claimant

#: Most notifications claimed at a time.
CLAIM_BATCH = 1000


class ClaimLapsing(Exception):
    """This replica's claim may lapse before an attempt ends: another will send it."""


class Claims:
    """This replica's claims on pending notifications (see the module)."""

    log = Logger()

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        claimant: Claimant,
        renew_every: float,
        monotonic: Callable[[], float],
        timeout: float,
        send: Callable[[Notification], Awaitable[None]],
    ) -> None:
        self._store = store
        self._clock = clock
        self.claimant = claimant
        self._renew_every = renew_every
        self._monotonic = monotonic
        self._timeout = timeout
        self._send = send
        #: Until when (monotonic) this replica's claims are surely its own.
        self._until = float("-inf")
        self._claiming: Deferred[None] | None = None
        self._loop: LoopingCall | None = None
        #: The notifications being sent, by id: their claims are renewed.
        self.in_flight: set[int] = set()

    def start(self) -> None:
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._renew_every, now=True)

    def stop(self) -> Deferred[None] | None:
        """Claim no more, and give back the claims of what is being sent (call before
        cancelling the sending)."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if not self.in_flight:
            return None
        return Deferred.fromCoroutine(self._release(sorted(self.in_flight)))

    def sending(self, notification_id: int, sending: Deferred[Any]) -> None:
        """``sending`` sends the notification: its claim is renewed until it ends."""
        self.in_flight.add(notification_id)

        def done(result: object) -> object:
            self.in_flight.discard(notification_id)
            return result

        sending.addBoth(done)

    def may_attempt(self) -> bool:
        """Whether an attempt started now ends while this replica's claims hold."""
        return self._monotonic() + self._timeout < self._until

    def _tick(self) -> None:
        # Never raises (a LoopingCall stops for good when its call does).
        if self._claiming is None:
            claiming = Deferred.fromCoroutine(self._claim())
            if not claiming.called:
                self._claiming = claiming

    async def _claim(self) -> None:
        sent = self._monotonic()
        try:
            claimed = await self._store.claim_notifications(
                self.claimant, sorted(self.in_flight), CLAIM_BATCH, self._now()
            )
        except Exception as e:
            self.log.warn("could not claim the webhooks to send: {error}", error=e)
            return
        finally:
            self._claiming = None
        self._until = max(self._until, sent + self.claimant.ttl - self._renew_every)
        for notification in claimed:
            if notification.notification_id not in self.in_flight:
                try:
                    await self._send(notification)
                except Exception:
                    self.log.failure("sending a webhook claimed")

    async def _release(self, notification_ids: list[int]) -> None:
        try:
            await self._store.claim_notifications(
                self.claimant, [], 0, self._now(), release=notification_ids
            )
        except Exception as e:
            self.log.warn("could not give back the webhooks being sent: {error}", error=e)

    def _now(self) -> Any:
        return utc_now_from(self._clock.seconds())
