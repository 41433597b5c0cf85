"""The real :class:`~taskscheduler.server.store.Store`: PostgreSQL through txpostgres.

Connections are txpostgres ``Connection`` objects (asynchronous psycopg2) kept in a small
pool of our own rather than txpostgres' ``ConnectionPool``, which opens its connections
once and never replaces one: here a connection that breaks is thrown away, the idle ones
with it (a broken connection usually means the server restarted), and the next call
opens fresh ones. Nothing waits forever: connecting has a deadline, and an operation
that outlives its deadline has its connection closed under it. Every failure to reach
the database surfaces as :class:`~taskscheduler.server.store.StoreUnavailable`.

The schema is created and upgraded at :meth:`PostgresStore.start` from
:mod:`taskscheduler.server.migrations`, under an advisory lock.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import psycopg2
import psycopg2.errors
from psycopg2.extensions import parse_dsn
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from txpostgres.txpostgres import Connection, RollbackFailed

from taskscheduler.protocol import Output, ResultStatus, RunResult, TaskSpec
from taskscheduler.schedule import execution_index, parse_frequency
from taskscheduler.server.migrations import (
    CREATE_MIGRATIONS_TABLE,
    MIGRATION_LOCK_KEY,
    MIGRATIONS,
)
from taskscheduler.server.store import (
    AgentConflict,
    AgentRecord,
    AuditEvent,
    Execution,
    RecordOutcome,
    StoreUnavailable,
    Task,
    UnknownTask,
)

T = TypeVar("T")
Cursor = Any  # txpostgres.Cursor: execute() returns a Deferred, the rest is psycopg2's

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_USEC = timedelta(microseconds=1)

#: How often a transaction that lost a deadlock against another is retried.
_ROLLBACK_RETRIES = 5

# -- SQL ------------------------------------------------------------------------------------

_TASK_COLUMNS = (
    "t.task_id, t.command, t.frequency, t.anchor, t.time_limit_us, t.created_at, t.deleted_at"
)

#: The newest complete execution of a task: two backward index probes of one row each
#: (the newest execution marked complete, and the newest one past its deadline), so the
#: cost does not grow with the task's history. No row: unknown task.
LATEST_EXECUTION_SQL = """
SELECT t.time_limit_us, e.scheduled_at, e.expected
FROM tasks t
LEFT JOIN LATERAL (
    SELECT c.scheduled_at, c.expected FROM (
        (SELECT x.scheduled_at, x.expected FROM executions x
         WHERE x.task_id = t.task_id AND x.completed_at IS NOT NULL
         ORDER BY x.scheduled_at DESC LIMIT 1)
        UNION ALL
        (SELECT x.scheduled_at, x.expected FROM executions x
         WHERE x.task_id = t.task_id
           AND x.scheduled_at < %(now)s::timestamptz
                                - t.time_limit_us * interval '1 microsecond'
                                - %(grace)s::interval
         ORDER BY x.scheduled_at DESC LIMIT 1)
    ) c
    ORDER BY c.scheduled_at DESC LIMIT 1
) e ON true
WHERE t.task_id = %(task_id)s::uuid
"""

#: One execution's results, by primary key.
_RESULT_COLUMNS = """agent_id, status, exit_code, signal, started_at, finished_at,
       stdout, stdout_bytes, stdout_truncated, stderr, stderr_bytes, stderr_truncated,
       reason"""

EXECUTION_RESULTS_SQL = f"""
SELECT {_RESULT_COLUMNS}
FROM results
WHERE task_id = %(task_id)s::uuid AND scheduled_at = %(scheduled_at)s
ORDER BY agent_id
"""

#: Cached task schedules (anchor, interval) before the cache is emptied and refilled.
_SCHEDULE_CACHE_SIZE = 100_000

#: Store a batch of results in one implicit transaction: create the executions they
#: belong to (expecting every agent then assigned), lock those executions in key order,
#: insert the results that are new, and count them in their executions. Returns the keys
#: of the results inserted; the others were already stored, or are of instants after
#: their task's deletion (neither an execution nor a result is made for those).
_RECORD_SQL = """
INSERT INTO executions (task_id, scheduled_at, expected)
SELECT v.task_id, v.scheduled_at,
       (SELECT count(*) FROM task_agents a WHERE a.task_id = v.task_id)
FROM unnest(%(e_task)s::uuid[], %(e_at)s::timestamptz[]) AS v (task_id, scheduled_at)
WHERE NOT EXISTS (SELECT 1 FROM tasks t
                  WHERE t.task_id = v.task_id AND t.deleted_at < v.scheduled_at)
ON CONFLICT DO NOTHING;

SELECT 1 FROM executions e
JOIN unnest(%(e_task)s::uuid[], %(e_at)s::timestamptz[]) AS v (task_id, scheduled_at)
  ON e.task_id = v.task_id AND e.scheduled_at = v.scheduled_at
ORDER BY e.task_id, e.scheduled_at
FOR UPDATE OF e;

