"""Who is calling the server: operators, enrolled agents, agents enrolling.

Every request for a non-public route carries ``Authorization: Bearer <token>``:

- an operator's API token (``tso_``), from the tokens file or variable, for operator
  routes; without operator tokens, on loopback only, operator routes are open (the
  playground);
- an enrolled agent's credential (``tsa_``), looked up by its hash in the ``agents``
  table, for the routes agents call; a revoked credential is refused at once, by every
  replica of the server;
- a join secret (``tsj_``), for enrolment only.

A missing or unknown credential is 401 with a ``WWW-Authenticate`` challenge; a valid
credential of the wrong kind is 403.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from taskscheduler.auth import AGENT_PREFIX, TokenFile, bearer_token, hash_token, parse_bearer
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AgentRecord, StoreUnavailable
from taskscheduler.web.errors import DATABASE_UNAVAILABLE, FORBIDDEN, ApiError, unauthorized
from taskscheduler.web.gate import Access

CHALLENGE = b'Bearer realm="taskscheduler"'
CHALLENGE_INVALID = b'Bearer realm="taskscheduler", error="invalid_token"'
#: Seconds an agent credential's lookup is reused. A revocation or an enrolment through
#: any replica clears the cache of every replica at once (this one's in the route, the
#: others' when their change bus hears of it: :mod:`taskscheduler.server.cache_sync`),
#: and so does a resync; the delay only matters for a change made in the database by hand.
AGENT_CACHE_SECONDS = 5.0
_PRINCIPAL_ATTRIBUTE = "_taskscheduler_principal"


@dataclass(frozen=True)
class Principal:
    """Who made a request: ``kind`` is operator, agent or join; ``name`` the token's name,
    the agent's id or the join secret's name."""

    kind: str
    name: str
    agent: AgentRecord | None = None

    @property
    def actor(self) -> str:
        return f"{self.kind}:{self.name}"


#: The principal of operator requests on a loopback server without operator tokens.
LOCAL_ANONYMOUS = Principal("operator", "anonymous-local")


def principal_of(request: IRequest) -> Principal:
    """The principal :class:`ServerAccess` established for this request."""
    principal = getattr(request, _PRINCIPAL_ATTRIBUTE, None)
    if not isinstance(principal, Principal):
        raise RuntimeError("no principal: the request did not go through the access gate")
    return principal


class ServerAccess:
    """Authenticates requests for :class:`taskscheduler.web.gate.AuthGate`."""

    log = Logger()

    def __init__(
        self,
        store: Store,
        clock: IReactorTime,
        operator_tokens: TokenFile | None,
        join_secrets: TokenFile | None,
        *,
        open_operator_routes: bool = False,
    ) -> None:
        self._store = store
        self._clock = clock
        self._operators = operator_tokens
        self._joins = join_secrets
        self._open = open_operator_routes
        self._agents: dict[str, tuple[AgentRecord | None, float]] = {}

    def forget_agents(self) -> None:
        """Drop cached agent lookups: an agent was revoked or enrolled, through this
        replica or another, or the other replicas' changes may have been missed."""
        self._agents.clear()

    async def _agent(self, token: str) -> AgentRecord | None:
        if not token.startswith(AGENT_PREFIX):
            return None  # never a database round trip for garbage
        key = hash_token(token)
        now = self._clock.seconds()
        cached = self._agents.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        record = await self._store.agent_by_credential(key)
        if len(self._agents) > 10_000:
            self._agents.clear()
        self._agents[key] = (record, now + AGENT_CACHE_SECONDS)
        return record

    async def _identify(self, token: str) -> Principal | None:
        if self._operators is not None:
            name = self._operators.authenticate_token(token)
            if name is not None:
                return Principal("operator", name)
        if self._joins is not None:
            name = self._joins.authenticate_token(token)
            if name is not None:
                return Principal("join", name)
        agent = await self._agent(token)
        if agent is not None and not agent.revoked:
            return Principal("agent", str(agent.agent_id), agent)
        return None

    def check_headers(self, headers: Any, level: Access) -> ApiError | None:
        """What the request's headers alone decide, before its body is read.

        A missing or malformed credential is refused, and so is an operator or join token
        this server does not hold or one of the wrong kind (both are known without the
        database). An agent credential needs the database: it lets the body in, and
        :meth:`authorize` decides once it is read (its size and time bounded by the site).
        The answers are those :meth:`authorize` would give.
        """
        if level not in _KIND:
            return None
        values = headers.getRawHeaders(b"authorization")
        if not values:
            if level is Access.OPERATOR and self._open:
                return None
            return unauthorized(_WANTED[level], CHALLENGE)
        token = parse_bearer(values[0]) if len(values) == 1 else None
        if token is None:
            return unauthorized(
                "the Authorization header is not 'Bearer <token>'", CHALLENGE_INVALID
            )
        kind = None
        if self._operators is not None and self._operators.authenticate_token(token) is not None:
            kind = "operator"
        elif self._joins is not None and self._joins.authenticate_token(token) is not None:
            kind = "join"
        elif token.startswith(AGENT_PREFIX):
            return None  # known, revoked or unknown: the database says, after the body
        if kind is None:
            return unauthorized(self._refusal(level), CHALLENGE_INVALID)
        if kind != _KIND[level]:
            return FORBIDDEN(f"this {kind} credential cannot call this route ({_WANTED[level]})")
        return None

    async def authorize(self, request: IRequest, level: Access) -> None:
        """Establish the request's principal for a route of ``level``, or raise ApiError."""
        try:
            await self._authorize(request, level)
        except StoreUnavailable as e:
            self.log.warn("database unavailable checking a credential: {error}", error=str(e))
            raise DATABASE_UNAVAILABLE() from None

    async def _authorize(self, request: IRequest, level: Access) -> None:
        token = bearer_token(request)
        sent_something = request.requestHeaders.hasHeader(b"authorization")
        if token is None:
            if sent_something:
                raise unauthorized(
                    "the Authorization header is not 'Bearer <token>'", CHALLENGE_INVALID
                )
            if level is Access.OPERATOR and self._open:
                setattr(request, _PRINCIPAL_ATTRIBUTE, LOCAL_ANONYMOUS)
                return
            raise unauthorized(_WANTED[level], CHALLENGE)
        principal = await self._identify(token)
        if principal is None:
            raise unauthorized(self._refusal(level), CHALLENGE_INVALID)
        if principal.kind != _KIND[level]:
            raise FORBIDDEN(
                f"this {principal.kind} credential cannot call this route ({_WANTED[level]})"
            )
        setattr(request, _PRINCIPAL_ATTRIBUTE, principal)

    def _refusal(self, level: Access) -> str:
        """Why a credential nobody knows is refused, in the words of the route's kind."""
        if level is not Access.JOIN:
            return "the credential is unknown or revoked"
        if self._joins is None or len(self._joins) == 0:
            return "join secret refused: this server has no join secrets configured"
        return "join secret refused: it is not one of this server's join secrets (or was revoked)"


_KIND = {Access.OPERATOR: "operator", Access.AGENT: "agent", Access.JOIN: "join"}
_WANTED = {
    Access.OPERATOR: "this route needs an operator's API token: Authorization: Bearer tso_...",
    Access.AGENT: "this route needs an enrolled agent's credential",
    Access.JOIN: "enrolment needs a join secret: Authorization: Bearer tsj_...",
}
