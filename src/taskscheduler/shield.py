"""Deferreds whose cancellation does not reach the work under them.

Some work must not be cut short because someone stopped waiting for it: a route whose
client went away (Klein cancels it), a store operation (txpostgres' own cancel raises
``_CancelInProgress`` out of ``cancel()`` and leaves its connection busy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

T = TypeVar("T")


def uncancellable(work: Deferred[T], on_cancel: Callable[[Deferred[T]], None]) -> Deferred[T]:
    """``work``'s outcome, as a Deferred whose cancel leaves ``work`` running: the one who
    cancelled hears CancelledError at once, and ``on_cancel(work)`` is called to take
    care of what ``work`` ends with (a failure it does not handle is left in ``work``)."""
    answer: Deferred[T] = Deferred(lambda _: on_cancel(work))

    def done(result: T) -> T | None:
        if answer.called:  # cancelled: the result stays with work
            return result
        answer.callback(result)
        return None

    def failed(failure: Any) -> Any:
        if answer.called:
            return failure
        answer.errback(failure)
        return None

    work.addCallbacks(done, failed)
    return answer
