"""Recording results in PostgreSQL: judging a batch with the rules, the insert SQL, and
the executions of run-nows (manual runs, with a row per agent to tell). Concurrent
reports are recorded together (:mod:`~taskscheduler.server.store.group_commit`).

The outcome rules are :mod:`~taskscheduler.server.store.rules`: alignment, revisions,
pauses, run-nows and result identity are checked here in Python with them; completeness
and the deletion cut-off are applied by the SQL below, which
``tests/unit/test_store_rules.py`` holds to the same rules.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta

import psycopg2
import psycopg2.errors

from taskscheduler.cron import parse_cron
from taskscheduler.protocol import RunResult, Trigger
from taskscheduler.protocol.options import RunOn
from taskscheduler.server.store.audit import insert_audit
from taskscheduler.server.store.claim_rules import manual_choice
from taskscheduler.server.store.claimed import EXPECTED_SQL, insert_claim, task_agents
from taskscheduler.server.store.group_commit import GroupCommit
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import (
    AuditEvent,
    Execution,
    RecordOutcome,
    StoreUnavailable,
)
from taskscheduler.server.store.rules import (
    Pause,
    Revision,
    is_manual,
    manual_run_deadline,
    manual_verdict,
    result_digest,
    scheduled_verdict,
    utc,
    utc_or_none,
)

# -- SQL ------------------------------------------------------------------------------------

#: Store a batch of results in one implicit transaction: create the executions they
#: belong to (expecting every agent then assigned), lock those executions in key order,
#: insert the results that are new, and count them in their executions. Returns the keys
#: of the results inserted; the others were already stored, or are of instants after
#: their task's deletion (:func:`rules.after_deletion`: neither an execution nor a result
#: is made for those). An execution is marked complete once it has every result it
#: expects (:func:`rules.reported_enough`); the agents expected are :func:`fleet.expected_urls`,
#: or the holder of the instant's claim (run on one: :data:`claimed.EXPECTED_SQL`).
RECORD_SQL = f"""
INSERT INTO executions (task_id, scheduled_at, expected, expected_urls, revision)
SELECT v.task_id, v.scheduled_at, cardinality(x.urls), x.urls, v.revision
FROM unnest(%(e_task)s::uuid[], %(e_at)s::timestamptz[], %(e_revision)s::integer[])
     AS v (task_id, scheduled_at, revision)
CROSS JOIN LATERAL (SELECT {EXPECTED_SQL} AS urls) x
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
                         revision, trigger, attempt, final, received_at)
    SELECT v.*, %(received_at)s
    FROM unnest(%(task)s::uuid[], %(at)s::timestamptz[], %(agent)s::uuid[],
                %(status)s::text[], %(exit_code)s::integer[], %(signal)s::integer[],
                %(started)s::timestamptz[], %(finished)s::timestamptz[],
                %(stdout)s::bytea[], %(stdout_bytes)s::bigint[],
                %(stdout_truncated)s::boolean[],
                %(stderr)s::bytea[], %(stderr_bytes)s::bigint[],
                %(stderr_truncated)s::boolean[], %(reason)s::text[], %(digest)s::bytea[],
                %(revision)s::integer[], %(trigger)s::text[], %(attempt)s::integer[],
                %(final)s::boolean[])
         AS v (task_id, scheduled_at, agent_id, status, exit_code, signal,
               started_at, finished_at, stdout, stdout_bytes, stdout_truncated,
               stderr, stderr_bytes, stderr_truncated, reason, digest, revision, trigger,
               attempt, final)
    WHERE EXISTS (SELECT 1 FROM executions e
                  WHERE e.task_id = v.task_id AND e.scheduled_at = v.scheduled_at)
      AND NOT EXISTS (SELECT 1 FROM tasks t
                      WHERE t.task_id = v.task_id AND t.deleted_at < v.scheduled_at)
    ON CONFLICT DO NOTHING
    RETURNING task_id, agent_id, scheduled_at, attempt, final
), counted AS (
    -- An agent is counted once, when its last attempt is a final one
    -- (rules.reported_agents): not when it is none of those already stored.
    -- Each agent's newest attempt of the batch (one sort, not a self-join per row).
    SELECT i.task_id, i.scheduled_at, count(*) AS n
    FROM (SELECT DISTINCT ON (task_id, scheduled_at, agent_id)
                 task_id, scheduled_at, agent_id, attempt, final
          FROM inserted
          ORDER BY task_id, scheduled_at, agent_id, attempt DESC) i
    WHERE i.final
      AND NOT EXISTS (SELECT 1 FROM results r
                      WHERE r.task_id = i.task_id AND r.scheduled_at = i.scheduled_at
                        AND r.agent_id = i.agent_id AND (r.final OR r.attempt > i.attempt))
    GROUP BY i.task_id, i.scheduled_at
), counters AS (
    UPDATE executions e
    SET reported = e.reported + c.n,
        completed_at = CASE
            WHEN e.completed_at IS NULL AND e.reported + c.n >= e.expected
            THEN %(received_at)s ELSE e.completed_at END
    FROM counted c
    WHERE e.task_id = c.task_id AND e.scheduled_at = c.scheduled_at
)
SELECT task_id, agent_id, scheduled_at, attempt FROM inserted
"""

#: The digests stored under keys a batch could not insert (already there, or deleted).
STORED_DIGESTS_SQL = """
SELECT r.task_id, r.agent_id, r.scheduled_at, r.attempt, r.digest
FROM unnest(%s::uuid[], %s::timestamptz[], %s::uuid[], %s::integer[]) AS v (t, s, a, n)
JOIN results r ON r.task_id = v.t AND r.scheduled_at = v.s AND r.agent_id = v.a
              AND r.attempt = v.n
