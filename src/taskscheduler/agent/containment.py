"""Keeping every process of a run inside it: a cgroup per run, or the agent as subreaper.

A process group is not enough: ``setsid sleep 1000 &``, ``setsid -f`` or a child calling
``setpgid(0, 0)`` leave it, outlive the run and its time limit, and end up with parent
pid 1. Two mechanisms track every descendant instead:

- :class:`CgroupContainment` (preferred): each run gets a cgroup v2 of its own under the
  agent's; the run's shell joins it before it starts anything, and every descendant is
  born into it whatever it does to its session or group. Signals go to every member;
  ``cgroup.kill`` ends them all at once (as systemd's ``KillMode=control-group``, Nomad
  and Kubernetes do). It works whether the agent is alive or not: a restarted agent
  kills a leftover run by its cgroup path, which the run record names.
- :class:`SubreaperContainment`, where the agent may not create cgroups: the agent is a
  child subreaper (``PR_SET_CHILD_SUBREAPER``), so a process whose parent dies is
  re-parented to the agent instead of pid 1. When a run's shell ends, everything left of
  the run is therefore a tree under one of the agent's own children that is not a run's
  shell; it is told apart by the ``TASKSCHEDULER_RUN_ID`` every run carries in its
  environment, and killed. Runs left by an agent that died are found by that variable
  in ``/proc``.

Both also signal the run's process group, which covers the instant between the spawn and
the shell joining its cgroup.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

from twisted.logger import Logger

#: The environment variable that names a run in every process it starts.
RUN_ID_VARIABLE = "TASKSCHEDULER_RUN_ID"

_PR_SET_CHILD_SUBREAPER = 36
_PROC = Path("/proc")


class Containment(Protocol):
    """What the runner asks of a containment mechanism."""

    #: "cgroup" or "subreaper", as shown in the agent's health and log.
    name: str

    def prepare(self, run_id: str) -> str | None:
        """Make room for a new run; the ``cgroup.procs`` path its shell joins, if any."""
        ...

    def adopt(self, run_id: str, pid: int) -> None:
        """The run's shell was spawned with ``pid``."""
        ...

    def signal(self, run_id: str, pgid: int | None, signum: int) -> None:
        """Send ``signum`` to every process of the run."""
        ...

    def release(self, run_id: str, pgid: int | None) -> None:
        """The run's shell ended: kill whatever is left of the run and forget it."""
        ...

    def tidy(self) -> bool:
        """Finish what :meth:`release` could not do at once; True while work remains."""
        ...


def _signal_group(pgid: int | None, signum: int) -> None:
    if pgid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


# -- cgroup v2 ----------------------------------------------------------------------------


