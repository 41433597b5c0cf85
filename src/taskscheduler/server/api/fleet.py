"""The fleet at run time and the agents' liveness: the operators' fleet routes, the agents'
heartbeat, and how an agent and a member are shown (their ``state``).

A member added gets every active task; a member removed, or an agent revoked, is told to
leave (the dispatcher delivers it, :mod:`taskscheduler.server.dispatch`); each change
calls ``_on_fleet_changed`` so that the dispatcher follows at once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote

from twisted.web import http
from twisted.web.iweb import IRequest

from taskscheduler import protocol
from taskscheduler.protocol import InvalidMessage
from taskscheduler.protocol.labels import labels_text, parse_labels
from taskscheduler.schedule import format_instant, parse_instant
from taskscheduler.server.access import principal_of
from taskscheduler.server.api.base import Routes, routes
from taskscheduler.server.api.views import agent_json
from taskscheduler.server.store.fleet import holder_of
from taskscheduler.server.store.records import AgentRecord, Execution, FleetMember, Heartbeat
from taskscheduler.web.errors import (
    BAD_REQUEST,
    INVALID_AGENT_ID,
    INVALID_URL,
    NOT_IN_FLEET,
    UNKNOWN_AGENT,
)
from taskscheduler.web.requests import read_json
from taskscheduler.web.responses import json_response

#: Seconds between an agent's heartbeats (the agent's ``--heartbeat-interval`` default).
DEFAULT_HEARTBEAT_INTERVAL = 10.0
#: An agent is ``online`` if heard from within this many heartbeat intervals.
ONLINE_INTERVALS = 3


def agent_state(
    agent: AgentRecord, in_fleet: bool, now: datetime, heartbeat_interval: float
) -> str:
    """``revoked`` wins over everything, then ``not_in_fleet``, then ``online`` (heard from
    within :data:`ONLINE_INTERVALS` heartbeat intervals) or ``offline``."""
    if agent.revoked:
        return "revoked"
    if not in_fleet:
        return "not_in_fleet"
    window = timedelta(seconds=ONLINE_INTERVALS * heartbeat_interval)
    if agent.last_seen_at is not None and now - agent.last_seen_at <= window:
        return "online"
    return "offline"


def parse_member_url(value: Any) -> str:
    """A fleet member's URL, validated as an AVAILABLE_SERVERS entry; 400 ``invalid_url``."""
    if (
        not isinstance(value, str)
        or not value.startswith(("http://", "https://"))
        or len(value) > 2000
        or any(c.isspace() for c in value)
        or len(value.rstrip("/")) <= len("https://")
    ):
        raise INVALID_URL()
    try:
        protocol.utf8_of(value, "url")
    except InvalidMessage:
        raise INVALID_URL() from None
    return value.rstrip("/")


def _count(body: dict[str, Any], name: str) -> int:
    value = body.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BAD_REQUEST(f"'{name}' must be a whole number, 0 or more")
    return value


def parse_heartbeat(body: Any) -> Heartbeat:
    """An agent's heartbeat; fields it does not know are ignored (a newer agent)."""
    if not isinstance(body, dict):
        raise BAD_REQUEST("the request body must be a JSON object")
    version, hostname = body.get("version", ""), body.get("hostname", "")
    if not isinstance(version, str) or not isinstance(hostname, str):
        raise BAD_REQUEST("'version' and 'hostname' must be strings")
    started_at = None
    if body.get("started_at") is not None:
        try:
            started_at = parse_instant(str(body["started_at"]))
        except ValueError as e:
            raise BAD_REQUEST(f"'started_at': {e}") from None
    try:
        # Absent from an agent that predates labels: it has none.
        labels = parse_labels(body.get("labels"))
    except InvalidMessage as e:
        raise BAD_REQUEST(str(e)) from None
    return Heartbeat(
        version[:100],
        hostname[:255],
        started_at,
        _count(body, "tasks"),
        _count(body, "running"),
        _count(body, "spooled"),
        _count(body, "dropped_results"),
        labels,
    )


def missing_agents_json(execution: Execution) -> list[dict[str, str | None]]:
    """The agents ``execution`` misses, as the store read them with it (the cost is the
    execution's, not the fleet's: no route lists every agent for this)."""
    return [
        {"url": url, "agent_id": None if agent_id is None else str(agent_id)}
        for url, agent_id in execution.missing
    ]


