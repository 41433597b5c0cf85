"""What both daemons do when they cannot start: say why on stderr, stop, and exit 1.

``twistd`` exits 0 whenever its reactor stops, whatever stopped it, so a daemon that
refused to start looked like a clean exit to systemd, Docker's restart policies and CI.
Twisted offers no public way to set twistd's exit status, so :class:`StartFailure` ends
the process itself with :data:`EXIT_START_FAILED`, from an ``atexit`` handler: by then
twistd has stopped the services (the embedded PostgreSQL among them), removed its pid
file and closed its log, and every exit handler registered after the daemon was built
(pgserver's among them) has run.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from twisted.internet.error import ReactorNotRunning

#: The exit status of a daemon that could not start.
EXIT_START_FAILED = 1


class StartFailure:
    """Called with a one-line reason when a daemon cannot start.

    It writes ``<daemon> could not start: <reason>`` to the process's own stderr (twistd
    sends ``sys.stderr`` to its log, which may be a file), stops the reactor (also when
    called before it runs), and makes the process exit with :data:`EXIT_START_FAILED`.
    Build it in ``makeService``: its exit handler must be registered before anything the
    services start registers one, since handlers run last registered, first.
    """

    def __init__(
        self,
        reactor: Any,  # IReactorCore: callWhenRunning and stop
        daemon: str,
        *,
        stderr: TextIO | None = None,
        exit: Callable[[int], object] = os._exit,
        register_exit_handler: Callable[[Callable[[], None]], object] = atexit.register,
    ) -> None:
        self._reactor = reactor
        self._daemon = daemon
        self._stderr = stderr
        self._exit = exit
        #: The first reason given, or None while the daemon has not failed.
        self.reason: str | None = None
        register_exit_handler(self._exit_if_failed)

    def __call__(self, reason: str) -> None:
        if self.reason is None:
            # One line, so that `journalctl` or `docker logs` shows it whole.
            self.reason = " ".join(reason.split()) or "unknown error"
            stream = self._stderr if self._stderr is not None else sys.__stderr__
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.write(f"{self._daemon} could not start: {self.reason}\n")
                    stream.flush()
        self._reactor.callWhenRunning(self._stop_reactor)

    def _stop_reactor(self) -> None:
        with contextlib.suppress(ReactorNotRunning):
            self._reactor.stop()

    def _exit_if_failed(self) -> None:
        if self.reason is None:
            return
        # os._exit skips the interpreter's own flushing of the standard streams.
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):
                if stream is not None:
                    stream.flush()
        self._exit(EXIT_START_FAILED)