def own_cgroup_dir(proc: Path = _PROC) -> Path | None:
    """The cgroup v2 folder this process is in, or None where there is no cgroup v2."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
        mounts = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    relative = next((line[3:] for line in lines if line.startswith("0::")), None)
    if relative is None:
        return None
    for line in mounts:
        # "... mountpoint ... - cgroup2 cgroup2 rw"
        before, _, after = line.partition(" - ")
        if after.split(" ", 1)[0] == "cgroup2":
            mount_point = before.split(" ")[4]
            return Path(mount_point) / relative.lstrip("/")
    return None


class CgroupContainment:
    """One cgroup v2 per run, under ``parent``."""

    name = "cgroup"
    log = Logger()

    def __init__(self, parent: Path) -> None:
        self.parent = parent
        self._unremoved: set[Path] = set()

    @classmethod
    def probe(cls, parent: Path) -> CgroupContainment:
        """A containment under ``parent`` (created), or OSError if cgroups cannot be made."""
        parent.mkdir(exist_ok=True)
        if not (parent / "cgroup.procs").exists():
            raise OSError(errno.ENOTSUP, f"{parent} is not a cgroup v2 folder")
        probe = parent / ".probe"
        probe.mkdir(exist_ok=True)
        try:
            if not (probe / "cgroup.kill").exists():
                raise OSError(errno.ENOTSUP, "this kernel has no cgroup.kill (Linux 5.14+)")
        finally:
            probe.rmdir()
        return cls(parent)

    def path(self, run_id: str) -> Path:
        return self.parent / run_id

    def prepare(self, run_id: str) -> str | None:
        self._retry_removals()
        group = self.path(run_id)
        group.mkdir(exist_ok=True)
        return str(group / "cgroup.procs")

    def adopt(self, run_id: str, pid: int) -> None:
        # The shell joins by itself before it starts anything; this covers a shell that
        # may not write there (a --run-as user), in practice before its first fork.
        with contextlib.suppress(OSError):
            (self.path(run_id) / "cgroup.procs").write_text(str(pid))

    def members(self, run_id: str) -> list[int]:
        return self.members_of(self.path(run_id))

    @staticmethod
    def members_of(group: Path) -> list[int]:
        """The processes in the cgroup ``group`` (none if it is gone)."""
        try:
            text = (group / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def signal(self, run_id: str, pgid: int | None, signum: int) -> None:
        _signal_group(pgid, signum)
        if signum == signal.SIGKILL:
            self.kill(self.path(run_id))
            return
        for pid in self.members(run_id):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)

    @staticmethod
    def kill(group: Path) -> None:
        """SIGKILL every process in the cgroup ``group`` (and its children)."""
        with contextlib.suppress(FileNotFoundError):
            (group / "cgroup.kill").write_text("1")

    def release(self, run_id: str, pgid: int | None) -> None:
        self.signal(run_id, pgid, signal.SIGKILL)
        self.remove(self.path(run_id))

    def remove(self, group: Path) -> None:
        """Remove the cgroup ``group``, now or (if its processes are still dying) later."""
        try:
            group.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            self._unremoved.add(group)

    def tidy(self) -> bool:
        """Remove the cgroups whose killed processes were still dying at release."""
        self._retry_removals()
        return bool(self._unremoved)

    def _retry_removals(self) -> None:
        for group in list(self._unremoved):
            try:
                group.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue
            self._unremoved.discard(group)


# -- subreaper ----------------------------------------------------------------------------


def become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (Linux 3.4+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(code)}")


def environment_of(pid: int, proc: Path = _PROC) -> bytes:
    try:
        return (proc / str(pid) / "environ").read_bytes()
    except OSError:
        return b""


def run_id_of(pid: int, proc: Path = _PROC) -> str | None:
    """The run a process belongs to, from its environment (None if it names none)."""
    marker = RUN_ID_VARIABLE.encode() + b"="
    for item in environment_of(pid, proc).split(b"\0"):
        if item.startswith(marker):
            return item[len(marker) :].decode("ascii", "replace")
    return None


def processes_of_run(run_id: str, proc: Path = _PROC) -> list[int]:
    """Every process on the host whose environment names ``run_id`` (a scan of /proc)."""
    return processes_by_run(run_id, proc).get(run_id, [])


def processes_by_run(prefix: str, proc: Path = _PROC) -> dict[str, list[int]]:
    """Every live process whose ``TASKSCHEDULER_RUN_ID`` starts with ``prefix``, by run id
    (one scan of /proc)."""
    found: dict[str, list[int]] = {}
    needle = f"{RUN_ID_VARIABLE}={prefix}".encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        for item in environment_of(int(entry.name), proc).split(b"\0"):
            if item.startswith(needle):
                run = item[len(RUN_ID_VARIABLE) + 1 :].decode("ascii", "replace")
                found.setdefault(run, []).append(int(entry.name))
                break
    return found


def children_of(pid: int, proc: Path = _PROC) -> list[int]:
    """The children of process ``pid`` (every thread's), from /proc."""
    children: list[int] = []
    try:
        tasks = list((proc / str(pid) / "task").iterdir())
    except OSError:
        return children
    for task in tasks:
        with contextlib.suppress(OSError):
            children.extend(int(child) for child in (task / "children").read_text().split())
    return children


class SubreaperContainment:
    """The agent as child subreaper; a run's leftovers told apart by their environment.

    ``ours`` says whether a pid is a process the agent started itself (a run's shell,
    reaped by Twisted); every other child of the agent is an adopted orphan.
    """

    name = "subreaper"
    log = Logger()

    def __init__(
        self,
        ours: Callable[[int], bool],
        live_runs: Callable[[], Iterable[str]],
        proc: Path = _PROC,
        subreaper: Callable[[], None] = become_subreaper,
    ) -> None:
        subreaper()
        self._ours = ours
        self._live_runs = live_runs
        self._proc = proc

    def prepare(self, run_id: str) -> str | None:
        return None

    def adopt(self, run_id: str, pid: int) -> None:
        pass

    def signal(self, run_id: str, pgid: int | None, signum: int) -> None:
        _signal_group(pgid, signum)
        if signum == signal.SIGKILL:
            # Escapees from the group are still descendants of the shell, until it ends:
            # the time limit's final word reaches them through their environment.
            for pid in processes_of_run(run_id, self._proc):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)

    def release(self, run_id: str, pgid: int | None) -> None:
        _signal_group(pgid, signal.SIGKILL)
        self.sweep()

    def tidy(self) -> bool:
        return self.sweep() > 0

    def sweep(self) -> int:
        """Kill and reap the agent's adopted orphans whose run is over; how many."""
        live = set(self._live_runs())
        killed = 0
        for pid in children_of(os.getpid(), self._proc):
            if self._ours(pid):
                continue
            owner = run_id_of(pid, self._proc)
            if owner is not None and owner in live:
                continue  # a run still going: it ends with its run
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)
        return killed


class GroupContainment:
    """The run's process group only: what a process that leaves it escapes.

    The fallback of last resort, and what unit tests inject (with a fake ``kill_group``).
    """

    name = "process-group"

    def __init__(self, kill_group: Callable[[int, int], None] = os.killpg) -> None:
        self._kill_group = kill_group

    def prepare(self, run_id: str) -> str | None:
        return None

    def adopt(self, run_id: str, pid: int) -> None:
        pass

    def signal(self, run_id: str, pgid: int | None, signum: int) -> None:
        """ProcessLookupError if there is no such group (yet: see the runner)."""
        if pgid is not None:
            self._kill_group(pgid, signum)

    def release(self, run_id: str, pgid: int | None) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            self.signal(run_id, pgid, signal.SIGKILL)

    def tidy(self) -> bool:
        return False
