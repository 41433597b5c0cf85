"""What a run leaves in ``<data-dir>/runs/``: its slot (output files, exit status), kept
within the cap.

A run's output goes straight from the command into files, not through pipes to the
agent: it does not depend on the agent's process being alive (a crashed agent used to
leave its runs writing into closed pipes, and SIGPIPE), and the agent holds no file
descriptor per run in flight.

- **Slots.** A run writes into a *slot*: ``slot-<n>.out``, ``slot-<n>.err`` and
  ``slot-<n>.exit`` (the exit status its shell writes as it ends: how a restarted agent
  learns the outcome of a run that ended while it was down). Slots are reused, emptied,
  once a run's result is safe: creating a file costs far more than opening one (an inode
  to allocate, 0.2-0.5 ms on a busy disk here, against about 10 us), so on the common
  path no file is created at all.
- **The cap** is kept on disk by punching a hole in the middle of an output file past it
  (``fallocate(PUNCH_HOLE)``): the first and last ``cap/2`` bytes stay, the size stays
  the original size, the disk holds about ``cap``. :func:`read_capped` returns head,
  tail, original size and the truncated flag.
- **The journal** (:mod:`taskscheduler.agent.runjournal`) records which run is in which
  slot, for a restarted agent to find its runs.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from taskscheduler.agent.runjournal import RunJournal, RunRecord
from taskscheduler.protocol import Output

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLOCK = 4096
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


class RunFiles:
    """Run files in slots, and the journal of the runs under way (:class:`RunJournal`).

    Every method is plain, short file I/O with no fsync; none creates a file on the
    common path (see the module's docstring).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._slots: dict[str, int] = {}  # run id -> its slot
        self._free: list[int] = []  # empty slots
        self._dirty: list[int] = []  # slots of runs over, not yet emptied
        self._next_slot = 0
        self.journal = RunJournal(directory)

    # -- the folder --------------------------------------------------------------------

    def create(self) -> None:
        """Make the folder, read what a previous life of the agent left, open the journal.

        The runs the journal says are under way keep their slots (see :meth:`leftovers`);
        every other slot is emptied and free.
        """
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.journal = RunJournal.replayed(self.directory)
        self._slots = dict(self.journal.slots)
        busy = set(self._slots.values())
        slots = set()
        for entry in self.directory.glob("slot-*.*"):
            number = entry.name[len("slot-") :].partition(".")[0]
            if number.isdigit():
                slots.add(int(number))
        self._next_slot = max(slots, default=-1) + 1
        for slot in sorted(slots - busy, reverse=True):
            self._empty(slot)
            self._free.append(slot)
        self.journal.rewrite()

    def slot_path(self, slot: int, kind: str) -> Path:
        return self.directory / f"slot-{slot}.{kind}"

    def path(self, run: str, kind: str) -> Path:
        """The file ``kind`` (out, err, exit) of the run ``run``."""
        return self.slot_path(self._slots[run], kind)

    # -- a run's life ------------------------------------------------------------------

    def begin(self, run: str) -> tuple[int, int, int]:
        """Give ``run`` a slot: its stdout, stderr and exit-status files, open for
        writing (the caller closes them)."""
        if self._free:
            slot = self._free.pop()
        else:  # the one place a file is made: when more runs are in flight than ever
            slot = self._next_slot
            self._next_slot += 1
            for kind in _KINDS:
                flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
                os.close(os.open(self.slot_path(slot, kind), flags, 0o600))
        self._slots[run] = slot
        fds: list[int] = []
        try:
            for kind in _KINDS:
                fds.append(os.open(self.slot_path(slot, kind), os.O_WRONLY | os.O_CLOEXEC))
            # The shell overwrites these four bytes with its status (see runner.SUPERVISOR):
            # no truncation, which would cost as much as a create.
            os.pwrite(fds[2], NO_STATUS, 0)
        except BaseException:
            for fd in fds:
                os.close(fd)
            self.remove(run)
            raise
        return fds[0], fds[1], fds[2]

    def started(self, run: str, record: RunRecord) -> None:
        """Record that ``run`` started: what a restarted agent finds it by."""
        self.journal.started(run, self._slots[run], record)

    def mark_limit_reached(self, run: str) -> None:
        """Record, before the first signal, that ``run`` is being ended at its limit."""
        self.journal.mark_limit_reached(run)

    def mark_replaced(self, run: str) -> None:
        """Note that ``run`` is being ended because a newer run of its task replaces it."""
        self.journal.mark_replaced(run)

    def replaced(self, run: str) -> bool:
        return run in self.journal.replaced

    def limit_reached(self, run: str) -> bool:
        return run in self.journal.limits

    def read_record(self, run: str) -> RunRecord | None:
        return self.journal.records.get(run)

    def read_exit(self, run: str) -> int | None:
        """The exit status the run's shell wrote as it ended, or None."""
        try:
            with open(self.path(run, "exit"), "rb") as f:
                status = f.read(4)
        except OSError:
            return None
        if len(status) == 4 and status[:3].isdigit() and status[3:] == b"\n":
            return int(status[:3])
        return None  # not written, or cut short while writing

    def read_output(self, run: str, cap: int) -> tuple[Output, Output]:
        return (
            read_capped(self.path(run, "out"), cap),
            read_capped(self.path(run, "err"), cap),
        )

    def trim(self, run: str, cap: int) -> None:
        """Free the disk blocks of the middle of each output file past the cap."""
        if run in self._slots:
            for kind in ("out", "err"):
                trim_file(self.path(run, kind), cap)

    def remove(self, run: str) -> None:
        """``run`` is over and its result safe: the journal forgets it, its slot waits to
        be emptied (:meth:`empty_dirty`, off the reactor: freeing blocks is as slow as
        allocating them)."""
        slot = self._slots.pop(run, None)
        if slot is not None:
            self._dirty.append(slot)
        self.journal.done(run)

    def take_dirty(self) -> list[int]:
        """The slots waiting to be emptied (now the caller's to empty and give back)."""
        dirty, self._dirty = self._dirty, []
        return dirty

    def empty_slots(self, slots: list[int]) -> None:
        """Empty ``slots`` (blocking; a thread's work)."""
        for slot in slots:
            self._empty(slot)

    def give_back(self, slots: list[int]) -> None:
        """``slots`` are empty: free for new runs."""
        self._free.extend(slots)

    def leftovers(self) -> list[str]:
        """The runs a previous life of the agent started and did not see to their end."""
        return self.journal.leftovers()

    def _empty(self, slot: int) -> None:
        for kind in ("out", "err"):
            path = self.slot_path(slot, kind)
            try:
                if path.stat().st_size:
                    os.truncate(path, 0)
            except FileNotFoundError:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))


#: What the exit-status file holds until the run's shell overwrites it ("000\n"-"255\n").
NO_STATUS = b"---\n"
#: The files of a slot.
_KINDS = ("out", "err", "exit")


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
