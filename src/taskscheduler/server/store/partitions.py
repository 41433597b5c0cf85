"""History partitioned by week: migration 16 (online), partitions made ahead, and whole
partitions dropped by retention.

``executions``, ``results``, ``claims`` and ``manual_runs`` are partitioned by range of
``scheduled_at``, all four alike:

- ``<table>_low``: everything before the oldest week kept (``MINVALUE`` to ``L``): the
  table as it was before migration 16, instants older than every week (a late result),
  and the executions retention keeps whatever their age (``--retention-min-executions``).
  It is pruned row by row, as the whole table was before.
- ``<table>_wYYYYMMDD``: one week from that Monday, 00:00 UTC.
- ``<table>_high``: everything from the newest week's end on (``MAXVALUE``), so an instant
  far in the future is stored, never refused.

No DEFAULT partition: with one, PostgreSQL cannot read partitions in order, and a task's
newest execution would take a probe of every partition (a Merge Append) instead of
stopping at the newest one that has a row (an ordered Append). A week is the width: with
the default 90 days of retention that is about 17 partitions, few enough that planning
a query over all of them (``latest_output`` and history pages cannot prune: they ask by
task) stays cheap, while history is kept at most a week longer than asked.

Foreign keys from ``results`` and ``manual_runs`` to ``executions`` are declared between
partitions of the same range (``results_w…`` -> ``executions_w…``): a foreign key to
the partitioned table would have to be checked when a partition is detached, and
adding it to a populated table would scan it under a lock.

A little over 400 lines: migration 16 and the two changes of partitions share the names,
bounds and lock order they rely on, and read best side by side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg2.errors
from twisted.logger import Logger

from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import StoreUnavailable

#: The partitioned tables, in the order they are locked (the order writers use).
TABLES = ("executions", "results", "claims", "manual_runs")
#: Partitions with a foreign key to the ``executions`` partition of the same range.
_REFERENCING = {
    "results": "",
    "manual_runs": " ON DELETE CASCADE",
}
WEEK = timedelta(days=7)
#: How far ahead of the current week partitions exist, so a week's results never wait
#: for its partition to be made (the high partition would take them meanwhile).
AHEAD = 4 * WEEK
#: Two partition makers (replicas) take turns; the key is a constant of our own.
PARTITION_LOCK_KEY = 0x7A5C_5EED_0016
#: How long a change of partitions waits for queries in flight before giving up (and
#: trying again at the next tick): whoever queues behind it waits no longer than this.
LOCK_TIMEOUT = "2s"

# -- migration 16 ---------------------------------------------------------------------------

#: Step 1 (one short transaction): choose the first boundary (Monday 00:00 UTC at least a
#: week after now and after every stored instant) and bound each table below it with a
#: CHECK added NOT VALID: ACCESS EXCLUSIVE on each table for a catalog update only, no
#: scan. New rows are checked from here on; none of today's go that far.
_MIGRATION_16_BOUND = """
CREATE TABLE IF NOT EXISTS history_partitioning (boundary timestamptz NOT NULL);
DO $$
DECLARE
    b timestamptz := date_trunc('week', greatest(
        now(),
        (SELECT max(scheduled_at) FROM executions),
        (SELECT max(scheduled_at) FROM claims)), 'UTC') + interval '2 weeks';
    t text;
BEGIN
    DELETE FROM history_partitioning;
    INSERT INTO history_partitioning VALUES (b);
    FOREACH t IN ARRAY ARRAY['executions', 'results', 'claims', 'manual_runs'] LOOP
        EXECUTE format('ALTER TABLE %I DROP CONSTRAINT IF EXISTS %I', t, t || '_low_bound');
        EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (scheduled_at < %L) NOT VALID',
                       t, t || '_low_bound', b);
    END LOOP;
END
$$;
"""

#: Steps 2-5 (a transaction each): validate the bound, a scan that holds SHARE UPDATE
#: EXCLUSIVE only: reads and writes go on meanwhile.
_MIGRATION_16_VALIDATE = tuple(f"ALTER TABLE {t} VALIDATE CONSTRAINT {t}_low_bound" for t in TABLES)

#: Step 6 (one short transaction, catalog updates only): rename each table to
#: ``<table>_low`` and its indexes, make the partitioned table in its place with the same
#: columns, keys and indexes, attach the old table below the boundary (its validated CHECK
#: proves the bound: no scan; its indexes and its foreign key to ``tasks`` are taken as
#: the partitioned table's: no build), and add the high partition above it.
_MIGRATION_16_SWAP = """
ALTER TABLE executions RENAME TO executions_low;
ALTER INDEX executions_pkey RENAME TO executions_low_pkey;
ALTER INDEX executions_completed RENAME TO executions_low_completed;
ALTER INDEX executions_by_scheduled_at RENAME TO executions_low_by_scheduled_at;
CREATE TABLE executions (LIKE executions_low INCLUDING DEFAULTS)
    PARTITION BY RANGE (scheduled_at);
