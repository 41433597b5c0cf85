"""Sends spooled results to the server until it acknowledges them.

One result waiting goes alone (``POST /api/v1/tasks/{task_id}/complete``), for
freshness; many go in batches (``POST /api/v1/results``), so that a busy agent costs the
server one request and one multi-row insert per hundred results. A new result wakes the
reporter at once.

- acknowledged (``stored`` / ``duplicate``): the result leaves the spool;
- refused for good (400, 403, 404, 409 for one; ``conflict``, ``unknown_task``, ``deleted``,
  ``misaligned``, ``invalid``, ``forbidden`` in a batch): it leaves the spool, is logged
  and counted; a whole batch refused with 400 or 403 is sent again one by one to isolate
  the bad result;
- 401 (the credential is unknown or was revoked) is like a server down: the results stay
  spooled and are sent again with back-off, so nothing is lost while an operator sorts
  the agent's enrolment out;
- anything else (5xx, no connection, timeout): everything stays and is sent again after
  an exponential back-off with jitter, so that a thousand agents coming back at once do
  not flood the server. The back-off is capped at 30 s (retries between 15 and 30 s
  apart), so that results spooled while the server was away arrive within a minute of
  its return.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from taskscheduler.agent.spool import Spool, SpoolEntry
from taskscheduler.backoff import backoff_delay
from taskscheduler.schedule import format_instant

#: Most results in one batch, and their most bytes (the server accepts 16 MiB bodies).
BATCH_SIZE = 100
BATCH_BYTES = 8 * 1024 * 1024
#: Seconds to wait for the server's answer.
REQUEST_TIMEOUT = 30.0

_ACKNOWLEDGED = frozenset({"stored", "duplicate"})
_REFUSED = frozenset({"conflict", "unknown_task", "misaligned", "invalid", "forbidden", "deleted"})
#: Answers to a single result that no amount of retrying will change.
_REFUSED_CODES = frozenset({400, 403, 404, 409, 413, 422})
#: Answers to a batch that call for sending its results one by one.
_SEND_SINGLY_CODES = frozenset({400, 403, 404, 405, 413})


class _RetryLater(Exception):
    """The server could not take the results now; nothing was lost."""


class Reporter:
    """Empties the spool into the server."""

    log = Logger()

    def __init__(
        self,
        spool: Spool,
        http: Any,  # a DaemonHTTP, or a treq.testing.StubTreq in tests
        clock: IReactorTime,
        server_url: str,
        *,
        credential: str | None = None,
        batch_size: int = BATCH_SIZE,
        batch_bytes: int = BATCH_BYTES,
        retry_base: float = 1.0,
        retry_cap: float = 30.0,
        timeout: float = REQUEST_TIMEOUT,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._spool = spool
        self._http = http
        self._clock = clock
        self._url = server_url.rstrip("/")
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._timeout = timeout
        self._jitter = jitter
        #: The agent's credential, sent as a bearer token (None before enrolment).
        self.credential = credential
        self._failures = 0
        self._pending: IDelayedCall | None = None
        self._sending: Deferred[None] | None = None
        self._stopped = True
        #: Results the server refused for good.
        self.rejected = 0
        #: Results the server acknowledged.
        self.acknowledged = 0

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> None:
        self._stopped = False
        self.wake()

    def stop(self) -> None:
        """Send nothing more; what is unsent stays in the spool for the next start."""
        self._stopped = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._sending is not None:
            self._sending.cancel()

    def wake(self) -> None:
        """Send what is spooled now, unless a send is under way or the server is backed off."""
        if self._stopped or self._sending is not None:
            return  # a send under way takes every result spooled meanwhile
        if self._pending is not None and self._pending.active():
            return  # due on the next turn, or backing off: a server down is not hammered
        self._pending = self._clock.callLater(0, self._send_safely)

    # -- sending -----------------------------------------------------------------------

    def _send_safely(self) -> None:
        self._pending = None
        d = Deferred.fromCoroutine(self._send_all())
        if not d.called:
            self._sending = d

    async def _send_all(self) -> None:
        try:
            while not self._stopped:
                entries = self._spool.oldest(self._batch_size, self._batch_bytes)
                if not entries:
                    break
                if len(entries) == 1:
                    await self._send_single(entries[0])
                else:
                    await self._send_batch(entries)
            self._failures = 0
        except Exception as e:
            if self._stopped:
                return
            self._failures += 1
            delay = self._backoff()
            self.log.warn(
                "could not report results to {url} ({error}); {count} waiting, "
                "retrying in {delay:.1f}s",
                url=self._url,
                error=_describe(e),
                count=len(self._spool),
                delay=delay,
            )
            self._pending = self._clock.callLater(delay, self._send_safely)
        finally:
            self._sending = None

    def _backoff(self) -> float:
        return backoff_delay(self._failures, self._retry_base, self._retry_cap, self._jitter)

    async def _post(self, path: str, body: bytes) -> tuple[int, Any]:
        """POST ``body``; the status and decoded JSON answer (None if not JSON)."""
        try:
            headers = {b"Content-Type": [b"application/json"]}
            if self.credential is not None:
                headers[b"Authorization"] = [f"Bearer {self.credential}".encode("ascii")]
            response = await self._http.post(
                self._url + path,
                data=body,
                headers=headers,
                timeout=self._timeout,
                reactor=self._clock,
            )
            raw = await self._http.content(response)
        except Exception as e:
            raise _RetryLater(_describe(e)) from e
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        return response.code, answer

    def _read(self, entry: SpoolEntry) -> bytes | None:
        try:
            return self._spool.read(entry)
        except (OSError, ValueError) as e:
            self._refuse(entry, f"its spool file is unreadable: {e}")
            return None

    async def _send_single(self, entry: SpoolEntry) -> None:
        body = self._read(entry)
        if body is None:
            return
        code, answer = await self._post(f"/api/v1/tasks/{entry.task_id}/complete", body)
        if code == 200 and isinstance(answer, dict) and answer.get("status") in _ACKNOWLEDGED:
            self._acknowledge(entry)
        elif code in _REFUSED_CODES:
            self._refuse(entry, f"{code} {_error_message(answer)}")
        else:
            raise _RetryLater(f"the server answered {code} {_error_message(answer)}")

    async def _send_batch(self, entries: list[SpoolEntry]) -> None:
        readable: list[SpoolEntry] = []
        bodies: list[bytes] = []
        for entry in entries:
            body = self._read(entry)
            if body is not None:
                readable.append(entry)
                bodies.append(body)
        if not readable:
            return
        code, answer = await self._post(
            "/api/v1/results", b'{"results":[' + b",".join(bodies) + b"]}"
        )
        if code in _SEND_SINGLY_CODES:
            self.log.warn(
                "the server refused a batch of {count} results ({code} {error}); "
                "sending them one by one",
                count=len(readable),
                code=code,
                error=_error_message(answer),
            )
            for entry in readable:
                await self._send_single(entry)
            return
        items = answer.get("results") if code == 200 and isinstance(answer, dict) else None
        if not isinstance(items, list) or len(items) != len(readable):
            raise _RetryLater(f"the server answered {code} {_error_message(answer)}")
        unexpected = 0
        for entry, item in zip(readable, items, strict=True):
            status = item.get("status") if isinstance(item, dict) else None
            if status in _ACKNOWLEDGED:
                self._acknowledge(entry)
            elif status in _REFUSED:
                self._refuse(entry, str(status))
            else:
                unexpected += 1
        if unexpected:
            raise _RetryLater(f"the server gave {unexpected} answers the agent does not know")

    def _acknowledge(self, entry: SpoolEntry) -> None:
        self._spool.remove(entry)
        self.acknowledged += 1

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


def _error_message(answer: Any) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("message", ""))[:200]
    return ""


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]
