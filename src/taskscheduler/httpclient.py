"""One HTTP client per daemon: persistent connections, quiet, closed at shutdown; and
what both directions' typed clients share: one bounded exchange and the reading of an
answer (:class:`Answer`).

:class:`DaemonHTTP` has the part of treq's module API the daemons use (``get``,
``post``, ``request``, ``content``, ``json_content``), so unit tests hand the same code a
``treq.testing.StubTreq`` instead.

Neither daemon trusts the other with its memory: every answer one reads from the other
goes through :func:`read_body`, which stops reading and drops the connection past a
number of bytes or a deadline (the request must be made with ``unbuffered=True``, or
treq reads the whole body first).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss

from taskscheduler.tls import make_http_client


class _QuietClientFactory(_HTTP11ClientFactory):
    # Without this every new connection logs "Starting factory" at info level.
    noisy = False


class DaemonHTTP:
    """A treq ``HTTPClient`` on a persistent, quiet connection pool."""

    def __init__(
        self,
        reactor: Any,
        ca_file: str | Path | None = None,
        client_cert_file: str | Path | None = None,
        client_key_file: str | Path | None = None,
        *,
        max_per_host: int = 8,
        connect_timeout: float = 10.0,
    ) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_per_host
        self.pool.cachedConnectionTimeout = 120
        self.pool._factory = _QuietClientFactory
        self._client = make_http_client(
            reactor,
            ca_file,
            client_cert_file,
            client_key_file,
            pool=self.pool,
            connect_timeout=connect_timeout,
        )

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        return self._client.request(method, url, **kwargs)

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self._client.get(url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self._client.post(url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> Deferred[Any]:
        return self._client.delete(url, **kwargs)

    @staticmethod
    def content(response: Any) -> Deferred[bytes]:
        return response.content()  # type: ignore[no-any-return]

    @staticmethod
    def json_content(response: Any) -> Deferred[Any]:
        return response.json()  # type: ignore[no-any-return]

    def close(self) -> Deferred[None]:
        """Close every pooled connection (at stopService)."""
        return self.pool.closeCachedConnections()  # type: ignore[no-any-return]


class AnswerTooLarge(Exception):
    """The other daemon's answer is larger than the reader accepts; it was not read."""


class AnswerTooSlow(Exception):
    """The other daemon's answer did not arrive whole in time."""


def read_body(
    response: Any,
    max_bytes: int,
    clock: IReactorTime | None = None,
    timeout: float | None = None,
) -> Deferred[bytes]:
    """The body of ``response``, or :class:`AnswerTooLarge` as soon as it passes
    ``max_bytes`` (at once if its ``Content-Length`` says so), or :class:`AnswerTooSlow`
    if it is not whole ``timeout`` seconds from now. Either way the connection is
    dropped, so the rest of the answer is never read."""
    reader = _CappedReader(max_bytes)
    declared = getattr(response, "length", None)
    if isinstance(declared, int) and declared > max_bytes:
        reader.refused = AnswerTooLarge(f"the answer declares {declared} bytes, over {max_bytes}")
    if clock is not None and timeout is not None:
        reader.deadline = clock.callLater(
            timeout, reader.stop, AnswerTooSlow(f"the answer was not whole after {timeout:g}s")
        )
    response.deliverBody(reader)
    return reader.done


class _CappedReader(Protocol):
    """Keeps at most ``max_bytes`` of a body; past them, stops it and fails ``done``."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._chunks: list[bytes] = []
        self._size = 0
        self.refused: Exception | None = None
        self.deadline: IDelayedCall | None = None
        self.done: Deferred[bytes] = Deferred(lambda _: self._drop())

    def connectionMade(self) -> None:
        if self.refused is not None:
            self.stop(self.refused)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._max_bytes:
            self.stop(AnswerTooLarge(f"the answer is larger than {self._max_bytes} bytes"))
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        self._cancel_deadline()
        # PotentialDataLoss: a body without a length, ended by closing the connection.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)

    def stop(self, error: Exception) -> None:
        """Fail ``done`` with ``error`` and drop the connection, unless already done."""
        if self.done.called:
            return
        self._chunks = []
        self._cancel_deadline()
        self.done.errback(error)
        self._drop()

    def _drop(self) -> None:
        self._cancel_deadline()
        producer: Any = self.transport  # the response's, an IPushProducer
        if producer is not None:
            producer.stopProducing()

    def _cancel_deadline(self) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        self.deadline = None


class NoAnswer(Exception):
    """No whole answer came: no connection, a timeout, an answer too large to read."""


@dataclass(frozen=True)
class Answer:
    """What the other daemon answered: its status, and its body decoded from JSON (None
    when it is not JSON)."""

    status: int
    body: Any

    @property
    def error_code(self) -> str | None:
        """The code of a taskscheduler error body (``{"error": {"code", "message"}}``),
        or None if the body is not one."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        if not isinstance(error, dict):
            return None
        code, message = error.get("code"), error.get("message")
        return code if isinstance(code, str) and isinstance(message, str) else None

    @property
    def error_message(self) -> str:
        """The message of an error body, cut short for a log line ("" if none)."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        return str(error.get("message", ""))[:200] if isinstance(error, dict) else ""

    def describe(self) -> str:
        """The answer, in a few words for the log."""
        code = self.error_code
        if code is not None:
            return f"{self.status} {code}: {self.error_message}"
        return f"{self.status} with a body that is not a taskscheduler answer"


async def exchange(
    http: Any,
    clock: IReactorTime,
    method: str,
    url: str,
    body: bytes,
    headers: dict[bytes, list[bytes]],
    *,
    timeout: float,
    max_answer_bytes: int,
    allow_redirects: bool = True,
) -> Answer:
    """Send one request and read its answer within ``max_answer_bytes`` and ``timeout``;
    :class:`NoAnswer` (saying why) if no whole answer came.

    Cancelling the caller's wait raises CancelledError, however the request ends: the
    caller stopped, and must neither act on an outcome nor send a next request. (treq's
    own timeout cancels the request too; that is a :class:`NoAnswer`.)
    """
    stopped = False
    try:
        request = http.request(
            method,
            url,
            data=body or None,
            headers=headers,
            timeout=timeout,
            reactor=clock,
            unbuffered=True,  # read_body bounds what is read; treq would read it all
            allow_redirects=allow_redirects,
        )
    except Exception as e:  # a URL treq cannot parse, say
        raise NoAnswer(describe(e)) from e

    def stop_waiting(_: Deferred[Any]) -> None:
        nonlocal stopped
        stopped = True
        request.cancel()

    waiting: Deferred[Any] = Deferred(stop_waiting)
    request.chainDeferred(waiting)
    try:
        response = await waiting
        raw = await read_body(response, max_answer_bytes, clock, timeout)
    except CancelledError:
        raise
    except Exception as e:
        if stopped:
            raise CancelledError() from e
        raise NoAnswer(describe(e)) from e
    try:
        decoded = json.loads(raw)
    except ValueError:
        decoded = None
    return Answer(response.code, decoded)


def describe(error: BaseException | None) -> str:
    """An exception in one line for the log."""
    return f"{type(error).__name__}: {error}"[:300]