ALTER TABLE executions ADD PRIMARY KEY (task_id, scheduled_at),
                       ADD FOREIGN KEY (task_id) REFERENCES tasks;
-- latest_output: the newest complete execution is one backward index probe.
CREATE INDEX executions_completed ON executions (task_id, scheduled_at)
    WHERE completed_at IS NOT NULL;
CREATE INDEX executions_by_scheduled_at ON executions (scheduled_at);

ALTER TABLE results RENAME TO results_low;
ALTER INDEX results_pkey RENAME TO results_low_pkey;
CREATE TABLE results (LIKE results_low INCLUDING DEFAULTS) PARTITION BY RANGE (scheduled_at);
ALTER TABLE results ADD PRIMARY KEY (task_id, scheduled_at, agent_id, attempt),
                    ADD CONSTRAINT results_attempt_check CHECK (attempt >= 1);

ALTER TABLE claims RENAME TO claims_low;
ALTER INDEX claims_pkey RENAME TO claims_low_pkey;
ALTER INDEX claims_by_scheduled_at RENAME TO claims_low_by_scheduled_at;
CREATE TABLE claims (LIKE claims_low INCLUDING DEFAULTS) PARTITION BY RANGE (scheduled_at);
ALTER TABLE claims ADD PRIMARY KEY (task_id, scheduled_at),
                   ADD FOREIGN KEY (task_id) REFERENCES tasks;
CREATE INDEX claims_by_scheduled_at ON claims (scheduled_at);

ALTER TABLE manual_runs RENAME TO manual_runs_low;
ALTER INDEX manual_runs_pkey RENAME TO manual_runs_low_pkey;
ALTER INDEX manual_runs_pending RENAME TO manual_runs_low_pending;
CREATE TABLE manual_runs (LIKE manual_runs_low INCLUDING DEFAULTS)
    PARTITION BY RANGE (scheduled_at);
ALTER TABLE manual_runs ADD PRIMARY KEY (task_id, scheduled_at, agent_url);
CREATE INDEX manual_runs_pending ON manual_runs (agent_url, scheduled_at)
    WHERE delivered_at IS NULL;

DO $$
DECLARE
    b timestamptz := (SELECT boundary FROM history_partitioning);
    t text;
BEGIN
    FOREACH t IN ARRAY ARRAY['executions', 'results', 'claims', 'manual_runs'] LOOP
        EXECUTE format('ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (MINVALUE) TO (%L)',
                       t, t || '_low', b);
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (MAXVALUE)',
                       t || '_high', t, b);
    END LOOP;
END
$$;
ALTER TABLE results_high ADD FOREIGN KEY (task_id, scheduled_at) REFERENCES executions_high;
ALTER TABLE manual_runs_high ADD FOREIGN KEY (task_id, scheduled_at)
    REFERENCES executions_high ON DELETE CASCADE;
DROP TABLE history_partitioning;
"""

#: Migration 16, as steps each run in a transaction of its own (so no lock is held from
#: one to the next); each may run again if the server stops before the last.
MIGRATION_16: tuple[str, ...] = (
    _MIGRATION_16_BOUND,
    *_MIGRATION_16_VALIDATE,
    _MIGRATION_16_SWAP,
)

# -- the layout -----------------------------------------------------------------------------

_LAYOUT_SQL = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'executions'::regclass
"""

_BOUND = re.compile(r"FROM \((.+)\) TO \((.+)\)")


@dataclass(frozen=True)
class Layout:
    """The partitions of ``executions`` (the other tables' are alike)."""

    low_until: datetime  # the low partition's upper bound
    weeks: tuple[datetime, ...]  # each week's first instant, oldest first
    high_from: datetime  # the high partition's lower bound


def _instant(literal: str) -> datetime | None:
    if literal in ("MINVALUE", "MAXVALUE"):
        return None
    return datetime.fromisoformat(literal.strip("'")).astimezone(UTC)


