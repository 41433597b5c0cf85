"""How fast each operator may create tasks: a token bucket per principal.

Every task created is delivered to every agent, oldest first; a client creating tens of
thousands of tasks at once would make every other client's task wait behind them. Each
principal (an operator token's name; the anonymous operator of a loopback server without
tokens) may create ``rate`` tasks a second on average, and ``burst`` at once. Past that the
server answers 429 with ``Retry-After``, so that the backlog one client can cause stays
within what the delivery clears in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

#: Tasks a second each principal may create on average, and at once.
DEFAULT_CREATE_RATE = 100.0
DEFAULT_CREATE_BURST = 1000
#: Buckets kept at most; full buckets are forgotten first (they hold no debt).
MAX_BUCKETS = 10_000


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets by key, on an injected clock. ``rate`` 0 means no limit."""

    def __init__(
        self,
        clock: IReactorTime,
        rate: float = DEFAULT_CREATE_RATE,
        burst: int = DEFAULT_CREATE_BURST,
    ) -> None:
        self._clock = clock
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> float:
        """Spend one token of ``key``'s bucket: 0 if it had one, else the seconds until it
        will (nothing is spent then)."""
        if self.rate <= 0:
            return 0.0
        now = self._clock.seconds()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
        bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.at) * self.rate >= self.burst:
                del self._buckets[key]
        if len(self._buckets) >= MAX_BUCKETS:
            # Principals are operator tokens, a handful: this many means a bug, not a crowd.
            self._buckets.clear()


def retry_after(seconds: float) -> bytes:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds))).encode("ascii")
