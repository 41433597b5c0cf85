"""Runs a previous life of the agent left: found again at start-up, and followed to their end.

The runner leaves, per run, a journal line, its output files and (once its shell has
ended) its exit status (:mod:`taskscheduler.agent.runfiles`). For each run left:

- **still going** (same boot, its pid alive with the recorded start time): re-attached:
  watched through a pidfd until it ends, its time limit counting from its start (a run
  already past it is ended now), then reported with its real status, exit code and
  output;
- **ended while the agent was down**: reported as it ended (its exit status file), or
  ``timed_out`` if the agent had begun to end it at its limit, ``replaced`` if it had
  begun to end it for a newer run of its task, or ``failed`` if a signal ended it (which
  one cannot be known: its parent was not the agent);
- **of another boot of the host**: ``lost``, the one outcome that cannot be known;
- **not in the journal** (the agent died between the spawn and the journal line): found
  by its run id in ``/proc``, killed, and reported ``lost``.

Whatever a finished run left behind is killed by its cgroup or, failing that, found by
its run id in ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from taskscheduler.agent.containment import (
    CgroupContainment,
    processes_by_run,
    processes_of_run,
    run_id_of,
)
from taskscheduler.agent.outcome import REATTACHED, RecoveredRun, RunOutcome, status_of
from taskscheduler.agent.runjournal import RunRecord, parse_run_id
from taskscheduler.protocol import Output, ResultStatus
from taskscheduler.schedule import format_instant

_PROC = Path("/proc")


def process_is_running(pid: int, proc: Path = _PROC) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie has done all it will)."""
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return False
    # The command name (field 2) may hold spaces and parentheses: read after its end.
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


@implementer(IReadDescriptor)
class _ExitWatcher:
    """Fires when a process that is not our child ends: its pidfd becomes readable."""

    def __init__(self, reactor: Any, pid: int, on_exit: Callable[[], None]) -> None:
        self._reactor = reactor
        self._fd: int | None = os.pidfd_open(pid)
        self._on_exit = on_exit
        reactor.addReader(self)

    def fileno(self) -> int:
        return -1 if self._fd is None else self._fd

    def doRead(self) -> None:
        self.close()
        self._on_exit()

    def close(self) -> None:
        if self._fd is not None:
            self._reactor.removeReader(self)
            os.close(self._fd)
            self._fd = None

    def connectionLost(self, reason: Failure) -> None:
        self.close()

    def logPrefix(self) -> str:
        return "run-exit-watcher"


