"""Reading executions and their results back from PostgreSQL: the latest complete one,
history pages, one execution, each task's newest, and pruning the oldest.

Completeness and the deletion cut-off (:mod:`~taskscheduler.server.store.rules`) are
applied by the SQL below, which ``tests/unit/test_store_rules.py`` holds to the rules.
Recording is :mod:`~taskscheduler.server.store.recording`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from taskscheduler.protocol import Output, ResultStatus, RunResult, Trigger
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import Execution, ExecutionSummary, UnknownTask
from taskscheduler.server.store.rules import last_attempts, utc, utc_or_none

# -- SQL ------------------------------------------------------------------------------------

#: The newest complete execution of a task (:func:`rules.is_complete`): two backward index
#: probes of one row each (the newest execution marked complete, and the newest one past
#: its reporting deadline, :func:`rules.completion_cutoff`), so the cost does not grow
#: with the task's history. No row: unknown task.
LATEST_EXECUTION_SQL = """
SELECT t.time_limit_us, e.scheduled_at, e.expected, e.trigger, e.revision, e.expected_urls
FROM tasks t
LEFT JOIN LATERAL (
    SELECT c.scheduled_at, c.expected, c.trigger, c.revision, c.expected_urls FROM (
        (SELECT x.scheduled_at, x.expected, x.trigger, x.revision, x.expected_urls
         FROM executions x
         WHERE x.task_id = t.task_id AND x.completed_at IS NOT NULL
         ORDER BY x.scheduled_at DESC LIMIT 1)
        UNION ALL
        (SELECT x.scheduled_at, x.expected, x.trigger, x.revision, x.expected_urls
         FROM executions x
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


def missing_agents_sql(execution: str) -> str:
    """The agents ``execution`` (an alias with ``task_id``, ``scheduled_at`` and
    ``expected_urls``) expects and has no result of, as :func:`fleet.missing_agents`
    names them: ``{url, agent_id or NULL}`` pairs in the order of ``expected_urls``.

    A URL counts as reported if an agent enrolled there (now revoked or not) has a result
    of the execution; the agent answering for a missing URL is the live one, else the
    newest revoked one (ties: the larger id, the last in ``list_agents``' order). Costs
    a few index probes per expected URL (the agents there, and each one's result by the
    results' primary key), whatever the fleet's size.
    """
    return f"""
ARRAY(SELECT ARRAY[u.url,
                   (SELECT g.agent_id::text FROM agents g WHERE g.url = u.url
                    ORDER BY g.revoked_at IS NULL DESC, g.enrolled_at DESC, g.agent_id DESC
                    LIMIT 1)]
      FROM unnest({execution}.expected_urls) WITH ORDINALITY AS u (url, n)
      -- the agents at the URL (by index), each looked up by the results' primary key
      WHERE NOT EXISTS (SELECT 1 FROM agents g
                        WHERE g.url = u.url
                          AND EXISTS (SELECT 1 FROM results r
                                      WHERE r.task_id = {execution}.task_id
                                        AND r.scheduled_at = {execution}.scheduled_at
                                        AND r.agent_id = g.agent_id))
      ORDER BY u.n)
"""


#: One execution's results, by primary key.
_RESULT_COLUMNS = """agent_id, status, exit_code, signal, started_at, finished_at,
       stdout, stdout_bytes, stdout_truncated, stderr, stderr_bytes, stderr_truncated,
       reason, revision, trigger, attempt, final"""

EXECUTION_RESULTS_SQL = f"""
SELECT {_RESULT_COLUMNS}
FROM results
WHERE task_id = %(task_id)s::uuid AND scheduled_at = %(scheduled_at)s
ORDER BY agent_id, attempt
"""

#: The same columns of the results joined to an execution (``r``).
_JOINED_RESULT_COLUMNS = ", ".join(f"r.{name.strip()}" for name in _RESULT_COLUMNS.split(","))

#: latest_output in one round trip: the newest complete execution (the probes of
#: LATEST_EXECUTION_SQL) and its results by the primary key's prefix, each agent's
#: attempts in order, with the agents it misses (:func:`missing_agents_sql`, once per
#: execution). No row: unknown task; one row with a NULL instant: none yet.
LATEST_OUTPUT_SQL = f"""
SELECT l.scheduled_at, l.expected, l.trigger, l.revision, l.expected_urls, l.missing,
       {_JOINED_RESULT_COLUMNS}
FROM (SELECT e.*, {missing_agents_sql("e")} AS missing
      FROM (SELECT %(task_id)s::uuid AS task_id, n.* FROM ({LATEST_EXECUTION_SQL}) n) e
      OFFSET 0) l  -- not pulled up: once per execution, not per result joined below
LEFT JOIN results r ON r.task_id = %(task_id)s::uuid AND r.scheduled_at = l.scheduled_at
ORDER BY r.agent_id, r.attempt
"""

#: A page of a task's history in one round trip: the task (no row: unknown), a backward
#: walk of the executions' primary key from ``before`` for ``limit`` rows, and each one's
#: results by the results' primary key, and the agents each one misses (computed on the
#: page's rows only). The cost is the page, whatever the history's and the fleet's
#: length. One row with a NULL instant: an empty page.
HISTORY_PAGE_SQL = f"""
SELECT p.scheduled_at, p.expected, p.trigger, p.revision, p.expected_urls, p.missing,
       {_JOINED_RESULT_COLUMNS}
FROM tasks t
LEFT JOIN LATERAL (
    SELECT x.*, {missing_agents_sql("x")} AS missing FROM (
        SELECT x.task_id, x.scheduled_at, x.expected, x.trigger, x.revision, x.expected_urls
        FROM executions x
        WHERE x.task_id = t.task_id
          AND (%(before)s::timestamptz IS NULL OR x.scheduled_at < %(before)s)
        ORDER BY x.scheduled_at DESC
        LIMIT %(limit)s
    ) x
    OFFSET 0  -- not pulled up: once per execution, not per result joined below
) p ON true
LEFT JOIN results r ON r.task_id = t.task_id AND r.scheduled_at = p.scheduled_at
WHERE t.task_id = %(task_id)s::uuid
ORDER BY p.scheduled_at DESC, r.agent_id, r.attempt
"""


#: Delete the oldest executions scheduled before a cutoff, with their results, in one
#: statement (one implicit transaction). The oldest ones come from the scheduled_at index,
#: at most ``limit`` of them. SKIP LOCKED passes over executions that record_results has
#: locked (it is adding a result to them), so a prune never waits for result ingestion
#: and the two cannot deadlock; whatever is skipped goes in a later call. Results are
#: deleted first in the same statement, so the foreign key holds when it is checked. The
#: locked executions are deleted by their row address (a TID scan: they cannot move while
#: we hold their locks), so no plan ever joins against the whole table; a row address
#: names a row within one partition, so the partition (tableoid) is matched too.
#: Start lateness of the newest scheduled executions fleet-wide (the agents page): a
#: backward walk of ``executions_by_scheduled_at`` for N rows, then each one's results by
#: the primary key's prefix; first attempts only (a retry starts late on purpose).
START_LATENESS_SQL = """
SELECT r.agent_id, extract(epoch FROM r.started_at - r.scheduled_at)::float8
FROM (SELECT task_id, scheduled_at FROM executions
      WHERE trigger = 'schedule'
      ORDER BY scheduled_at DESC LIMIT %(executions)s) e
JOIN results r ON r.task_id = e.task_id AND r.scheduled_at = e.scheduled_at
WHERE r.attempt = 1 AND r.started_at IS NOT NULL
"""

PRUNE_SQL = """
WITH doomed AS (
    SELECT tableoid, ctid, task_id, scheduled_at FROM executions e
    WHERE scheduled_at < %(before)s
      -- the newest %(keep)s of its task are kept (rules.newest_kept): older than the
      -- keep-th newest, found by a backward walk of the primary key (none: fewer)
      AND (%(keep)s = 0 OR scheduled_at < (
          SELECT k.scheduled_at FROM executions k WHERE k.task_id = e.task_id
          ORDER BY k.scheduled_at DESC OFFSET %(keep)s - 1 LIMIT 1))
    ORDER BY scheduled_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), gone_results AS (
    DELETE FROM results r USING doomed d
    WHERE r.task_id = d.task_id AND r.scheduled_at = d.scheduled_at
)
DELETE FROM executions
WHERE ctid = ANY(ARRAY(SELECT ctid FROM doomed))
  -- a row address is unique within one partition only
  AND (tableoid, ctid) IN (SELECT tableoid, ctid FROM doomed)
"""

#: Claims (run on one) of instants before the cutoff whose execution is gone (pruned,
#: or never made: no result came), oldest first.
PRUNE_CLAIMS_SQL = """
WITH doomed AS (
    SELECT c.tableoid, c.ctid FROM claims c
    WHERE c.scheduled_at < %(before)s
      AND NOT EXISTS (SELECT 1 FROM executions e
                      WHERE e.task_id = c.task_id AND e.scheduled_at = c.scheduled_at)
    ORDER BY c.scheduled_at LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
DELETE FROM claims
WHERE ctid = ANY(ARRAY(SELECT ctid FROM doomed))
  AND (tableoid, ctid) IN (SELECT tableoid, ctid FROM doomed)
"""

#: Each task's newest execution: the status of each agent's last attempt, and how many of
#: those are final.
LAST_EXECUTIONS_SQL = """
SELECT e.task_id, e.scheduled_at, e.trigger, e.revision, e.expected,
       ARRAY(SELECT DISTINCT ON (r.agent_id) r.status FROM results r
             WHERE r.task_id = e.task_id AND r.scheduled_at = e.scheduled_at
             ORDER BY r.agent_id, r.attempt DESC),
       e.reported,
       ARRAY(SELECT r.agent_id::text FROM results r
             WHERE r.task_id = e.task_id AND r.scheduled_at = e.scheduled_at
             GROUP BY r.agent_id ORDER BY r.agent_id)
FROM unnest(%s::uuid[]) AS v (task_id)
JOIN LATERAL (SELECT * FROM executions x WHERE x.task_id = v.task_id
              ORDER BY x.scheduled_at DESC LIMIT 1) e ON true
"""


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
        revision,
        trigger,
        attempt,
        final,
    ) = row
    return RunResult(
        task_id=task_id,
        agent_id=uuid.UUID(str(agent_id)),
        scheduled_at=scheduled_at,
        status=ResultStatus(status),
        exit_code=exit_code,
        signal=signal,
        started_at=utc_or_none(started_at),
        finished_at=utc_or_none(finished_at),
        stdout=Output(bytes(stdout), stdout_bytes, stdout_truncated),
        stderr=Output(bytes(stderr), stderr_bytes, stderr_truncated),
        reason=reason,
        revision=revision,
        trigger=Trigger(trigger),
        attempt=attempt,
        final=final,
    )


def _results_from_rows(
    task_id: uuid.UUID, scheduled_at: datetime, rows: Sequence[Sequence[Any]]
) -> dict[str, Any]:
    """An execution's ``results`` (each agent's last attempt) and ``attempts`` (all of
    them) from its rows, ordered by agent and attempt."""
    attempts = tuple(_result_from_row(task_id, scheduled_at, row) for row in rows)
    return {"results": last_attempts(attempts), "attempts": attempts}


def _missing_from(
    pairs: Sequence[Sequence[str | None]],
) -> tuple[tuple[str, uuid.UUID | None], ...]:
    """:func:`missing_agents_sql`'s pairs as ``Execution.missing``."""
    return tuple((str(url), None if agent is None else uuid.UUID(agent)) for url, agent in pairs)


def _executions_from_rows(task_id: uuid.UUID, rows: Sequence[Sequence[Any]]) -> list[Execution]:
    """Executions from rows of an execution's six columns then a result's (NULL: none),
    grouped by instant in the order the rows come; a NULL instant is no execution."""
    grouped: dict[datetime, list[Sequence[Any]]] = {}
    heads: dict[datetime, Sequence[Any]] = {}
    for row in rows:
        scheduled_at = row[0]
        if scheduled_at is None:
            continue
        heads.setdefault(scheduled_at, row[:6])
        results = grouped.setdefault(scheduled_at, [])
        if row[6] is not None:
            results.append(row[6:])
    executions = []
    for scheduled_at, (_, expected, trigger, revision, urls, missing) in heads.items():
        at = utc(scheduled_at)
        executions.append(
            Execution(
                task_id=task_id,
                scheduled_at=at,
                expected=expected,
                **_results_from_rows(task_id, at, grouped[scheduled_at]),
                trigger=Trigger(trigger),
                revision=revision,
                expected_urls=None if urls is None else tuple(urls),
                missing=_missing_from(missing),
            )
        )
    return executions


#: Executions since a moment past their reporting deadline (rules.completion_cutoff) with
#: fewer agents reported than expected (rules.reported_enough): by the scheduled_at index.
INCOMPLETE_SQL = """
SELECT count(*) FROM executions e JOIN tasks t ON t.task_id = e.task_id
WHERE e.scheduled_at >= %(since)s
  AND e.reported < e.expected
  AND e.scheduled_at < %(now)s - t.time_limit_us * interval '1 microsecond' - %(grace)s
"""


class Results:
    """Reads executions and their results back, and prunes the oldest."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def latest_complete_execution(
        self, task_id: uuid.UUID, now: datetime, report_grace: timedelta
    ) -> Execution | None:
        async def operation(cursor: Cursor) -> Execution | None:
            await cursor.execute(
                LATEST_OUTPUT_SQL,
                {"task_id": str(task_id), "now": now, "grace": report_grace},
            )
            rows = cursor.fetchall()
            if not rows:
                raise UnknownTask(str(task_id))
            found = _executions_from_rows(task_id, rows)
            return found[0] if found else None

        return await self._db.run(operation, transaction=False)

    async def list_executions(
        self, task_id: uuid.UUID, limit: int, before: datetime | None = None
    ) -> list[Execution]:
        async def operation(cursor: Cursor) -> list[Execution]:
            await cursor.execute(
                HISTORY_PAGE_SQL, {"task_id": str(task_id), "before": before, "limit": limit}
            )
            rows = cursor.fetchall()
            if not rows:
                raise UnknownTask(str(task_id))
            return _executions_from_rows(task_id, rows)

        return await self._db.run(operation, transaction=False)

    async def recent_start_lateness(self, executions: int) -> list[tuple[uuid.UUID, float]]:
        async def operation(cursor: Cursor) -> list[tuple[uuid.UUID, float]]:
            await cursor.execute(START_LATENESS_SQL, {"executions": executions})
            return [(uuid.UUID(str(a)), float(s)) for a, s in cursor.fetchall()]

        return await self._db.run(operation, transaction=False)

    async def count_incomplete_executions(
        self, since: datetime, now: datetime, report_grace: timedelta
    ) -> int:
        async def operation(cursor: Cursor) -> int:
            await cursor.execute(
                INCOMPLETE_SQL, {"since": utc(since), "now": utc(now), "grace": report_grace}
            )
            row = cursor.fetchone()
            return int(row[0]) if row is not None else 0

        return await self._db.run(operation, transaction=False)

    async def prune_history(self, before: datetime, limit: int, keep: int = 0) -> int:
        async def operation(cursor: Cursor) -> int:
            await cursor.execute(PRUNE_SQL, {"before": before, "limit": limit, "keep": keep})
            pruned = int(cursor.rowcount)
            await cursor.execute(PRUNE_CLAIMS_SQL, {"before": before, "limit": limit})
            return pruned

        return await self._db.run(operation, transaction=False)

    async def last_executions(
        self, task_ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, ExecutionSummary]:
        if not task_ids:
            return {}

        async def operation(cursor: Cursor) -> dict[uuid.UUID, ExecutionSummary]:
            await cursor.execute(LAST_EXECUTIONS_SQL, (sorted({str(t) for t in task_ids}),))
            found = {}
            for row in cursor.fetchall():
                task_id, at, trigger, revision, expected, statuses, reported, agents = row
                key = uuid.UUID(str(task_id))
                found[key] = ExecutionSummary(
                    key,
                    utc(at),
                    Trigger(trigger),
                    revision,
                    expected,
                    tuple(ResultStatus(s) for s in statuses),
                    final_count=reported,
                    agent_ids=tuple(uuid.UUID(str(a)) for a in agents),
                )
            return found

        return await self._db.run(operation, transaction=False)

    async def get_execution(self, task_id: uuid.UUID, scheduled_at: datetime) -> Execution | None:
        async def operation(cursor: Cursor) -> Execution | None:
            await cursor.execute("SELECT 1 FROM tasks WHERE task_id = %s::uuid", (str(task_id),))
            if cursor.fetchone() is None:
                raise UnknownTask(str(task_id))
            await cursor.execute(
                f"SELECT x.expected, x.trigger, x.revision, x.expected_urls,"
                f" {missing_agents_sql('x')} FROM executions x"
                " WHERE x.task_id = %s::uuid AND x.scheduled_at = %s",
                (str(task_id), scheduled_at),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            expected, trigger, revision, urls, missing = row
            at = utc(scheduled_at)
            await cursor.execute(
                EXECUTION_RESULTS_SQL, {"task_id": str(task_id), "scheduled_at": scheduled_at}
            )
            return Execution(
                task_id=task_id,
                scheduled_at=at,
                expected=expected,
                **_results_from_rows(task_id, at, cursor.fetchall()),
                trigger=Trigger(trigger),
                revision=revision,
                expected_urls=None if urls is None else tuple(urls),
                missing=_missing_from(missing),
            )

        return await self._db.run(operation, transaction=False)