async def read_layout(cursor: Cursor) -> Layout:
    """The partitions as the catalog says (call with the session's TimeZone at UTC)."""
    await cursor.execute(_LAYOUT_SQL)
    low = high = None
    weeks = []
    for name, bound in cursor.fetchall():
        match = _BOUND.search(bound)
        if match is None:
            raise RuntimeError(f"unexpected partition {name}: {bound}")
        lower, upper = _instant(match.group(1)), _instant(match.group(2))
        if lower is None and upper is not None:
            low = upper
        elif upper is None and lower is not None:
            high = lower
        elif lower is not None:
            weeks.append(lower)
    if low is None or high is None:
        raise RuntimeError("executions has no low or no high partition")
    return Layout(low, tuple(sorted(weeks)), high)


def week_start(at: datetime) -> datetime:
    """Monday 00:00 UTC of ``at``'s week."""
    day = at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def _name(table: str, week: datetime) -> str:
    return f"{table}_w{week:%Y%m%d}"


def _literal(at: datetime) -> str:
    return "'" + at.astimezone(UTC).isoformat() + "'"


async def _locked(cursor: Cursor) -> None:
    """Take the partition makers' turn and bound every lock wait of this transaction."""
    await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK_KEY,))
    await cursor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    await cursor.execute("SET LOCAL TimeZone = 'UTC'")


def _lock_timed_out(error: StoreUnavailable) -> bool:
    """Whether the store gave up because a lock was not had within :data:`LOCK_TIMEOUT`
    (the pool counts every OperationalError as the database being unavailable)."""
    return isinstance(error.__cause__, psycopg2.errors.LockNotAvailable)


async def _lock_parents(cursor: Cursor) -> None:
    await cursor.execute(f"LOCK TABLE {', '.join(TABLES)} IN ACCESS EXCLUSIVE MODE")


