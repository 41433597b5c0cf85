"""Runs one command in a session of its own and captures what it writes.

Every run is ``setsid /bin/sh -c <command>`` started with ``spawnProcess``:

- **Own session, fast path kept.** Twisted starts processes with ``posix_spawnp`` unless
  ``path=``, ``uid=`` or ``gid=`` is given (then it forks, several times slower), and
  ``posix_spawnp`` there starts no new process group. So the program we spawn is util-linux
  ``setsid``: a freshly spawned process is never a group leader, so ``setsid`` calls
  ``setsid()`` in place (no fork) and execs ``/bin/sh``. The shell therefore keeps the pid
  that ``spawnProcess`` returned, and that pid is also its process group and session id.
  ``bench/bench_spawn.py`` measures what this costs.
- **Explicit environment.** The child gets exactly ``environment`` plus ``extra_env``;
  nothing comes from the agent's own ``os.environ``. An empty mapping means an empty
  environment (no ``PATH``).
- **Output** is captured as bytes, stdout and stderr apart, each capped: past the cap the
  first half and the last half are kept and the stream is flagged truncated with its
  original size. No marker is inserted; the bytes kept are exactly bytes written.
- **Time limit.** At the limit the process group gets SIGTERM, ``kill_grace`` seconds later
  SIGKILL; the outcome is ``TIMED_OUT``.
- **A run owns its process group; nothing of it survives the run.** When the shell exits,
  the pipes get ``pipe_grace`` seconds to reach end-of-file (a background grandchild may
  hold them open); then, and in any case once the run has ended, whatever is left of the
  group is sent SIGKILL and the pipes are closed. Background daemons started by a command
  therefore die with the run. A process that leaves the group on purpose (``setsid``,
  double-fork daemons) escapes the kill, but not the pipe grace: its pipes are closed.
- **Shutdown.** :meth:`ProcessRunner.terminate_all` ends every run as the time limit would;
  runs it cut short report ``LOST`` (the agent went away during the run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.protocol import Output, ResultStatus

#: util-linux ``setsid``: starts the shell in a new session without forking (see above).
SETSID = "/usr/bin/setsid"
#: The shell every command runs under.
SHELL = "/bin/sh"
#: Longest piece of a command quoted in a log line.
_LOGGED_COMMAND_CHARS = 200


@dataclass(frozen=True)
class RunOutcome:
    """How one run ended, and what it wrote."""

    status: ResultStatus  # SUCCEEDED, FAILED, TIMED_OUT, or LOST (cut short by terminate_all)
    exit_code: int | None  # set when the shell exited by itself
    signal: int | None  # set when the shell was ended by a signal
    started_at: datetime  # aware UTC, from the wall clock
    finished_at: datetime
    duration: float  # seconds, from the monotonic clock
    stdout: Output
    stderr: Output
    pid: int | None = None  # the shell's pid (= its process group); None if it never started


class _Capture:
    """One output stream: keeps the first and the last bytes within ``cap``."""

    def __init__(self, cap: int) -> None:
        self._head_cap = cap // 2
        self._tail_cap = cap - self._head_cap
        self._head = bytearray()
        self._tail = bytearray()
        self.size = 0

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        room = self._head_cap - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data and self._tail_cap:
            self._tail += data
            # Trim only once the tail is twice its cap: amortised O(1) per byte.
            if len(self._tail) > 2 * self._tail_cap:
                del self._tail[: -self._tail_cap]

    def output(self) -> Output:
        tail = self._tail[-self._tail_cap :] if self._tail_cap else b""
        data = bytes(self._head + tail)
        return Output(data, self.size, self.size > len(data))


class _Run(ProcessProtocol):
    """The protocol of one run: its output, its timers, and how it ended."""

    log = Logger()

    def __init__(self, runner: ProcessRunner, command: str, time_limit: float) -> None:
        self._runner = runner
        self._command = command
        self._time_limit = time_limit
        self._stdout = _Capture(runner.output_cap)
        self._stderr = _Capture(runner.output_cap)
        self._started_at = datetime.fromtimestamp(runner.wall_clock(), UTC)
        self._started = runner.monotonic()
        self.pid: int | None = None
        self._exit: ProcessDone | ProcessTerminated | None = None  # set once the shell exited
        self._timed_out = False
        self._terminated = False
        self._finished = False
        self._group_killed = False  # SIGKILL already sent to the whole group
        self._limit_call: IDelayedCall | None = None
        self._kill_call: IDelayedCall | None = None
        self._pipe_call: IDelayedCall | None = None
        self.done: Deferred[RunOutcome] = Deferred()
        self._waiters: list[Deferred[None]] = []

    # -- ProcessProtocol ------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.closeStdin()
        self._limit_call = self._runner.reactor.callLater(
            self._time_limit, self._time_limit_reached
        )
        self.log.debug(
            "run {pid} started: {command}",
            pid=self.pid,
            command=self._command[:_LOGGED_COMMAND_CHARS],
        )

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 1:
            self._stdout.feed(data)
        elif childFD == 2:
            self._stderr.feed(data)

    def processExited(self, reason: Failure) -> None:
        ended = reason.value
        assert isinstance(ended, ProcessDone | ProcessTerminated)
        self._exit = ended
        self._cancel("_limit_call")
        if not self._finished:
            # processEnded waits for every pipe to close; a grandchild may keep one open.
            self._pipe_call = self._runner.reactor.callLater(
                self._runner.pipe_grace, self._pipe_grace_expired
            )

    def processEnded(self, reason: Failure) -> None:
        if self._exit is None:
            ended = reason.value
            assert isinstance(ended, ProcessDone | ProcessTerminated)
            self._exit = ended
        self._finish()

    # -- ending a run ---------------------------------------------------------------------

    def terminate(self) -> None:
        """Shut the run down as its time limit would, now (for ``terminate_all``)."""
        if self._finished:
            return
        if self._exit is not None:
            # The shell is gone; only stragglers hold the pipes: no reason to wait longer.
            self._cancel("_pipe_call")
            self._pipe_grace_expired()
            return
        if not self._timed_out:
            self._terminated = True
        self._signal_group(signal.SIGTERM)
        if self._kill_call is None:
            self._kill_call = self._runner.reactor.callLater(
                self._runner.kill_grace, self._signal_group, signal.SIGKILL
            )

    def abandon(self) -> None:
        """Forget a run whose process could not be started."""
        self._finished = True
        for name in ("_limit_call", "_kill_call", "_pipe_call"):
            self._cancel(name)

    def wait_ended(self) -> Deferred[None]:
        """A Deferred that fires (with None) once the run has ended."""
        if self._finished:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _time_limit_reached(self) -> None:
        self._limit_call = None
        self._timed_out = True
        self.log.info(
            "run {pid} reached its time limit of {time_limit}s; "
            "sending SIGTERM to its process group, SIGKILL in {kill_grace}s",
            pid=self.pid,
            time_limit=self._time_limit,
            kill_grace=self._runner.kill_grace,
        )
        self._signal_group(signal.SIGTERM)
        self._kill_call = self._runner.reactor.callLater(
            self._runner.kill_grace, self._signal_group, signal.SIGKILL
        )

    def _pipe_grace_expired(self) -> None:
        self._pipe_call = None
        self.log.info(
            "run {pid}: the shell exited but its output stayed open for {grace}s; "
            "killing what is left of its process group",
            pid=self.pid,
            grace=self._runner.pipe_grace,
        )
        self._signal_group(signal.SIGKILL)
        # A process that left the group may still hold the pipes: close our ends, which
        # ends the run (processEnded) with the shell's exit status.
        if self.transport is not None:
            self.transport.loseConnection()

    def _signal_group(self, signum: int) -> None:
        if self.pid is None or self._group_killed:
            return
        try:
            self._runner.kill_group(self.pid, signum)
            if signum == signal.SIGKILL:
                self._group_killed = True
        except ProcessLookupError:
            # No such group: it is empty, or the child has not reached setsid() yet; in
            # the second case the child itself is still ours to signal.
            if self._exit is None and self.transport is not None:
                with contextlib.suppress(ProcessExitedAlready, OSError):
                    self.transport.signalProcess(signum)
        except OSError as e:
            self.log.warn(
                "could not send signal {signum} to process group {pid}: {error}",
                signum=signum,
                pid=self.pid,
                error=e,
            )

    def _cancel(self, name: str) -> None:
        call: IDelayedCall | None = getattr(self, name)
        if call is not None and call.active():
            call.cancel()
        setattr(self, name, None)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        for name in ("_limit_call", "_kill_call", "_pipe_call"):
            self._cancel(name)
        # A run owns its process group: background processes do not outlive it. Linux
        # keeps a pid unused while it names a live process group, so once the group is
        # empty this finds nothing (ESRCH) unless the pids wrapped around in between.
        self._signal_group(signal.SIGKILL)
        exit_code = getattr(self._exit, "exitCode", None)
        signum = getattr(self._exit, "signal", None)
        if self._timed_out:
            status = ResultStatus.TIMED_OUT
        elif self._terminated:
            status = ResultStatus.LOST
        elif exit_code == 0 and signum is None:
            status = ResultStatus.SUCCEEDED
        else:
            status = ResultStatus.FAILED
        outcome = RunOutcome(
            status=status,
            exit_code=exit_code,
            signal=signum,
            started_at=self._started_at,
            finished_at=datetime.fromtimestamp(self._runner.wall_clock(), UTC),
            duration=max(0.0, self._runner.monotonic() - self._started),
            stdout=self._stdout.output(),
            stderr=self._stderr.output(),
            pid=self.pid,
        )
        self.log.debug(
            "run {pid} ended: {status} (exit code {exit_code}, signal {signal}) in {duration:.3f}s",
            pid=self.pid,
            status=status.value,
            exit_code=exit_code,
            signal=signum,
            duration=outcome.duration,
        )
        self._runner._run_ended(self)
        waiters, self._waiters = self._waiters, []
        self.done.callback(outcome)
        for waiter in waiters:
            waiter.callback(None)


class ProcessRunner:
    """Starts commands, each in its own session, and reports how they ended.

    ``reactor`` provides ``IReactorProcess`` and ``IReactorTime``. ``environment`` is the
    whole base of every child's environment. ``kill_group`` (``os.killpg`` by default) and
    the clocks are injectable for tests; ``setsid`` is the path of util-linux ``setsid``.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        environment: Mapping[str, str],
        output_cap: int = 1024 * 1024,
        kill_grace: float = 5.0,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        *,
        pipe_grace: float = 1.0,
        kill_group: Callable[[int, int], None] = os.killpg,
        setsid: str = SETSID,
        run_as: tuple[int, int] | None = None,
    ) -> None:
        if output_cap < 0:
            raise ValueError("output_cap must not be negative")
        self.reactor = reactor
        self.environment = dict(environment)
        self.output_cap = output_cap
        self.kill_grace = kill_grace
        self.wall_clock = wall_clock
        self.monotonic = monotonic
        self.pipe_grace = pipe_grace
        self.kill_group = kill_group
        self.setsid = setsid
        #: (uid, gid) to run commands as (--run-as), or None for the agent's own user.
        self.run_as = run_as
        self._runs: dict[_Run, None] = {}  # in start order

    @property
    def running(self) -> int:
        """How many runs are in progress."""
        return len(self._runs)

    def run(
        self, command: str, time_limit: float, extra_env: Mapping[str, str] = {}
    ) -> Deferred[RunOutcome]:
        """Run ``/bin/sh -c command`` in a new session; fires with its :class:`RunOutcome`.

        Never errbacks because of the command: a process that cannot be started gives a
        ``FAILED`` outcome whose stderr says why.
        """
        env = {**self.environment, **extra_env}
        run = _Run(self, command, time_limit)
        self._runs[run] = None
        try:
            # No path=, uid= or gid= on the common path: any of them turns posix_spawn into
            # a slow fork. A run-as user is the operator's explicit choice, and costs that.
            ids = {} if self.run_as is None else {"uid": self.run_as[0], "gid": self.run_as[1]}
            self.reactor.spawnProcess(
                run,
                self.setsid,
                [self.setsid, SHELL, "-c", command],
                env=env,
                childFDs={0: "w", 1: "r", 2: "r"},
                **ids,
            )
        except Exception as e:
            self._runs.pop(run, None)
            run.abandon()
            self.log.failure(
                "could not start a run: {command}",
                command=command[:_LOGGED_COMMAND_CHARS],
            )
            now = self.wall_clock()
            message = f"taskscheduler: could not start the command: {e}\n".encode(
                "utf-8", errors="replace"
            )
            return succeed(
                RunOutcome(
                    status=ResultStatus.FAILED,
                    exit_code=None,
                    signal=None,
                    started_at=run._started_at,
                    finished_at=datetime.fromtimestamp(now, UTC),
                    duration=max(0.0, self.monotonic() - run._started),
                    stdout=Output(),
                    stderr=Output.of(message),
                )
            )
        return run.done

    def terminate_all(self) -> Deferred[None]:
        """SIGTERM every run's process group, SIGKILL after ``kill_grace``.

        Fires once every run has ended; runs cut short this way report ``LOST``.
        """
        runs = list(self._runs)
        if runs:
            self.log.info("terminating {count} running commands", count=len(runs))
        waiters = [run.wait_ended() for run in runs]
        for run in runs:
            run.terminate()
        done: Deferred[None] = gatherResults(waiters).addCallback(lambda _: None)
        return done

    def _run_ended(self, run: _Run) -> None:
        self._runs.pop(run, None)
