"""Results not yet acknowledged by the server, and markers of runs under way.

:class:`Spool` keeps one file per result in ``<data-dir>/spool/``, written durably before
the result is reported and deleted only once the server acknowledged it, so a result
survives the server being down and the agent restarting. Its bytes are exactly the JSON
body that is sent. The reporter reads them (up to 8 MiB a batch) off the reactor thread,
with :meth:`Spool.read_bodies`.

Results the spool had to throw away (its byte cap reached, the disk refusing a write) are
counted, logged and shown by the agent's health endpoint; the count is kept in
``<data-dir>/spool/dropped`` so that a restart does not hide it.

:class:`RunMarkers` reads the small files older agents kept per run under way in
``<data-dir>/running/`` (agents now keep a run journal, :mod:`taskscheduler.agent.runjournal`).
A marker still there at start-up means that agent died during that run: it becomes a
``lost`` result.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler import protocol
from taskscheduler.agent.durable import (
    BatchWriter,
    RunInThread,
    atomic_write,
    ensure_directory,
    remove,
    remove_leftovers,
    run_here,
)
from taskscheduler.protocol import RunResult
from taskscheduler.schedule import format_instant, parse_instant

#: Default bound on the bytes the spool may hold.
DEFAULT_SPOOL_MAX_BYTES = 1024 * 1024 * 1024

_STAMP = "%Y%m%dT%H%M%S.%fZ"

#: The file, beside the results, that counts the results dropped over the agent's life.
DROPPED_FILE = "dropped"

#: (task_id, scheduled_at, attempt); the agent is implied. Each attempt of a run (its
#: retries, :mod:`taskscheduler.agent.retries`) is a result of its own.
ResultKey = tuple[uuid.UUID, datetime, int]


def _file_name(key: ResultKey) -> str:
    # The instant first, so that sorting the names sorts results oldest first; a retry's
    # ``~NN`` sorts after the first attempt's ``.json``, and attempts in order.
    task_id, scheduled_at, attempt = key
    stem = f"{scheduled_at.astimezone(UTC).strftime(_STAMP)}_{task_id}"
    return f"{stem}.json" if attempt == 1 else f"{stem}~{attempt:02d}.json"


def _parse_file_name(name: str) -> ResultKey:
    """The key a file name encodes; ValueError if it encodes none."""
    stem = name.removesuffix(".json")
    stamp, _, rest = stem.partition("_")
    task_id, tilde, attempt = rest.partition("~")
    number = int(attempt) if tilde else 1
    if number < 1:
        raise ValueError(f"not an attempt: {attempt}")
    scheduled_at = datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)
    return uuid.UUID(task_id), scheduled_at, number


def encode_result(result: RunResult) -> bytes:
    """The wire body of a result, as compact UTF-8 JSON."""
    body = protocol.result_to_json(result)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class SpoolEntry:
    key: ResultKey
    path: Path
    size: int
    #: When its run ended (POSIX seconds; None: not a run, or spooled by an earlier life
    #: of the agent), for the report latency.
    finished: float | None = None

    @property
    def task_id(self) -> uuid.UUID:
        return self.key[0]


class Spool:
    """Durable results waiting for the server, oldest first, bounded in bytes."""

    log = Logger()

    def __init__(
        self,
        directory: Path,
        max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        writer: BatchWriter | None = None,
        run_in_thread: RunInThread = run_here,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        #: Writes results durably; None writes each one at once, on this thread.
        self._writer = writer
        #: Where results are read back for the reporter.
        self._run_in_thread = run_in_thread
        #: Called when a result becomes durable, so that it can be reported.
        self.on_ready: Callable[[], None] = lambda: None
        self._entries: dict[ResultKey, SpoolEntry] = {}
        self._writing: dict[ResultKey, int] = {}  # not durable yet: not to be reported
        self.bytes = 0
        #: Results thrown away (the spool full, the disk failing), over the agent's life.
        self.dropped = 0

    def load(self) -> None:
        """Index the results a previous life of the agent left unacknowledged."""
        ensure_directory(self.directory)
        remove_leftovers(self.directory)
        try:
            self.dropped = int((self.directory / DROPPED_FILE).read_text().strip() or 0)
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            self.log.error("could not read the count of dropped results: {error}", error=str(e))
        if self.dropped:
            self.log.warn("{dropped} results were dropped so far", dropped=self.dropped)
        for path in sorted(self.directory.glob("*.json")):
            try:
                key = _parse_file_name(path.name)
                size = path.stat().st_size
            except (OSError, ValueError) as e:
                self.log.error(
                    "ignoring unexpected spool file {path}: {error}", path=str(path), error=str(e)
                )
                continue
            self._remember(SpoolEntry(key, path, size))
        if self._entries:
            self.log.info(
                "{count} results ({bytes} bytes) are waiting to be reported",
                count=len(self._entries),
                bytes=self.bytes,
            )

    def _remember(self, entry: SpoolEntry) -> None:
        self._entries[entry.key] = entry
        self.bytes += entry.size

    def add(self, result: RunResult) -> Deferred[bool]:
        """Write ``result`` durably; True once it is, False (logged, counted) if it cannot be.

        Only then is it offered to the reporter. A second result for the same key is
        ignored: results are immutable, and the first is the one the server may hold.
        """
        key: ResultKey = (result.task_id, result.scheduled_at, result.attempt)
        if key in self:
            self.log.warn(
                "a result of task {task_id} at {scheduled_at} (attempt {attempt}) is already "
                "spooled; keeping the first",
                attempt=result.attempt,
                task_id=str(result.task_id),
                scheduled_at=format_instant(result.scheduled_at),
            )
            return succeed(True)
        data = encode_result(result)
        if self.bytes + len(data) > self.max_bytes:
            self._count_dropped()
            self.log.error(
                "spool full ({bytes} of {max_bytes} bytes): dropped the {status} result of "
                "task {task_id} at {scheduled_at} ({dropped} dropped so far)",
                bytes=self.bytes,
                max_bytes=self.max_bytes,
                status=result.status.value,
                task_id=str(result.task_id),
                scheduled_at=format_instant(result.scheduled_at),
                dropped=self.dropped,
            )
            return succeed(False)
        path = self.directory / _file_name(key)
        finished = None if result.finished_at is None else result.finished_at.timestamp()
        entry = SpoolEntry(key, path, len(data), finished)
        if self._writer is None:
            atomic_write(path, data)
            return succeed(self._written(None, entry, False))
        self._writing[key] = len(data)
        self.bytes += len(data)
        written = self._writer.write(path, data)
        return written.addCallbacks(
            self._written, self._not_written, callbackArgs=(entry, True), errbackArgs=(entry,)
        )

    def _written(self, _: object, entry: SpoolEntry, counted: bool) -> bool:
        if counted:
            del self._writing[entry.key]
            self.bytes -= entry.size
        self._remember(entry)
        self.log.debug(
            "task {task_id}: the result of {scheduled_at} (attempt {attempt}) is spooled",
            task_id=str(entry.task_id),
            scheduled_at=format_instant(entry.key[1]),
            attempt=entry.key[2],
        )
        self.on_ready()
        return True

    def _not_written(self, failure: Failure, entry: SpoolEntry) -> bool:
        del self._writing[entry.key]
        self.bytes -= entry.size
        self._count_dropped()
        self.log.failure(
            "could not spool the result of task {task_id} at {scheduled_at}; dropped it "
            "({dropped} dropped so far)",
            failure,
            task_id=str(entry.task_id),
            scheduled_at=format_instant(entry.key[1]),
            dropped=self.dropped,
        )
        return False

    def _count_dropped(self) -> None:
        self.dropped += 1
        try:
            # Not fsynced: a count that survives the agent's death is what is asked for.
            atomic_write(
                self.directory / DROPPED_FILE, str(self.dropped).encode("ascii"), sync=False
            )
        except OSError as e:
            self.log.error("could not record the count of dropped results: {error}", error=str(e))

    def __contains__(self, key: object) -> bool:
        return key in self._entries or key in self._writing

    def __len__(self) -> int:
        """Results spooled or being spooled."""
        return len(self._entries) + len(self._writing)

    def __iter__(self) -> Iterator[SpoolEntry]:
        return iter(list(self._entries.values()))

    def oldest(self, count: int, max_bytes: int) -> list[SpoolEntry]:
        """Up to ``count`` oldest entries totalling at most ``max_bytes`` (at least one)."""
        chosen: list[SpoolEntry] = []
        total = 0
        for entry in self._entries.values():
            if len(chosen) >= count or (chosen and total + entry.size > max_bytes):
                break
            chosen.append(entry)
            total += entry.size
        return chosen

    def result_keys(self) -> list[ResultKey]:
        """The key of every result spooled or being spooled."""
        return [*self._entries, *self._writing]

    def read(self, entry: SpoolEntry) -> bytes:
        """The body of ``entry``; OSError or ValueError if the file is gone or not JSON.

        It blocks on the disk: on the reactor, use :meth:`read_bodies`.
        """
        data = entry.path.read_bytes()
        json.loads(data)
        return data

    def read_bodies(self, entries: list[SpoolEntry]) -> Deferred[list[bytes | Exception]]:
        """The body of each of ``entries``, or the OSError or ValueError that made it
        unreadable; read and checked in one go off the reactor thread."""
        bodies: list[bytes | Exception] = []

        def read_all() -> None:
            for entry in entries:
                try:
                    bodies.append(self.read(entry))
                except (OSError, ValueError) as e:
                    bodies.append(e)

        return self._run_in_thread(read_all).addCallback(lambda _: bodies)

    def remove(self, entry: SpoolEntry) -> None:
        """Forget ``entry`` for good (the server acknowledged or refused it)."""
        if self._entries.pop(entry.key, None) is not None:
            self.bytes -= entry.size
        # Not fsynced: should a crash resurrect the file, the server answers "duplicate".
        # Off the reactor when there is a writer: an unlink waits on the folder's lock,
        # which the writer's file creations hold (a batch of a thousand acknowledged
        # results took seconds of the reactor on a busy agent).
        if self._writer is None:
            remove(entry.path, sync=False)
        else:
            self._writer.remove(entry.path, sync=False).addErrback(
                lambda f: self.log.failure("could not remove {path}", f, path=str(entry.path))
            )


@dataclass(frozen=True)
class RunMarker:
    task_id: uuid.UUID
    scheduled_at: datetime
    started_at: datetime


class RunMarkers:
    """One file per run under way, as older agents kept them; what is left at start-up
    was lost with the agent."""

    log = Logger()

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, task_id: uuid.UUID, scheduled_at: datetime) -> Path:
        return self.directory / _file_name((task_id, scheduled_at, 1))

    def leftovers(self) -> list[RunMarker]:
        """The runs a previous life of the agent started and never finished."""
        ensure_directory(self.directory)
        remove_leftovers(self.directory)
        markers = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                task_id, scheduled_at, _ = _parse_file_name(path.name)
                body = json.loads(path.read_bytes())
                started_at = parse_instant(body["started_at"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.log.error(
                    "ignoring unreadable run marker {path}: {error}", path=str(path), error=str(e)
                )
                continue
            markers.append(RunMarker(task_id, scheduled_at, started_at))
        return markers

    def clear(self, task_id: uuid.UUID, scheduled_at: datetime) -> None:
        remove(self._path(task_id, scheduled_at), sync=False)
