"""Accepting connections when the process is out of descriptors: pause the listening
port for a moment instead of failing on every turn of the reactor."""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

#: Seconds accepting pauses when the process is out of descriptors.
ACCEPT_PAUSE = 0.5

#: Accept errors that mean the process (or the system) is out of descriptors or buffers.
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class PausingListener:
    """A listening socket whose ``accept`` pauses its port for ``pause`` seconds when the
    process runs out of descriptors, instead of failing on every turn of the reactor.

    Twisted's port would otherwise find the socket readable again at once, fail again,
    and log each failure: a busy loop that starves the clients already connected. While
    paused, new connections wait in the kernel's backlog. One warning per minute at most.
    """

    log = Logger()

    def __init__(self, sock: Any, port: Any, clock: IReactorTime, pause: float) -> None:
        self._socket = sock
        self._port = port
        self._clock = clock
        self._pause = pause
        self._resume: IDelayedCall | None = None
        self._paused = 0
        self._logged_at: float | None = None

    def accept(self) -> Any:
        try:
            return self._socket.accept()
        except OSError as e:
            if e.errno not in _OUT_OF_DESCRIPTORS:
                raise
            self._pause_accepting(e)
            raise BlockingIOError(errno.EAGAIN, "accepting paused") from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._socket, name)

    def _pause_accepting(self, error: OSError) -> None:
        if self._resume is not None and self._resume.active():
            return
        self._port.stopReading()
        self._resume = self._clock.callLater(self._pause, self._resume_accepting)
        self._paused += 1
        now = self._clock.seconds()
        if self._logged_at is None or now - self._logged_at >= 60:
            self.log.warn(
                "out of descriptors ({error}): paused accepting connections {count} time(s) "
                "for {pause} s; connected clients are still served",
                error=errno.errorcode.get(error.errno or 0, str(error)),
                count=self._paused,
                pause=self._pause,
            )
            self._paused, self._logged_at = 0, now

    def _resume_accepting(self) -> None:
        self._resume = None
        port = self._port
        if getattr(port, "connected", False) and not getattr(port, "disconnecting", False):
            port.startReading()


def pause_accepting_when_out_of_descriptors(
    port: Any, clock: IReactorTime, pause: float = ACCEPT_PAUSE
) -> None:
    """Wrap a listening port's socket in a :class:`PausingListener` (a no-op for a port
    that is not a socket Twisted reads from)."""
    sock = getattr(port, "socket", None)
    if sock is None or not hasattr(port, "stopReading") or isinstance(sock, PausingListener):
        return
    port.socket = PausingListener(sock, port, clock, pause)
