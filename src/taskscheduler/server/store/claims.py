"""Claims of the instants of run-on-one tasks in PostgreSQL: at most one agent holds each
(task, instant), by the ``claims`` table's primary key.

Who is granted a claim is decided by :func:`~taskscheduler.server.store.claim_rules.claim_verdict`
(the preferred agent by rendezvous hashing, the grace after which any agent of the task
may take it); this module reads what it needs and writes the claim, first writer wins.
An execution of a claimed instant expects its holder alone
(:data:`~taskscheduler.server.store.claimed.EXPECTED_SQL`).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from taskscheduler.protocol import ResultStatus, RunResult
from taskscheduler.server.store.claim_rules import claim_verdict
from taskscheduler.server.store.claimed import HOLDER_SQL, insert_claim, task_agents
from taskscheduler.server.store.pool import Cursor, Database
from taskscheduler.server.store.recording import Recording
from taskscheduler.server.store.records import Claim, ClaimAnswer, ClaimStatus
from taskscheduler.server.store.rules import utc
from taskscheduler.server.store.tasks import TASK_COLUMNS, task_from_row


class Claims:
    """Grants each instant of a run-on-one task to one agent."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def claim_instant(
        self, claim: Claim, now: datetime, grace: timedelta, online_since: datetime
    ) -> ClaimAnswer:
        at = utc(claim.scheduled_at)

        async def operation(cursor: Cursor) -> ClaimAnswer:
            task_id = str(claim.task_id)
            await cursor.execute(
                f"SELECT {TASK_COLUMNS} FROM tasks t WHERE t.task_id = %s", (task_id,)
            )
            row = cursor.fetchone()
            task = None if row is None else task_from_row(row)
            verdict = None
            if task is not None:
                # Judged by the code that judges a result of the instant.
                probe = RunResult(
                    claim.task_id, claim.agent_id, at, ResultStatus.SKIPPED, revision=claim.revision
                )
                judging = await Recording(self._db)._judging(cursor, [probe])
                verdict, _ = judging.verdict(probe)
            assigned, online = await task_agents(cursor, claim.task_id, online_since)
            await cursor.execute(HOLDER_SQL, (task_id, at))
            held = cursor.fetchone()
            answer = claim_verdict(
                task,
                verdict,
                claim,
                assigned=assigned,
                online=online,
                # (a run-now's claim names no agent: its instant is off the grid)
                holder=None if held is None or held[0] is None else uuid.UUID(str(held[0])),
                now=now,
                grace=grace,
            )
            if answer.status is not ClaimStatus.GRANTED or held is not None:
                return answer
            # The primary key lets one writer in; a concurrent claim that lost is HELD.
            holder = await insert_claim(
                cursor, claim.task_id, at, claim.agent_id, claim.agent_url, now
            )
            status = ClaimStatus.GRANTED if holder == claim.agent_id else ClaimStatus.HELD
            return ClaimAnswer(status, holder=holder)

        # Each statement on its own: the insert alone decides, atomically, who holds it.
        # Idempotent: asked again, the holder is granted its claim again.
        return await self._db.run(operation, transaction=False, idempotent=True)
