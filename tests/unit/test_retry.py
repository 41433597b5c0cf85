"""The one retry helper: delays doubling up to a cap, spread so that a fleet does not
retry in step; one pending call; a kick that waits out the back-off; nothing after stop;
the awaitable form with a deadline."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from taskscheduler.retry import (
    Backoff,
    OutOfTime,
    RetryLoop,
    backoff_delay,
    no_jitter,
    retry_until,
)


def test_the_ceiling_doubles_up_to_the_cap() -> None:
    highest = [backoff_delay(n, 1.0, 30.0, lambda: 1.0) for n in range(1, 9)]
    assert highest == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_jitter_spreads_each_delay_over_the_upper_half_of_its_ceiling() -> None:
    assert backoff_delay(4, 1.0, 30.0, lambda: 0.0) == 4.0
    assert backoff_delay(4, 1.0, 30.0, lambda: 0.5) == 6.0
    assert backoff_delay(1000, 1.0, 30.0, lambda: 0.0) == 15.0  # no overflow, capped


def test_a_backoff_counts_failures_in_a_row() -> None:
    backoff = Backoff(0.5, 5.0, lambda: 1.0)
    assert [backoff.failed() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    backoff.succeeded()
    assert backoff.failed() == 0.5


class Flaky:
    """An attempt that fails while ``down``, recording when it ran; ``hang`` holds it."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.down = True
        self.ran: list[float] = []
        self.hang: Deferred[None] | None = None
        self.failures: list[tuple[str, float]] = []

    async def __call__(self) -> None:
        self.ran.append(self.clock.seconds())
        if self.hang is not None:
            await self.hang
        if self.down:
            raise ConnectionRefusedError("down")

    def logged(self, error: Exception, delay: float) -> None:
        self.failures.append((type(error).__name__, delay))


def loop(clock: Clock, attempt: Flaky, jitter: Any = lambda: 1.0) -> RetryLoop:
    return RetryLoop(clock, attempt, Backoff(1.0, 8.0, jitter), attempt.logged)


def run_for(clock: Clock, seconds: float, step: float = 0.25) -> None:
    clock.advance(0)
    for _ in range(int(seconds / step)):
        clock.advance(step)


def test_failures_are_retried_after_a_growing_back_off_then_counted_from_zero() -> None:
    clock = Clock()
    attempt = Flaky(clock)
    retries = loop(clock, attempt)
    retries.start()
    run_for(clock, 30)
    assert attempt.ran == [0, 1, 3, 7, 15, 23]  # 1, 2, 4, 8, then capped at 8
    assert attempt.failures[:3] == [("ConnectionRefusedError", d) for d in (1.0, 2.0, 4.0)]
    attempt.down = False
    run_for(clock, 8)
    assert retries.failures == 0 and attempt.ran[-1] == 31
    ran = len(attempt.ran)
    run_for(clock, 60)
    assert len(attempt.ran) == ran, "a success ends the retries until the next kick"


def test_jitter_spreads_the_retries() -> None:
    clock = Clock()
    attempt = Flaky(clock)
    draws = iter([0.0, 0.5, 0.0, 0.0])
    retries = loop(clock, attempt, jitter=lambda: next(draws))
    retries.start()
    run_for(clock, 6)
    assert attempt.ran == [0, 0.5, 2.0, 4.0]  # waits of 0.5, 1.5, 2


def test_a_kick_waits_out_the_back_off_unless_told_otherwise() -> None:
    clock = Clock()
    attempt = Flaky(clock)
    retries = loop(clock, attempt)
    retries.start()
    run_for(clock, 1.5)  # failed at 0 and 1; next at 3
    for _ in range(5):
        retries.kick()  # one pending call, never more
    clock.advance(0)
    assert attempt.ran == [0, 1]
    assert len(clock.getDelayedCalls()) == 1
    retries.kick(through_backoff=True)
    clock.advance(0)
    assert attempt.ran == [0, 1, 1.5]
    retries.retry_now()
    clock.advance(0)
    assert attempt.ran == [0, 1, 1.5, 1.5] and attempt.failures[-1][1] == 1.0, "count reset"


def test_a_kick_during_an_attempt_runs_it_once_more_after_a_success() -> None:
    clock = Clock()
    attempt = Flaky(clock)
    attempt.down = False
    attempt.hang = Deferred()
    retries = loop(clock, attempt)
    retries.start()
    clock.advance(0)
    retries.kick()
    retries.kick()
    hang, attempt.hang = attempt.hang, None
    hang.callback(None)
    run_for(clock, 10)
    assert attempt.ran == [0, 0]


def test_nothing_runs_after_stop_and_the_attempt_under_way_is_cancelled() -> None:
    clock = Clock()
    attempt = Flaky(clock)
    retries = loop(clock, attempt)
    retries.start()
    run_for(clock, 2)  # failed at 0 and 1; one retry pending at 3
    retries.stop()
    assert clock.getDelayedCalls() == []
    retries.kick()
    run_for(clock, 60)
    assert attempt.ran == [0, 1], "no call after stop"

    attempt.hang = Deferred()
    retries.start()
    clock.advance(0)
    retries.stop()
    assert attempt.hang.called, "the attempt under way was cancelled"
    run_for(clock, 60)
    assert attempt.ran == [0, 1, 62] and len(attempt.failures) == 2, "and not logged"


@pytest_twisted.ensureDeferred
async def test_retry_until_succeeds_or_gives_up_at_its_deadline() -> None:
    clock = Clock()
    attempt = Flaky(clock)

    async def connect() -> str:
        await attempt()
        return "connected"

    logged: list[float] = []
    d = Deferred.fromCoroutine(
        retry_until(
            clock,
            connect,
            Backoff(0.5, 5.0, no_jitter),  # as the server's database connect at start-up
            retry_on=(ConnectionRefusedError,),
            within=10.0,
            on_failure=lambda error, delay: logged.append(delay),
        )
    )
    run_for(clock, 20, step=0.5)
    assert attempt.ran == [0, 0.5, 1.5, 3.5, 7.5]  # the next, at 12.5, is past 10 s
    assert logged == [0.5, 1.0, 2.0, 4.0]
    with pytest.raises(OutOfTime) as failed:
        await d
    assert isinstance(failed.value.last, ConnectionRefusedError)

    attempt.ran.clear()
    d = Deferred.fromCoroutine(
        retry_until(clock, connect, Backoff(0.5, 5.0), retry_on=(OSError,), within=None)
    )
    clock.advance(0.2)
    attempt.down = False
    run_for(clock, 2)
    assert await d == "connected" and len(attempt.ran) == 2


@pytest_twisted.ensureDeferred
async def test_retry_until_stops_waiting_when_cancelled_and_raises_the_rest() -> None:
    clock = Clock()
    attempt = Flaky(clock)
    d = Deferred.fromCoroutine(
        retry_until(clock, attempt, Backoff(1.0, 8.0), retry_on=(OSError,), within=None)
    )
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    run_for(clock, 30)
    assert attempt.ran == [0] and clock.getDelayedCalls() == []

    async def broken() -> None:
        raise ValueError("a bug, not the network")

    with pytest.raises(ValueError):
        await Deferred.fromCoroutine(
            retry_until(clock, broken, Backoff(1.0, 8.0), retry_on=(OSError,), within=None)
        )
