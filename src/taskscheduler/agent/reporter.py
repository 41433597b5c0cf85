"""Sends spooled results to the server until it acknowledges them.

One result waiting goes alone (``POST /api/v1/tasks/{task_id}/complete``), for
freshness; many go in batches (``POST /api/v1/results``), so that a busy agent costs the
server one request and one multi-row insert per hundred results. A new result wakes the
reporter at once.

- acknowledged (``stored`` / ``duplicate``): the result leaves the spool;
- refused for good: it leaves the spool, is logged and counted. Only a verdict from a
  taskscheduler server counts as one: the status *and* the JSON error code of
  :data:`taskscheduler.protocol.FINAL_RESULT_ERRORS` for one result (``409 conflict``,
  ``404 unknown_task``, ``404 task_deleted``, ``400 misaligned``, ``403 not_assigned``...),
  one of :data:`~taskscheduler.protocol.FINAL_BATCH_STATUSES` for an item of a batch. A
  whole batch refused as malformed, impersonating or too large (or on a server without
  the batch route) is sent again one by one, to isolate the bad result;
- too large for the server (413 ``payload_too_large``, which names the limit): the
  result is sent again with its output trimmed to fit (head and tail kept, flagged
  truncated, the original sizes kept), and every later result over that limit is
  trimmed before it is sent. A result is never dropped for its size;
- dated ahead of the server's clock (``409 too_early``, or ``"too_early"`` for an item of
  a batch: :data:`~taskscheduler.protocol.RETRY_LATER_RESULT_ERRORS`): kept, and sent
  again with back-off until the server's clock has reached it;
- 401 (the credential is unknown or was revoked) is like a server down: the results stay
  spooled and are sent again with back-off, so nothing is lost while an operator sorts
  the agent's enrolment out;
- anything else (5xx, no connection, timeout, and any answer that is not a verdict: a
  404 from a proxy or a wrong path prefix, an HTML 413, a body that is not ours):
  everything stays and is sent again after an exponential back-off with jitter, so that
  a thousand agents coming back at once do not flood the server. The back-off is capped
  at 30 s (retries between 15 and 30 s apart), so that results spooled while the server
  was away arrive within a minute of its return. An answer no taskscheduler server gives
  is logged loudly (a misconfiguration to fix), at most once a minute.

Which answer is which is read by :class:`taskscheduler.agent.server_client.ServerClient`;
what is here is the policy: what to send, what leaves the spool, trimming to fit.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskscheduler import protocol
from taskscheduler.agent.metrics import AgentMetrics
from taskscheduler.agent.server_client import (
    Acknowledged,
    Refused,
    RetryLater,
    SendSingly,
    ServerClient,
    TooLarge,
)
from taskscheduler.agent.spool import Spool, SpoolEntry, encode_result
from taskscheduler.httpclient import describe
from taskscheduler.protocol import MAX_BATCH, InvalidMessage, RunResult
from taskscheduler.retry import Backoff, RetryLoop
from taskscheduler.schedule import format_instant

#: Most results in one batch (as many as the server takes: a busy agent whose reactor
#: answers slowly still drains its spool many times faster than it fills), and their
#: most bytes (the server accepts 16 MiB bodies).
BATCH_SIZE = MAX_BATCH
BATCH_BYTES = 8 * 1024 * 1024
#: Seconds between two loud logs of the same kind (answers that are not ours, trims).
LOUD_LOG_INTERVAL = 60.0
#: Most bytes of results read on the reactor thread rather than off it. A result is
#: sent a moment after it was written, so its file is in the page cache and reading a
#: few of them costs microseconds; a hop to a thread and back costs milliseconds, tens
#: on a busy agent, and it is on the way of every fresh result. A backlog (after the
#: server was away, or a restart: maybe no longer cached) is read off the reactor.
INLINE_READ_BYTES = 64 * 1024

#: Bytes of ``{"results":[`` and ``]}`` around the results of a batch.
_BATCH_ENVELOPE = len(b'{"results":[]}')


class _RetryLater(Exception):
    """The server could not take the results now; nothing was lost.

    ``foreign`` when the answer is not one a taskscheduler server gives: a proxy, or a
    wrong server URL, is in the way, and someone should know.
    """

    def __init__(self, message: str, *, foreign: bool = False) -> None:
        super().__init__(message)
        self.foreign = foreign


class _Throttle:
    """Lets one log line through per ``interval`` seconds and counts the others."""

    def __init__(self, clock: IReactorTime, interval: float) -> None:
        self._clock = clock
        self._interval = interval
        self._next = float("-inf")
        self._held = 0

    def allow(self) -> int | None:
        """None to stay quiet; else how many lines were held back since the last one."""
        now = self._clock.seconds()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self._interval
        held, self._held = self._held, 0
        return held


class Reporter:
    """Empties the spool into the server, through ``client`` (which holds the agent's
    credential)."""

    log = Logger()

    def __init__(
        self,
        spool: Spool,
        client: ServerClient,
        clock: IReactorTime,
        *,
        batch_size: int = BATCH_SIZE,
        batch_bytes: int = BATCH_BYTES,
        retry_base: float = 1.0,
        retry_cap: float = 30.0,
        jitter: Callable[[], float] = random.random,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self._spool = spool
        self.client = client
        self._clock = clock
        #: Observes each acknowledged run's report latency.
        self._metrics = metrics
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        self._sending = RetryLoop(
            clock, self._send_all, Backoff(retry_base, retry_cap, jitter), self._failed
        )
        #: Results the server refused for good.
        self.rejected = 0
        #: Results the server acknowledged.
        self.acknowledged = 0
        #: Results sent with their output trimmed to fit the server's body limit.
        self.trimmed = 0
        #: The server's body limit, once a 413 told it: larger results are trimmed first.
        self.max_body_bytes: int | None = None
        self._foreign_log = _Throttle(clock, LOUD_LOG_INTERVAL)
        self._trim_log = _Throttle(clock, LOUD_LOG_INTERVAL)

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        self._sending.start()

    def stop(self) -> None:
        """Send nothing more; what is unsent stays in the spool for the next start."""
        self._sending.stop()

    def wake(self) -> None:
        """Send what is spooled now, unless the server is backed off (a send under way
        takes every result spooled meanwhile)."""
        self._sending.kick()

    # -- sending -----------------------------------------------------------------------

    async def _send_all(self) -> None:
        while not self._sending.stopped:
            entries = self._spool.oldest(self._batch_size, self._batch_room())
            if not entries:
                break
            if len(entries) == 1:
                await self._send_single(entries[0])
            else:
                await self._send_batch(entries)

    def _failed(self, error: Exception, delay: float) -> None:
        if isinstance(error, _RetryLater) and error.foreign:
            self._log_foreign(error, delay)
            return
        self.log.warn(
            "could not report results to {url} ({error}); {count} waiting, "
            "retrying in {delay:.1f}s",
            url=self.client.url,
            error=describe(error),
            count=len(self._spool),
            delay=delay,
        )

    def _log_foreign(self, error: _RetryLater, delay: float) -> None:
        held = self._foreign_log.allow()
        if held is None:
            return
        self.log.warn(
            "the server at {url} gave an answer no taskscheduler server gives ({error}): "
            "is the agent's --server URL right (scheme, host, port, no path prefix), or is "
            "a proxy in the way? {count} results kept, retrying in {delay:.1f}s "
            "({held} more such answers since the last warning)",
            url=self.client.url,
            error=str(error),
            count=len(self._spool),
            delay=delay,
            held=held,
        )

    def _batch_room(self) -> int:
        """Most bytes of results in one batch: within the server's limit once known."""
        if self.max_body_bytes is None:
            return self._batch_bytes
        room = self.max_body_bytes - _BATCH_ENVELOPE - self._batch_size
        return max(1, min(self._batch_bytes, room))

    async def _read(self, entries: list[SpoolEntry]) -> list[tuple[SpoolEntry, bytes]]:
        """The readable entries with their bodies (read on the reactor when they are few
        and small, :data:`INLINE_READ_BYTES`, else off it); drops the others."""
        readable = []
        bodies: list[bytes | Exception]
        if sum(entry.size for entry in entries) <= INLINE_READ_BYTES:
            bodies = [self._read_here(entry) for entry in entries]
        else:
            bodies = await self._spool.read_bodies(entries)
        for entry, body in zip(entries, bodies, strict=True):
            if isinstance(body, bytes):
                readable.append((entry, body))
            else:
                self._refuse(entry, f"its spool file is unreadable: {body}")
        return readable

    def _read_here(self, entry: SpoolEntry) -> bytes | Exception:
        try:
            return self._spool.read(entry)
        except (OSError, ValueError) as e:
            return e

    async def _send_single(self, entry: SpoolEntry) -> None:
        readable = await self._read([entry])
        if not readable:
            return
        [(_, spooled)] = readable
        body = self._fit(entry, spooled)
        if body is None:
            return
        outcome = await self.client.report(entry.task_id, body)
        if isinstance(outcome, TooLarge):
            self._learn_limit(outcome)
            body = self._fit(entry, body)
            if body is None:
                return
            outcome = await self.client.report(entry.task_id, body)
        if isinstance(outcome, Acknowledged):
            self._acknowledge(entry)
        elif isinstance(outcome, Refused):
            self._refuse(entry, outcome.reason)
        elif isinstance(outcome, TooLarge):
            raise _RetryLater(f"the server answered {outcome.reason}")
        else:
            raise _RetryLater(outcome.reason, foreign=outcome.foreign)

    def _learn_limit(self, too_large: TooLarge) -> None:
        """Remember the body limit the server's 413 named."""
        limit = too_large.limit
        if limit is None or not limit < too_large.sent:
            limit = too_large.sent // 2  # a server that does not say: halve until it passes
        if self.max_body_bytes is None or limit < self.max_body_bytes:
            self.max_body_bytes = limit

    def _fit(self, entry: SpoolEntry, body: bytes) -> bytes | None:
        """``body``, with its output trimmed if it is over the server's known limit; None
        (and the result dropped) only if not even its output's sizes would fit."""
        limit = self.max_body_bytes
        if limit is None or len(body) <= limit:
            return body
        try:
            result = protocol.parse_result(json.loads(body))
        except (ValueError, InvalidMessage) as e:
            self._refuse(entry, f"its spool file is unreadable: {e}")
            return None
        fitted = shrink_to_fit(result, limit)
        if fitted is None:
            self._refuse(entry, f"it does not fit in {limit} bytes even without its output")
            return None
        self.trimmed += 1
        held = self._trim_log.allow()
        if held is not None:
            self.log.warn(
                "the result of task {task_id} at {scheduled_at} is {size} bytes, over the "
                "server's limit of {limit}: sent with its output trimmed (head and tail "
                "kept, flagged truncated); raise the server's --max-body-bytes or lower "
                "the agent's --output-cap ({held} more trimmed since the last warning)",
                task_id=str(entry.task_id),
                scheduled_at=format_instant(entry.key[1]),
                size=len(body),
                limit=limit,
                held=held,
            )
        return fitted

    async def _send_batch(self, entries: list[SpoolEntry]) -> None:
        pairs = await self._read(entries)
        if not pairs:
            return
        readable = [entry for entry, _ in pairs]
        bodies = [body for _, body in pairs]
        answer = await self.client.report_batch(bodies)
        if isinstance(answer, TooLarge | SendSingly):
            if isinstance(answer, TooLarge):
                self._learn_limit(answer)
            self.log.warn(
                "the server refused a batch of {count} results ({error}); sending them one by one",
                count=len(readable),
                error=answer.reason,
            )
            for entry in readable:
                await self._send_single(entry)
            return
        if isinstance(answer, RetryLater):
            raise _RetryLater(answer.reason, foreign=answer.foreign)
        unexpected = later = 0
        for entry, item in zip(readable, answer.items, strict=True):
            if isinstance(item, Acknowledged):
                self._acknowledge(entry)
            elif isinstance(item, Refused):
                self._refuse(entry, item.reason)
            elif item.foreign:
                unexpected += 1
            else:
                later += 1
        if unexpected:
            raise _RetryLater(
                f"the server gave {unexpected} answers the agent does not know", foreign=True
            )
        if later:
            raise _RetryLater(f"the server will take {later} results later (they are too early)")

    def _acknowledge(self, entry: SpoolEntry) -> None:
        self._spool.remove(entry)
        self.acknowledged += 1
        self.log.debug(
            "task {task_id}: the result of {scheduled_at} (attempt {attempt}) is reported",
            task_id=str(entry.task_id),
            scheduled_at=format_instant(entry.key[1]),
            attempt=entry.key[2],
        )
        if self._metrics is not None and entry.finished is not None:
            self._metrics.reported(self._clock.seconds() - entry.finished)

    def _refuse(self, entry: SpoolEntry, reason: str) -> None:
        self._spool.remove(entry)
        self.rejected += 1
        self.log.error(
            "the result of task {task_id} at {scheduled_at} was refused and dropped: {reason} "
            "({rejected} refused so far)",
            task_id=str(entry.task_id),
            scheduled_at=format_instant(entry.key[1]),
            reason=reason,
            rejected=self.rejected,
        )


