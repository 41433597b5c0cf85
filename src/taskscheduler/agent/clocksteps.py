"""Steps of the wall clock: seeing them, and keeping the reactor's timers on monotonic pace.

Twisted's timers follow the wall clock: a step forward makes every timer overdue at once,
a step back puts every timer to sleep for as long as the step. :class:`ClockSteps`
compares the wall clock with the monotonic one (a reactor timer every quarter second sees
forward steps before the timers they made overdue; a :class:`Watchdog` thread, which a
backward step cannot put to sleep, sees backward ones) and on a step of a second or more:

1. tells its listener (the scheduler), which re-plans the timers it keeps on the wall
   clock's timeline (its task loops) by cancelling them and making new ones;
2. moves every other timer that was pending before the step by the step, back onto
   monotonic pace: time limits, kill graces, back-offs, request timeouts (Twisted's own
   among them) each meant "so many seconds from now".

Twisted offers no monotonic reactor, so the second job is done on the reactor's list of
timers (``getDelayedCalls``), here and nowhere else: a timer's owner opts out of it only
by replacing its timer when told of the step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorThreads, IReactorTime
from twisted.logger import Logger

#: A change of at least this many seconds between the wall clock and the monotonic clock
#: is a step (NTP slews smaller offsets away gradually, and steps larger ones).
STEP_THRESHOLD = 1.0
#: How often the reactor compares the clocks: the most a timer may fire early when the
#: wall clock steps forward.
SENTINEL_INTERVAL = 0.25
#: How often the watchdog thread compares them.
WATCHDOG_INTERVAL = 0.5


class Watchdog(threading.Thread):
    """Compares the clocks off the reactor, which a backward step leaves asleep.

    The reactor's timers follow the wall clock: after a step back of an hour, it sleeps
    an hour. This thread sleeps on the monotonic clock and, when it sees a step, wakes
    the reactor to deal with it.
    """

    def __init__(
        self,
        call_from_thread: Callable[[Callable[[], object]], None],
        check: Callable[[], object],
        wall: Callable[[], float],
        monotonic: Callable[[], float],
        interval: float = WATCHDOG_INTERVAL,
    ) -> None:
        super().__init__(name="taskscheduler-clock-watchdog", daemon=True)
        self._call_from_thread = call_from_thread
        self._check = check
        self._wall = wall
        self._monotonic = monotonic
        self._interval = interval
        self._stopping = threading.Event()
        self._offset = wall() - monotonic()

    def poll(self) -> bool:
        """Compare the clocks once; True (and the reactor told) if the wall clock stepped."""
        offset = self._wall() - self._monotonic()
        stepped = abs(offset - self._offset) >= STEP_THRESHOLD
        self._offset = offset
        if stepped:
            self._call_from_thread(self._check)
        return stepped

    def run(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self.poll()
            except Exception:  # the reactor is gone: nothing left to watch for
                return

    def stop(self) -> None:
        self._stopping.set()


class ClockSteps:
    """Watches the wall clock against the monotonic one, on the reactor ``clock``.

    ``monotonic`` is the clock that steps do not move: by default the system's when
    ``clock`` is a real reactor, else ``clock`` itself (no steps to see). ``watchdog``
    starts the thread that sees backward steps (by default with a real reactor).
    ``on_step`` is called with each step seen (seconds, negative backward), before the
    other timers are moved (see the module's docstring).
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        on_step: Callable[[float], object],
        *,
        monotonic: Callable[[], float] | None = None,
        watchdog: bool | None = None,
    ) -> None:
        self._clock = clock
        self._on_step = on_step
        real_reactor = IReactorThreads.providedBy(clock)
        if monotonic is None:
            monotonic = time.monotonic if real_reactor else clock.seconds
        self._monotonic = monotonic
        self._enabled = monotonic != clock.seconds
        self._use_watchdog = real_reactor if watchdog is None else watchdog
        self._offset = clock.seconds() - monotonic()  # wall minus monotonic, last seen
        self._sentinel: IDelayedCall | None = None
        self._watchdog: Watchdog | None = None
        self._stopped = False

    def watch(self) -> None:
        """Start watching (once; again does nothing)."""
        if not self._enabled or self._sentinel is not None or self._stopped:
            return
        # A forward step is seen on the reactor, by this timer or a caller's own check,
        # before the timers it made overdue all fire at once; a backward step, which
        # leaves every timer asleep, by the watchdog thread.
        self._sentinel = self._clock.callLater(SENTINEL_INTERVAL, self._sentinel_tick)
        if self._use_watchdog:
            reactor: Any = self._clock
            self._watchdog = Watchdog(
                reactor.callFromThread, self.check, self._clock.seconds, self._monotonic
            )
            self._watchdog.start()

    def stop(self) -> None:
        """Watch no more; a check already queued finds nothing to do."""
        self._stopped = True
        if self._sentinel is not None and self._sentinel.active():
            self._sentinel.cancel()
        self._sentinel = None
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def check(self) -> float:
        """Compare the wall clock with the monotonic one; the step seen (0.0 if none)."""
        offset = self._clock.seconds() - self._monotonic()
        step = offset - self._offset
        self._offset = offset
        if abs(step) < STEP_THRESHOLD or self._stopped:
            return 0.0
        before = list(self._clock.getDelayedCalls())
        try:
            self._on_step(step)
        finally:
            for call in before:
                # Still pending: not one the listener replaced, so it meant "so many
                # seconds from now", which the step has just changed by ``step``.
                if call.active():
                    call.delay(step)
        return step

    def _sentinel_tick(self) -> None:
        self._sentinel = None
        try:
            self.check()
        except Exception:
            self.log.failure("could not check the clocks")
        if not self._stopped:
            self._sentinel = self._clock.callLater(SENTINEL_INTERVAL, self._sentinel_tick)
