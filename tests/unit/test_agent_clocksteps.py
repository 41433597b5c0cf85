"""Steps of the wall clock: who sees them, and which of the reactor's timers move."""

from __future__ import annotations

import pytest
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock

from taskscheduler.agent.clocksteps import ClockSteps, Watchdog


class Clocks:
    def __init__(self) -> None:
        self.reactor = Clock()
        self.reactor.advance(1_800_000_000)
        self.mono = 10.0

    def tick(self, seconds: float) -> None:
        self.mono += seconds
        self.reactor.advance(seconds)


def test_a_step_moves_the_timers_left_pending_and_not_those_the_listener_replaced() -> None:
    c = Clocks()
    fired: list[str] = []
    mine: list[IDelayedCall] = [c.reactor.callLater(10, fired.append, "old wall-clock timer")]

    def replan(step: float) -> None:
        mine[0].cancel()
        mine[0] = c.reactor.callLater(10, fired.append, "new wall-clock timer")

    steps = ClockSteps(c.reactor, replan, monotonic=lambda: c.mono, watchdog=False)
    c.reactor.callLater(5, fired.append, "time limit")
    c.reactor.rightNow += 3600
    assert steps.check() == 3600
    c.tick(4.9)
    assert fired == [], "five seconds from before the step are still five seconds"
    c.tick(0.2)
    assert fired == ["time limit"]
    c.tick(5)
    assert fired == ["time limit", "new wall-clock timer"], "the listener's own is not moved"


def test_other_timers_move_even_when_the_listener_fails() -> None:
    c = Clocks()
    fired: list[str] = []

    def broken(step: float) -> None:
        raise RuntimeError("re-planning failed")

    steps = ClockSteps(c.reactor, broken, monotonic=lambda: c.mono, watchdog=False)
    c.reactor.callLater(5, fired.append, "kill grace")
    c.reactor.rightNow -= 3600
    with pytest.raises(RuntimeError):
        steps.check()
    c.tick(5.1)
    assert fired == ["kill grace"], "a step back does not put it to sleep for an hour"


def test_no_step_and_a_stopped_watch_move_nothing() -> None:
    c = Clocks()
    seen: list[float] = []
    steps = ClockSteps(c.reactor, seen.append, monotonic=lambda: c.mono, watchdog=False)
    steps.watch()
    c.tick(0.5)
    c.reactor.rightNow += 0.5  # under a second: NTP slews it
    c.tick(0.25)
    assert seen == []
    steps.stop()
    c.reactor.rightNow += 60
    assert steps.check() == 0.0 and seen == []
    assert c.reactor.getDelayedCalls() == [], "the sentinel is gone"


def test_the_watchdog_wakes_the_reactor_only_on_a_step() -> None:
    clocks = {"wall": 1_800_000_000.0, "mono": 10.0}
    calls: list[object] = []
    watchdog = Watchdog(calls.append, lambda: None, lambda: clocks["wall"], lambda: clocks["mono"])
    clocks["wall"] += 0.5
    clocks["mono"] += 0.5
    assert not watchdog.poll()
    clocks["wall"] -= 3600
    assert watchdog.poll()
    clocks["wall"] += 0.5
    clocks["mono"] += 0.5
    assert not watchdog.poll()
    assert len(calls) == 1
