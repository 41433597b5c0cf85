"""Start-up order as services: children started one after another and stopped in reverse,
a daemon's listening port, and one-line steps of start-up.

Twisted's ``MultiService`` starts its children all at once and ignores what their
``startService`` returns; a daemon whose HTTP port must wait for its database needs each
child to wait for the one before. :class:`StartInOrder` does that, and turns a child that
fails to start into a clean exit with status 1 (:class:`taskscheduler.daemon.StartFailure`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.web.listener import pause_accepting_when_out_of_descriptors


class StartInOrder(MultiService):
    """Starts its children one after another, each once the one before it has started (a
    child's ``startService`` may return a Deferred), and stops those it started in
    reverse, each once the one after it has stopped.

    If a child fails to start, the failure is logged (without a traceback when it is one
    of ``operator_errors``, whose message says it all) and ``on_fatal`` is called with a
    one-line reason: it must stop the process, which stops this service and so every
    child already started. Stopped while starting (SIGTERM), it is not a failure.
    """

    log = Logger()

    def __init__(
        self,
        daemon: str,
        on_fatal: Callable[[str], None],
        operator_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        super().__init__()
        self._daemon = daemon
        self._on_fatal = on_fatal
        self._operator_errors = operator_errors
        self._started: list[IService] = []
        self._starting: Deferred[None] | None = None
        self._stopping = False

    def startService(self) -> None:
        Service.startService(self)  # not MultiService's: it would start every child now
        self._stopping = False
        self._starting = Deferred.fromCoroutine(self._start_children())
        self._starting.addErrback(self._failed)

    async def _start_children(self) -> None:
        for child in list(self):
            if self._stopping:
                return
            self._started.append(child)
            await maybeDeferred(child.startService)

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError) and self._stopping:
            return  # stopped (SIGTERM, Ctrl-C) while starting: not a failure
        if failure.check(*self._operator_errors):
            reason = failure.getErrorMessage()
            self.log.error("{daemon} could not start: {error}", daemon=self._daemon, error=reason)
        else:
            kind = getattr(failure.type, "__name__", "Error")
            reason = f"{kind}: {failure.getErrorMessage()} (see the log)"
            self.log.failure("{daemon} could not start", failure, daemon=self._daemon)
        self._on_fatal(reason)

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopping = True
        if self._starting is not None and not self._starting.called:
            self._starting.cancel()
        Service.stopService(self)
        started, self._started = self._started, []
        for child in reversed(started):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {service!r} failed", service=child)


class Step(Service):
    """One step of start-up as a service: ``start`` runs when it starts (an awaitable it
    returns is waited for), ``stop`` when it stops."""

    def __init__(
        self,
        name: str,
        start: Callable[[], Awaitable[object] | object] | None = None,
        stop: Callable[[], Awaitable[object] | object] | None = None,
    ) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop

    def startService(self) -> Deferred[None] | None:  # type: ignore[override]
        super().startService()
        return None if self._start is None else _deferred(self._start)

    def stopService(self) -> Deferred[None] | None:  # type: ignore[override]
        super().stopService()
        return None if self._stop is None else _deferred(self._stop)

    def __repr__(self) -> str:
        return f"<Step {self.name}>"


def _deferred(function: Callable[[], Awaitable[object] | object]) -> Deferred[None]:
    async def run() -> None:
        result = function()
        if isinstance(result, Awaitable):
            await result

    return Deferred.fromCoroutine(run())


class ListeningPort(Service):
    """A daemon's listening port, bound when the daemon starts and accepting connections
    only once :meth:`accept` is called.

    It binds in ``privilegedStartService`` (before twistd drops root, as Twisted's own
    ``StreamServerEndpointService`` does), so a port that cannot be had, or that
    ``check`` refuses (``check`` is given the port, and raises to refuse it), stops the
    daemon before it starts anything else. Until :meth:`accept`, clients wait in the
    kernel's backlog: nothing is served before the services behind the port are up (a
    port Twisted does not read itself, such as a test's fake, cannot wait: it serves).
    """

    log = Logger()

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        clock: IReactorTime,
        check: Callable[[IListeningPort], None] | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._clock = clock
        self._check = check
        self._listening: Deferred[IListeningPort] | None = None
        #: The bound port, once it is.
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self._listening is None:
            self._listening = self._endpoint.listen(self._factory)
            self._listening.addCallback(self._bound)

    def _bound(self, port: IListeningPort) -> IListeningPort:
        # On the listen's own turn of the reactor: no connection was accepted before.
        pause = getattr(port, "stopReading", None)
        if pause is not None:
            pause()
        self.port = port
        return port

    def startService(self) -> Deferred[None]:  # type: ignore[override]
        super().startService()
        self.privilegedStartService()
        return Deferred.fromCoroutine(self._started())

    async def _started(self) -> None:
        assert self._listening is not None
        port = await self._listening
        if self._check is not None:
            self._check(port)

    def accept(self) -> None:
        """Start accepting connections."""
        if self.port is None:
            return
        pause_accepting_when_out_of_descriptors(self.port, self._clock)
        resume = getattr(self.port, "startReading", None)
        if resume is not None:
            resume()

    async def stop_listening(self) -> None:
        """Close the port (the connections it accepted go on)."""
        listening, self._listening = self._listening, None
        if listening is not None and not listening.called:
            listening.cancel()
        port, self.port = self.port, None
        if port is not None:
            await maybeDeferred(port.stopListening)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        return Deferred.fromCoroutine(self.stop_listening())

    def accepting(self) -> Step:
        """The service that opens the port to clients, last of a daemon's start-up, and
        closes it first when the daemon stops."""
        return Step("accepting", self.accept, self.stop_listening)
