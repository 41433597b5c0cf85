"""A client that closes its connection before the answer (an agent failing over to another
replica after its attempt timeout) is normal: the server logs nothing above info, writes
nothing to the closed request, and the work the request started runs to its end."""

from __future__ import annotations

import gc
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.logger import Logger, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from txpostgres.txpostgres import _CancelInProgress

from taskscheduler.web.gate import Access, AuthGate
from taskscheduler.web.responses import App, install_error_handlers, json_response


class _CancelRaises(Deferred[None]):
    """Waits like a txpostgres query: cancelling it raises, as txpostgres' poll does."""

    def __init__(self) -> None:
        def refuse(_: Deferred[None]) -> None:
            raise _CancelInProgress()

        super().__init__(refuse)


class Api:
    app = App()
    log = Logger()

    def __init__(self) -> None:
        self.authorized: Deferred[None] = Deferred()
        self.query = _CancelRaises()
        self.stored: list[str] = []

    async def authorize(self, request: IRequest, level: Access) -> None:
        await self.authorized

    @app.route("/store", methods=["POST"])
    async def store(self, request: IRequest) -> bytes:
        await self.query
        self.stored.append("result")
        return json_response(request, {"stored": 1})

    @app.route("/open", methods=["GET"])
    async def open(self, request: IRequest) -> bytes:
        await self.query
        self.stored.append("read")
        return json_response(request, {})

    def resource(self) -> AuthGate:
        access = {"store": Access.AGENT, "open": Access.PUBLIC}
        return AuthGate(self.app.resource(), self.app.url_map, access, self.authorize)


install_error_handlers(Api.app, Api.log)


def _request(method: bytes, path: bytes) -> Request:
    request = Request(DummyChannel())
    request.method = method
    request.uri = request.path = path
    request.prepath = []
    request.postpath = path.split(b"/")[1:]
    request.client = request.channel.transport.getPeer()  # type: ignore[attr-defined]
    request.sent = request.channel.transport.written  # type: ignore[attr-defined]
    return request


def _serve(api: Api, request: Request) -> None:
    request.render(api.resource())


def _lose(request: Request) -> None:
    request.connectionLost(Failure(ConnectionDone("the client gave up")))


def _loud(events: list[dict[str, Any]]) -> list[str]:
    loud = [e for e in events if e.get("log_level", LogLevel.info) > LogLevel.info]
    loud += [e for e in events if e.get("isError") or e.get("log_failure") is not None]
    return [formatEvent(e) or repr(e.get("log_failure")) for e in loud]


def _written(request: Request) -> bytes:
    """What went out on the request's connection (kept: finish() drops ``channel``)."""
    return request.sent.getvalue()  # type: ignore[attr-defined, no-any-return]


def test_client_gone_while_the_route_works() -> None:
    api = Api()
    api.authorized.callback(None)
    request = _request(b"POST", b"/store")
    with capturedLogs() as events:
        _serve(api, request)
        assert api.stored == []
        _lose(request)
        # The work goes on: the store commits although nobody waits for the answer.
        api.query.callback(None)
        gc.collect()
    assert api.stored == ["result"]
    assert _loud(events) == []
    assert _written(request) == b""
    gone = [e for e in events if "went away" in (formatEvent(e) or "")]
    assert len(gone) == 1 and gone[0]["log_level"] == LogLevel.debug


def test_client_gone_while_its_credential_is_checked() -> None:
    api = Api()
    request = _request(b"POST", b"/store")
    with capturedLogs() as events:
        _serve(api, request)
        _lose(request)
        api.authorized.callback(None)
        api.query.callback(None)
        gc.collect()
    assert _loud(events) == []
    assert _written(request) == b""


def test_client_gone_on_a_public_route() -> None:
    api = Api()
    request = _request(b"GET", b"/open")
    with capturedLogs() as events:
        _serve(api, request)
        _lose(request)
        api.query.callback(None)
        gc.collect()
    assert api.stored == ["read"]
    assert _loud(events) == []
    assert _written(request) == b""


def test_an_answer_still_goes_to_a_client_that_waits() -> None:
    api = Api()
    api.authorized.callback(None)
    request = _request(b"POST", b"/store")
    _serve(api, request)
    api.query.callback(None)
    assert request.finished
    assert b'{"stored":1}' in _written(request)


def test_work_that_fails_after_its_client_left_is_logged_without_a_traceback() -> None:
    api = Api()
    api.authorized.callback(None)
    request = _request(b"POST", b"/store")
    with capturedLogs() as events:
        _serve(api, request)
        _lose(request)
        api.query.errback(RuntimeError("the database broke"))
        gc.collect()
    warned = [e for e in events if e.get("log_level") == LogLevel.warn]
    assert [formatEvent(e) for e in warned] == [
        "POST /store failed after its client went away: the database broke"
    ]
    assert all(e.get("log_failure") is None for e in events)
    assert [e for e in events if e.get("log_level", LogLevel.info) > LogLevel.warn] == []
