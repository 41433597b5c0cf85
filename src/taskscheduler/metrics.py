"""What both daemons' ``GET /metrics`` shares: the Prometheus text page, the count of HTTP
requests by route and status, and who may read the page.

Each daemon instance keeps its metrics in a registry of its own (never
``prometheus_client``'s global one), so that several daemons in one process (the tests)
keep theirs apart. The names and what they mean are listed in the README ("Metrics").

Who may read the page: anyone when the daemon listens on loopback only or was given
``--metrics-public``; otherwise an operator's token (server) or the token of
``--metrics-token-file`` (agent). The route sits in each app's access table at the
closed level; :meth:`taskscheduler.web.gate.AuthGate.open_route` opens it at run time,
once the listening address is known.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
)
from twisted.web.iweb import IRequest

from taskscheduler.auth import HASH_SCHEME, hash_token, parse_bearer

# The ``_created`` series double every counter and histogram for a start time that
# Prometheus can tell from resets itself.
disable_created_metrics()

#: The route name of requests no route matches (404, 405): one series, not one per path.
UNMATCHED = "unmatched"


def new_registry() -> CollectorRegistry:
    """A registry for one daemon instance."""
    return CollectorRegistry(auto_describe=True)


def metrics_page(request: IRequest, registry: CollectorRegistry) -> bytes:
    """The Prometheus text exposition of ``registry``, as the answer to ``request``."""
    request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
    request.setHeader(b"Cache-Control", b"no-store")
    return generate_latest(registry)


class HTTPMetrics:
    """``taskscheduler_<daemon>_http_requests_total{route, code}``: requests answered.

    ``route`` is the Klein endpoint name (``get_task``, not ``/api/v1/tasks/<uuid>``), or
    :data:`UNMATCHED`: the series are bounded by the routes and the status codes, never
    by what clients send. Requests refused before their body is read (413, and 401/403
    decided on the headers alone) never reach the routes and are not counted.
    """

    def __init__(self, registry: CollectorRegistry, daemon: str) -> None:
        self._requests = Counter(
            f"taskscheduler_{daemon}_http_requests",
            "HTTP requests answered, by route (the Klein endpoint name, 'unmatched' when no "
            "route matches) and status code.",
            ["route", "code"],
            registry=registry,
        )
        self._children: dict[tuple[str, int], Any] = {}

    def observe(self, request: IRequest, route: str | None) -> None:
        """Count ``request`` once it is answered (or its client went away)."""
        finished: Any = request  # a twisted.web Request: IRequest lacks notifyFinish
        finished.notifyFinish().addBoth(self._finished, finished, route or UNMATCHED)

    def _finished(self, _: object, request: Any, route: str) -> None:
        code: int = request.code
        child = self._children.get((route, code))
        if child is None:
            child = self._children[(route, code)] = self._requests.labels(route, str(code))
        child.inc()


class MetricsTokenError(OSError):
    """``--metrics-token-file`` holds no token: an operator error (said without a traceback)."""


class MetricsToken:
    """The bearer token that reads an agent's ``/metrics`` (``--metrics-token-file``).

    The file holds the token itself (what Prometheus's ``credentials_file`` sends) or
    its ``sha256:`` hash; only the hash is kept, and a presented token's hash is compared
    with it in constant time.
    """

    def __init__(self, token_hash: str) -> None:
        self._hash = token_hash.encode("ascii")

    @classmethod
    def from_file(cls, path: Path) -> MetricsToken:
        """Read ``path`` (:class:`MetricsTokenError` if it holds no token)."""
        text = path.read_text(encoding="utf-8").strip()
        if not text or len(text.split()) != 1:
            raise MetricsTokenError(f"{path}: expected one token (or its sha256: hash), alone")
        return cls(text.lower() if text.startswith(HASH_SCHEME) else hash_token(text))

    def accepts(self, headers: Any) -> bool:
        """Whether ``headers`` (twisted ``Headers``) carry the token."""
        values = headers.getRawHeaders(b"authorization") or []
        token = parse_bearer(values[0]) if len(values) == 1 else None
        if token is None:
            return False
        return hmac.compare_digest(hash_token(token).encode("ascii"), self._hash)
