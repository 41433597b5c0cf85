"""Runs commands so that they never escape, and never depend on the agent staying alive:
the runs in flight, their files and their containment, from start to result.

Each run is one process (:mod:`taskscheduler.agent.runprocess`: the supervising shell, the
time limit) in its own session, joined to its own containment
(:mod:`taskscheduler.agent.containment`: a cgroup per run, or the agent as subreaper):

- **Output goes to files** (:mod:`taskscheduler.agent.runfiles`), not pipes: a run's
  output does not depend on the agent being alive, and the agent holds no descriptor per
  run in flight (Twisted's posix_spawn path lists and inspects every open descriptor at
  each start: with pipes, each start got slower as runs piled up). Each stream is capped
  on disk as it grows (:mod:`taskscheduler.agent.upkeep`), keeping its first and last
  halves of the cap and its size.
- **Explicit environment**: ``environment`` plus ``extra_env`` and ``TASKSCHEDULER_RUN_ID``;
  nothing from the agent's own ``os.environ``. A ``working_dir`` is where the shell goes
  before the command (see :mod:`taskscheduler.agent.runprocess`); by default, the agent's.
- **Replaced runs.** :meth:`ProcessRunner.replace` ends one run as its time limit would
  (a newer run of its task replaces it); it reports ``REPLACED``.
- **Nothing of a run survives it.** When the shell exits, whatever is left of the run
  (background jobs, processes that left the group or the session) is killed at once
  through the containment.
- **A journal line per run** names its process group and its cgroup; every process of
  the run carries the run's id in its environment (``TASKSCHEDULER_RUN_ID``), which also
  tells the run's shell from a process that reused its pid. :meth:`ProcessRunner.recover`
  finds every run a previous life of the agent left (:mod:`taskscheduler.agent.recovery`),
  re-attaches to those still going (their time limit still holds) and reports the others
  as they ended; ``lost`` is left for runs whose outcome cannot be known.
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
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from taskscheduler.agent.containment import (
    RUN_ID_VARIABLE,
    Containment,
    GroupContainment,
)
from taskscheduler.agent.outcome import RecoveredRun, RunOutcome
from taskscheduler.agent.recovery import Recovery
from taskscheduler.agent.runfiles import RunFiles
from taskscheduler.agent.runjournal import RunNames, RunRecord, boot_id, run_id, run_names
from taskscheduler.agent.runprocess import EXIT_FD, SETSID, RunProcess, supervised_command
from taskscheduler.agent.upkeep import Upkeep
from taskscheduler.protocol import Output, ResultStatus, Trigger
from taskscheduler.schedule import format_instant

#: Output up to this many bytes is read on the reactor when a run ends; more, on a thread.
SMALL_OUTPUT = 64 * 1024
#: After a run ends, the containment is tidied this many seconds later, and again (up to
#: TIDY_ATTEMPTS times) while killed processes are still dying.
TIDY_DELAY = 0.2
TIDY_ATTEMPTS = 25


def instance_of(runs_dir: Path) -> str:
    """The runner instance of an agent whose runs are in ``runs_dir``."""
    return hashlib.sha256(str(runs_dir.resolve()).encode()).hexdigest()[:12]


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
        #: This boot of the host (a run recorded in another cannot still be going).
        self.boot_id = boot_id()
        self._runs: dict[RunProcess, None] = {}  # in start order
        self._pids: set[int] = set()  # the shells of those runs
        #: Runs a previous life of the agent left, re-attached and still going (recovery's),
        #: each with what replaces it.
        self.reattached: dict[str, Callable[[], None]] = {}
        self._tidy_call: IDelayedCall | None = None
        self.upkeep = Upkeep(
            reactor, self.files, output_cap, self.live_run_ids, self._run_in_thread
        )

    @property
    def running(self) -> int:
        """How many runs are in progress."""
        return len(self._runs) + len(self.reattached)

    def live_run_ids(self) -> list[str]:
        """The file ids of the runs in flight."""
        return [run.run_id for run in self._runs] + list(self.reattached)

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
        revision: int | None = None,
        trigger: Trigger = Trigger.SCHEDULE,
        working_dir: str | None = None,
        attempt: int = 1,
    ) -> Deferred[RunOutcome]:
        """Run ``command`` in a new session; fires with its :class:`RunOutcome`.

        ``key`` (task, instant) and ``attempt`` name the run's files; without a key a
        fresh id is made.
        ``working_dir``: where the command runs (one that cannot be used fails the run,
        its stderr saying so); None: the agent's own.
        ``revision`` and ``trigger`` go to its journal line, for a restarted agent.
        Never errbacks because of the command: a process that cannot be started gives a
        ``FAILED`` outcome whose stderr says why.
        """
        if key is None:
            key = (uuid.uuid4(), datetime.fromtimestamp(self.wall_clock(), UTC))
        run_name = run_id(*key, attempt)
        names = RunNames(task_id=str(key[0]), scheduled_at=format_instant(key[1]))
        run = RunProcess(self, run_name, key, time_limit)
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
                supervised_command(self.setsid, cgroup_procs, command, working_dir),
                env=env,
                childFDs={0: self._devnull, 1: out, 2: err, EXIT_FD: exit_file},
                **ids,
            )
        except Exception as e:
            self._runs.pop(run, None)
            run.abandon()
            # Never the command itself: it may hold a secret.
            self.log.failure("task {task_id}: could not start its run of {scheduled_at}", **names)
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
                    duration=max(0.0, self.monotonic() - run.started),
                    stdout=Output(),
                    stderr=Output.of(message),
                )
            )
        finally:
            for fd in fds:
                os.close(fd)
        pid = run.pid
        if pid is not None and not run.finished:
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
                        boot_id=self.boot_id,
                        cgroup=None if cgroup_procs is None else str(Path(cgroup_procs).parent),
                        revision=revision,
                        trigger=trigger,
                    ),
                )
            except OSError:
                # The run goes on; only a crash of the agent before it ends would lose it.
                self.log.failure(
                    "task {task_id}: could not record the start of its run of {scheduled_at}",
                    **names,
                )
        self.log.debug(
            "task {task_id}: its run of {scheduled_at} started (attempt {attempt}, {trigger})",
            attempt=attempt,
            trigger=trigger.value,
            **names,
        )
        self.upkeep.keep_trimming()
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

    def replace(self, key: tuple[uuid.UUID, datetime], attempt: int = 1) -> bool:
        """End the run ``key`` (its ``attempt``) as its time limit would (a newer run of
        its task replaces it): it reports ``REPLACED``. False if no such run is going."""
        name = run_id(*key, attempt)
        for run in self._runs:
            if run.run_id == name:
                run.replace()
                return True
        replace_reattached = self.reattached.get(name)
        if replace_reattached is None:
            return False
        replace_reattached()
        return True

    def mark_replaced(self, run: str) -> None:
        """Record, before the first signal, that ``run`` is being replaced."""
        try:
            self.files.mark_replaced(run)
        except OSError as e:
            self.log.warn(
                "task {task_id}: could not record that its run of {scheduled_at} is "
                "replaced: {error}",
                error=e,
                **run_names(run),
            )

    def mark_limit_reached(self, run: str) -> None:
        """Record, before the first signal, that ``run`` is being ended at its limit."""
        try:
            self.files.mark_limit_reached(run)
        except OSError as e:
            self.log.warn(
                "task {task_id}: could not record that its run of {scheduled_at} reached "
                "its limit: {error}",
                error=e,
                **run_names(run),
            )

    def run_ended(self, run: RunProcess) -> None:
        """``run``'s shell has ended: what it left is killed, its trimming stops."""
        self._runs.pop(run, None)
        self._pids.discard(run.pid)  # type: ignore[arg-type]
        try:
            more = self.containment.tidy()
        except Exception:
            self.log.failure("could not clean up after a finished run")
            more = True
        if more:
            self._tidy_soon()
        if not self._runs and not self.reattached:
            self.upkeep.stop_trimming()

    def collect(self, run: str, outcome: RunOutcome) -> Deferred[RunOutcome]:
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

    def discard(self, key: tuple[uuid.UUID, datetime], attempt: int = 1) -> None:
        """Let go of the run ``key`` (its ``attempt``), whose result is now durable
        elsewhere: the journal forgets it, and its slot is emptied for another run, off
        the reactor."""
        run = run_id(*key, attempt)
        try:
            self.files.remove(run)
        except OSError:
            self.log.failure(
                "task {task_id}: could not let go of the files of its run of {scheduled_at}",
                **run_names(run),
            )
        self.upkeep.empty_dirty_slots()

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

    def recover(
        self, reported: Callable[..., bool] = lambda task_id, at, attempt=1: False
    ) -> list[RecoveredRun]:
        """Find every run a previous life of the agent left (see :mod:`.recovery`):
        ``reported(task_id, scheduled_at, attempt)`` says whose result is spooled.

        Call once, at start-up, before any new run starts.
        """
        return Recovery(self).recover(reported)
