"""History retention: a service that deletes executions and results past their age.

Every ``interval`` (and once at start) the :class:`HistoryPruner` first makes the
history's partitions for the weeks ahead (``Store.ensure_partitions``), then drops the
weeks wholly older than ``retention`` at once (``Store.drop_partitions``: on PostgreSQL
history is partitioned by week, server/store/partitions.py), then deletes what is left
before the oldest week kept (executions older than every partition: those of before the
partitioning, late ones) in batches of ``batch_size`` (each batch its own short
transaction, see :meth:`~taskscheduler.server.store.interface.Store.prune_history`), until
none are left or the tick's ``time_budget`` is spent; the rest waits for the next tick.
History is thus kept at least ``retention``, at most a week longer. The newest ``keep``
executions of each task are never pruned, however old (``--retention-min-executions``):
dropping a week moves them into the partition below the weeks, where later ticks prune
them row by row once newer ones replace them. Tasks and the audit log are never pruned.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import StoreUnavailable

DEFAULT_RETENTION_DAYS = 90
DEFAULT_PRUNE_INTERVAL = 300.0  # seconds between ticks
DEFAULT_PRUNE_BATCH = 5_000  # executions per transaction
DEFAULT_PRUNE_BUDGET = 30.0  # seconds of pruning per tick, at most (plus one batch)
DEFAULT_MIN_EXECUTIONS = 100  # the newest executions of each task kept however old


class HistoryPruner(Service):
    """Deletes history older than ``retention``, a little at a time, forever."""

    log = Logger()

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        retention: timedelta,
        *,
        interval: float = DEFAULT_PRUNE_INTERVAL,
        batch_size: int = DEFAULT_PRUNE_BATCH,
        time_budget: float = DEFAULT_PRUNE_BUDGET,
        keep: int = 0,
    ) -> None:
        if retention <= timedelta(0):
            raise ValueError("retention must be positive")
        self._store = store
        self._clock = clock
        self._retention = retention
        self._interval = interval
        self._batch_size = batch_size
        self._time_budget = time_budget
        self._keep = keep
        self._loop: LoopingCall | None = None
        self._done: Deferred[Any] | None = None
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._done = self._loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._stopping = True  # a tick under way ends after its current batch
        loop, done = self._loop, self._done
        self._loop = self._done = None
        if loop is None or done is None:
            return None
        if loop.running:
            loop.stop()
        # Fires once a tick under way has finished, so the store is not closed under it.
        result: Deferred[None] = done.addCallback(lambda _: None)
        return result

    def _tick(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._guarded_prune())

    async def _guarded_prune(self) -> None:
        # A LoopingCall stops for good when its callable fails: nothing escapes here.
        try:
            await self.prune()
        except StoreUnavailable as e:
            self.log.warn("history pruning skipped, the database is unavailable: {error}", error=e)
        except Exception:
            self.log.failure("history pruning failed; retrying at the next tick")

    async def prune(self) -> int:
        """Delete what is past retention, batch after batch, within the time budget."""
        started = self._clock.seconds()
        cutoff = datetime.fromtimestamp(started, UTC) - self._retention
        now = datetime.fromtimestamp(started, UTC)
        await self._store.ensure_partitions(now)
        # Whole weeks first, one per call, until none is left past retention.
        rows_before = await self._store.drop_partitions(cutoff, self._keep)
        while not self._stopping and self._clock.seconds() - started < self._time_budget:
            further = await self._store.drop_partitions(cutoff, self._keep)
            if further == rows_before:
                break
            rows_before = further
        pruned = 0
        try:
            while True:
                count = await self._store.prune_history(rows_before, self._batch_size, self._keep)
                pruned += count
                if count < self._batch_size or self._stopping:
                    break
                if self._clock.seconds() - started >= self._time_budget:
                    self.log.info(
                        "history pruning paused after {seconds:.1f} s; more next time",
                        seconds=self._clock.seconds() - started,
                    )
                    break
        finally:
            if pruned:
                self.log.info(
                    "pruned {count} executions scheduled before {cutoff} with their results",
                    count=pruned,
                    cutoff=cutoff.isoformat(),
                )
        return pruned
