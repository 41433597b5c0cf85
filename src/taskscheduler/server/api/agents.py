"""The fleet's identities: an agent enrols with a join secret; operators list agents,
revoke one, and release a revoked agent's URL."""

from __future__ import annotations

from twisted.web import http
from twisted.web.iweb import IRequest

from taskscheduler import protocol
from taskscheduler.auth import AGENT_PREFIX, hash_token, new_token
from taskscheduler.protocol import InvalidMessage
from taskscheduler.protocol.labels import parse_labels
from taskscheduler.server.access import principal_of
from taskscheduler.server.api.base import routes
from taskscheduler.server.api.fleet import FleetRoutes
from taskscheduler.server.lateness import LATENESS_EXECUTIONS, lateness_by_agent
from taskscheduler.server.store.records import AgentConflict
from taskscheduler.web.errors import (
    AGENT_CONFLICTS,
    BAD_REQUEST,
    INVALID_AGENT_ID,
    UNKNOWN_AGENT,
    UNKNOWN_LIVE_AGENT,
)
from taskscheduler.web.requests import peer_address, read_json
from taskscheduler.web.responses import json_response


class AgentRoutes(FleetRoutes):
    """Enrolment and the operators' view of the fleet."""

    @routes.route("/api/v1/agents/enrol", methods=["POST"])
    async def enrol(self, request: IRequest) -> bytes:
        """An agent with a join secret enrols: ``{"agent_id", "url", "labels"}`` -> its
        credential."""
        body = read_json(request)
        if not isinstance(body, dict):
            raise BAD_REQUEST("the request body must be a JSON object")
        try:
            agent_id = protocol.parse_uuid(body.get("agent_id"), "agent_id")
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        url = body.get("url")
        if (
            not isinstance(url, str)
            or not url.startswith(("http://", "https://"))
            or len(url) > 2000
            or any(c.isspace() for c in url)
        ):
            raise BAD_REQUEST("'url' must be the agent's base URL, like http://host:8081")
        try:
            protocol.utf8_of(url, "url")
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        url = url.rstrip("/")
        try:
            labels = parse_labels(body.get("labels"))
        except InvalidMessage as e:
            raise BAD_REQUEST(str(e)) from None
        principal = principal_of(request)
        credential = new_token(AGENT_PREFIX)
        audit = self._audit(request, principal, "agent.enrolled", str(agent_id), url=url)
        try:
            record = await self._store.enrol_agent(
                agent_id, url, hash_token(credential), self._now(), audit, labels
            )
        except AgentConflict as e:
            self.log.warn(
                "refused to enrol agent {agent_id} at {url} ({peer}): {error}",
                agent_id=str(agent_id),
                url=url,
                peer=peer_address(request),
                error=e.message,
            )
            raise AGENT_CONFLICTS[e.code]() from None
        self.log.info(
            "enrolled agent {agent_id} at {url} with join secret {name}",
            agent_id=str(agent_id),
            url=url,
            name=principal.name,
        )
        self._on_agent_enrolled(record)
        self.warn_if_outside(record, await self._store.is_fleet_member(url), "enrolment")
        return json_response(
            request,
            {
                "agent_id": str(agent_id),
                "credential": credential,
                "server_public_key": self._server_public_key,
            },
            http.CREATED,
        )

    @routes.route("/api/v1/agents", methods=["GET"])
    async def list_agents(self, request: IRequest) -> bytes:
        """Every enrolled agent, with its state and its start lateness over the fleet's
        newest scheduled executions (:mod:`taskscheduler.server.lateness`)."""
        agents = await self._store.list_agents()
        fleet = await self._fleet_urls()
        lateness = lateness_by_agent(await self._store.recent_start_lateness(LATENESS_EXECUTIONS))
        views = []
        for agent in agents:
            view = self.agent_view(agent, fleet)
            late = lateness.get(agent.agent_id)
            view["start_lateness"] = None if late is None else late.to_json()
            views.append(view)
        return json_response(request, {"agents": views})

    @routes.route("/api/v1/agents/<agent_id>", methods=["DELETE"])
    async def revoke_agent(self, request: IRequest, agent_id: str) -> bytes:
        """Revoke an agent's credential: its next request is refused."""
        try:
            parsed = protocol.parse_uuid(agent_id, "agent_id")
        except InvalidMessage as e:
            raise INVALID_AGENT_ID(str(e)) from None
        principal = principal_of(request)
        audit = self._audit(request, principal, "agent.revoked", str(parsed))
        record = await self._store.revoke_agent(parsed, self._now(), audit)
        self._access.forget_agents()
        self._metrics.forget_agent(parsed)
        if record is None:
            raise UNKNOWN_LIVE_AGENT()
        self.log.info(
            "{actor} revoked agent {agent_id} at {url}; telling it to drop its tasks",
            actor=principal.actor,
            agent_id=str(parsed),
            url=record.url,
        )
        self._on_agent_revoked(record)
        self._on_fleet_changed()
        return json_response(request, self.agent_view(record, await self._fleet_urls()))

    @routes.route("/api/v1/agents/<agent_id>/release-url", methods=["POST"])
    async def release_agent_url(self, request: IRequest, agent_id: str) -> bytes:
        """Let a new agent enrol at the URL of a revoked one: an operator's decision, audited.

        Until then a join secret cannot enrol there (409 ``url_revoked``), so that whoever
        holds it cannot take the revoked agent's place and have its results stored.
        """
        try:
            parsed = protocol.parse_uuid(agent_id, "agent_id")
        except InvalidMessage as e:
            raise INVALID_AGENT_ID(str(e)) from None
        principal = principal_of(request)
        audit = self._audit(request, principal, "agent.url_released", str(parsed))
        try:
            record = await self._store.release_agent_url(parsed, self._now(), audit)
        except AgentConflict as e:
            raise AGENT_CONFLICTS[e.code]() from None
        if record is None:
            raise UNKNOWN_AGENT()
        self.log.info(
            "{actor} released the URL {url} of revoked agent {agent_id}",
            actor=principal.actor,
            agent_id=str(parsed),
            url=record.url,
        )
        # The agent as every agent route shows it: with its state.
        return json_response(request, self.agent_view(record, await self._fleet_urls()))