WITH inserted AS (
    INSERT INTO results (task_id, scheduled_at, agent_id, status, exit_code, signal,
                         started_at, finished_at, stdout, stdout_bytes, stdout_truncated,
                         stderr, stderr_bytes, stderr_truncated, reason, digest,
                         received_at)
    SELECT v.*, %(received_at)s
    FROM unnest(%(task)s::uuid[], %(at)s::timestamptz[], %(agent)s::uuid[],
                %(status)s::text[], %(exit_code)s::integer[], %(signal)s::integer[],
                %(started)s::timestamptz[], %(finished)s::timestamptz[],
                %(stdout)s::bytea[], %(stdout_bytes)s::bigint[],
                %(stdout_truncated)s::boolean[],
                %(stderr)s::bytea[], %(stderr_bytes)s::bigint[],
                %(stderr_truncated)s::boolean[], %(reason)s::text[], %(digest)s::bytea[])
         AS v (task_id, scheduled_at, agent_id, status, exit_code, signal,
               started_at, finished_at, stdout, stdout_bytes, stdout_truncated,
               stderr, stderr_bytes, stderr_truncated, reason, digest)
    WHERE EXISTS (SELECT 1 FROM executions e
                  WHERE e.task_id = v.task_id AND e.scheduled_at = v.scheduled_at)
      AND NOT EXISTS (SELECT 1 FROM tasks t
                      WHERE t.task_id = v.task_id AND t.deleted_at < v.scheduled_at)
    ON CONFLICT DO NOTHING
    RETURNING task_id, agent_id, scheduled_at
), counted AS (
    SELECT task_id, scheduled_at, count(*) AS n FROM inserted GROUP BY task_id, scheduled_at
), counters AS (
    UPDATE executions e
    SET reported = e.reported + c.n,
        completed_at = CASE
            WHEN e.completed_at IS NULL AND e.reported + c.n >= e.expected
            THEN %(received_at)s ELSE e.completed_at END
    FROM counted c
    WHERE e.task_id = c.task_id AND e.scheduled_at = c.scheduled_at
)
SELECT task_id, agent_id, scheduled_at FROM inserted
"""


#: Delete the oldest executions scheduled before a cutoff, with their results, in one
#: statement (one implicit transaction). The oldest ones come from the scheduled_at index,
#: at most ``limit`` of them. SKIP LOCKED passes over executions that record_results has
#: locked (it is adding a result to them), so a prune never waits for result ingestion
#: and the two cannot deadlock; whatever is skipped goes in a later call. Results are
#: deleted first in the same statement, so the foreign key holds when it is checked. The
#: locked executions are deleted by their row address (a TID scan: they cannot move while
#: we hold their locks), so no plan ever joins against the whole table.
PRUNE_SQL = """
WITH doomed AS (
    SELECT ctid, task_id, scheduled_at FROM executions
    WHERE scheduled_at < %(before)s
    ORDER BY scheduled_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone_results AS (
    DELETE FROM results r USING doomed d
    WHERE r.task_id = d.task_id AND r.scheduled_at = d.scheduled_at
)
DELETE FROM executions WHERE ctid = ANY(ARRAY(SELECT ctid FROM doomed))
"""


# -- conversions ----------------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _micros(value: datetime | None) -> int | None:
    return None if value is None else (value - _EPOCH) // _USEC


def result_digest(result: RunResult) -> bytes:
    """SHA-256 of a result's body (everything but its key), in an unambiguous encoding.

    Two results with the same key are the same report exactly when their digests match.
    A result without a reason digests as it did before reasons existed, so a result
    stored then and sent again now is still a duplicate.
    """
    fields: list[Any] = [
        result.status.value,
        result.exit_code,
        result.signal,
        _micros(result.started_at),
        _micros(result.finished_at),
        [result.stdout.size, result.stdout.truncated, len(result.stdout.data)],
        [result.stderr.size, result.stderr.truncated, len(result.stderr.data)],
    ]
    if result.reason is not None:
        fields.append(result.reason)
    head = json.dumps(fields).encode("ascii")
    digest = hashlib.sha256(head)
    digest.update(b"\n")
    digest.update(result.stdout.data)
    digest.update(result.stderr.data)
    return digest.digest()


def _task_from_row(row: Sequence[Any]) -> Task:
    task_id, command, frequency, anchor, time_limit_us, created_at, deleted_at = row
    spec = TaskSpec(
        task_id=uuid.UUID(str(task_id)),
        command=command,
        frequency=parse_frequency(frequency),
        anchor=anchor.astimezone(UTC),
        time_limit=timedelta(microseconds=time_limit_us),
    )
    return Task(spec, created_at.astimezone(UTC), _utc(deleted_at))


def _is_connection_failure(error: BaseException) -> bool:
    return isinstance(
        error,
        psycopg2.OperationalError
        | psycopg2.InterfaceError
        | ConnectionDone
        | ConnectionLost
        | RollbackFailed,
    ) and not isinstance(error, psycopg2.errors.TransactionRollbackError)


# -- connections ----------------------------------------------------------------------------


class _Pool:
    """Up to ``size`` txpostgres connections, opened on demand, replaced when broken."""

    log = Logger()

    def __init__(self, dsn: str, reactor: Any, size: int, connect_timeout: float) -> None:
        self._dsn = dsn
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._slots = DeferredSemaphore(size)
        self._idle: list[Connection] = []
        self._closed = False
        # Keepalives make a vanished server (no RST) fail a query within ~15 s on TCP.
        given = parse_dsn(dsn)
        defaults = {
            "application_name": "taskscheduler",
            "keepalives": "1",
            "keepalives_idle": "5",
            "keepalives_interval": "2",
            "keepalives_count": "3",
        }
        self._params = {k: v for k, v in defaults.items() if k not in given}

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection for one operation; closed instead of reused if it broke."""
        if self._closed:
            raise StoreUnavailable("the store is stopped")
        await self._slots.acquire()
        conn: Connection | None = None
        try:
            conn = self._take_idle()
            if conn is None:
                conn = await self._connect()
            try:
                yield conn
            except BaseException as e:
                if _is_connection_failure(e) or conn.closed:
                    # Probably a server restart: every idle connection is dead too.
                    self._discard(conn)
                    conn = None
                    self.close_idle()
                raise
        finally:
            if conn is not None:
                if self._closed or conn.closed:
                    self._discard(conn)
                else:
                    self._idle.append(conn)
            self._slots.release()

    def _take_idle(self) -> Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
            self._discard(conn)
        return None

    async def _connect(self) -> Connection:
        conn = Connection(self._reactor)
        timed_out = []

        def give_up() -> None:
            timed_out.append(True)
            self._discard(conn)

        # libpq's connect_timeout does not apply to asynchronous connections.
        timer = self._reactor.callLater(self._connect_timeout, give_up)
        try:
            await conn.connect(self._dsn, **self._params)
        except (psycopg2.OperationalError, ConnectionDone, ConnectionLost) as e:
            self._discard(conn)
            if timed_out:
                raise StoreUnavailable(
                    f"PostgreSQL did not answer within {self._connect_timeout:g} s"
                ) from None
            raise StoreUnavailable(f"cannot connect to PostgreSQL: {_first_line(e)}") from e
        finally:
            if timer.active():
                timer.cancel()
        return conn

    @staticmethod
    def _discard(conn: Connection) -> None:
        if conn.pollable() is not None:
            conn.close()

    def close_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn)

    def close(self) -> None:
        self._closed = True
        self.close_idle()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- the store ------------------------------------------------------------------------------