class FleetRoutes(Routes):
    """The fleet, the heartbeat and the agents' states."""

    #: agent_id -> whether it was in the fleet when last heard of (a warning per change).
    _in_fleet_seen: dict[uuid.UUID, bool]

    async def _fleet_urls(self) -> set[str]:
        return {m.url for m in await self._store.list_fleet()}

    def _state(self, agent: AgentRecord, in_fleet: bool) -> str:
        return agent_state(agent, in_fleet, self._now(), self._heartbeat_interval)

    def agent_view(self, agent: AgentRecord, fleet_urls: set[str]) -> dict[str, Any]:
        body = agent_json(agent)
        hb = agent.heartbeat
        seen = agent.last_seen_at
        body.update(
            state=self._state(agent, agent.url in fleet_urls),
            last_seen_at=None if seen is None else format_instant(seen),
            version=None if hb is None else hb.version,
            hostname=None if hb is None else hb.hostname,
            started_at=(
                None if hb is None or hb.started_at is None else format_instant(hb.started_at)
            ),
            tasks=None if hb is None else hb.tasks,
            running=None if hb is None else hb.running,
            spooled=None if hb is None else hb.spooled,
            dropped_results=None if hb is None else hb.dropped_results,
        )
        return body

    def _member_view(
        self, member: FleetMember, agents: Sequence[AgentRecord], fleet_urls: set[str]
    ) -> dict[str, Any]:
        holder = holder_of(member.url, agents)
        return {
            "url": member.url,
            "added_at": format_instant(member.added_at),
            "agent_id": None if holder is None else str(holder.agent_id),
            "state": (
                "not_enrolled" if holder is None else self._state(holder, member.url in fleet_urls)
            ),
        }

    def warn_if_outside(self, agent: AgentRecord, in_fleet: bool, when: str) -> None:
        """Warn, once per change, that an enrolled agent's URL is not in the fleet."""
        before = self._in_fleet_seen.get(agent.agent_id)
        if before == in_fleet:
            return
        self._in_fleet_seen[agent.agent_id] = in_fleet
        if not in_fleet:
            self.log.warn(
                "agent {agent_id} at {url} ({when}) is not in the fleet: no task runs there; "
                "add it with POST /api/v1/fleet or AVAILABLE_SERVERS",
                agent_id=str(agent.agent_id),
                url=agent.url,
                when=when,
            )
        elif before is False:
            self.log.info(
                "agent {agent_id} at {url} is in the fleet now",
                agent_id=str(agent.agent_id),
                url=agent.url,
            )

    @routes.route("/api/v1/agents/heartbeat", methods=["POST"])
    async def heartbeat(self, request: IRequest) -> bytes:
        """An agent says it is alive: ``{"agent_id", "version", "hostname", "started_at",
        "tasks", "running", "spooled", "dropped_results", "labels"}``; labels other than
        those stored change which tasks it is assigned, at once."""
        agent = principal_of(request).agent
        assert agent is not None  # the gate let only an agent's credential in
        body = read_json(request)
        heartbeat = parse_heartbeat(body)
        claimed = body.get("agent_id")
        if claimed is not None and claimed != str(agent.agent_id):
            raise BAD_REQUEST("'agent_id' is not the id of the credential's agent")
        relabelled = await self._store.record_heartbeat(agent.agent_id, self._now(), heartbeat)
        self._metrics.heartbeat(agent.agent_id, self._clock.seconds())
        if relabelled:
            self.log.info(
                "agent {agent_id} at {url} now has labels {labels}",
                agent_id=str(agent.agent_id),
                url=agent.url,
                labels=labels_text(heartbeat.labels) or "(none)",
            )
            self._on_agent_relabelled(agent.url)
        in_fleet = await self._store.is_fleet_member(agent.url)
        self.warn_if_outside(agent, in_fleet, "heartbeat")
        return json_response(
            request,
            {
                "state": "online" if in_fleet else "not_in_fleet",
                "in_fleet": in_fleet,
                "interval_seconds": self._heartbeat_interval,
            },
        )

    @routes.route("/api/v1/agents/<agent_id>", methods=["GET"])
    async def get_agent(self, request: IRequest, agent_id: str) -> bytes:
        try:
            parsed = protocol.parse_uuid(agent_id, "agent_id")
        except InvalidMessage as e:
            raise INVALID_AGENT_ID(str(e)) from None
        agent = await self._store.get_agent(parsed)
        if agent is None:
            raise UNKNOWN_AGENT()
        return json_response(request, self.agent_view(agent, await self._fleet_urls()))

    @routes.route("/api/v1/fleet", methods=["GET"])
    async def list_fleet(self, request: IRequest) -> bytes:
        members = await self._store.list_fleet()
        agents = await self._store.list_agents()
        urls = {m.url for m in members}
        return json_response(
            request, {"members": [self._member_view(m, agents, urls) for m in members]}
        )

    @routes.route("/api/v1/fleet", methods=["POST"])
    async def add_fleet_member(self, request: IRequest) -> bytes:
        """Add an agent URL to the fleet: every active task is assigned and delivered."""
        body = read_json(request)
        if not isinstance(body, dict):
            raise BAD_REQUEST("the request body must be a JSON object")
        protocol.refuse_unknown(body, ("url",))
        url = parse_member_url(body.get("url"))
        principal = principal_of(request)
        audit = self._audit(request, principal, "fleet.added", url)
        member, added = await self._store.add_fleet_member(url, self._now(), audit)
        if added:
            self.log.info("{actor} added {url} to the fleet", actor=principal.actor, url=url)
            self._on_fleet_changed()
        agents = await self._store.list_agents()
        view = self._member_view(member, agents, await self._fleet_urls())
        return json_response(request, view, http.CREATED if added else http.OK)

    @routes.route("/api/v1/fleet/<path:url>", methods=["DELETE"])
    async def remove_fleet_member(self, request: IRequest, url: str) -> bytes:
        """Take an agent URL (percent-encoded) out of the fleet: the agent there is told,
        signed, to drop every task."""
        decoded = unquote(url).rstrip("/")
        principal = principal_of(request)
        audit = self._audit(request, principal, "fleet.removed", decoded)
        member = await self._store.remove_fleet_member(decoded, audit)
        if member is None:
            raise NOT_IN_FLEET()
        self.log.info("{actor} removed {url} from the fleet", actor=principal.actor, url=decoded)
        self._on_fleet_changed()
        agents = await self._store.list_agents()
        return json_response(request, self._member_view(member, agents, set()))
