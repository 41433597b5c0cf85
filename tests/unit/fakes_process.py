"""A fake process reactor: records ``spawnProcess`` calls and lets a test play the child.

``FakeProcessReactor`` is a ``task.Clock`` (IReactorTime) that also provides
``IReactorProcess``. Each ``spawnProcess`` call is recorded as a :class:`SpawnCall` whose
``transport`` (a :class:`FakeProcessTransport`) lets the test write output, exit the
child and close its pipes, in the order Twisted's real ``Process`` would report them:
``processExited`` when the child is reaped, ``processEnded`` once it is reaped and every
pipe is closed. No real process is started and no real signal is sent.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, AnyStr, cast

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessProtocol, IProcessTransport, IReactorProcess
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer


class FakeProcessTransport:
    """The transport of one fake child process."""

    def __init__(
        self,
        reactor: FakeProcessReactor,
        protocol: IProcessProtocol,
        pid: int,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> None:
        self._reactor = reactor
        # Descriptors of the parent's open files handed to the child (as a real child's
        # copies, they stay open after the parent closes its own until the child ends).
        self.files = {
            child: os.dup(parent)
            for child, parent in (childFDs or {}).items()
            if isinstance(parent, int)
        }
        self.proto = protocol
        self.pid: int | None = pid
        self.signals: list[int | str] = []  # sent with signalProcess, in order
        self.stdin_closed = False
        self.pipes_open = any(kind == "r" for kind in (childFDs or {1: "r"}).values())
        self.lose_connection_calls = 0
        self._reason: BaseException | None = None
        self._ended = False

    # -- IProcessTransport (the parts a runner uses) ----------------------------------------

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def closeChildFD(self, childFD: int) -> None:
        if childFD == 0:
            self.stdin_closed = True

    def signalProcess(self, signalID: int | str) -> None:
        if self._reason is not None:
            raise ProcessExitedAlready()
        self.signals.append(signalID)

    def loseConnection(self) -> None:
        # Twisted closes each pipe on the next reactor turn (callLater(0, ...)).
        self.lose_connection_calls += 1
        self.stdin_closed = True
        self._reactor.callLater(0, self.close_pipes)

    # -- playing the child ---------------------------------------------------------------

    @property
    def exited(self) -> bool:
        return self._reason is not None

    def write(self, childFD: int, data: bytes) -> None:
        """The child writes ``data`` to its file descriptor ``childFD`` (1 or 2)."""
        if childFD in self.files:
            os.write(self.files[childFD], data)
            return
        assert self.pipes_open, "the pipes are closed"
        self.proto.childDataReceived(childFD, data)

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        """The child exits with ``code``, or is killed by ``signal``; it is reaped."""
        assert self._reason is None, "the child already exited"
        if signal is not None:
            self._reason = ProcessTerminated(None, signal, signal)
        elif code:
            self._reason = ProcessTerminated(code, None, code << 8)
        else:
            self._reason = ProcessDone(0)
        self.pid = None  # Twisted forgets the pid once the child is reaped
        for fd in self.files.values():
            os.close(fd)
        self.files = {}
        self.proto.processExited(Failure(self._reason))
        self._maybe_end()

    def close_pipes(self) -> None:
        """Every writer of stdout and stderr is gone: the pipes reach end-of-file."""
        if not self.pipes_open:
            return
        self.pipes_open = False
        for fd in (1, 2):
            self.proto.childConnectionLost(fd)
        self._maybe_end()

    def finish(self, code: int | None = 0, signal: int | None = None) -> None:
        """The common case: the child exits and its pipes close with it."""
        self.exit(code, signal)
        self.close_pipes()

    def _maybe_end(self) -> None:
        if self._reason is not None and not self.pipes_open and not self._ended:
            self._ended = True
            self.proto.processEnded(Failure(self._reason))


@dataclass
class SpawnCall:
    """One recorded ``spawnProcess`` call."""

    protocol: IProcessProtocol
    executable: bytes | str
    args: list[bytes | str]
    env: dict[Any, Any] | None
    path: bytes | str | None
    uid: int | None
    gid: int | None
    usePTY: bool
    childFDs: dict[int, int | str] | None
    transport: FakeProcessTransport = field(repr=False)


@implementer(IReactorProcess)
class FakeProcessReactor(Clock):
    """A ``task.Clock`` that also fakes ``IReactorProcess.spawnProcess``."""

    def __init__(self, first_pid: int = 4000) -> None:
        super().__init__()
        self.spawned: list[SpawnCall] = []
        self._pids = itertools.count(first_pid)
        #: When set, the next spawnProcess call raises it instead of starting anything.
        self.spawn_error: BaseException | None = None

    def spawnProcess(
        self,
        processProtocol: IProcessProtocol,
        executable: bytes | str,
        args: Sequence[bytes | str] = (),
        env: Mapping[AnyStr, AnyStr] | None = None,
        path: bytes | str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,
        childFDs: Mapping[int, int | str] | None = None,
    ) -> IProcessTransport:
        if self.spawn_error is not None:
            error, self.spawn_error = self.spawn_error, None
            raise error
        transport = FakeProcessTransport(self, processProtocol, next(self._pids), childFDs)
        self.spawned.append(
            SpawnCall(
                protocol=processProtocol,
                executable=executable,
                args=list(args),
                env=None if env is None else dict(env),
                path=path,
                uid=uid,
                gid=gid,
                usePTY=usePTY,
                childFDs=None if childFDs is None else dict(childFDs),
                transport=transport,
            )
        )
        # Just the parts of IProcessTransport that a runner uses.
        as_transport = cast(IProcessTransport, transport)
        processProtocol.makeConnection(as_transport)
        return as_transport

    @property
    def last(self) -> FakeProcessTransport:
        """The transport of the most recent spawn."""
        return self.spawned[-1].transport


class GroupKiller:
    """Stands in for ``os.killpg``: records ``(pgid, signal)`` instead of sending it.

    Groups listed in ``gone`` raise ProcessLookupError, as killpg does for an empty group.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.gone: set[int] = set()

    def __call__(self, pgid: int, signum: int) -> None:
        self.calls.append((pgid, signum))
        if pgid in self.gone:
            raise ProcessLookupError(3, "No such process")
