"""Runs one command so that it never escapes, and never depends on the agent staying alive.

Every run is ``setsid /bin/sh -c SUPERVISOR <cgroup.procs> <command>``, started with
``spawnProcess`` on Twisted's posix_spawn fast path:

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
- **Output goes to files** (:mod:`taskscheduler.agent.runfiles`), not pipes: a run's
  output does not depend on the agent being alive, and the agent holds no descriptor per
  run in flight (Twisted's posix_spawn path lists and inspects every open descriptor at
  each start: with pipes, each start got slower as runs piled up). Each stream is capped
  on disk as it grows, keeping its first and last halves of the cap and its size.
- **Explicit environment**: ``environment`` plus ``extra_env`` and ``TASKSCHEDULER_RUN_ID``;
  nothing from the agent's own ``os.environ``.
- **Time limit.** SIGTERM to every process of the run, ``kill_grace`` seconds later
  SIGKILL; the outcome is ``TIMED_OUT``.
- **Nothing of a run survives it.** When the shell exits, whatever is left of the run
  (background jobs, processes that left the group or the session) is killed at once
  through the containment (a cgroup per run, or the agent as subreaper).
- **A journal line per run** names its process group and its cgroup; every process of
  the run carries the run's id in its environment (``TASKSCHEDULER_RUN_ID``), which also
  tells the run's shell from a process that reused its pid. :meth:`ProcessRunner.recover`
  finds every run a previous life of the agent left, re-attaches to those still going
  (their time limit still holds) and reports the others as they ended; ``lost`` is left
  for runs whose outcome cannot be known.
- **Shutdown.** :meth:`ProcessRunner.terminate_all` ends every run as the time limit
  would; runs it cut short report ``LOST``.

Per run the agent makes a handful of short system calls besides the spawn: it opens the
three files of a reused slot, appends a line to the run journal, reads the output
(on a thread when it is large) and empties the slot; no file is created, nothing is
fsynced (see :mod:`taskscheduler.agent.runfiles`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.containment import (
    RUN_ID_VARIABLE,
    Containment,
    GroupContainment,
)
from taskscheduler.agent.outcome import RecoveredRun, RunOutcome, status_of
from taskscheduler.agent.recovery import Recovery
from taskscheduler.agent.runfiles import (
    RunFiles,
    RunRecord,
    boot_id,
    run_id,
)
from taskscheduler.protocol import Output, ResultStatus
from taskscheduler.schedule import format_instant

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
#: The descriptor the shell writes its exit status to.
EXIT_FD = 9
#: Output up to this many bytes is read on the reactor when a run ends; more, on a thread.
SMALL_OUTPUT = 64 * 1024
#: How often the output files of runs in flight are trimmed to the cap.
TRIM_INTERVAL = 0.5
#: After a run ends, the containment is tidied this many seconds later, and again (up to
#: TIDY_ATTEMPTS times) while killed processes are still dying.
TIDY_DELAY = 0.2
TIDY_ATTEMPTS = 25
#: Longest piece of a command quoted in a log line.
_LOGGED_COMMAND_CHARS = 200


def instance_of(runs_dir: Path) -> str:
    """The runner instance of an agent whose runs are in ``runs_dir``."""
    return hashlib.sha256(str(runs_dir.resolve()).encode()).hexdigest()[:12]


class _Run(ProcessProtocol):
    """One run spawned by this agent: its timers, and how it ended."""

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
        self._started = runner.monotonic()
        self.pid: int | None = None
        self.cgroup: str | None = None
        self._exit: ProcessDone | ProcessTerminated | None = None
        self._timed_out = False
        self._terminated = False
        self._finished = False
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
        if self._finished:
            return
        if not self._timed_out:
            self._terminated = True
        self._signal(signal.SIGTERM)
        if self._kill_call is None:
            self._kill_call = self._runner.reactor.callLater(
                self._runner.kill_grace, self._signal, signal.SIGKILL
            )

    def abandon(self) -> None:
        """Forget a run whose process could not be started."""
        self._finished = True
        for name in ("_limit_call", "_kill_call"):
            self._cancel(name)

    def wait_ended(self) -> Deferred[None]:
        """A Deferred that fires (with None) once the run's shell has ended."""
        if self._finished:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _time_limit_reached(self) -> None:
        self._limit_call = None
        self._timed_out = True
        self._runner.mark_limit_reached(self.run_id)
        self.log.info(
            "{run} reached its time limit of {time_limit}s; sending SIGTERM to every "
            "process of the run, SIGKILL in {kill_grace}s",
            run=self._name(),
            time_limit=self._time_limit,
            kill_grace=self._runner.kill_grace,
        )
        self._signal(signal.SIGTERM)
        self._kill_call = self._runner.reactor.callLater(
            self._runner.kill_grace, self._signal, signal.SIGKILL
        )

    def _signal(self, signum: int) -> None:
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
                "{run}: could not send signal {signum}: {error}",
                run=self._name(),
                signum=signum,
                error=e,
            )

    def _name(self) -> str:
        if self._key is None:
            return f"run {self.pid}"
        return f"task {self._key[0]} run {format_instant(self._key[1])} (pid {self.pid})"

    def _cancel(self, name: str) -> None:
        call: IDelayedCall | None = getattr(self, name)
        if call is not None and call.active():
            call.cancel()
        setattr(self, name, None)

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        for name in ("_limit_call", "_kill_call"):
            self._cancel(name)
        # A run owns all it started: what it left behind does not outlive it.
        try:
            self._runner.containment.release(self.marker, self.pid)
        except OSError as e:
            self.log.warn("{run}: could not clean up: {error}", run=self._name(), error=e)
        exit_code = getattr(self._exit, "exitCode", None)
        signum = getattr(self._exit, "signal", None)
        if self._timed_out:
            status = ResultStatus.TIMED_OUT
        elif self._terminated:
            status = ResultStatus.LOST
        else:
            status = status_of(exit_code, signum)
        finished_at = datetime.fromtimestamp(self._runner.wall_clock(), UTC)
        duration = max(0.0, self._runner.monotonic() - self._started)
        self.log.debug(
            "{run} ended: {status} (exit code {exit_code}, signal {signal}) in {duration:.3f}s",
            run=self._name(),
            status=status.value,
            exit_code=exit_code,
            signal=signum,
            duration=duration,
        )
        self._runner._run_ended(self)
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
        self._runner._collect(self.run_id, outcome).chainDeferred(self.done)


