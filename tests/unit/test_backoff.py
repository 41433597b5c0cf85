"""Retry delays: doubling up to a cap, spread so that a fleet does not retry in step."""

from __future__ import annotations

from taskscheduler.backoff import backoff_delay


def test_the_ceiling_doubles_up_to_the_cap() -> None:
    highest = [backoff_delay(n, 1.0, 30.0, lambda: 1.0) for n in range(1, 9)]
    assert highest == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_jitter_spreads_each_delay_over_the_upper_half_of_its_ceiling() -> None:
    assert backoff_delay(4, 1.0, 30.0, lambda: 0.0) == 4.0
    assert backoff_delay(4, 1.0, 30.0, lambda: 0.5) == 6.0
    assert backoff_delay(1000, 1.0, 30.0, lambda: 0.0) == 15.0  # no overflow, capped
