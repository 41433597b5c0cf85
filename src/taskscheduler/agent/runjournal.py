"""The run journal (``<data-dir>/runs/journal``): what a restarted agent finds its runs by.

It gets one line as each run starts (task, instant, start time, time limit, process
group = the shell's pid, the boot, the cgroup, the slot, the task's revision and what
triggered the run), one if the agent ends it at its
time limit or because a newer run of its task replaces it (before the first signal), and
one once its result is safe. Appending a line
is one ``write`` (no fsync); a restarted agent replays the journal to find its runs, and
it is rewritten with the live runs only once it has grown.

A run's id is ``<instant>_<task id>``, so that ids sort oldest first; a retry's (attempt
``n`` > 1 of the instant, :mod:`taskscheduler.agent.retries`) is ``<instant>_<task id>~<n>``.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypedDict

from twisted.logger import Logger

from taskscheduler.protocol import Trigger, parse_trigger
from taskscheduler.schedule import format_instant, parse_instant

_STAMP = "%Y%m%dT%H%M%S.%fZ"
_PROC = Path("/proc")
#: The journal is rewritten with the live runs only once it grows past this.
JOURNAL_REWRITE_BYTES = 8 * 1024 * 1024


def run_id(task_id: uuid.UUID, scheduled_at: datetime, attempt: int = 1) -> str:
    name = f"{scheduled_at.astimezone(UTC).strftime(_STAMP)}_{task_id}"
    return name if attempt == 1 else f"{name}~{attempt:02d}"


class RunNames(TypedDict):
    """The fields that name a run in a log line: its task and its instant."""

    task_id: str
    scheduled_at: str


def run_names(run: str) -> RunNames:
    """The fields naming run ``run`` (a run id) in a log line: its task and instant."""
    try:
        task_id, scheduled_at, _ = parse_run_id(run)
    except ValueError:
        return RunNames(task_id="-", scheduled_at=run)
    return RunNames(task_id=str(task_id), scheduled_at=format_instant(scheduled_at))


def parse_run_id(name: str) -> tuple[uuid.UUID, datetime, int]:
    """The (task, instant, attempt) a run id names; ValueError if it names none."""
    stamp, _, rest = name.partition("_")
    task_id, tilde, attempt = rest.partition("~")
    number = int(attempt) if tilde else 1
    if number < 1:
        raise ValueError(f"not an attempt: {attempt}")
    return (
        uuid.UUID(task_id),
        datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC),
        number,
    )


def boot_id(proc: Path = _PROC) -> str:
    """This boot of the host: a run recorded in another boot cannot still be going."""
    try:
        return (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class RunRecord:
    """What a restarted agent needs to find a run again."""

    task_id: uuid.UUID
    scheduled_at: datetime
    started_at: datetime
    time_limit: float  # seconds
    pid: int  # the shell's pid, which is also its process group and session
    boot_id: str
    cgroup: str | None  # the run's cgroup folder, under cgroup containment
    #: The task's revision the run runs (None: not known, a line of an older agent).
    revision: int | None = None
    trigger: Trigger = Trigger.SCHEDULE

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": str(self.task_id),
            "scheduled_at": format_instant(self.scheduled_at),
            "started_at": format_instant(self.started_at),
            "time_limit": self.time_limit,
            "pid": self.pid,
            "boot_id": self.boot_id,
            "cgroup": self.cgroup,
            "revision": self.revision,
            "trigger": self.trigger.value,
        }

    @classmethod
    def from_dict(cls, body: dict[str, Any]) -> RunRecord:
        return cls(
            task_id=uuid.UUID(body["task_id"]),
            scheduled_at=parse_instant(body["scheduled_at"]),
            started_at=parse_instant(body["started_at"]),
            time_limit=float(body["time_limit"]),
            pid=int(body["pid"]),
            boot_id=str(body["boot_id"]),
            cgroup=body["cgroup"],
            revision=None if body.get("revision") is None else int(body["revision"]),
            trigger=parse_trigger(body.get("trigger")),
        )


class RunJournal:
    """The journal in ``directory``: the runs under way, each with its slot, and those
    being ended at their time limit or replaced."""

    log = Logger()

    def __init__(self, directory: Path) -> None:
        self.path = directory / "journal"
        #: The runs under way, by run id, and the slot each writes into.
        self.records: dict[str, RunRecord] = {}
        self.slots: dict[str, int] = {}
        #: The runs being ended at their time limit.
        self.limits: set[str] = set()
        #: The runs being ended because a newer run of their task replaces them.
        self.replaced: set[str] = set()
        self._fd: int | None = None
        self._bytes = 0

    @classmethod
    def replayed(cls, directory: Path) -> RunJournal:
        """The journal a previous life of the agent left in ``directory``, read (not
        opened for writing)."""
        journal = cls(directory)
        journal._replay()
        return journal

    def leftovers(self) -> list[str]:
        """The runs started and not seen to their end, oldest first."""
        return sorted(self.records)

    def started(self, run: str, slot: int, record: RunRecord) -> None:
        self.records[run] = record
        self.slots[run] = slot
        self._append({"start": run, "slot": slot, **record.to_dict()})

    def mark_limit_reached(self, run: str) -> None:
        self.limits.add(run)
        self._append({"limit": run})

    def mark_replaced(self, run: str) -> None:
        self.replaced.add(run)
        self._append({"replaced": run})

    def done(self, run: str) -> None:
        """``run`` is over and its result safe: forgotten (the journal rewritten once it
        has grown)."""
        if run in self.records:
            del self.records[run]
            self.slots.pop(run, None)
            self._append({"done": run})
        self.limits.discard(run)
        self.replaced.discard(run)
        if (
            self._bytes > JOURNAL_REWRITE_BYTES and not self.records
        ) or self._bytes > 4 * JOURNAL_REWRITE_BYTES:
            self.rewrite()

    def _append(self, entry: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = json.dumps(entry, separators=(",", ":")).encode("ascii") + b"\n"
        os.write(self._fd, line)
        self._bytes += len(line)

    def _replay(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        for line in data.splitlines():
            try:
                entry = json.loads(line)
                if "start" in entry:
                    run = str(entry["start"])
                    self.records[run] = RunRecord.from_dict(entry)
                    self.slots[run] = int(entry["slot"])
                elif "limit" in entry:
                    self.limits.add(str(entry["limit"]))
                elif "replaced" in entry:
                    self.replaced.add(str(entry["replaced"]))
                elif "done" in entry:
                    run = str(entry["done"])
                    self.records.pop(run, None)
                    self.slots.pop(run, None)
                    self.limits.discard(run)
                    self.replaced.discard(run)
            except (ValueError, KeyError, TypeError):
                # The agent died while writing its last line.
                self.log.warn(
                    "ignoring a damaged line of the run journal: {line!r}", line=line[:200]
                )

    def rewrite(self) -> None:
        """A journal of the live runs only, replacing the old one at once, open for
        appending."""
        lines = [
            json.dumps(
                {"start": run, "slot": self.slots[run], **record.to_dict()},
                separators=(",", ":"),
            ).encode("ascii")
            for run, record in self.records.items()
        ]
        lines += [
            json.dumps({"limit": run}).encode("ascii") for run in self.limits if run in self.records
        ]
        lines += [
            json.dumps({"replaced": run}).encode("ascii")
            for run in self.replaced
            if run in self.records
        ]
        data = b"".join(line + b"\n" for line in lines)
        tmp = self.path.parent / ".journal.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._bytes = len(data)
