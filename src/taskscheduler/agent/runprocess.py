"""One run's process: the supervising shell's command line, and the run's life as Twisted
sees it (time limit, kill grace, how it ended).

Every run is ``setsid /bin/sh -c SUPERVISOR sh <cgroup.procs> <command>``
(:func:`supervised_command`), started on Twisted's posix_spawn fast path:

- **Own session, fast path kept.** ``posix_spawn`` starts no new group; util-linux
  ``setsid``, never a group leader when freshly spawned, calls ``setsid()`` in place (no
  fork) and execs the shell, which keeps the pid ``spawnProcess`` returned: that pid is
  the run's process group and session. ``bench/bench_spawn.py`` measures the cost.
- **The shell supervises the command.** Its first act is to join the run's cgroup
  (:mod:`taskscheduler.agent.containment`), before it starts anything; it then evaluates
  the command itself (``eval``, no second shell), and as it exits writes the exit status
  (three digits) to a file it holds as descriptor 9 (closed for the command). A command
  therefore runs exactly as under ``sh -c``, and a restarted agent learns how a run
  ended while it was down.
- **Time limit.** SIGTERM to every process of the run, ``kill_grace`` seconds later
  SIGKILL; the outcome is ``TIMED_OUT``. A run :meth:`RunProcess.terminate` cut short
  (shutdown) reports ``LOST``; one :meth:`RunProcess.replace` ended the same way (a newer
  run of its task replaced it) reports ``REPLACED``, with the signal that ended it.
"""

from __future__ import annotations

import contextlib
import signal
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.outcome import RunOutcome, status_of
from taskscheduler.agent.runjournal import RunNames
from taskscheduler.protocol import Output, ResultStatus
from taskscheduler.schedule import format_instant

if TYPE_CHECKING:
    from taskscheduler.agent.runner import ProcessRunner

#: util-linux ``setsid``: starts the shell in a new session without forking (see above).
SETSID = "/usr/bin/setsid"
#: The shell every command runs under.
SHELL = "/bin/sh"
#: The run's shell: ``$1`` is the cgroup.procs file to join ("" for none), ``$2`` the
#: command. The EXIT trap records the status on descriptor 9, which the command never
#: sees. The one variable it sets is named so as not to collide with a command's own.
SUPERVISOR = (
    '[ -z "$1" ] || { echo 0 >"$1"; } 2>/dev/null; '
    "__taskscheduler_command=$2; shift 2; "
    "trap 'printf \"%03d\\n\" $? >&9' EXIT; "
    'eval "$__taskscheduler_command" 9>&-'
)
#: The run's shell in a working directory (``$3``): it goes there before the command,
#: as the posix_spawn fast path has no chdir (Twisted forks for ``path=``). One it cannot
#: use fails the run (exit status 126), saying so on stderr.
SUPERVISOR_IN_DIR = (
    '[ -z "$1" ] || { echo 0 >"$1"; } 2>/dev/null; '
    "__taskscheduler_command=$2; "
    "trap 'printf \"%03d\\n\" $? >&9' EXIT; "
    'cd -- "$3" 2>/dev/null || { '
    "printf 'taskscheduler: cannot use the working directory %s\\n' \"$3\" >&2; exit 126; }; "
    "shift 3; "
    'eval "$__taskscheduler_command" 9>&-'
)
#: The descriptor the shell writes its exit status to.
EXIT_FD = 9


def supervised_command(
    setsid: str, cgroup_procs: str | None, command: str, working_dir: str | None = None
) -> list[str]:
    """The argv of a run: ``setsid`` execs the supervising shell, which joins
    ``cgroup_procs`` (if any), goes to ``working_dir`` (if any) and evaluates ``command``."""
    if working_dir is not None:
        return [
            setsid,
            SHELL,
            "-c",
            SUPERVISOR_IN_DIR,
            "sh",
            cgroup_procs or "",
            command,
            working_dir,
        ]
    return [setsid, SHELL, "-c", SUPERVISOR, "sh", cgroup_procs or "", command]


