"""The run files' upkeep, off each run's start path: the output of runs in flight trimmed
to the cap, and the slots of runs over emptied (on a thread) for new runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.runfiles import RunFiles
from taskscheduler.agent.runjournal import run_names

#: How often the output files of runs in flight are trimmed to the cap.
TRIM_INTERVAL = 0.5


class Upkeep:
    """Keeps ``files`` within ``output_cap`` and their slots ready for new runs.

    ``live_run_ids`` names the runs in flight; ``run_in_thread`` runs blocking file work
    somewhere else (a thread pool).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        files: RunFiles,
        output_cap: int,
        live_run_ids: Callable[[], list[str]],
        run_in_thread: Callable[[Callable[[], Any]], Deferred[Any]],
    ) -> None:
        self._reactor = reactor
        self._files = files
        self._output_cap = output_cap
        self._live_run_ids = live_run_ids
        self._run_in_thread = run_in_thread
        self._trimmer = LoopingCall(self._trim)
        self._trimmer.clock = reactor
        self._emptying = False

    # -- trimming ------------------------------------------------------------------------

    def keep_trimming(self) -> None:
        """Trim the output of runs in flight to the cap, every TRIM_INTERVAL seconds."""
        if not self._trimmer.running:
            self._trimmer.start(TRIM_INTERVAL, now=False)

    def stop_trimming(self) -> None:
        """No run is in flight: nothing to trim until the next starts."""
        if self._trimmer.running:
            self._trimmer.stop()

    def _trim(self) -> None:
        # Never raise: a LoopingCall stops for good. A stat per output file of each run
        # in flight; a hole is punched only past the cap.
        cap = self._output_cap
        for run in self._live_run_ids():
            try:
                self._files.trim(run, cap)
            except (OSError, KeyError):
                self.log.failure(
                    "task {task_id}: could not trim the output of its run of {scheduled_at}",
                    **run_names(run),
                )

    # -- emptying slots ------------------------------------------------------------------

    def empty_dirty_slots(self) -> None:
        """Empty the slots of finished runs on a thread, a batch at a time."""
        if self._emptying:
            return
        dirty = self._files.take_dirty()
        if not dirty:
            return
        self._emptying = True

        def emptied(_: object) -> None:
            self._emptying = False
            self._files.give_back(dirty)
            self.empty_dirty_slots()

        def failed(failure: Failure) -> None:
            self._emptying = False
            self.log.failure("could not empty run files", failure)

        self._run_in_thread(lambda: self._files.empty_slots(dirty)).addCallbacks(emptied, failed)
