"""Group commit of task creations: the creates that arrive together are written in one
transaction of one round trip to PostgreSQL.

Creating a task took a transaction of four round trips (``BEGIN``, the task's rows, its
audit line, ``COMMIT``) and a commit of its own; with many clients creating at once, the
server spent most of its time driving those round trips. Here a create that finds no
batch being written starts one at once (a lone create waits for nobody); those that
arrive meanwhile wait, and are written together as soon as it ends. A batch is one
multi-statement query: PostgreSQL runs it as one implicit transaction, and answers only
after the commit, so nothing is acknowledged before it is durable.

Each create keeps its own outcome:

- the batch committed: every create in it succeeded;
- PostgreSQL refused the batch's data (an integrity or data error: a task id that
  exists, a value out of range): the batch changed nothing, and each of its creates is
  written again alone, so that the one at fault is refused and only it;
- anything else (the database unreachable, a timeout): each create of the batch fails
  with that error, as a single create would have.

Only tasks with no target are created here: a targeted task's rows are matched against
the agents' labels (:func:`~taskscheduler.server.store.assignment.rematch_rows`), which
takes round trips of its own, so those are created one by one as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg2
import psycopg2.errors

from taskscheduler.protocol.options import options_to_json
from taskscheduler.server.store.group_commit import GroupCommit
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.records import AuditEvent, Task

_USEC = timedelta(microseconds=1)
#: Most creates written in one transaction (a batch is bounded by the clients anyway).
MAX_BATCH = 500

#: The arrays of a batch, one element per create (the audit's: per create that has one).
_COLUMNS = (
    *("task_id", "command", "frequency", "interval", "anchor", "time_limit_us", "created_at"),
    *("options", "cron", "timezone", "at", "actor", "action", "target", "peer", "details"),
)

#: One batch: the tasks, every fleet member's assignment of each, their first revision,
#: and the audit lines, all from arrays (one row per create).
INSERT_TASKS_SQL = """
    LOCK TABLE fleet IN SHARE MODE;
    INSERT INTO tasks (task_id, command, frequency, interval_seconds, anchor,
                       time_limit_us, created_at, options, cron, timezone)
        SELECT * FROM unnest(%(task_id)s::uuid[], %(command)s::text[], %(frequency)s::text[],
                             %(interval)s::integer[], %(anchor)s::timestamptz[],
                             %(time_limit_us)s::bigint[], %(created_at)s::timestamptz[],
                             %(options)s::jsonb[], %(cron)s::text[], %(timezone)s::text[]);
    INSERT INTO task_agents (task_id, agent_url)
        SELECT t.task_id, f.agent_url
        FROM unnest(%(task_id)s::uuid[]) AS t (task_id) CROSS JOIN fleet f;
    INSERT INTO task_revisions (task_id, revision, effective_at, anchor,
                                interval_seconds, cron, timezone)
        SELECT task_id, 1, anchor, anchor, interval, cron, timezone
        FROM unnest(%(task_id)s::uuid[], %(anchor)s::timestamptz[], %(interval)s::integer[],
                    %(cron)s::text[], %(timezone)s::text[])
             AS r (task_id, anchor, interval, cron, timezone);
    INSERT INTO audit_events (at, actor, action, target, peer, details)
        SELECT * FROM unnest(%(at)s::timestamptz[], %(actor)s::text[], %(action)s::text[],
                             %(target)s::text[], %(peer)s::text[], %(details)s::jsonb[]);
"""


@dataclass(frozen=True)
class PendingCreate:
    """One create waiting for its batch."""

    task: Task
    audit: AuditEvent | None


def batch_parameters(batch: Sequence[PendingCreate]) -> dict[str, list[Any]]:
    """The arrays :data:`INSERT_TASKS_SQL` reads: one element per create (audit lines only
    for the creates that have one)."""
    columns: dict[str, list[Any]] = {name: [] for name in _COLUMNS}
    for pending in batch:
        spec = pending.task.spec
        frequency, cron = spec.frequency, spec.cron
        columns["task_id"].append(str(spec.task_id))
        columns["command"].append(spec.command)
        columns["frequency"].append(None if frequency is None else str(frequency))
        columns["interval"].append(None if frequency is None else frequency.seconds)
        columns["anchor"].append(spec.anchor)
        columns["time_limit_us"].append(spec.time_limit // _USEC)
        columns["created_at"].append(pending.task.created_at)
        columns["options"].append(json.dumps(options_to_json(spec.options)))
        columns["cron"].append(None if cron is None else cron.expression)
        columns["timezone"].append(None if cron is None else cron.timezone)
        audit = pending.audit
        if audit is not None:
            columns["at"].append(audit.at)
            columns["actor"].append(audit.actor)
            columns["action"].append(audit.action)
            columns["target"].append(audit.target)
            columns["peer"].append(audit.peer)
            columns["details"].append(json.dumps(audit.details))
    return columns


def _refused(error: BaseException) -> bool:
    """Whether PostgreSQL refused the batch's data (so that one create may be at fault)."""
    return isinstance(error, psycopg2.IntegrityError | psycopg2.DataError)


class CreateBatches:
    """Writes concurrent creates of untargeted tasks in batches (see the module), through
    :class:`~taskscheduler.server.store.group_commit.GroupCommit`: one batch at a time."""

    def __init__(self, db: Database, max_batch: int = MAX_BATCH) -> None:
        self._db = db
        self._group: GroupCommit[PendingCreate, Task, None] = GroupCommit(
            self._write,
            lambda _: None,
            alone_after=_refused,
            max_items=max_batch,
            max_in_flight=1,
        )

    async def create(self, task: Task, audit: AuditEvent | None) -> Task:
        """Store ``task`` (with ``audit``) in the next batch; its outcome alone."""
        (created,) = await self._group.submit([PendingCreate(task, audit)], None)
        return created

    async def _write(self, batch: list[PendingCreate], _: None) -> list[Task]:
        parameters = batch_parameters(batch)

        async def operation(cursor: Cursor) -> None:
            # One query of several statements: one implicit transaction, one round trip.
            await cursor.execute(INSERT_TASKS_SQL, parameters)

        try:
            await self._db.run(operation, transaction=False)
        except psycopg2.errors.UniqueViolation as e:
            if len(batch) == 1:
                raise ValueError(f"task {batch[0].task.task_id} already exists") from e
            raise
        return [pending.task for pending in batch]
