"""Which fleet members a task runs on (its target): the pure rule both stores apply, and
the PostgreSQL helper that re-applies it to ``task_agents`` rows.

Every member of the fleet has a row per live task, as before targeting; its ``matched``
says whether the live agent enrolled at the member's URL matches the task's target
(:meth:`~taskscheduler.protocol.options.Target.matches`). A member where no agent has
enrolled yet (or whose agent was revoked) has no id and no labels: it matches only a task
with no target. The rows a task runs on are those matched and not due for removal
(:data:`LIVE_ASSIGNMENT_SQL`; for an active task, every matched row).

The rule is re-applied to the rows concerned whenever one of its inputs changes: a task
created or its target changed (PATCH), an agent enrolled, revoked, or heard with other
labels, a member added. A row that stops matching on an active task is due for removal
(the agent is told, signed, to drop the task, as for a deleted one), unless no agent at
that URL ever acknowledged the task; a row that starts matching is due a delivery.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from taskscheduler.protocol.labels import NO_LABELS
from taskscheduler.protocol.options import Target, parse_target
from taskscheduler.server.store.pool import Cursor
from taskscheduler.server.store.records import AgentRecord

#: The live rows of ``task_agents a``: the agents the task runs on (for an active task).
LIVE_ASSIGNMENT_SQL = "a.matched AND NOT a.removal_pending"
#: Tasks ``t`` with a target: the only ones whose rows an agent's change can affect (an
#: untargeted task matches every member, whoever enrols there).
TARGETED_SQL = "jsonb_typeof(t.options->'target') = 'object'"


def member_matches(target: Target, agent: AgentRecord | None) -> bool:
    """Whether a task with ``target`` runs at a member whose live agent is ``agent``
    (None: none enrolled there, so no id and no labels)."""
    if agent is None:
        return target.matches(None, NO_LABELS)
    return target.matches(agent.agent_id, agent.labels)


@dataclass(frozen=True)
class Rematch:
    """What becomes of one row whose ``matched`` changes."""

    matched: bool
    #: Whether the agent is told to drop the task (it stops matching an active task that
    #: an agent at the URL acknowledged) or a pending removal is called off (it matches
    #: again); None: ``removal_pending`` stays as it is (a paused task's).
    removal_pending: bool | None
    #: It starts matching: deliver it (again).
    undelivered: bool


def rematch(was: bool, now: bool, active: bool, acknowledged: bool) -> Rematch | None:
    """The change to a row that matched (``was``) and matches ``now``; None if none.

    ``active``: the task is neither paused nor deleted (a paused task's rows are all due
    for removal already, and resuming delivers the matched ones). ``acknowledged``: an
    agent at the row's URL took the task once, so may hold it.
    """
    if was == now:
        return None
    if not active:
        return Rematch(now, None, now)
    if now:
        return Rematch(True, False, True)
    return Rematch(False, acknowledged, False)


def live_target(options: Mapping[str, Any] | None) -> Target:
    """The target of a task's stored options (``tasks.options``)."""
    return parse_target((options or {}).get("target"))


async def share_agents(cursor: Cursor, where: str, params: Any) -> None:
    """Lock (``FOR SHARE``) the live agents at the URLs of the rows ``where`` chooses
    (as :func:`rematch_rows`), so that their labels stay as read until the transaction
    ends: a relabelling under way is waited for, then seen. A transaction that changes
    ``task_agents`` rows before its rematch takes this first, as a relabelling does (its
    agent's row, then the rows at its URL), so that the two never deadlock."""
    await cursor.execute(
        f"""
        SELECT 1 FROM agents g
        WHERE g.revoked_at IS NULL AND g.url IN (
            SELECT a.agent_url FROM task_agents a JOIN tasks t ON t.task_id = a.task_id
            WHERE t.deleted_at IS NULL AND ({where}))
        ORDER BY g.agent_id
        FOR SHARE OF g
        """,
        params,
    )


async def rematch_rows(cursor: Cursor, where: str, params: Any) -> int:
    """Re-apply the rule to the ``task_agents a`` rows of live tasks ``t`` chosen by the
    SQL condition ``where`` (with ``params``); returns how many rows changed.

    The agents are read under :func:`share_agents`, and the rows locked in key order, so
    a rematch never reads labels a concurrent relabelling is changing, and two rematches
    never deadlock on each other.
    """
    await share_agents(cursor, where, params)
    await cursor.execute(
        f"""
        SELECT a.task_id, a.agent_url, a.matched, a.agent_id IS NOT NULL,
               t.paused_at IS NULL, t.options, g.agent_id, g.labels
        FROM task_agents a
        JOIN tasks t ON t.task_id = a.task_id
        LEFT JOIN agents g ON g.url = a.agent_url AND g.revoked_at IS NULL
        WHERE t.deleted_at IS NULL AND ({where})
        ORDER BY a.task_id, a.agent_url
        FOR UPDATE OF a
        """,
        params,
    )
    targets: dict[str, Target] = {}
    changes: list[tuple[str, str, Rematch]] = []
    for task_id, url, was, acknowledged, active, options, agent_id, labels in cursor.fetchall():
        key = str(task_id)
        if key not in targets:
            targets[key] = live_target(options)
        matches = targets[key].matches(
            None if agent_id is None else uuid.UUID(str(agent_id)), labels or NO_LABELS
        )
        change = rematch(was, matches, active, acknowledged)
        if change is not None:
            changes.append((key, url, change))
    if changes:
        await cursor.execute(
            """
            UPDATE task_agents a
            SET matched = v.matched,
                removal_pending = coalesce(v.removal_pending, a.removal_pending),
                delivered_at = CASE WHEN v.undelivered THEN NULL ELSE a.delivered_at END
            FROM unnest(%s::uuid[], %s::text[], %s::boolean[], %s::boolean[], %s::boolean[])
                 AS v (task_id, agent_url, matched, removal_pending, undelivered)
            WHERE a.task_id = v.task_id AND a.agent_url = v.agent_url
            """,
            _columns(changes),
        )
    return len(changes)


def _columns(changes: Sequence[tuple[str, str, Rematch]]) -> tuple[list[Any], ...]:
    return (
        [task_id for task_id, _, _ in changes],
        [url for _, url, _ in changes],
        [c.matched for _, _, c in changes],
        [c.removal_pending for _, _, c in changes],
        [c.undelivered for _, _, c in changes],
    )