class Partitions:
    """Makes the weeks ahead and drops the weeks past retention (whole partitions).

    A change that cannot have its locks within :data:`LOCK_TIMEOUT` (long queries in
    flight) changes nothing, is logged, and is tried again at the next call.
    """

    log = Logger()

    def __init__(self, db: Database) -> None:
        self._db = db

    async def ensure(self, now: datetime) -> int:
        """Make the partitions of every week until :data:`AHEAD` past ``now``'s week;
        returns how many weeks were added.

        One transaction holding ACCESS EXCLUSIVE on the four tables while it moves the
        high partition up (a few catalog updates; rows the high partition held in the
        new weeks, normally none, are moved into them): a few milliseconds, once a week.
        """
        target = week_start(now) + AHEAD

        async def operation(cursor: Cursor) -> int:
            await _locked(cursor)
            layout = await read_layout(cursor)
            if layout.high_from >= target:
                return 0
            await _lock_parents(cursor)
            weeks = []
            week = layout.high_from
            while week < target:
                weeks.append(week)
                week += WEEK
            for table in TABLES:
                await cursor.execute(
                    f"ALTER TABLE {table} DETACH PARTITION {table}_high;"
                    f" ALTER TABLE {table}_high RENAME TO {table}_high_old"
                )
            for first in [*weeks, week]:
                last = "MAXVALUE" if first == week else _literal(first + WEEK)
                suffix = None if first == week else first
                for table in TABLES:
                    name = f"{table}_high" if suffix is None else _name(table, suffix)
                    await cursor.execute(
                        f"CREATE TABLE {name} PARTITION OF {table}"
                        f" FOR VALUES FROM ({_literal(first)}) TO ({last})"
                    )
                target_executions = (
                    "executions_high" if suffix is None else _name("executions", suffix)
                )
                for table, action in _REFERENCING.items():
                    name = f"{table}_high" if suffix is None else _name(table, suffix)
                    await cursor.execute(
                        f"ALTER TABLE {name} ADD FOREIGN KEY (task_id, scheduled_at)"
                        f" REFERENCES {target_executions}{action}"
                    )
            # Whatever the old high partition held goes where it now belongs.
            for table in TABLES:
                await cursor.execute(f"INSERT INTO {table} SELECT * FROM {table}_high_old")
            for table in reversed(TABLES):
                await cursor.execute(f"DROP TABLE {table}_high_old")
            self.log.info(
                "history partitions made for {count} weeks, up to {until}",
                count=len(weeks),
                until=week.isoformat(),
            )
            return len(weeks)

        try:
            return await self._db.run(operation)
        except StoreUnavailable as e:
            if not _lock_timed_out(e):
                raise
            self.log.warn("the weeks ahead were not made: the tables are busy; next time")
            return 0

    async def drop(self, before: datetime, keep: int) -> datetime:
        """Drop the oldest week if it is wholly before ``before``; returns the instant
        before which history is still to be pruned row by row (the low partition's
        bound, or ``before`` if that is earlier).

        The executions among the newest ``keep`` of their task in those weeks (with
        their results, claims and run-now rows) are moved into the low partition first.
        Two transactions: the low partition gets a CHECK for its new bound, added NOT
        VALID and validated (a scan under SHARE UPDATE EXCLUSIVE: reads and writes go
        on); then, holding ACCESS EXCLUSIVE on the four tables, the weeks and the low
        partition are detached, the kept rows copied, the weeks dropped and the low
        partition attached again up to the new bound (its CHECK proves it: no scan).
        That lock is held for catalog updates and the copy of the kept rows.
        """

        async def bound(cursor: Cursor) -> Layout:
            await _locked(cursor)
            return await read_layout(cursor)

        layout = await self._db.run(bound)
        # One week at a time: the lock below is held while that week's kept rows are
        # copied, so each hold stays short; the caller calls again for the next week.
        doomed = [w for w in layout.weeks if w + WEEK <= before][:1]
        if not doomed or doomed[0] != layout.low_until:
            return min(before, layout.low_until)
        until = doomed[-1] + WEEK

        async def widen(cursor: Cursor) -> None:
            await _locked(cursor)
            for table in TABLES:
                await cursor.execute(
                    f"ALTER TABLE {table}_low DROP CONSTRAINT IF EXISTS {table}_low_next;"
                    f" ALTER TABLE {table}_low ADD CONSTRAINT {table}_low_next"
                    f" CHECK (scheduled_at < {_literal(until)}) NOT VALID"
                )

        await self._db.run(widen)
        for table in TABLES:

            async def validate(cursor: Cursor, table: str = table) -> None:
                await cursor.execute(
                    f"ALTER TABLE {table}_low VALIDATE CONSTRAINT {table}_low_next"
                )

            await self._db.run(validate)

        async def swap(cursor: Cursor) -> int | None:
            await _locked(cursor)
            if await read_layout(cursor) != layout:
                return None  # another replica did it meanwhile
            await _lock_parents(cursor)
            await cursor.execute(
                "CREATE TEMPORARY TABLE kept ON COMMIT DROP AS"
                " SELECT e.task_id, e.scheduled_at FROM tasks t CROSS JOIN LATERAL"
                " (SELECT x.task_id, x.scheduled_at FROM executions x"
                "  WHERE x.task_id = t.task_id ORDER BY x.scheduled_at DESC LIMIT %(keep)s) e"
                " WHERE e.scheduled_at >= %(low)s AND e.scheduled_at < %(until)s",
                {"keep": keep, "low": layout.low_until, "until": until},
            )
            for table in TABLES:
                await cursor.execute(f"ALTER TABLE {table} DETACH PARTITION {table}_low")
                for week in doomed:
                    await cursor.execute(
                        f"ALTER TABLE {table} DETACH PARTITION {_name(table, week)}"
                    )
                await cursor.execute(
                    f"ALTER TABLE {table}_low DROP CONSTRAINT IF EXISTS {table}_low_bound;"
                    f" ALTER TABLE {table}_low RENAME CONSTRAINT {table}_low_next"
                    f" TO {table}_low_bound"
                )
            for table in TABLES:
                for week in doomed:
                    await cursor.execute(
                        f"INSERT INTO {table}_low SELECT w.* FROM {_name(table, week)} w"
                        " JOIN kept k ON k.task_id = w.task_id"
                        " AND k.scheduled_at = w.scheduled_at"
                    )
            for table in reversed(TABLES):
                for week in doomed:
                    await cursor.execute(f"DROP TABLE {_name(table, week)}")
            for table in TABLES:
                await cursor.execute(
                    f"ALTER TABLE {table} ATTACH PARTITION {table}_low"
                    f" FOR VALUES FROM (MINVALUE) TO ({_literal(until)})"
                )
            await cursor.execute("SELECT count(*) FROM kept")
            row = cursor.fetchone()
            return int(row[0]) if row is not None else 0

        try:
            kept = await self._db.run(swap)
        except StoreUnavailable as e:
            if not _lock_timed_out(e):
                raise
            self.log.warn("the weeks past retention were not dropped: the tables are busy")
            return min(before, layout.low_until)
        if kept is not None:
            self.log.info(
                "history of the week of {week} dropped; {kept} of its executions kept",
                week=doomed[0].isoformat(),
                kept=kept,
            )
        return min(before, until)
