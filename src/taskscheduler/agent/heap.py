"""Waiting tasks cost the garbage collector nothing: what they hold is frozen
(``gc.freeze()``) once the set of tasks settles.

CPython's full collection (generation 2) walks every object it tracks, and no run
starts meanwhile. An agent holding 10,000 tasks tracks some 250,000 objects (each task's
spec, loop and timer): a full collection took 60-600 ms, and came every 20-40 s at 100
runs/s, as the objects of runs in flight aged. What a task holds while it waits lives as
long as the task, so collecting it is wasted work: once no task has changed for
:data:`SETTLE` s (or :data:`MAX_WAIT` s after a change, when changes keep coming),
what is not frozen yet is collected (cheap: frozen objects are skipped) and everything
left moves to the permanent generation, which collections skip. Runs' own objects, made
after that, are collected as before, over a heap that holds little else; and as each run
replaces its task's timer by a new one, the heap is frozen again every :data:`STEADY` s
(what is not frozen yet, a few seconds of runs and timers, is collected first: a few
milliseconds).

Frozen garbage is never collected: a task that leaves the agent (unscheduled, or
replaced by a new revision) may leave cycles behind, and so may the runs that were in
flight at a settle. So when a task left, or every :data:`FULL_EVERY` settles, the settle
collects fully first (unfreeze, collect, freeze): one pause when the operator removes or
changes tasks, at most one every :data:`FULL_GAP` s; in a steady state, one an hour.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: Seconds without a change of the tasks after which the heap is frozen.
SETTLE = 1.0
#: Seconds after the first unsettled change by which it is frozen, changes or not.
MAX_WAIT = 5.0
#: Seconds between two freezes when nothing changes.
STEADY = 10.0
#: Seconds at least between two full collections.
FULL_GAP = 60.0
#: Settles without a task leaving after which one collects fully all the same (what
#: frozen garbage the runs in flight at each settle left is then freed).
FULL_EVERY = 360


class GarbageCollector(Protocol):
    """What is used of the :mod:`gc` module."""

    def collect(self, generation: int = 2) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...


class HeapKeeper:
    """Freezes the heap once the tasks settle (see the module's docstring)."""

    log = Logger()

    def __init__(self, clock: IReactorTime, gc: GarbageCollector) -> None:
        self._clock = clock
        self._gc = gc
        self._call: IDelayedCall | None = None
        self._first_change: float | None = None  # of the changes not settled yet
        self._removed = False  # a task left since the last full collection
        self._settles = 0  # since the last full collection
        self._last_full: float | None = None

    def changed(self, removed: bool = False) -> None:
        """The tasks changed (``removed``: one left, or was replaced): freeze them once
        they settle."""
        now = self._clock.seconds()
        if self._first_change is None:
            self._first_change = now
        self._removed = self._removed or removed
        self._plan(min(now + SETTLE, self._first_change + MAX_WAIT))

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _plan(self, at: float) -> None:
        self.stop()
        self._call = self._clock.callLater(max(0.0, at - self._clock.seconds()), self._settle)

    def _settle(self) -> None:
        self._call = None
        now = self._clock.seconds()
        full = self._removed or self._settles + 1 >= FULL_EVERY
        if full and self._last_full is not None and now < self._last_full + FULL_GAP:
            # Not so soon after the last one: wait for the gap (young objects meanwhile
            # age into generation 2, collected as usual).
            self._plan(self._last_full + FULL_GAP)
            return
        self._first_change = None
        try:
            if full:
                self._gc.unfreeze()
                self._gc.collect()
                self._removed = False
                self._settles = 0
                self._last_full = now
            else:
                self._gc.collect()  # over what is not frozen yet only
                self._settles += 1
            self._gc.freeze()
        except Exception:  # a loop that never raises: the next settle tries again
            self.log.failure("could not freeze the heap")
        self._plan(now + STEADY)