def shrink_to_fit(result: RunResult, max_bytes: int) -> bytes | None:
    """The wire body of ``result`` with its output trimmed to fit in ``max_bytes``, or
    None if even with no output at all it would not fit.

    Each stream keeps its head and tail (the middle dropped, flagged truncated, its
    original size kept); the bytes kept are shared evenly, a short stream leaving its
    share to the other. JSON escaping and base64 make the body larger than the bytes
    kept by a factor that depends on the output, so the amount kept is measured and
    narrowed rather than guessed once.
    """

    def body(keep: int) -> bytes:
        out, err = result.stdout.data, result.stderr.data
        keep_out = min(len(out), max(keep // 2, keep - len(err)))
        keep_err = min(len(err), keep - keep_out)
        trimmed = dataclasses.replace(
            result, stdout=result.stdout.trimmed(keep_out), stderr=result.stderr.trimmed(keep_err)
        )
        return encode_result(trimmed)

    empty = len(body(0))
    if empty > max_bytes:
        return None
    keep = len(result.stdout.data) + len(result.stderr.data)
    for _ in range(20):
        candidate = body(keep)
        if len(candidate) <= max_bytes or keep == 0:
            return candidate
        # Bytes on the wire per byte kept, as measured; aim 1% under the limit.
        ratio = (len(candidate) - empty) / keep
        keep = min(keep - 1, int((max_bytes - empty) / ratio * 0.99))
        keep = max(keep, 0)
    return body(0)