class ProcessRunner:
    """Starts commands, each contained and recorded, and reports how they ended.

    ``reactor`` provides ``IReactorProcess`` and ``IReactorTime`` (and ``IReactorFDSet``
    to re-attach to runs). ``environment`` is the whole base of every child's
    environment. ``runs_dir`` holds the run files. The clocks, the containment and
    ``run_in_thread`` are injectable for tests.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        environment: Mapping[str, str],
        runs_dir: Path,
        output_cap: int = 1024 * 1024,
        kill_grace: float = 5.0,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        *,
        containment: Containment | None = None,
        kill_group: Callable[[int, int], None] = os.killpg,
        setsid: str = SETSID,
        run_as: tuple[int, int] | None = None,
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] | None = None,
    ) -> None:
        if output_cap < 0:
            raise ValueError("output_cap must not be negative")
        self.reactor = reactor
        self.environment = dict(environment)
        self.files = RunFiles(runs_dir)
        self.files.create()
        #: Tells this agent's runs from other agents' on the same host (stable across
        #: restarts: a restarted agent finds its runs by it).
        self.instance = instance_of(runs_dir)
        self.output_cap = output_cap
        self.kill_grace = kill_grace
        self.wall_clock = wall_clock
        self.monotonic = monotonic
        self.containment: Containment = containment or GroupContainment(kill_group)
        self.setsid = setsid
        #: (uid, gid) to run commands as (--run-as), or None for the agent's own user.
        self.run_as = run_as
        #: Runs blocking file work somewhere else (a thread pool); None: right here.
        self._run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]] = (
            run_in_thread or maybeDeferred
        )
        self._devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._boot_id = boot_id()
        self._runs: dict[_Run, None] = {}  # in start order
        self._pids: set[int] = set()  # the shells of those runs
        self._recovering: dict[str, None] = {}  # re-attached runs still going
        self._trimmer = LoopingCall(self._trim)
        self._trimmer.clock = reactor
        self._tidy_call: IDelayedCall | None = None
        self._emptying = False

    @property
    def running(self) -> int:
        """How many runs are in progress."""
        return len(self._runs) + len(self._recovering)

    def live_run_ids(self) -> list[str]:
        """The file ids of the runs in flight."""
        return [run.run_id for run in self._runs] + list(self._recovering)

    def live_markers(self) -> list[str]:
        """The ``TASKSCHEDULER_RUN_ID`` of the runs in flight."""
        return [self.marker(run) for run in self.live_run_ids()]

    def marker(self, run: str) -> str:
        """What marks every process of ``run`` in its environment, unique on the host:
        several agents on one host run the same (task, instant)."""
        return f"{self.instance}.{run}"

    def is_run_shell(self, pid: int) -> bool:
        """Whether ``pid`` is the shell of a run this agent spawned (and reaps)."""
        return pid in self._pids

    def run(
        self,
        command: str,
        time_limit: float,
        extra_env: Mapping[str, str] = {},
        *,
        key: tuple[uuid.UUID, datetime] | None = None,
    ) -> Deferred[RunOutcome]:
        """Run ``command`` in a new session; fires with its :class:`RunOutcome`.

        ``key`` (task, instant) names the run's files; without one a fresh id is made.
        Never errbacks because of the command: a process that cannot be started gives a
        ``FAILED`` outcome whose stderr says why.
        """
        if key is None:
            key = (uuid.uuid4(), datetime.fromtimestamp(self.wall_clock(), UTC))
        run_name = run_id(*key)
        run = _Run(self, run_name, key, time_limit)
        env = {**self.environment, **extra_env, RUN_ID_VARIABLE: run.marker}
        fds: list[int] = []
        try:
            cgroup_procs = self.containment.prepare(run.marker)
            out, err, exit_file = self.files.begin(run_name)
            fds += [out, err, exit_file]
            self._runs[run] = None
            # No path=, uid= or gid= on the common path: any of them turns posix_spawn into
            # a slow fork. A run-as user is the operator's explicit choice, and costs that.
            ids = {} if self.run_as is None else {"uid": self.run_as[0], "gid": self.run_as[1]}
            self.reactor.spawnProcess(
                run,
                self.setsid,
                [self.setsid, SHELL, "-c", SUPERVISOR, "sh", cgroup_procs or "", command],
                env=env,
                childFDs={0: self._devnull, 1: out, 2: err, EXIT_FD: exit_file},
                **ids,
            )
        except Exception as e:
            self._runs.pop(run, None)
            run.abandon()
            self.log.failure(
                "could not start a run: {command}",
                command=command[:_LOGGED_COMMAND_CHARS],
            )
            with contextlib.suppress(OSError):
                self.containment.release(run.marker, None)
            with contextlib.suppress(OSError):
                self.files.remove(run_name)
            now = self.wall_clock()
            message = f"taskscheduler: could not start the command: {e}\n".encode(
                "utf-8", errors="replace"
            )
            return succeed(
                RunOutcome(
                    status=ResultStatus.FAILED,
                    exit_code=None,
                    signal=None,
                    started_at=run.started_at,
                    finished_at=datetime.fromtimestamp(now, UTC),
                    duration=max(0.0, self.monotonic() - run._started),
                    stdout=Output(),
                    stderr=Output.of(message),
                )
            )
        finally:
            for fd in fds:
                os.close(fd)
        pid = run.pid
        if pid is not None and not run._finished:
            self._pids.add(pid)
            if self.run_as is not None:
                # The shell joins its cgroup itself, unless its user may not write there.
                self.containment.adopt(run.marker, pid)
            try:
                self.files.started(
                    run_name,
                    RunRecord(
                        task_id=key[0],
                        scheduled_at=key[1],
                        started_at=run.started_at,
                        time_limit=time_limit,
                        pid=pid,
                        boot_id=self._boot_id,
                        cgroup=None if cgroup_procs is None else str(Path(cgroup_procs).parent),
                    ),
                )
            except OSError:
                # The run goes on; only a crash of the agent before it ends would lose it.
                self.log.failure("could not record the start of {run}", run=run_name)
        self.keep_trimming()
        return run.done

    def terminate_all(self) -> Deferred[None]:
        """SIGTERM every run, SIGKILL after ``kill_grace``.

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

    def mark_limit_reached(self, run: str) -> None:
        """Record, before the first signal, that ``run`` is being ended at its limit."""
        try:
            self.files.mark_limit_reached(run)
        except OSError as e:
            self.log.warn(
                "could not record that {run} reached its limit: {error}", run=run, error=e
            )

    def _run_ended(self, run: _Run) -> None:
        self._runs.pop(run, None)
        self._pids.discard(run.pid)  # type: ignore[arg-type]
        try:
            more = self.containment.tidy()
        except Exception:
            self.log.failure("could not clean up after a finished run")
            more = True
        if more:
            self._tidy_soon()
        if not self._runs and not self._recovering and self._trimmer.running:
            self._trimmer.stop()

    def _collect(self, run: str, outcome: RunOutcome) -> Deferred[RunOutcome]:
        """Read the run's output into ``outcome``: here if it is small, else off the
        reactor.

        The files stay until :meth:`discard`: a result is not safe before it is durable
        elsewhere (the spool), and until then a restarted agent finds the run again.
        """
        cap = self.output_cap

        def collect() -> RunOutcome:
            stdout, stderr = self.files.read_output(run, cap)
            return replace(outcome, stdout=stdout, stderr=stderr)

        try:
            small = (
                sum(self.files.path(run, kind).stat().st_size for kind in ("out", "err"))
                <= SMALL_OUTPUT
            )
        except OSError:
            small = False
        if small:
            return maybeDeferred(collect)
        return self._run_in_thread(collect)

    def discard(self, key: tuple[uuid.UUID, datetime]) -> None:
        """Let go of the run ``key``, whose result is now durable elsewhere: the journal
        forgets it, and its slot is emptied for another run, off the reactor."""
        run = run_id(*key)
        try:
            self.files.remove(run)
        except OSError:
            self.log.failure("could not let go of the files of {run}", run=run)
        self._empty_dirty_slots()

    def _empty_dirty_slots(self) -> None:
        """Empty the slots of finished runs on a thread, a batch at a time."""
        if self._emptying:
            return
        dirty = self.files.take_dirty()
        if not dirty:
            return
        self._emptying = True

        def emptied(_: object) -> None:
            self._emptying = False
            self.files.give_back(dirty)
            self._empty_dirty_slots()

        def failed(failure: Failure) -> None:
            self._emptying = False
            self.log.failure("could not empty run files", failure)

        self._run_in_thread(lambda: self.files.empty_slots(dirty)).addCallbacks(emptied, failed)

    def _tidy_soon(self, attempts: int = TIDY_ATTEMPTS) -> None:
        """Processes killed at a run's end take a moment to die; then the containment
        reaps them, kills what they left in turn, removes the run's cgroup."""
        if self._tidy_call is None or not self._tidy_call.active():
            self._tidy_call = self.reactor.callLater(TIDY_DELAY, self._tidy, attempts)

    def _tidy(self, attempts: int) -> None:
        self._tidy_call = None
        try:
            more = self.containment.tidy()
        except Exception:
            self.log.failure("could not clean up after finished runs")
            more = True
        if more and attempts > 1:
            self._tidy_soon(attempts - 1)

    def keep_trimming(self) -> None:
        """Trim the output of runs in flight to the cap, every TRIM_INTERVAL seconds."""
        if not self._trimmer.running:
            self._trimmer.start(TRIM_INTERVAL, now=False)

    def _trim(self) -> None:
        # Never raise: a LoopingCall stops for good. A stat per output file of each run
        # in flight; a hole is punched only past the cap.
        cap = self.output_cap
        for run in self.live_run_ids():
            try:
                self.files.trim(run, cap)
            except (OSError, KeyError):
                self.log.failure("could not trim the output of {run}", run=run)

    def recover(
        self, reported: Callable[[uuid.UUID, datetime], bool] = lambda task_id, at: False
    ) -> list[RecoveredRun]:
        """Find every run a previous life of the agent left (see :mod:`.recovery`).

        Call once, at start-up, before any new run starts.
        """
        return Recovery(self).recover(reported)