class PostgresStore:
    """:class:`~taskscheduler.server.store.Store` on PostgreSQL.

    ``dsn`` is a libpq connection string or URI. ``reactor`` must provide
    ``IReactorFDSet`` and ``IReactorTime``. ``connect_timeout`` bounds opening a
    connection and ``operation_timeout`` any single call; past either the call raises
    StoreUnavailable.
    """

    log = Logger()

    #: Connections kept open. Single-result reports are bound by commit latency, so
    #: a few more connections than cores let PostgreSQL group their commits.
    DEFAULT_POOL_SIZE = 8

    def __init__(
        self,
        dsn: str,
        reactor: Any = None,
        *,
        pool_size: int = DEFAULT_POOL_SIZE,
        connect_timeout: float = 5.0,
        operation_timeout: float = 30.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._dsn = dsn
        self._reactor = reactor
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._operation_timeout = operation_timeout
        self._pool: _Pool | None = None
        self._schedules: dict[uuid.UUID, tuple[datetime, timedelta]] = {}

    # -- plumbing -----------------------------------------------------------------------

    async def _run(
        self, operation: Callable[[Cursor], Coroutine[Any, Any, T]], *, transaction: bool = True
    ) -> T:
        """Run ``operation`` with a cursor, in a transaction unless told otherwise."""
        if self._pool is None:
            raise StoreUnavailable("the store is not started")
        for attempt in range(_ROLLBACK_RETRIES):
            try:
                return await self._run_once(self._pool, operation, transaction)
            except psycopg2.errors.TransactionRollbackError:
                # A deadlock or serialization failure: the transaction changed nothing.
                if attempt + 1 == _ROLLBACK_RETRIES:
                    raise StoreUnavailable("the database is too contended; retry") from None
        raise AssertionError("unreachable")

    async def _run_once(
        self, pool: _Pool, operation: Callable[[Cursor], Coroutine[Any, Any, T]], transaction: bool
    ) -> T:
        try:
            async with pool.connection() as conn:
                timed_out = []

                def abort() -> None:
                    timed_out.append(True)
                    conn.close()

                watchdog = self._reactor.callLater(self._operation_timeout, abort)
                try:
                    if transaction:
                        return await conn.runInteraction(
                            lambda cursor: Deferred.fromCoroutine(operation(cursor))
                        )
                    return await operation(conn.cursor())
                except BaseException as e:
                    if timed_out:
                        raise StoreUnavailable(
                            f"the database did not answer within {self._operation_timeout:g} s"
                        ) from e
                    raise
                finally:
                    if watchdog.active():
                        watchdog.cancel()
        except StoreUnavailable:
            raise
        except BaseException as e:
            if isinstance(e, RollbackFailed) and not _is_connection_failure(
                e.originalFailure.value
            ):
                e.originalFailure.raiseException()
            if _is_connection_failure(e):
                raise StoreUnavailable(f"database unavailable: {_first_line(e)}") from e
            raise

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self._pool = _Pool(self._dsn, self._reactor, self._pool_size, self._connect_timeout)
        await self._run(self._migrate, transaction=False)

    async def _migrate(self, cursor: Cursor) -> None:
        # Session-level lock: held across the per-migration transactions below, released
        # by the unlock or, if we die, by the connection closing.
        await cursor.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            await cursor.execute(CREATE_MIGRATIONS_TABLE)
            await cursor.execute("SELECT version FROM schema_migrations")
            applied = {row[0] for row in cursor.fetchall()}
            if applied and max(applied) > len(MIGRATIONS):
                raise RuntimeError(
                    f"the database schema is at version {max(applied)}, newer than this "
                    f"server's {len(MIGRATIONS)}: upgrade the server"
                )
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version in applied:
                    continue
                await cursor.execute("BEGIN")
                try:
                    await cursor.execute(sql)
                    await cursor.execute(
                        "INSERT INTO schema_migrations (version) VALUES (%s)", (version,)
                    )
                    await cursor.execute("COMMIT")
                except BaseException:
                    if not cursor.connection.closed:
                        await cursor.execute("ROLLBACK")
                    raise
                self.log.info("applied database migration {version}", version=version)
        finally:
            if not cursor.connection.closed:
                await cursor.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))

    async def stop(self) -> None:
        if self._pool is not None:
            self._pool.close()

    # -- tasks and the fleet ------------------------------------------------------------

    async def set_fleet(self, agent_urls: Sequence[str]) -> None:
        urls = list(dict.fromkeys(agent_urls))

        async def operation(cursor: Cursor) -> None:
            # SHARE ROW EXCLUSIVE waits for create_task (SHARE) transactions in flight, so
            # a task created concurrently is either seen here or sees the new fleet.
            await cursor.execute(
                """
                LOCK TABLE fleet IN SHARE ROW EXCLUSIVE MODE;
                DELETE FROM fleet WHERE NOT (agent_url = ANY(%(urls)s::text[]));
                INSERT INTO fleet (agent_url) SELECT unnest(%(urls)s::text[])
                    ON CONFLICT DO NOTHING;
                DELETE FROM task_agents WHERE NOT (agent_url = ANY(%(urls)s::text[]));
                INSERT INTO task_agents (task_id, agent_url)
                    SELECT t.task_id, f.agent_url FROM tasks t CROSS JOIN fleet f
                    WHERE t.deleted_at IS NULL
                    ON CONFLICT DO NOTHING;
                """,
                {"urls": urls},
            )

        await self._run(operation)

    async def create_task(
        self, spec: TaskSpec, created_at: datetime, audit: AuditEvent | None = None
    ) -> Task:
        task = Task(
            TaskSpec(
                task_id=spec.task_id,
                command=spec.command,
                frequency=spec.frequency,
                anchor=spec.anchor.astimezone(UTC),
                time_limit=spec.time_limit,
            ),
            created_at.astimezone(UTC),
        )

        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                """
                LOCK TABLE fleet IN SHARE MODE;
                INSERT INTO tasks (task_id, command, frequency, interval_seconds, anchor,
                                   time_limit_us, created_at)
                    VALUES (%(task_id)s::uuid, %(command)s, %(frequency)s,
                            %(interval)s, %(anchor)s, %(time_limit_us)s, %(created_at)s);
                INSERT INTO task_agents (task_id, agent_url)
                    SELECT %(task_id)s::uuid, agent_url FROM fleet;
                """,
                {
                    "task_id": str(spec.task_id),
                    "command": spec.command,
                    "frequency": str(spec.frequency),
                    "interval": spec.frequency.seconds,
                    "anchor": task.spec.anchor,
                    "time_limit_us": spec.time_limit // _USEC,
                    "created_at": task.created_at,
                },
            )
            if audit is not None:
                await _insert_audit(cursor, audit)

        try:
            await self._run(operation)
        except psycopg2.errors.UniqueViolation:
            raise ValueError(f"task {spec.task_id} already exists") from None
        self._schedules[spec.task_id] = (task.spec.anchor, spec.frequency.interval)
        return task

    async def get_task(self, task_id: uuid.UUID) -> Task | None:
        async def operation(cursor: Cursor) -> Task | None:
            await cursor.execute(
                f"SELECT {_TASK_COLUMNS} FROM tasks t WHERE t.task_id = %s::uuid",
                (str(task_id),),
            )
            row = cursor.fetchone()
            return None if row is None else _task_from_row(row)

        return await self._run(operation, transaction=False)

    async def delete_task(
        self, task_id: uuid.UUID, deleted_at: datetime, audit: AuditEvent
    ) -> Task | None:
        async def operation(cursor: Cursor) -> Task | None:
            await cursor.execute(
                f"""
                UPDATE tasks t SET deleted_at = %(deleted_at)s
                WHERE t.task_id = %(task_id)s::uuid AND t.deleted_at IS NULL
                RETURNING {_TASK_COLUMNS}
                """,
                {"task_id": str(task_id), "deleted_at": deleted_at},
            )
            row = cursor.fetchone()
            if row is None:
                return None
            await cursor.execute(
                "UPDATE task_agents SET removal_pending = true WHERE task_id = %s::uuid",
                (str(task_id),),
            )
            await _insert_audit(cursor, audit)
            return _task_from_row(row)

        return await self._run(operation)

    # -- results ------------------------------------------------------------------------

    async def record_results(
        self, results: Sequence[RunResult], received_at: datetime
    ) -> list[RecordOutcome]:
        if not results:
            return []
        received = received_at.astimezone(UTC)

        async def operation(cursor: Cursor) -> list[RecordOutcome]:
            return await self._record(cursor, results, received)

        # Not in an explicit transaction: the writes go as one multi-statement query,
        # which PostgreSQL runs as one implicit transaction (one round trip, not four).
        return await self._run(operation, transaction=False)

    async def _schedules_of(
        self, cursor: Cursor, task_ids: set[uuid.UUID]
    ) -> dict[uuid.UUID, tuple[datetime, timedelta]]:
        """Anchor and interval of each known task; they never change, so they are cached."""
        missing = [str(t) for t in task_ids if t not in self._schedules]
        if missing:
            await cursor.execute(
                "SELECT task_id, anchor, interval_seconds FROM tasks"
                " WHERE task_id = ANY(%s::uuid[])",
                (missing,),
            )
            if len(self._schedules) > _SCHEDULE_CACHE_SIZE:
                self._schedules.clear()
            for task_id, anchor, interval in cursor.fetchall():
                self._schedules[uuid.UUID(str(task_id))] = (anchor, timedelta(seconds=interval))
        return {t: self._schedules[t] for t in task_ids if t in self._schedules}

    async def _record(
        self, cursor: Cursor, results: Sequence[RunResult], received_at: datetime
    ) -> list[RecordOutcome]:
        outcomes: list[RecordOutcome | None] = [None] * len(results)
        schedules = await self._schedules_of(cursor, {r.task_id for r in results})
        # The first candidate for each key is the one we try to insert; any later one in
        # the same batch is judged against whatever ends up stored.
        first: dict[tuple[str, str, datetime], int] = {}
        keys: list[tuple[str, str, datetime] | None] = [None] * len(results)
        digests = [b""] * len(results)
        for i, r in enumerate(results):
            schedule = schedules.get(r.task_id)
            if schedule is None:
                outcomes[i] = RecordOutcome.UNKNOWN_TASK
            elif execution_index(schedule[0], schedule[1], r.scheduled_at) is None:
                outcomes[i] = RecordOutcome.MISALIGNED
            else:
                key = (str(r.task_id), str(r.agent_id), r.scheduled_at)
                keys[i] = key
                first.setdefault(key, i)
                digests[i] = result_digest(r)
        if not first:
            return [outcome for outcome in outcomes if outcome is not None]

        # Sorted: concurrent calls take row locks in the same order, so never deadlock.
        candidates = sorted(first, key=lambda k: (k[0], k[2], k[1]))
        executions = sorted({(t, at) for t, _, at in candidates})
        chosen = [results[first[key]] for key in candidates]
        await cursor.execute(
            _RECORD_SQL,
            {
                "e_task": [t for t, _ in executions],
                "e_at": [at for _, at in executions],
                "task": [k[0] for k in candidates],
                "at": [k[2] for k in candidates],
                "agent": [k[1] for k in candidates],
                "status": [r.status.value for r in chosen],
                "exit_code": [r.exit_code for r in chosen],
                "signal": [r.signal for r in chosen],
                "started": [r.started_at for r in chosen],
                "finished": [r.finished_at for r in chosen],
                "stdout": [psycopg2.Binary(r.stdout.data) for r in chosen],
                "stdout_bytes": [r.stdout.size for r in chosen],
                "stdout_truncated": [r.stdout.truncated for r in chosen],
                "stderr": [psycopg2.Binary(r.stderr.data) for r in chosen],
                "stderr_bytes": [r.stderr.size for r in chosen],
                "stderr_truncated": [r.stderr.truncated for r in chosen],
                "reason": [r.reason for r in chosen],
                "digest": [psycopg2.Binary(digests[first[key]]) for key in candidates],
                "received_at": received_at,
            },
        )
        inserted = {(str(t), str(a), at) for t, a, at in cursor.fetchall()}
        stored_digests = {key: digests[first[key]] for key in inserted}

        already = [key for key in candidates if key not in inserted]
        if already:
            await cursor.execute(
                """
                SELECT r.task_id, r.agent_id, r.scheduled_at, r.digest
                FROM unnest(%s::uuid[], %s::timestamptz[], %s::uuid[]) AS v (t, s, a)
                JOIN results r ON r.task_id = v.t AND r.scheduled_at = v.s AND r.agent_id = v.a
                """,
                ([k[0] for k in already], [k[2] for k in already], [k[1] for k in already]),
            )
            for task_id, agent_id, at, digest in cursor.fetchall():
                stored_digests[(str(task_id), str(agent_id), at)] = bytes(digest)

        for i, candidate in enumerate(keys):
            if candidate is None:
                continue
            if first[candidate] == i and candidate in inserted:
                outcomes[i] = RecordOutcome.STORED
            elif candidate not in stored_digests:
                outcomes[i] = RecordOutcome.DELETED  # neither inserted nor stored before
            elif stored_digests[candidate] == digests[i]:
                outcomes[i] = RecordOutcome.DUPLICATE
            else:
                outcomes[i] = RecordOutcome.CONFLICT
        return [outcome for outcome in outcomes if outcome is not None]

    async def latest_complete_execution(
        self, task_id: uuid.UUID, now: datetime, report_grace: timedelta
    ) -> Execution | None:
        async def operation(cursor: Cursor) -> Execution | None:
            await cursor.execute(
                LATEST_EXECUTION_SQL,
                {"task_id": str(task_id), "now": now, "grace": report_grace},
            )
            row = cursor.fetchone()
            if row is None:
                raise UnknownTask(str(task_id))
            _, scheduled_at, expected = row
            if scheduled_at is None:
                return None
            await cursor.execute(
                EXECUTION_RESULTS_SQL, {"task_id": str(task_id), "scheduled_at": scheduled_at}
            )
            scheduled_at = scheduled_at.astimezone(UTC)
            return Execution(
                task_id=task_id,
                scheduled_at=scheduled_at,
                expected=expected,
                results=tuple(
                    _result_from_row(task_id, scheduled_at, row) for row in cursor.fetchall()
                ),
            )

        return await self._run(operation, transaction=False)

    async def list_executions(
        self, task_id: uuid.UUID, limit: int, before: datetime | None = None
    ) -> list[Execution]:
        async def operation(cursor: Cursor) -> list[Execution]:
            await cursor.execute("SELECT 1 FROM tasks WHERE task_id = %s::uuid", (str(task_id),))
            if cursor.fetchone() is None:
                raise UnknownTask(str(task_id))
            # Both queries walk the primary keys backwards from `before`: the cost is
            # the page, whatever the length of the history.
            await cursor.execute(
                """
                SELECT scheduled_at, expected FROM executions
                WHERE task_id = %(task_id)s::uuid
                  AND (%(before)s::timestamptz IS NULL OR scheduled_at < %(before)s)
                ORDER BY scheduled_at DESC
                LIMIT %(limit)s
                """,
                {"task_id": str(task_id), "before": before, "limit": limit},
            )
            page = cursor.fetchall()
            if not page:
                return []
            await cursor.execute(
                f"""
                SELECT scheduled_at, {_RESULT_COLUMNS} FROM results
                WHERE task_id = %(task_id)s::uuid
                  AND scheduled_at <= %(newest)s AND scheduled_at >= %(oldest)s
                ORDER BY scheduled_at, agent_id
                """,
                {"task_id": str(task_id), "newest": page[0][0], "oldest": page[-1][0]},
            )
            by_instant: dict[datetime, list[Sequence[Any]]] = {}
            for row in cursor.fetchall():
                by_instant.setdefault(row[0], []).append(row[1:])
            executions = []
            for scheduled_at, expected in page:
                at = scheduled_at.astimezone(UTC)
                executions.append(
                    Execution(
                        task_id=task_id,
                        scheduled_at=at,
                        expected=expected,
                        results=tuple(
                            _result_from_row(task_id, at, row)
                            for row in by_instant.get(scheduled_at, [])
                        ),
                    )
                )
            return executions

        return await self._run(operation, transaction=False)

    async def prune_history(self, before: datetime, limit: int) -> int:
        async def operation(cursor: Cursor) -> int:
            await cursor.execute(PRUNE_SQL, {"before": before, "limit": limit})
            return int(cursor.rowcount)

        return await self._run(operation, transaction=False)

    # -- deliveries ---------------------------------------------------------------------

    async def undelivered_tasks(self, agent_url: str, limit: int) -> list[Task]:
        async def operation(cursor: Cursor) -> list[Task]:
            await cursor.execute(
                f"""
                SELECT {_TASK_COLUMNS}
                FROM task_agents a JOIN tasks t ON t.task_id = a.task_id
                WHERE a.agent_url = %s AND a.delivered_at IS NULL AND t.deleted_at IS NULL
                ORDER BY t.created_at, t.task_id
                LIMIT %s
                """,
                (agent_url, limit),
            )
            return [_task_from_row(row) for row in cursor.fetchall()]

        return await self._run(operation, transaction=False)

    async def assigned_task_ids(self, agent_url: str) -> set[uuid.UUID]:
        async def operation(cursor: Cursor) -> set[uuid.UUID]:
            await cursor.execute(
                """
                SELECT a.task_id FROM task_agents a JOIN tasks t ON t.task_id = a.task_id
                WHERE a.agent_url = %s AND t.deleted_at IS NULL
                """,
                (agent_url,),
            )
            return {uuid.UUID(str(row[0])) for row in cursor.fetchall()}

        return await self._run(operation, transaction=False)

    async def mark_delivered(
        self, agent_url: str, task_ids: Sequence[uuid.UUID], agent_id: uuid.UUID
    ) -> None:
        if not task_ids:
            return

        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                """
                UPDATE task_agents SET delivered_at = now(), agent_id = %s::uuid
                WHERE agent_url = %s AND task_id = ANY(%s::uuid[])
                """,
                (str(agent_id), agent_url, sorted(str(t) for t in task_ids)),
            )

        await self._run(operation, transaction=False)

    async def mark_undelivered(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        if not task_ids:
            return

        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                """
                UPDATE task_agents SET delivered_at = NULL
                WHERE agent_url = %s AND task_id = ANY(%s::uuid[])
                """,
                (agent_url, sorted(str(t) for t in task_ids)),
            )

        await self._run(operation, transaction=False)

    async def assigned_among(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        if not task_ids:
            return set()

        async def operation(cursor: Cursor) -> set[uuid.UUID]:
            await cursor.execute(
                "SELECT task_id FROM task_agents"
                " WHERE agent_url = %s AND task_id = ANY(%s::uuid[])",
                (agent_url, sorted({str(t) for t in task_ids})),
            )
            return {uuid.UUID(str(row[0])) for row in cursor.fetchall()}

        return await self._run(operation, transaction=False)

    async def pending_removals(self, agent_url: str, limit: int) -> list[uuid.UUID]:
        async def operation(cursor: Cursor) -> list[uuid.UUID]:
            await cursor.execute(
                """
                SELECT a.task_id
                FROM task_agents a JOIN tasks t ON t.task_id = a.task_id
                WHERE a.agent_url = %s AND a.removal_pending
                ORDER BY t.deleted_at, a.task_id
                LIMIT %s
                """,
                (agent_url, limit),
            )
            return [uuid.UUID(str(row[0])) for row in cursor.fetchall()]

        return await self._run(operation, transaction=False)

    async def mark_removed(self, agent_url: str, task_ids: Sequence[uuid.UUID]) -> None:
        if not task_ids:
            return

        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                """
                UPDATE task_agents SET removal_pending = false
                WHERE agent_url = %s AND task_id = ANY(%s::uuid[])
                """,
                (agent_url, sorted(str(t) for t in task_ids)),
            )

        await self._run(operation, transaction=False)

    async def request_removal(
        self, agent_url: str, task_ids: Sequence[uuid.UUID]
    ) -> set[uuid.UUID]:
        if not task_ids:
            return set()

        async def operation(cursor: Cursor) -> set[uuid.UUID]:
            await cursor.execute(
                """
                UPDATE task_agents a SET removal_pending = true
                FROM tasks t
                WHERE t.task_id = a.task_id AND t.deleted_at IS NOT NULL
                  AND a.agent_url = %s AND a.task_id = ANY(%s::uuid[])
                RETURNING a.task_id
                """,
                (agent_url, sorted({str(t) for t in task_ids})),
            )
            return {uuid.UUID(str(row[0])) for row in cursor.fetchall()}

        return await self._run(operation, transaction=False)

    # -- agents and the audit log -------------------------------------------------------

    async def enrol_agent(
        self,
        agent_id: uuid.UUID,
        url: str,
        credential_hash: str,
        enrolled_at: datetime,
        audit: AuditEvent,
    ) -> AgentRecord:
        async def operation(cursor: Cursor) -> None:
            await cursor.execute("SELECT 1 FROM agents WHERE agent_id = %s::uuid", (str(agent_id),))
            if cursor.fetchone() is not None:
                raise AgentConflict("agent_exists", f"agent {agent_id} is already enrolled")
            await cursor.execute(
                "SELECT revoked_at IS NULL FROM agents WHERE url = %s AND url_released_at IS NULL",
                (url,),
            )
            holders = [live for (live,) in cursor.fetchall()]
            if any(holders):
                raise AgentConflict("url_taken", f"a live agent is already enrolled at {url}")
            if holders:
                raise AgentConflict("url_revoked", f"the revoked agent at {url} still holds it")
            await cursor.execute(
                """
                INSERT INTO agents (agent_id, url, credential_hash, enrolled_at)
                VALUES (%s::uuid, %s, %s, %s)
                """,
                (str(agent_id), url, credential_hash, enrolled_at),
            )
            await _insert_audit(cursor, audit)

        try:
            await self._run(operation)
        except psycopg2.errors.UniqueViolation:
            # Two enrolments raced: the loser sees the winner's row.
            raise AgentConflict("agent_exists", "this agent or URL was just enrolled") from None
        return AgentRecord(agent_id, url, enrolled_at.astimezone(UTC))

    async def agent_by_credential(self, credential_hash: str) -> AgentRecord | None:
        async def operation(cursor: Cursor) -> AgentRecord | None:
            await cursor.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE credential_hash = %s",
                (credential_hash,),
            )
            row = cursor.fetchone()
            return None if row is None else _agent_from_row(row)

        return await self._run(operation, transaction=False)

    async def agent_for_url(self, url: str) -> AgentRecord | None:
        async def operation(cursor: Cursor) -> AgentRecord | None:
            await cursor.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE url = %s AND revoked_at IS NULL",
                (url,),
            )
            row = cursor.fetchone()
            return None if row is None else _agent_from_row(row)

        return await self._run(operation, transaction=False)

    async def revoke_agent(
        self, agent_id: uuid.UUID, revoked_at: datetime, audit: AuditEvent
    ) -> AgentRecord | None:
        async def operation(cursor: Cursor) -> AgentRecord | None:
            await cursor.execute(
                f"""
                UPDATE agents SET revoked_at = %s
                WHERE agent_id = %s::uuid AND revoked_at IS NULL
                RETURNING {_AGENT_COLUMNS}
                """,
                (revoked_at, str(agent_id)),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            await _insert_audit(cursor, audit)
            return _agent_from_row(row)

        return await self._run(operation)

    async def release_agent_url(
        self, agent_id: uuid.UUID, released_at: datetime, audit: AuditEvent
    ) -> AgentRecord | None:
        async def operation(cursor: Cursor) -> AgentRecord | None:
            await cursor.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE agent_id = %s::uuid FOR UPDATE",
                (str(agent_id),),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            record = _agent_from_row(row)
            if not record.revoked:
                raise AgentConflict("agent_live", f"agent {agent_id} is not revoked")
            if record.url_released_at is not None:
                return record
            await cursor.execute(
                f"""
                UPDATE agents SET url_released_at = %s WHERE agent_id = %s::uuid
                RETURNING {_AGENT_COLUMNS}
                """,
                (released_at, str(agent_id)),
            )
            released = _agent_from_row(cursor.fetchone())
            await _insert_audit(cursor, audit)
            return released

        return await self._run(operation)

    async def list_agents(self) -> list[AgentRecord]:
        async def operation(cursor: Cursor) -> list[AgentRecord]:
            await cursor.execute(
                f"SELECT {_AGENT_COLUMNS} FROM agents ORDER BY enrolled_at, agent_id"
            )
            return [_agent_from_row(row) for row in cursor.fetchall()]

        return await self._run(operation, transaction=False)

    async def audit_events(self, limit: int, before: int | None = None) -> list[AuditEvent]:
        async def operation(cursor: Cursor) -> list[AuditEvent]:
            await cursor.execute(
                """
                SELECT event_id, at, actor, action, target, peer, details FROM audit_events
                WHERE %(before)s::bigint IS NULL OR event_id < %(before)s
                ORDER BY event_id DESC LIMIT %(limit)s
                """,
                {"before": before, "limit": limit},
            )
            return [
                AuditEvent(
                    at=at.astimezone(UTC),
                    actor=actor,
                    action=action,
                    target=target,
                    peer=peer,
                    details=details,
                    event_id=event_id,
                )
                for event_id, at, actor, action, target, peer, details in cursor.fetchall()
            ]

        return await self._run(operation, transaction=False)


_AGENT_COLUMNS = "agent_id, url, enrolled_at, revoked_at, url_released_at"


def _agent_from_row(row: Sequence[Any]) -> AgentRecord:
    agent_id, url, enrolled_at, revoked_at, url_released_at = row
    return AgentRecord(
        uuid.UUID(str(agent_id)),
        url,
        enrolled_at.astimezone(UTC),
        _utc(revoked_at),
        _utc(url_released_at),
    )


async def _insert_audit(cursor: Cursor, event: AuditEvent) -> None:
    await cursor.execute(
        """
        INSERT INTO audit_events (at, actor, action, target, peer, details)
        VALUES (%s, %s, %s, %s, %s, %s::jsonb)
        """,
        (event.at, event.actor, event.action, event.target, event.peer, json.dumps(event.details)),
    )


def _result_from_row(task_id: uuid.UUID, scheduled_at: datetime, row: Sequence[Any]) -> RunResult:
    (
        agent_id,
        status,
        exit_code,
        signal,
        started_at,
        finished_at,
        stdout,
        stdout_bytes,
        stdout_truncated,
        stderr,
        stderr_bytes,
        stderr_truncated,
        reason,
    ) = row
    return RunResult(
        task_id=task_id,
        agent_id=uuid.UUID(str(agent_id)),
        scheduled_at=scheduled_at,
        status=ResultStatus(status),
        exit_code=exit_code,
        signal=signal,
        started_at=_utc(started_at),
        finished_at=_utc(finished_at),
        stdout=Output(bytes(stdout), stdout_bytes, stdout_truncated),
        stderr=Output(bytes(stderr), stderr_bytes, stderr_truncated),
        reason=reason,
    )
