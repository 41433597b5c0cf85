"""The watch over the embedded PostgreSQL: :class:`PostgresSupervisor` starts it again,
with back-off, whenever its postmaster dies, so the API recovers without a restart.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from taskscheduler.retry import backoff_delay


class SupervisedPostgres(Protocol):
    """What :class:`PostgresSupervisor` needs of an embedded PostgreSQL."""

    data_dir: Path

    def alive(self) -> bool: ...

    async def start(self) -> str: ...

    @property
    def postmaster_pid(self) -> int | None: ...


#: Seconds between two looks at whether the postmaster is alive (a read of /proc).
CHECK_INTERVAL = 1.0
#: Back-off between failed restarts: from 1 s, doubling, up to 30 s.
RESTART_BACKOFF_BASE = 1.0
RESTART_BACKOFF_CAP = 30.0


class PostgresSupervisor(Service):
    """Starts the embedded PostgreSQL again whenever its postmaster dies.

    The server's store reconnects by itself once the database answers again, so while
    PostgreSQL is down the API answers 503, and afterwards it recovers without a restart
    of the server. Each restart attempt logs one warning; the recovery logs one line.
    Failed attempts are retried with back-off (:func:`taskscheduler.retry.backoff_delay`).
    """

    log = Logger()

    def __init__(
        self,
        postgres: SupervisedPostgres,
        clock: IReactorTime,
        *,
        check_interval: float = CHECK_INTERVAL,
        backoff_base: float = RESTART_BACKOFF_BASE,
        backoff_cap: float = RESTART_BACKOFF_CAP,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._postgres = postgres
        self._clock = clock
        self._check_interval = check_interval
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._jitter = jitter
        self._loop: LoopingCall | None = None
        self._restarting: Deferred[None] | None = None
        self._pause: Deferred[None] | None = None
        #: How many times PostgreSQL was brought back (for tests and curiosity).
        self.restarts = 0

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._check)
        self._loop.clock = self._clock
        self._loop.start(self._check_interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pause is not None:
            self._pause.cancel()
        # A start under way runs in a thread and cannot be interrupted: wait for it, so
        # that whoever stops PostgreSQL next finds it started.
        waiting: Deferred[None] = Deferred()
        if self._restarting is None:
            waiting.callback(None)
        else:
            self._restarting.addBoth(lambda _: waiting.callback(None))
        return waiting

    def _check(self) -> None:
        # The body of a LoopingCall: it must never raise, or the supervision ends.
        if self._restarting is not None or not self.running:
            return
        try:
            alive = self._postgres.alive()
        except Exception:
            self.log.failure("could not tell whether the embedded PostgreSQL is running")
            return
        if alive:
            return
        self._restarting = Deferred.fromCoroutine(self._restart())
        self._restarting.addErrback(
            lambda failure: self.log.failure("supervising the embedded PostgreSQL", failure)
        )
        self._restarting.addBoth(self._restarted)

    def _restarted(self, _: object) -> None:
        self._restarting = None

    async def _restart(self) -> None:
        died_at = self._clock.seconds()
        self.log.warn(
            "the embedded PostgreSQL in {path} is not running; starting it again",
            path=str(self._postgres.data_dir),
        )
        failures = 0
        while self.running:
            try:
                await self._postgres.start()
            except Exception as e:
                if not self.running:
                    return  # stopped meanwhile: whoever stops the server handles the rest
                failures += 1
                delay = backoff_delay(failures, self._backoff_base, self._backoff_cap, self._jitter)
                self.log.warn(
                    "could not start the embedded PostgreSQL again ({error}); "
                    "next attempt in {delay:.1f} s",
                    error=str(e) or type(e).__name__,
                    delay=delay,
                )
                self._pause = deferLater(self._clock, delay, lambda: None)
                try:
                    await self._pause
                except CancelledError:
                    return
                finally:
                    self._pause = None
                continue
            self.restarts += 1
            self.log.info(
                "the embedded PostgreSQL is back (pid {pid}), {seconds:.1f} s after it was "
                "found down",
                pid=self._postgres.postmaster_pid,
                seconds=self._clock.seconds() - died_at,
            )
            return
