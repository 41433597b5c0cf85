"""Access control, deny by default: :class:`AuthGate` stands in front of a Klein app,
looks up which route a request is for, and lets it through only after the check that
route's :class:`Access` level calls for. A route missing from the table is refused (and
the route sweep test fails), so a new route is closed until someone classifies it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, RequestRedirect

from taskscheduler.web.errors import (
    INTERNAL_ERROR,
    UNCLASSIFIED_ROUTE,
    ApiError,
    method_not_allowed,
)
from taskscheduler.web.responses import described, render_error


class Access(enum.StrEnum):
    """Who may call a route."""

    PUBLIC = "public"  # anyone: health checks only
    OPERATOR = "operator"  # an operator's API token
    AGENT = "agent"  # an enrolled agent's credential
    JOIN = "join"  # a join secret (agent enrolment)
    SERVER = "server"  # on an agent: an instruction signed by its server


#: Checks a request against a route's access level: returns, or raises ApiError.
Authorize = Callable[[IRequest, Access], Awaitable[None]]
#: What can be refused on a request's headers (``Headers``) alone, for a route's level.
CheckHeaders = Callable[[Any, Access], "ApiError | None"]


def routing_path(request: IRequest) -> str | None:
    """The path Klein routes a request on, or None if it is not UTF-8 (Klein answers 400).

    Not ``request.path``: twisted.web splits the raw path on ``/`` and percent-decodes
    each segment, and Klein joins the segments again, so ``/api%2Fv1/agents`` reaches
    the route ``/api/v1/agents``. Access must be decided on that very path, or an
    encoded slash or letter would walk past the gate.
    """
    return _joined_path(getattr(request, "postpath", None) or [])


def _joined_path(postpath: list[bytes]) -> str | None:
    path = b"/".join(postpath)
    if not path.startswith(b"/"):
        path = b"/" + path
    try:
        return path.decode("utf-8")
    except UnicodeDecodeError:
        return None


def fixed_paths(url_map: Map) -> dict[str, frozenset[str]]:
    """The methods of each path that has no variable part (``/api/v1/tasks/create``).

    Such a path belongs to its routes for every method: ``GET /api/v1/tasks/create``
    must be a 405, not ``GET /api/v1/tasks/<task_id>`` with the id "create".
    """
    fixed: dict[str, set[str]] = {}
    for rule in url_map.iter_rules():
        if not rule.arguments:
            fixed.setdefault(rule.rule, set()).update(rule.methods or ())
    return {path: frozenset(methods) for path, methods in fixed.items()}


def route_endpoint(url_map: Map, request: IRequest) -> str | None:
    """The Klein endpoint (route function name) a request is for, or None if no route
    matches (Klein then answers 404 or 405 itself)."""
    return _match(url_map, routing_path(request), request.method)


def _match(url_map: Map, path: str | None, method_bytes: bytes) -> str | None:
    if path is None:
        return None
    method = method_bytes.decode("ascii", "replace")
    try:
        endpoint, _ = url_map.bind("localhost").match(path, method=method)
    except (NotFound, MethodNotAllowed, RequestRedirect):
        return None
    return str(endpoint)


class AuthGate(Resource):
    """Deny by default in front of a Klein resource.

    ``access`` classifies every route by endpoint name; a request for a route missing
    from it is refused with 403 and logged. Requests no route matches go through to Klein,
    which answers 404 or 405 without running anything; so are requests for a fixed path
    with a method it does not take (405 with ``Allow``).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        inner: Any,
        url_map: Map,
        access: Mapping[str, Access],
        authorize: Authorize,
        check_headers: CheckHeaders | None = None,
        observe: Callable[[IRequest, str | None], None] | None = None,
    ) -> None:
        """``observe(request, endpoint)`` is told of every request that reaches the
        gate, with its route's endpoint name (None: no route matches): the metrics."""
        super().__init__()
        self._inner = inner
        self._url_map = url_map
        self._access = dict(access)
        self._authorize = authorize
        self._check_headers = check_headers
        self._observe = observe
        self._fixed = fixed_paths(url_map)

    def open_route(self, endpoint: str) -> None:
        """Let anyone call ``endpoint`` from now on (``/metrics`` on a loopback listener)."""
        self._access[endpoint] = Access.PUBLIC

    def refuse_early(self, method: bytes, postpath: list[bytes], headers: Any) -> ApiError | None:
        """What ``check_headers`` refuses on a request's headers alone, before its body is
        read (:class:`LimitedRequest` asks); None lets the body in, and :meth:`render`
        then makes the full check. Only for a route that needs a credential."""
        if self._check_headers is None:
            return None
        endpoint = _match(self._url_map, _joined_path(postpath), method)
        level = self._access.get(endpoint) if endpoint is not None else None
        if level is None or level is Access.PUBLIC:
            return None  # render answers these (404, 405, 403 unclassified, public)
        return self._check_headers(headers, level)

    def render(self, request: IRequest) -> Any:
        path = routing_path(request)
        endpoint = _match(self._url_map, path, request.method)
        if self._observe is not None:
            self._observe(request, endpoint)
        allowed = self._fixed.get(path) if path is not None else None
        if allowed is not None and request.method.decode("ascii", "replace") not in allowed:
            return render_error(request, method_not_allowed(request, allowed))
        if endpoint is None:
            return self._inner.render(request)
        level = self._access.get(endpoint)
        if level is None:
            self.log.error("refused a request for unclassified route {endpoint}", endpoint=endpoint)
            return render_error(request, UNCLASSIFIED_ROUTE())
        if level is Access.PUBLIC:
            return self._inner.render(request)
        d = Deferred.fromCoroutine(self._check(request, level))
        d.addErrback(self._unexpected, request)
        return NOT_DONE_YET

    async def _check(self, request: IRequest, level: Access) -> None:
        try:
            await self._authorize(request, level)
        except ApiError as e:
            _finish(request, render_error(request, e))
            return
        if _gone(request):
            # Klein would run the route and then finish a request whose connection is
            # lost (its own notice of that came before it was asked): nothing to answer,
            # and nothing was done yet; the client sends again.
            self.log.debug(
                "the client of {request} went away while its credential was checked",
                request=described(request),
            )
            return
        _finish(request, self._inner.render(request))

    def _unexpected(self, failure: Failure, request: IRequest) -> None:
        # The details go to the log, never to the client.
        self.log.failure("unexpected error checking access", failure)
        _finish(request, render_error(request, INTERNAL_ERROR()))


def _finish(request: IRequest, rendered: Any) -> None:
    if rendered is NOT_DONE_YET:
        return
    if _gone(request):
        return
    request.write(rendered)
    request.finish()


def _gone(request: IRequest) -> bool:
    """Whether the request's connection is lost (twisted.web has no public word for it)."""
    return bool(getattr(request, "_disconnected", False))