class RunProcess(ProcessProtocol):
    """One run spawned by ``runner``: its time limit and kill grace, and how it ended."""

    log = Logger()

    def __init__(
        self,
        runner: ProcessRunner,
        run: str,
        key: tuple[uuid.UUID, datetime] | None,
        time_limit: float,
    ) -> None:
        self._runner = runner
        self.run_id = run
        self.marker = runner.marker(run)
        self._key = key
        self._time_limit = time_limit
        self.started_at = datetime.fromtimestamp(runner.wall_clock(), UTC)
        self.started = runner.monotonic()  # on the monotonic clock
        self.pid: int | None = None
        self.cgroup: str | None = None
        self._exit: ProcessDone | ProcessTerminated | None = None
        self._timed_out = False
        self._terminated = False
        self._replaced = False
        self._sent: int | None = None  # the last signal the agent sent the run
        self.finished = False
        self._limit_call: IDelayedCall | None = None
        self._kill_call: IDelayedCall | None = None
        self.done: Deferred[RunOutcome] = Deferred()
        self._waiters: list[Deferred[None]] = []

    # -- ProcessProtocol ------------------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self._limit_call = self._runner.reactor.callLater(
            self._time_limit, self._time_limit_reached
        )

    def processEnded(self, reason: Failure) -> None:
        ended = reason.value
        assert isinstance(ended, ProcessDone | ProcessTerminated)
        self._exit = ended
        self._finish()

    # -- ending a run ---------------------------------------------------------------------

    def terminate(self) -> None:
        """Shut the run down as its time limit would, now (for ``terminate_all``)."""
        if self.finished:
            return
        if not self._timed_out:
            self._terminated = True
        self._signal(signal.SIGTERM)
        if self._kill_call is None:
            self._kill_call = self._runner.reactor.callLater(
                self._runner.kill_grace, self._signal, signal.SIGKILL
            )

    def replace(self) -> None:
        """End the run as its time limit would, now: a newer run of its task replaces it.
        Its time limit no longer matters; its outcome is ``REPLACED``."""
        if self.finished or self._timed_out or self._replaced:
            return
        self._replaced = True
        self._cancel("_limit_call")
        self._runner.mark_replaced(self.run_id)
        self.log.info(
            "task {task_id}: its run of {scheduled_at} is replaced by a newer run of its task; "
            "sending SIGTERM to every process of the run, SIGKILL in {kill_grace}s",
            kill_grace=self._runner.kill_grace,
            **self._names(),
        )
        self._signal(signal.SIGTERM)
        if self._kill_call is None:
            self._kill_call = self._runner.reactor.callLater(
                self._runner.kill_grace, self._signal, signal.SIGKILL
            )

    def abandon(self) -> None:
        """Forget a run whose process could not be started."""
        self.finished = True
        for name in ("_limit_call", "_kill_call"):
            self._cancel(name)

    def wait_ended(self) -> Deferred[None]:
        """A Deferred that fires (with None) once the run's shell has ended."""
        if self.finished:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _time_limit_reached(self) -> None:
        self._limit_call = None
        self._timed_out = True
        self._runner.mark_limit_reached(self.run_id)
        self.log.info(
            "task {task_id}: its run of {scheduled_at} reached its time limit of "
            "{time_limit}s; sending SIGTERM to every process of the run, SIGKILL in "
            "{kill_grace}s",
            time_limit=self._time_limit,
            kill_grace=self._runner.kill_grace,
            **self._names(),
        )
        self._signal(signal.SIGTERM)
        self._kill_call = self._runner.reactor.callLater(
            self._runner.kill_grace, self._signal, signal.SIGKILL
        )

    def _signal(self, signum: int) -> None:
        self._sent = signum
        try:
            self._runner.containment.signal(self.marker, self.pid, signum)
        except ProcessLookupError:
            # No such group: the child has not reached setsid() yet, so the child itself
            # is still the one to signal.
            if self._exit is None and self.transport is not None:
                with contextlib.suppress(ProcessExitedAlready, OSError):
                    self.transport.signalProcess(signum)
        except OSError as e:
            self.log.warn(
                "task {task_id}: could not send signal {signum} to its run of "
                "{scheduled_at}: {error}",
                signum=signum,
                error=e,
                **self._names(),
            )

    def _names(self) -> RunNames:
        """The fields that name the run in a log line: its task and instant (a pid says
        nothing to an operator, and is reused)."""
        if self._key is None:
            return RunNames(task_id="-", scheduled_at=self.run_id)
        return RunNames(task_id=str(self._key[0]), scheduled_at=format_instant(self._key[1]))

    def _cancel(self, name: str) -> None:
        call: IDelayedCall | None = getattr(self, name)
        if call is not None and call.active():
            call.cancel()
        setattr(self, name, None)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        for name in ("_limit_call", "_kill_call"):
            self._cancel(name)
        # A run owns all it started: what it left behind does not outlive it.
        try:
            self._runner.containment.release(self.marker, self.pid)
        except OSError as e:
            self.log.warn(
                "task {task_id}: could not clean up after its run of {scheduled_at}: {error}",
                error=e,
                **self._names(),
            )
        exit_code = getattr(self._exit, "exitCode", None)
        signum = getattr(self._exit, "signal", None)
        if self._timed_out:
            status = ResultStatus.TIMED_OUT
        elif self._replaced:
            status = ResultStatus.REPLACED
            # The signal that ended it, even when its shell exited of it by itself.
            signum = signum or self._sent
        elif self._terminated:
            status = ResultStatus.LOST
        else:
            status = status_of(exit_code, signum)
        finished_at = datetime.fromtimestamp(self._runner.wall_clock(), UTC)
        duration = max(0.0, self._runner.monotonic() - self.started)
        self.log.debug(
            "task {task_id}: its run of {scheduled_at} ended: {status} (exit code "
            "{exit_code}, signal {signal}) in {duration:.3f}s",
            status=status.value,
            exit_code=exit_code,
            signal=signum,
            duration=duration,
            **self._names(),
        )
        self._runner.run_ended(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)
        outcome = RunOutcome(
            status=status,
            exit_code=exit_code,
            signal=signum,
            started_at=self.started_at,
            finished_at=finished_at,
            duration=duration,
            stdout=Output(),
            stderr=Output(),
            pid=self.pid,
        )
        self._runner.collect(self.run_id, outcome).chainDeferred(self.done)
