"""What the task routes check of a target beyond its form: the agents it names exist.

A target naming an agent id that no live agent has (never enrolled, or revoked: an
identity never enrols again) is refused (400 ``invalid_request`` naming the ids): such a
target could never match, and a typo is better said at once than found as a task that
never runs. Agents revoked after the task was targeted at them simply stop running it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from taskscheduler.protocol import InvalidMessage
from taskscheduler.protocol.options import parse_target
from taskscheduler.server.store.interface import Store
from taskscheduler.web.errors import BAD_REQUEST


async def refuse_unknown_agents(store: Store, body: Mapping[str, Any]) -> None:
    """400 if the ``target`` a create or PATCH ``body`` gives names agents
    (``{"agents": [...]}``) that no live agent is."""
    try:
        agents = parse_target(body.get("target")).agents
    except InvalidMessage as e:
        raise BAD_REQUEST(str(e)) from None
    if not agents:
        return
    live = {a.agent_id for a in await store.list_agents() if not a.revoked}
    unknown = sorted(str(agent) for agent in agents - live)
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise BAD_REQUEST(
            f"'target.agents': no live agent has the id {', '.join(unknown[:5])}{more} "
            "(see GET /api/v1/agents)"
        )
