"""What a run leaves in ``<data-dir>/runs/``: its output, its record and its exit status.

A run's output goes straight from the command into two files, not through pipes to the
agent: it does not depend on the agent's process being alive (a crashed agent used to
leave its runs writing into closed pipes, and SIGPIPE), and the agent holds no file
descriptor per run in flight. Per run ``<id>``:

- ``<id>.out`` and ``<id>.err``: what the command wrote. The cap is kept on disk by
  punching a hole in the middle of a file past it (``fallocate(PUNCH_HOLE)``): the first
  and the last ``cap/2`` bytes stay, the size stays the original size, the disk holds
  about ``cap``. :func:`read_output` returns what the in-memory capture used to: head,
  tail, original size, truncated flag.
- ``<id>.json``: the run record, written as the run starts: task, instant, start time,
  time limit, process group (= the shell's pid), the kernel's start time of that pid
  (to guard against pid reuse), the boot it ran in and its cgroup. It is what lets a
  restarted agent find the run again.
- ``<id>.exit``: written by the run's shell when it ends, with its exit status: how a
  restarted agent learns the outcome of a run that ended while it was down.
- ``<id>.limit``: made when the agent ends the run at its time limit, before the first
  signal: a run that dies of that signal while the agent is down was timed out.

The id is ``<instant>_<task id>``, so that names sort oldest first.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from taskscheduler.protocol import Output
from taskscheduler.schedule import format_instant, parse_instant

_STAMP = "%Y%m%dT%H%M%S.%fZ"
_PROC = Path("/proc")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLOCK = 4096
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


def run_id(task_id: uuid.UUID, scheduled_at: datetime) -> str:
    return f"{scheduled_at.astimezone(UTC).strftime(_STAMP)}_{task_id}"


def parse_run_id(name: str) -> tuple[uuid.UUID, datetime]:
    """The (task, instant) a run id names; ValueError if it names none."""
    stamp, _, task_id = name.partition("_")
    return uuid.UUID(task_id), datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)


def boot_id(proc: Path = _PROC) -> str:
    """This boot of the host: a run recorded in another boot cannot still be going."""
    try:
        return (proc / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


def process_start_ticks(pid: int, proc: Path = _PROC) -> int | None:
    """When the kernel started process ``pid`` (clock ticks since boot); None if gone.

    Together with the pid it names one process for the life of the host: a pid reused
    later has a later start time.
    """
    try:
        stat = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its end.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None  # a zombie has done all it will do
    return int(fields[19])


@dataclass(frozen=True)
class RunRecord:
    """What a restarted agent needs to find a run again."""

    task_id: uuid.UUID
    scheduled_at: datetime
    started_at: datetime
    time_limit: float  # seconds
    pid: int  # the shell's pid, which is also its process group and session
    start_ticks: int | None  # the kernel's start time of ``pid``
    boot_id: str
    cgroup: str | None  # the run's cgroup folder, under cgroup containment

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "task_id": str(self.task_id),
                "scheduled_at": format_instant(self.scheduled_at),
                "started_at": format_instant(self.started_at),
                "time_limit": self.time_limit,
                "pid": self.pid,
                "start_ticks": self.start_ticks,
                "boot_id": self.boot_id,
                "cgroup": self.cgroup,
            }
        ).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes) -> RunRecord:
        body: dict[str, Any] = json.loads(data)
        return cls(
            task_id=uuid.UUID(body["task_id"]),
            scheduled_at=parse_instant(body["scheduled_at"]),
            started_at=parse_instant(body["started_at"]),
            time_limit=float(body["time_limit"]),
            pid=int(body["pid"]),
            start_ticks=None if body["start_ticks"] is None else int(body["start_ticks"]),
            boot_id=str(body["boot_id"]),
            cgroup=body["cgroup"],
        )


class RunFiles:
    """The folder of run files; every method is plain blocking file I/O."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, run: str, kind: str) -> Path:
        return self.directory / f"{run}.{kind}"

    def create(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def open_outputs(self, run: str) -> tuple[int, int]:
        """Fresh stdout and stderr files of ``run``, open for writing (close them)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        out = os.open(self.path(run, "out"), flags, 0o600)
        try:
            err = os.open(self.path(run, "err"), flags, 0o600)
        except BaseException:
            os.close(out)
            raise
        return out, err

    def write_record(self, run: str, record: RunRecord) -> None:
        """Not fsynced: it must survive the agent's death, which the page cache does; a
        host that loses power loses its runs too."""
        path = self.path(run, "json")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(record.to_json())
        os.replace(tmp, path)

    def read_record(self, run: str) -> RunRecord | None:
        try:
            return RunRecord.from_json(self.path(run, "json").read_bytes())
        except FileNotFoundError:
            return None

    def read_exit(self, run: str) -> int | None:
        """The exit status the run's shell wrote as it ended, or None."""
        try:
            text = self.path(run, "exit").read_text()
        except OSError:
            return None
        try:
            return int(text.strip())
        except ValueError:
            return None  # cut short while writing

    def leftovers(self) -> list[str]:
        """Ids of the runs whose files are here, oldest first."""
        if not self.directory.is_dir():
            return []
        names = set()
        for entry in self.directory.iterdir():
            if entry.name.startswith("."):
                entry.unlink(missing_ok=True)  # an interrupted record write
                continue
            run, _, _ = entry.name.rpartition(".")
            names.add(run)
        return sorted(names)

    def read_output(self, run: str, cap: int) -> tuple[Output, Output]:
        return (
            read_capped(self.path(run, "out"), cap),
            read_capped(self.path(run, "err"), cap),
        )

    def trim(self, run: str, cap: int) -> None:
        """Free the disk blocks of the middle of each output file past the cap."""
        for kind in ("out", "err"):
            trim_file(self.path(run, kind), cap)

    def mark_limit_reached(self, run: str) -> None:
        self.path(run, "limit").touch()

    def limit_reached(self, run: str) -> bool:
        return self.path(run, "limit").exists()

    def remove(self, run: str) -> None:
        for kind in ("out", "err", "json", "exit", "limit"):
            self.path(run, kind).unlink(missing_ok=True)


def _halves(cap: int) -> tuple[int, int]:
    head = cap // 2
    return head, cap - head


def read_capped(path: Path, cap: int) -> Output:
    """The first and last bytes of ``path`` within ``cap``, its size and whether cut."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return Output()
    try:
        size = os.fstat(fd).st_size
        if size <= cap:
            data = _read_at(fd, 0, size)
            return Output(data, len(data), False)
        head_cap, tail_cap = _halves(cap)
        data = _read_at(fd, 0, head_cap) + _read_at(fd, size - tail_cap, tail_cap)
        return Output(data, size, True)
    finally:
        os.close(fd)


def _read_at(fd: int, offset: int, length: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


def trim_file(path: Path, cap: int) -> bool:
    """Punch out the middle of ``path`` past the head and tail the cap keeps; True if any."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    head_cap, tail_cap = _halves(cap)
    start = -(-head_cap // _BLOCK) * _BLOCK  # the head's last block stays whole
    end = (max(0, stat.st_size - tail_cap) // _BLOCK) * _BLOCK
    if end <= start or stat.st_blocks * 512 <= cap + 4 * _BLOCK:
        return False
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start):
            code = ctypes.get_errno()
            raise OSError(code, f"fallocate(PUNCH_HOLE) on {path}: {os.strerror(code)}")
    finally:
        os.close(fd)
    return True


def disk_bytes(path: Path) -> int:
    """Bytes of disk ``path`` holds (its holes hold none)."""
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_blocks * 512
    return 0
