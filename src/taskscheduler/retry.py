"""Retrying over the network, written once: how long to wait after failures in a row
(:class:`Backoff`), a loop that keeps one pending call and cancels it on stop
(:class:`RetryLoop`), and the same as one awaitable with a deadline (:func:`retry_until`).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

T = TypeVar("T")


def backoff_delay(failures: int, base: float, cap: float, jitter: Callable[[], float]) -> float:
    """Seconds to wait after ``failures`` (>= 1) failures in a row.

    The ceiling doubles from ``base`` up to ``cap``; the delay is half the ceiling plus a
    random share (``jitter()`` in [0, 1)) of the other half, so that a thousand agents
    that lost the server at the same moment do not all come back at the same moment.
    """
    ceiling = min(cap, base * 2 ** min(max(failures, 1) - 1, 30))
    return ceiling / 2 + jitter() * ceiling / 2


def no_jitter() -> float:
    """A jitter that always waits the whole ceiling (one server, not a fleet, retries)."""
    return 1.0


class Backoff:
    """Failures in a row, and how long the next wait is."""

    def __init__(
        self, base: float, cap: float, jitter: Callable[[], float] = random.random
    ) -> None:
        self.base = base
        self.cap = cap
        self.jitter = jitter
        self.failures = 0

    def failed(self) -> float:
        """Count one more failure; the seconds to wait before the next attempt."""
        self.failures += 1
        return backoff_delay(self.failures, self.base, self.cap, self.jitter)

    def succeeded(self) -> None:
        self.failures = 0


class RetryLoop:
    """Runs ``attempt`` when kicked, and again after each failure once the back-off is
    over, until stopped.

    At most one call is pending and at most one attempt runs; a kick during an attempt
    runs it once more after a success. A kick during a back-off waits for it (an
    unreachable peer is not hammered) unless told otherwise. A failure is counted, handed
    to ``on_failure(error, delay)`` to log, and retried after ``delay``; success resets
    the count. :meth:`stop` cancels the pending call and the attempt under way.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        attempt: Callable[[], Awaitable[None]],
        backoff: Backoff,
        on_failure: Callable[[Exception, float], None],
    ) -> None:
        self._clock = clock
        self._attempt = attempt
        self.backoff = backoff
        self._on_failure = on_failure
        self._pending: IDelayedCall | None = None
        self._running: Deferred[None] | None = None
        self._again = False
        self.stopped = True

    @property
    def failures(self) -> int:
        return self.backoff.failures

    def start(self) -> None:
        """Accept kicks from now on and run an attempt now."""
        self.stopped = False
        self.kick()

    def stop(self) -> None:
        """Run nothing more: cancel the pending call and the attempt under way."""
        self.stopped = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._running is not None:
            self._running.cancel()

    def kick(self, *, through_backoff: bool = False) -> None:
        """Run an attempt on the next turn (or right after the one under way); during a
        back-off, only if ``through_backoff``."""
        if self.stopped:
            return
        if self._running is not None:
            self._again = True
            return
        if self._pending is not None and self._pending.active():
            if self.failures == 0 or not through_backoff:
                return  # due on the next turn already, or backing off
            self._pending.cancel()
        self._pending = self._clock.callLater(0, self._run)

    def retry_now(self) -> None:
        """Forget the back-off and run an attempt on the next turn."""
        self.backoff.succeeded()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        self.kick()

    def _run(self) -> None:
        self._pending = None
        self._again = False
        d = Deferred.fromCoroutine(self._once())
        if not d.called:
            self._running = d

    async def _once(self) -> None:
        try:
            await self._attempt()
        except Exception as e:
            self._running = None
            if self.stopped:
                return  # cancelled by stop(), or failed meanwhile: nothing more to do
            delay = self.backoff.failed()
            try:
                self._on_failure(e, delay)
            except Exception:
                self.log.failure("logging a failure to retry")
            self._pending = self._clock.callLater(delay, self._run)
            return
        self._running = None
        self.backoff.succeeded()
        if self._again:
            self.kick()


class OutOfTime(Exception):
    """:func:`retry_until` gave up: the next attempt would start past its deadline.
    ``last`` is the failure of the last attempt (also the ``__cause__``)."""

    def __init__(self, last: Exception) -> None:
        super().__init__(str(last))
        self.last = last


async def retry_until(
    clock: IReactorTime,
    attempt: Callable[[], Awaitable[T]],
    backoff: Backoff,
    *,
    retry_on: tuple[type[Exception], ...],
    within: float | None,
    on_failure: Callable[[Exception, float], None] = lambda error, delay: None,
) -> T:
    """``await attempt()`` until it succeeds, waiting the back-off after each failure of
    a kind in ``retry_on`` (any other is raised at once).

    :class:`OutOfTime` if the next attempt would start more than ``within`` seconds
    after the first (None: never). Cancelling the awaiting Deferred cancels the wait.
    """
    deadline = None if within is None else clock.seconds() + within
    while True:
        try:
            return await attempt()
        except retry_on as e:
            delay = backoff.failed()
            if deadline is not None and clock.seconds() + delay > deadline:
                raise OutOfTime(e) from e
            on_failure(e, delay)
            await deferLater(clock, delay, _nothing)


def _nothing() -> Any:
    return None
