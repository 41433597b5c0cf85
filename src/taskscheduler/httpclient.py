"""One HTTP client per daemon: persistent connections, quiet, closed at shutdown.

:class:`DaemonHTTP` has the part of treq's module API the daemons use (``get``,
``post``, ``request``, ``content``, ``json_content``), so unit tests hand the same code a
``treq.testing.StubTreq`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

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
