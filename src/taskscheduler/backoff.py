"""Retry delays shared by everything that retries over the network."""

from __future__ import annotations

from collections.abc import Callable


def backoff_delay(failures: int, base: float, cap: float, jitter: Callable[[], float]) -> float:
    """Seconds to wait after ``failures`` (>= 1) failures in a row.

    The ceiling doubles from ``base`` up to ``cap``; the delay is half the ceiling plus a
    random share (``jitter()`` in [0, 1)) of the other half, so that a thousand agents
    that lost the server at the same moment do not all come back at the same moment.
    """
    ceiling = min(cap, base * 2 ** min(max(failures, 1) - 1, 30))
    return ceiling / 2 + jitter() * ceiling / 2