class Recovery:
    """Finds and follows the runs a previous life of the agent left, for ``runner``."""

    log = Logger()

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._found: dict[str, list[int]] | None = None

    def recover(
        self, reported: Callable[..., bool] = lambda task_id, at, attempt=1: False
    ) -> list[RecoveredRun]:
        """Find every run whose files a previous life of the agent left.

        Runs still going are re-attached to (their time limit holds from their start;
        past it they are ended now); runs that ended meanwhile are reported as they
        ended, with their output; runs whose result is already ``reported`` (spooled:
        ``reported(task_id, scheduled_at, attempt)``) are only cleaned up. Call once,
        at start-up, before any new run starts.
        """
        # One scan of /proc for every process any run of this agent left, whatever its
        # state: each leftover takes its own from it, and what is left over after is of
        # runs the journal never heard of.
        self._found = processes_by_run(self._runner.marker(""))
        recovered = []
        for run in self._runner.files.leftovers():
            try:
                task_id, scheduled_at, attempt = parse_run_id(run)
            except ValueError:
                self.log.warn("removing the files of an unknown run {run}", run=run)
                self._runner.files.remove(run)
                continue
            if reported(task_id, scheduled_at, attempt):
                self._runner.files.remove(run)
                continue
            try:
                found = self._recover(run, task_id, scheduled_at)
                recovered.append(replace(found, attempt=attempt))
            except Exception:
                self.log.failure(
                    "task {task_id}: could not recover its run of {scheduled_at}",
                    task_id=str(task_id),
                    scheduled_at=format_instant(scheduled_at),
                )
        recovered += self._unrecorded(
            reported, {(r.task_id, r.scheduled_at, r.attempt) for r in recovered}
        )
        self._found = None  # later, a re-attached run's leftovers are looked up afresh
        return recovered

    def _unrecorded(
        self,
        reported: Callable[..., bool],
        known: set[tuple[uuid.UUID, datetime, int]],
    ) -> list[RecoveredRun]:
        """Runs whose start never reached the journal (the agent died as they started):
        found by their run id in /proc, killed, and reported ``lost``."""
        prefix = self._runner.marker("")
        lost = []
        for marker, pids in (self._found or {}).items():
            run = marker[len(prefix) :]
            if run in self._runner.reattached:
                continue  # re-attached: it ends as it will
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            try:
                key = parse_run_id(run)
            except ValueError:
                continue
            if key in known or reported(*key):
                continue
            self.log.warn(
                "task {task_id}: killed its run of {scheduled_at}, which the agent had "
                "started as it stopped, unrecorded",
                task_id=str(key[0]),
                scheduled_at=format_instant(key[1]),
            )
            outcome = self._outcome(
                ResultStatus.LOST, "the agent stopped as the run started; its outcome is unknown"
            )
            lost.append(
                RecoveredRun(
                    key[0], key[1], None, succeed(outcome), still_running=False, attempt=key[2]
                )
            )
            known.add(key)
        return lost

    def _outcome(
        self,
        status: ResultStatus,
        reason: str,
        started_at: datetime | None = None,
        exit_code: int | None = None,
        pid: int | None = None,
        signum: int | None = None,
    ) -> RunOutcome:
        """How a run the agent did not see end ended, as of now (its output read later)."""
        now = datetime.fromtimestamp(self._runner.wall_clock(), UTC)
        begun = started_at or now
        return RunOutcome(
            status=status,
            exit_code=exit_code,
            signal=signum,
            started_at=begun,
            finished_at=now,
            duration=max(0.0, (now - begun).total_seconds()),
            stdout=Output(),
            stderr=Output(),
            pid=pid,
            reason=reason,
        )

    def _recover(self, run: str, task_id: uuid.UUID, scheduled_at: datetime) -> RecoveredRun:
        record = self._runner.files.read_record(run)
        exit_code = self._runner.files.read_exit(run)

        def finished(
            status: ResultStatus,
            reason: str,
            exit_code: int | None = None,
            started_at: datetime | None = None,
        ) -> RecoveredRun:
            self._kill_leftovers(run, record)
            pid = None if record is None else record.pid
            outcome = self._outcome(status, reason, started_at, exit_code, pid)
            return RecoveredRun(
                task_id,
                scheduled_at,
                started_at,
                self._runner.collect(run, outcome),
                still_running=False,
                revision=None if record is None else record.revision,
                trigger=None if record is None else record.trigger,
            )

        assert record is not None  # the journal's leftovers all have their record
        # A pid names the run's shell only if that process carries the run's own id: a
        # pid reused since by another process does not.
        alive = (
            record.boot_id == self._runner.boot_id
            and process_is_running(record.pid)
            and run_id_of(record.pid) == self._runner.marker(run)
        )
        if exit_code is not None and not alive:
            return finished(
                status_of(exit_code, None),
                f"{REATTACHED}: the run had ended meanwhile",
                exit_code,
                record.started_at,
            )
        if record.boot_id != self._runner.boot_id:
            return finished(
                ResultStatus.LOST, "the host restarted during the run", started_at=record.started_at
            )
        if not alive and self._runner.files.replaced(run):
            # The agent had begun to end it for a newer run, and died before it was over.
            return finished(
                ResultStatus.REPLACED,
                f"{REATTACHED}: the run had been replaced by a newer run of its task",
                started_at=record.started_at,
            )
        if not alive and self._runner.files.limit_reached(run):
            # The agent had begun to end it at its limit, and died before it was over.
            return finished(
                ResultStatus.TIMED_OUT,
                f"{REATTACHED}: the run had been ended at its time limit",
                started_at=record.started_at,
            )
        if not alive:
            return finished(
                ResultStatus.FAILED,
                f"{REATTACHED}: the run had been ended by a signal (which one is not known)",
                started_at=record.started_at,
            )
        return self._reattach(run, record)

    def _reattach(self, run: str, record: RunRecord) -> RecoveredRun:
        """Watch a run still going until it ends; its time limit holds from its start,
        and a newer run of its task may replace it."""
        done: Deferred[RunOutcome] = Deferred()
        timed_out = False
        replaced = False
        calls: list[IDelayedCall] = []

        def kill(signum: int) -> None:
            if record.cgroup is not None:
                if signum == signal.SIGKILL:
                    CgroupContainment.kill(Path(record.cgroup))
                else:
                    for pid in CgroupContainment.members_of(Path(record.cgroup)):
                        with contextlib.suppress(OSError):
                            os.kill(pid, signum)
            with contextlib.suppress(OSError):
                os.killpg(record.pid, signum)
            if signum == signal.SIGKILL:
                self._kill_by_id(run)

        def limit() -> None:
            nonlocal timed_out
            timed_out = True
            self._runner.mark_limit_reached(run)
            self.log.info(
                "task {task_id}: the re-attached run of {scheduled_at} is past its time limit "
                "of {limit}s; ending it",
                task_id=str(record.task_id),
                scheduled_at=format_instant(record.scheduled_at),
                limit=record.time_limit,
            )
            kill(signal.SIGTERM)
            calls.append(
                self._runner.reactor.callLater(self._runner.kill_grace, kill, signal.SIGKILL)
            )

        def replace() -> None:
            nonlocal replaced
            if timed_out or replaced or run not in self._runner.reattached:
                return  # already being ended, or over
            replaced = True
            self._runner.mark_replaced(run)
            for call in calls:
                if call.active():
                    call.cancel()
            self.log.info(
                "task {task_id}: the re-attached run of {scheduled_at} is replaced by a "
                "newer run of its task; ending it",
                task_id=str(record.task_id),
                scheduled_at=format_instant(record.scheduled_at),
            )
            kill(signal.SIGTERM)
            calls.append(
                self._runner.reactor.callLater(self._runner.kill_grace, kill, signal.SIGKILL)
            )

        def ended() -> None:
            for call in calls:
                if call.active():
                    call.cancel()
            self._runner.reattached.pop(run, None)
            self._kill_leftovers(run, record)
            code = self._runner.files.read_exit(run)
            if timed_out or (code is None and self._runner.files.limit_reached(run)):
                status, reason = ResultStatus.TIMED_OUT, f"{REATTACHED}; ended at its time limit"
            elif replaced:
                status = ResultStatus.REPLACED
                reason = f"{REATTACHED}; replaced by a newer run of its task"
            elif code is not None:
                status, reason = status_of(code, None), REATTACHED
            else:
                status = ResultStatus.FAILED
                reason = f"{REATTACHED}; it was ended by a signal (which one is not known)"
            exit_code = None if status is ResultStatus.TIMED_OUT else code
            signum = signal.SIGTERM if status is ResultStatus.REPLACED else None
            outcome = self._outcome(
                status, reason, record.started_at, exit_code, record.pid, signum
            )
            self._runner.collect(run, outcome).chainDeferred(done)

        self._runner.reattached[run] = replace

        remaining = (
            record.started_at + timedelta(seconds=record.time_limit)
        ).timestamp() - self._runner.wall_clock()
        self.log.info(
            "task {task_id}: re-attached to its run of {scheduled_at}, {remaining:.1f}s "
            "left of its time limit",
            task_id=str(record.task_id),
            scheduled_at=format_instant(record.scheduled_at),
            pid=record.pid,
            remaining=max(0.0, remaining),
        )
        try:
            _ExitWatcher(self._runner.reactor, record.pid, ended)
        except ProcessLookupError:
            self._runner.reactor.callLater(0, ended)
        if self._runner.files.replaced(run):
            # The agent had begun to replace it as it died: it goes on doing so.
            self._runner.reactor.callLater(0, replace)
        elif remaining <= 0:
            self._runner.reactor.callLater(0, limit)
        else:
            calls.append(self._runner.reactor.callLater(remaining, limit))
        self._runner.upkeep.keep_trimming()
        return RecoveredRun(
            record.task_id,
            record.scheduled_at,
            record.started_at,
            done,
            still_running=True,
            revision=record.revision,
            trigger=record.trigger,
        )

    def _kill_leftovers(self, run: str, record: RunRecord | None) -> None:
        """Kill whatever is left of a run whose shell is gone, wherever it went."""
        if record is not None and record.cgroup is not None:
            group = Path(record.cgroup)
            CgroupContainment.kill(group)
            if isinstance(self._runner.containment, CgroupContainment):
                self._runner.containment.remove(group)
            else:
                with contextlib.suppress(OSError):
                    group.rmdir()
        self._kill_by_id(run)

    def _kill_by_id(self, run: str) -> None:
        """SIGKILL every process carrying ``run``'s id (from the start-up scan while it
        lasts, else from a scan of its own)."""
        marker = self._runner.marker(run)
        found = self._found
        for pid in found.pop(marker, []) if found is not None else processes_of_run(marker):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