"""
#: What the rules need to judge a batch: each task's revisions ('r'), each
#: pause ('p'), the deletion ('d') and each run-now at an instant of the batch ('m').
JUDGING_SQL = """
SELECT 'r', task_id, revision, effective_at, anchor, interval_seconds, cron, timezone
FROM task_revisions WHERE task_id = ANY(%(ids)s::uuid[])
UNION ALL
SELECT 'p', task_id, NULL, paused_at, resumed_at, NULL, NULL, NULL
FROM task_pauses WHERE task_id = ANY(%(ids)s::uuid[])
UNION ALL
SELECT 'd', task_id, NULL, deleted_at, NULL, NULL, NULL, NULL
FROM tasks WHERE task_id = ANY(%(ids)s::uuid[])
UNION ALL
SELECT 'm', e.task_id, e.revision, e.scheduled_at, NULL, NULL, NULL, NULL
FROM executions e
JOIN unnest(%(m_task)s::uuid[], %(m_at)s::timestamptz[]) AS v (task_id, scheduled_at)
  ON e.task_id = v.task_id AND e.scheduled_at = v.scheduled_at
WHERE e.trigger = 'manual'
"""


class _Judging:
    """What the rules need to judge the results of a batch, per task."""

    def __init__(self) -> None:
        self.revisions: dict[uuid.UUID, list[Revision]] = {}
        self.pauses: dict[uuid.UUID, list[Pause]] = {}
        self.deleted: dict[uuid.UUID, datetime | None] = {}
        self.manual: dict[tuple[uuid.UUID, datetime], int] = {}

    def verdict(self, result: RunResult) -> tuple[RecordOutcome | None, int]:
        task_id = result.task_id
        if task_id not in self.deleted:
            return RecordOutcome.UNKNOWN_TASK, 0
        if is_manual(result):
            recorded = self.manual.get((task_id, result.scheduled_at))
            verdict = manual_verdict(
                recorded is not None, self.deleted[task_id], result.scheduled_at
            )
            revision = recorded if result.revision is None else result.revision
            return verdict, revision or 0
        if (task_id, result.scheduled_at) in self.manual:
            return RecordOutcome.MISALIGNED, 0
        return scheduled_verdict(
            self.revisions.get(task_id, []),
            self.pauses.get(task_id, []),
            self.deleted[task_id],
            result.scheduled_at,
            result.revision,
        )


_Key = tuple[str, str, datetime, int]  # (task_id, agent_id, scheduled_at, attempt)


class Recording:
    """Records results into executions, and the executions of run-nows."""

    def __init__(self, db: Database) -> None:
        self._db = db
        # Concurrent reports share a transaction; a group is received when its last came.
        self.group: GroupCommit[RunResult, RecordOutcome, datetime] = GroupCommit(
            self._record_now, max, alone_after=lambda e: not isinstance(e, StoreUnavailable)
        )

    async def record_results(
        self, results: Sequence[RunResult], received_at: datetime
    ) -> list[RecordOutcome]:
        """Judge and store ``results``, with those of concurrent calls (group commit)."""
        return await self.group.submit(results, utc(received_at))

    async def _record_now(
        self, results: Sequence[RunResult], received: datetime
    ) -> list[RecordOutcome]:
        if not results:
            return []

        async def operation(cursor: Cursor) -> list[RecordOutcome]:
            return await self._record(cursor, results, received)

        # Not in an explicit transaction: the writes go as one multi-statement query,
        # which PostgreSQL runs as one implicit transaction (one round trip, not four).
        # Idempotent: a result stored already is found by its key and digest (DUPLICATE).
        return await self._db.run(operation, transaction=False, idempotent=True)

    async def _judging(self, cursor: Cursor, results: Sequence[RunResult]) -> _Judging:
        """Read what the rules need to judge ``results``, in one query."""
        manual = sorted({(str(r.task_id), r.scheduled_at) for r in results if is_manual(r)})
        await cursor.execute(
            JUDGING_SQL,
            {
                "ids": sorted({str(r.task_id) for r in results}),
                "m_task": [t for t, _ in manual],
                "m_at": [at for _, at in manual],
            },
        )
        judging = _Judging()
        for kind, task_id, revision, first, second, interval, cron, zone in cursor.fetchall():
            key = uuid.UUID(str(task_id))
            if kind == "r":
                judging.revisions.setdefault(key, []).append(
                    Revision(
                        revision,
                        utc(first),
                        utc(second),
                        None if interval is None else timedelta(seconds=interval),
                        None if cron is None else parse_cron(cron, zone),
                    )
                )
            elif kind == "p":
                judging.pauses.setdefault(key, []).append((utc(first), utc_or_none(second)))
            elif kind == "d":
                judging.deleted[key] = utc_or_none(first)
            else:
                judging.manual[(key, utc(first))] = revision
        return judging

    async def _record(
        self, cursor: Cursor, results: Sequence[RunResult], received_at: datetime
    ) -> list[RecordOutcome]:
        outcomes: list[RecordOutcome | None] = [None] * len(results)
        judging = await self._judging(cursor, results)
        # The first candidate for each key is the one we try to insert; any later one in
        # the same batch is judged against whatever ends up stored.
        first: dict[_Key, int] = {}
        keys: list[_Key | None] = [None] * len(results)
        digests = [b""] * len(results)
        revisions = [0] * len(results)
        for i, r in enumerate(results):
            verdict, revisions[i] = judging.verdict(r)
            if verdict is not None:
                outcomes[i] = verdict
            else:
                key = (str(r.task_id), str(r.agent_id), r.scheduled_at, r.attempt)
                keys[i] = key
                first.setdefault(key, i)
                digests[i] = result_digest(r)
        if not first:
            return [outcome for outcome in outcomes if outcome is not None]

        # Sorted: concurrent calls take row locks in the same order, so never deadlock.
        candidates = sorted(first, key=lambda k: (k[0], k[2], k[1], k[3]))
        execution_revisions = {(k[0], k[2]): revisions[first[k]] for k in candidates}
        executions = sorted(execution_revisions)
        chosen = [results[first[key]] for key in candidates]
        await cursor.execute(
            RECORD_SQL,
            {
                "e_task": [t for t, _ in executions],
                "e_at": [at for _, at in executions],
                "e_revision": [execution_revisions[e] for e in executions],
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
                # The revision each ran; an older agent's (None) is the one in effect.
                "revision": [
                    revisions[first[k]] if r.revision is None else r.revision
                    for k, r in zip(candidates, chosen, strict=True)
                ],
                "trigger": [r.trigger.value for r in chosen],
                "attempt": [r.attempt for r in chosen],
                "final": [r.final for r in chosen],
                "received_at": received_at,
            },
        )
        inserted = {(str(t), str(a), at, n) for t, a, at, n in cursor.fetchall()}
        stored_digests = {key: digests[first[key]] for key in inserted}

        already = [key for key in candidates if key not in inserted]
        if already:
            await cursor.execute(
                STORED_DIGESTS_SQL,
                (
                    [k[0] for k in already],
                    [k[2] for k in already],
                    [k[1] for k in already],
                    [k[3] for k in already],
                ),
            )
            for task_id, agent_id, at, attempt, digest in cursor.fetchall():
                stored_digests[(str(task_id), str(agent_id), at, attempt)] = bytes(digest)

        for i, candidate in enumerate(keys):
            if candidate is None:
                continue
            if first[candidate] == i and candidate in inserted:
                outcomes[i] = RecordOutcome.STORED
            elif candidate not in stored_digests:
                outcomes[i] = RecordOutcome.DELETED  # neither inserted nor stored before
            elif stored_digests[candidate] == digests[i]:  # rules.same_result, by digest
                outcomes[i] = RecordOutcome.DUPLICATE
            else:
                outcomes[i] = RecordOutcome.CONFLICT
        return [outcome for outcome in outcomes if outcome is not None]

    async def record_manual_execution(
        self,
        task_id: uuid.UUID,
        scheduled_at: datetime,
        audit: AuditEvent,
        online_since: datetime | None = None,
    ) -> Execution | None:
        at = utc(scheduled_at)

        async def operation(cursor: Cursor) -> Execution | None:
            await cursor.execute(
                "SELECT revision, interval_seconds, cron, timezone, options->>'run_on' FROM tasks"
                " WHERE task_id = %s::uuid AND deleted_at IS NULL FOR SHARE",
                (str(task_id),),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            revision, interval, cron, zone, run_on = row
            typical = (
                timedelta(seconds=interval)
                if cron is None
                else parse_cron(cron, zone).typical_interval()
            )
            deadline = manual_run_deadline(at, typical)
            if run_on == RunOn.ONE:
                # One agent runs it: claimed for it, so the execution expects it alone.
                assigned, online = await task_agents(cursor, task_id, online_since or at)
                chosen = manual_choice(task_id, at, assigned, online)
                if chosen is not None:
                    await insert_claim(cursor, task_id, at, None, chosen, at)
            await cursor.execute(
                f"""
                INSERT INTO executions (task_id, scheduled_at, expected, expected_urls,
                                        completed_at, trigger, revision)
                SELECT v.task_id, %(at)s, cardinality(x.urls), x.urls,
                       CASE WHEN cardinality(x.urls) = 0 THEN %(at)s::timestamptz END,
                       'manual', %(revision)s
                FROM (SELECT %(task_id)s::uuid AS task_id, %(at)s::timestamptz AS scheduled_at) v
                CROSS JOIN LATERAL (SELECT {EXPECTED_SQL} AS urls) x
                RETURNING expected_urls;
                """,
                {"task_id": str(task_id), "at": at, "revision": revision},
            )
            (urls,) = cursor.fetchone()
            # Each agent the execution expects is told of it.
            await cursor.execute(
                """
                INSERT INTO manual_runs (task_id, scheduled_at, agent_url, revision, deadline)
                SELECT %(task_id)s::uuid, %(at)s, url, %(revision)s, %(deadline)s
                FROM unnest(%(urls)s::text[]) AS url
                """,
                {
                    "task_id": str(task_id),
                    "at": at,
                    "revision": revision,
                    "deadline": deadline,
                    "urls": list(urls),
                },
            )
            await insert_audit(cursor, audit)
            return Execution(
                task_id, at, len(urls), (), Trigger.MANUAL, revision, expected_urls=tuple(urls)
            )

        try:
            return await self._db.run(operation)
        except psycopg2.errors.UniqueViolation:
            raise ValueError(f"task {task_id} already has an execution at {at}") from None
