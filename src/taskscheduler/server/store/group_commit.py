"""Group commit: requests that arrive while the database is busy are stored together.

Each agent reports its results as they come, one per request; one transaction per request
would make the commit (a round trip and a WAL flush each) the bound. Instead, a request is
queued; when fewer than ``max_in_flight`` groups are being written, the queue is written
as one group: one call of ``commit`` with every request's items, in one transaction. While
it runs the next requests queue up, so the groups grow with the load and an idle server
adds no delay (no timer: a lone request is written at once). A request of
``max_items`` or more is a group by itself and is written at once, beside the groups.

The rules each request still sees:

- its own answers, one per item, in its own order (a refused item refuses only itself:
  ``commit`` judges each item);
- nothing before the group is committed: the answers come from ``commit``'s return;
- a group that fails is written again one request at a time if ``alone_after(error)``
  says the error may be one request's own doing (data the database refuses), so that
  only the requests that fail alone fail; otherwise (the database unreachable) each of
  its requests fails with the error, to be sent again.

Results (:mod:`~taskscheduler.server.store.recording`) and task creations
(:mod:`~taskscheduler.server.store.create_batch`) are written through it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.server.store.pool import first_line

I = TypeVar("I")  # noqa: E741 - an item
O = TypeVar("O")  # noqa: E741 - an item's answer
K = TypeVar("K")  # the context of a group (e.g. when its requests arrived)

Commit = Callable[[list[I], K], Awaitable[list[O]]]


class _Request(Generic[I, O, K]):
    __slots__ = ("answer", "context", "items")

    def __init__(self, items: list[I], context: K) -> None:
        self.items = items
        self.context = context
        self.answer: Deferred[list[O]] = Deferred()

    def settle(self, outcome: list[O] | Failure) -> None:
        # Settled once: a group that failed midway settles what is left, not the rest again.
        if not self.answer.called:
            if isinstance(outcome, Failure):
                self.answer.errback(outcome)
            else:
                self.answer.callback(outcome)


class GroupCommit(Generic[I, O, K]):
    """Writes concurrent requests' items in groups through ``commit(items, context)``,
    which returns one answer per item, in order. A group's context is ``merge`` of its
    requests' contexts (e.g. the latest arrival time)."""

    log = Logger()

    def __init__(
        self,
        commit: Commit[I, K, O],
        merge: Callable[[list[K]], K],
        *,
        alone_after: Callable[[BaseException], bool],
        max_items: int = 1000,
        max_in_flight: int = 2,
    ) -> None:
        self._commit = commit
        self._merge = merge
        self._alone_after = alone_after
        self._max_items = max_items
        self._max_in_flight = max_in_flight
        self._queue: deque[_Request[I, O, K]] = deque()
        self._in_flight = 0
        #: Groups written and requests in them (what a test or a metric can read).
        self.groups = 0
        self.requests = 0

    async def submit(self, items: Sequence[I], context: K) -> list[O]:
        """Write ``items`` with whatever else is queued; their answers, once committed."""
        if not items:
            return []
        if len(items) >= self._max_items:
            # A group already: written at once, beside the groups (as many as the pool
            # holds), as without group commit.
            return await self._commit(list(items), context)
        request: _Request[I, O, K] = _Request(list(items), context)
        self._queue.append(request)
        self._start()
        return await request.answer

    def _start(self) -> None:
        while self._queue and self._in_flight < self._max_in_flight:
            group = [self._queue.popleft()]
            size = len(group[0].items)
            while self._queue and size + len(self._queue[0].items) <= self._max_items:
                size += len(self._queue[0].items)
                group.append(self._queue.popleft())
            self._in_flight += 1
            Deferred.fromCoroutine(self._write(group))

    async def _write(self, group: list[_Request[I, O, K]]) -> None:
        try:
            self.groups += 1
            self.requests += len(group)
            try:
                answers = await self._commit(
                    [item for r in group for item in r.items],
                    self._merge([r.context for r in group]),
                )
            except Exception as error:
                if len(group) == 1 or not self._alone_after(error):
                    failure = Failure()
                    for request in group:
                        request.settle(failure)
                    return
                # Likely one request's data (a duplicate task id, say): no traceback.
                self.log.warn(
                    "writing a group of {count} requests failed ({error}): writing each alone",
                    count=len(group),
                    error=first_line(error),
                )
                for request in group:
                    await self._write_alone(request)
                return
            start = 0
            for request in group:
                end = start + len(request.items)
                request.settle(answers[start:end])
                start = end
        except BaseException:
            failure = Failure()
            for request in group:
                request.settle(failure)
        finally:
            self._in_flight -= 1
            self._start()

    async def _write_alone(self, request: _Request[I, O, K]) -> None:
        try:
            answers = await self._commit(request.items, request.context)
        except Exception:
            request.settle(Failure())
        else:
            request.settle(answers)
