"""The server's access control: the route sweep, privileges, impersonation, enrolment,
revocation and the audit log (StubTreq over the real Klein resource behind its gate)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.task import Clock

from taskscheduler.auth import (
    AGENT_PREFIX,
    JOIN_PREFIX,
    OPERATOR_PREFIX,
    TokenFile,
    hash_token,
    new_token,
)
from taskscheduler.protocol import result_to_json
from taskscheduler.schedule import utc_now_from
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.records import AuditEvent, StoreUnavailable
from taskscheduler.web.gate import Access, AuthGate
from tests.unit.route_sweep import PUBLIC, concrete, disguises, routes
from tests.unit.test_server_api import (
    AGENT_A,
    AGENT_B,
    AGENTS,
    CREDENTIALS,
    JSON,
    OPERATOR,
    START,
    Harness,
    enrol_test_agents,
)

JOIN = new_token(JOIN_PREFIX)
REVOKED_OPERATOR = new_token(OPERATOR_PREFIX)
REVOKED_JOIN = new_token(JOIN_PREFIX)
REVOKED_AGENT_ID = uuid.UUID("cccccccc-0000-4000-8000-000000000003")
REVOKED_AGENT = new_token(AGENT_PREFIX)
ALL_SECRETS = [OPERATOR, JOIN, REVOKED_OPERATOR, REVOKED_JOIN, REVOKED_AGENT, *CREDENTIALS.values()]


class Server:
    """A server API whose tokens live in files, so that tokens can be revoked."""

    def __init__(self, folder: Path, open_operator_routes: bool = False) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = MemoryStore()
        self.tokens_file = folder / "tokens"
        self.joins_file = folder / "joins"
        self.tokens_file.write_text(
            f"alice {hash_token(OPERATOR)}\nbob {hash_token(REVOKED_OPERATOR)}\n"
        )
        self.joins_file.write_text(f"fleet {hash_token(JOIN)}\nold {hash_token(REVOKED_JOIN)}\n")
        tokens = (
            None if open_operator_routes else TokenFile.from_path(str(self.tokens_file), self.clock)
        )
        joins = TokenFile.from_path(str(self.joins_file), self.clock)
        self.access = ServerAccess(
            self.store, self.clock, tokens, joins, open_operator_routes=open_operator_routes
        )
        self.enrolled: list[Any] = []
        self.api = ServerAPI(
            self.store,
            self.clock,
            self.access,
            server_public_key="ed25519:test",
            on_agent_enrolled=self.enrolled.append,
        )
        self.http = StubTreq(self.api.resource())

    async def setup(self) -> None:
        await self.store.set_fleet(AGENTS)
        await enrol_test_agents(self.store)
        now = utc_now_from(START)
        await self.store.enrol_agent(
            REVOKED_AGENT_ID,
            "http://agent-c:8081",
            hash_token(REVOKED_AGENT),
            now,
            AuditEvent(now, "join:test", "agent.enrolled", str(REVOKED_AGENT_ID), ""),
        )
        code, _, _ = await self.call("DELETE", f"/api/v1/agents/{REVOKED_AGENT_ID}", token=OPERATOR)
        assert code == 200
        # Revoke bob's operator token and the old join secret by deleting their lines.
        self.tokens_file.write_text(f"alice {hash_token(OPERATOR)}\n")
        self.joins_file.write_text(f"fleet {hash_token(JOIN)}\n")
        self.clock.advance(2)

    async def call(
        self, method: str, path: str, body: Any = None, token: str | None = None
    ) -> tuple[int, Any, Any]:
        headers = dict(JSON)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = None if body is None else json.dumps(body).encode()
        response = await self.http.request(
            method, "http://server" + path, data=data, headers=headers
        )
        raw = await response.content()
        if response.headers.getRawHeaders("Content-Type") != ["application/json"]:
            return response.code, raw, response.headers  # the dashboard's files
        return response.code, (json.loads(raw) if raw else None), response.headers


@pytest_twisted.async_fixture
async def server(tmp_path: Path) -> Server:
    s = Server(tmp_path)
    await s.setup()
    return s


def test_every_route_is_classified() -> None:
    endpoints = {endpoint for _, _, endpoint in routes(ServerAPI.app)}
    unclassified = endpoints - set(ServerAPI.ACCESS)
    assert not unclassified, f"classify these routes in ServerAPI.ACCESS: {unclassified}"
    public = {
        (method, rule)
        for method, rule, endpoint in routes(ServerAPI.app)
        if ServerAPI.ACCESS[endpoint] is Access.PUBLIC
    }
    assert public <= PUBLIC, f"public routes beyond the allowlist: {public - PUBLIC}"


@pytest_twisted.ensureDeferred
async def test_route_sweep_refuses_missing_wrong_and_revoked_credentials(server: Server) -> None:
    kind_of = {
        Access.OPERATOR: (OPERATOR, REVOKED_OPERATOR),
        Access.AGENT: (CREDENTIALS[AGENT_A], REVOKED_AGENT),
        Access.JOIN: (JOIN, REVOKED_JOIN),
    }
    swept = 0
    for method, rule, endpoint in routes(ServerAPI.app):
        path = concrete(rule)
        level = ServerAPI.ACCESS[endpoint]
        if (method, rule) in PUBLIC:
            code, _, _ = await server.call(method, path)
            assert code == 200, (method, rule)
            continue
        _, revoked = kind_of[level]
        wrong = new_token(AGENT_PREFIX if level is Access.AGENT else OPERATOR_PREFIX)
        for label, token in [("missing", None), ("wrong", wrong), ("revoked", revoked)]:
            code, body, headers = await server.call(method, path, {}, token=token)
            assert code == 401, f"{method} {rule} with a {label} credential: {code} {body}"
            assert headers.getRawHeaders("WWW-Authenticate"), (method, rule)
            if method != "HEAD":
                assert body["error"]["code"] == "unauthorized"
        swept += 1
    assert swept >= 10


@pytest_twisted.ensureDeferred
async def test_an_encoded_path_is_checked_as_the_route_it_reaches(server: Server) -> None:
    """twisted.web decodes ``%2F`` and ``%61`` in a path before Klein routes it: the gate
    must decide on that same path, or ``GET /api%2Fv1/agents`` lists the fleet to anyone."""
    tried = 0
    for method, rule, _ in routes(ServerAPI.app):
        if (method, rule) in PUBLIC:
            continue
        for path in disguises(concrete(rule)):
            code, body, _ = await server.call(method, path, {"command": "id"})
            assert code == 401, f"{method} {path}: {code} {body}"
            tried += 1
    assert tried >= 50
    assert await server.store.undelivered_tasks(AGENTS[0], 10) == []


@pytest_twisted.ensureDeferred
async def test_a_valid_credential_of_the_wrong_kind_is_forbidden(server: Server) -> None:
    credentials = {
        "operator": OPERATOR,
        "agent": CREDENTIALS[AGENT_A],
        "join": JOIN,
    }
    for method, rule, endpoint in routes(ServerAPI.app):
        level = ServerAPI.ACCESS[endpoint]
        if level is Access.PUBLIC:
            continue
        for kind, token in credentials.items():
            if kind == level.value:
                continue
            code, body, _ = await server.call(method, concrete(rule), {}, token=token)
            assert code == 403, f"{kind} credential on {method} {rule}: {code} {body}"


@pytest_twisted.ensureDeferred
async def test_a_route_missing_from_the_access_table_is_refused() -> None:
    app = Klein()

    @app.route("/api/v1/forgotten", methods=["GET"])
    def forgotten(request: Any) -> bytes:
        return b"ran"

    async def allow(request: Any, level: Access) -> None:
        return None

    http = StubTreq(AuthGate(app.resource(), app.url_map, {}, allow))
    response = await http.get("http://server/api/v1/forgotten")
    assert response.code == 403
    body = json.loads(await response.content())
    assert body == {"error": {"code": "forbidden", "message": "this route is not open to anyone"}}


@pytest_twisted.ensureDeferred
async def test_an_access_check_that_fails_unexpectedly_is_a_500_that_tells_nothing() -> None:
    app = Klein()

    @app.route("/api/v1/guarded", methods=["GET"])
    def guarded(request: Any) -> bytes:
        return b"ran"

    async def broken(request: Any, level: Access) -> None:
        raise RuntimeError("secret detail")

    http = StubTreq(AuthGate(app.resource(), app.url_map, {"guarded": Access.OPERATOR}, broken))
    response = await http.get("http://server/api/v1/guarded")
    content = await response.content()
    assert response.code == 500 and b"secret" not in content and b"ran" not in content
    assert json.loads(content)["error"]["code"] == "internal_error"


@pytest_twisted.ensureDeferred
async def test_an_agent_cannot_report_as_another_agent(server: Server) -> None:
    harness = Harness(server.store)
    task_id = await harness.create()
    as_b = result_to_json(harness.result(task_id, AGENT_B, 1))
    code, body, _ = await server.call(
        "POST", f"/api/v1/tasks/{task_id}/complete", as_b, token=CREDENTIALS[AGENT_A]
    )
    assert (code, body["error"]["code"]) == (403, "impersonation")
    code, body, _ = await server.call(
        "POST", "/api/v1/results", {"results": [as_b]}, token=CREDENTIALS[AGENT_A]
    )
    assert (code, body["error"]["code"]) == (403, "impersonation")
    execution = await server.store.list_executions(uuid.UUID(task_id), 10)
    assert execution == [], "nothing was stored"
    # B itself may.
    code, _, _ = await server.call(
        "POST", f"/api/v1/tasks/{task_id}/complete", as_b, token=CREDENTIALS[AGENT_B]
    )
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_an_agent_cannot_report_for_a_task_not_assigned_to_it(server: Server) -> None:
    await server.store.set_fleet([AGENTS[1]])  # tasks now run on agent B only
    harness = Harness(server.store)
    task_id = await harness.create()
    mine = result_to_json(harness.result(task_id, AGENT_A, 1))
    code, body, _ = await server.call(
        "POST", f"/api/v1/tasks/{task_id}/complete", mine, token=CREDENTIALS[AGENT_A]
    )
    assert (code, body["error"]["code"]) == (403, "not_assigned")
    code, body, _ = await server.call(
        "POST", "/api/v1/results", {"results": [mine]}, token=CREDENTIALS[AGENT_A]
    )
    assert (code, body) == (200, {"results": [{"status": "forbidden"}]})
    assert await server.store.list_executions(uuid.UUID(task_id), 10) == []


@pytest_twisted.ensureDeferred
async def test_enrolment_issues_a_credential_once_per_identity(server: Server) -> None:
    new_id = str(uuid.uuid4())
    body = {"agent_id": new_id, "url": "http://agent-d:8081/"}
    code, answer, _ = await server.call("POST", "/api/v1/agents/enrol", body, token=JOIN)
    assert code == 201, answer
    credential = answer["credential"]
    assert credential.startswith(AGENT_PREFIX)
    assert answer["server_public_key"] == "ed25519:test"
    assert [a.url for a in server.enrolled] == ["http://agent-d:8081"]
    record = await server.store.agent_by_credential(hash_token(credential))
    assert record is not None and str(record.agent_id) == new_id
    # The join secret cannot take over an enrolled identity, nor a URL a live agent holds.
    code, answer, _ = await server.call("POST", "/api/v1/agents/enrol", body, token=JOIN)
    assert (code, answer["error"]["code"]) == (409, "agent_exists")
    assert "credential" not in answer
    taken = {"agent_id": str(uuid.uuid4()), "url": AGENTS[0]}
    code, answer, _ = await server.call("POST", "/api/v1/agents/enrol", taken, token=JOIN)
    assert (code, answer["error"]["code"]) == (409, "url_taken")
    for bad in [{"agent_id": "x", "url": "http://a:1"}, {"agent_id": new_id, "url": "ftp://a"}]:
        code, _, _ = await server.call("POST", "/api/v1/agents/enrol", bad, token=JOIN)
        assert code == 400


@pytest_twisted.ensureDeferred
async def test_a_wrong_join_secret_is_refused_as_a_join_secret(server: Server) -> None:
    body = {"agent_id": str(uuid.uuid4()), "url": "http://agent-d:8081"}
    for secret in (new_token(JOIN_PREFIX), REVOKED_JOIN):
        code, answer, headers = await server.call("POST", "/api/v1/agents/enrol", body, secret)
        assert code == 401 and headers.getRawHeaders("WWW-Authenticate")
        assert answer["error"]["code"] == "unauthorized"
        message = answer["error"]["message"]
        assert message.startswith("join secret refused"), message
        assert "credential" not in message
    # An unknown agent credential on an agent route is still told so.
    code, answer, _ = await server.call("POST", "/api/v1/results", {}, new_token(AGENT_PREFIX))
    assert (code, answer["error"]["message"]) == (401, "the credential is unknown or revoked")
    # A server with no join secrets at all (none given, or an empty list) says that.
    for joins in (None, TokenFile.from_env_value("")):
        store = MemoryStore()
        lone = ServerAPI(store, server.clock, ServerAccess(store, server.clock, None, joins))
        response = await StubTreq(lone.resource()).post(
            "http://server/api/v1/agents/enrol",
            data=json.dumps(body).encode(),
            headers={**JSON, "Authorization": f"Bearer {new_token(JOIN_PREFIX)}"},
        )
        answer = json.loads(await response.content())
        assert response.code == 401
        assert answer["error"]["message"] == (
            "join secret refused: this server has no join secrets configured"
        )


@pytest_twisted.ensureDeferred
async def test_a_revoked_agent_is_refused_on_its_next_request(server: Server) -> None:
    harness = Harness(server.store)
    task_id = await harness.create()
    result = result_to_json(harness.result(task_id, AGENT_A, 1))
    path = f"/api/v1/tasks/{task_id}/complete"
    code, _, _ = await server.call("POST", path, result, token=CREDENTIALS[AGENT_A])
    assert code == 200  # now cached by the access check
    code, body, _ = await server.call("DELETE", f"/api/v1/agents/{AGENT_A}", token=OPERATOR)
    assert code == 200 and body["revoked_at"] is not None
    code, _, _ = await server.call("POST", path, result, token=CREDENTIALS[AGENT_A])
    assert code == 401
    code, body, _ = await server.call("DELETE", f"/api/v1/agents/{AGENT_A}", token=OPERATOR)
    assert (code, body["error"]) == (
        404,
        {"code": "unknown_agent", "message": "no live agent has this id"},
    )
    code, body, _ = await server.call("DELETE", "/api/v1/agents/not-an-id", token=OPERATOR)
    assert (code, body["error"]["code"]) == (400, "invalid_agent_id")
    # Revoked agents stay revoked: the join secret cannot enrol the identity again.
    again = {"agent_id": str(AGENT_A), "url": AGENTS[0]}
    code, _, _ = await server.call("POST", "/api/v1/agents/enrol", again, token=JOIN)
    assert code == 409


@pytest_twisted.ensureDeferred
async def test_mutations_are_audited_with_who_what_and_where(server: Server) -> None:
    code, body, _ = await server.call(
        "POST",
        "/api/v1/tasks/create",
        {"command": "echo hi", "frequency": "every 5 seconds"},
        token=OPERATOR,
    )
    assert code == 201
    new_id = str(uuid.uuid4())
    await server.call(
        "POST", "/api/v1/agents/enrol", {"agent_id": new_id, "url": "http://d:1"}, token=JOIN
    )
    await server.call("DELETE", f"/api/v1/agents/{new_id}", token=OPERATOR)
    code, log, _ = await server.call("GET", "/api/v1/audit?limit=3", token=OPERATOR)
    assert code == 200
    assert [(e["action"], e["actor"], e["target"]) for e in log["events"]] == [
        ("agent.revoked", "operator:alice", new_id),
        ("agent.enrolled", "join:fleet", new_id),
        ("task.created", "operator:alice", body["command_id"]),
    ]
    assert all(e["peer"] and e["at"] for e in log["events"])
    code, older, _ = await server.call(
        "GET", f"/api/v1/audit?before={log['next_before']}", token=OPERATOR
    )
    assert code == 200 and older["events"][0]["action"] == "agent.revoked"  # the fixture's
    code, agents, _ = await server.call("GET", "/api/v1/agents", token=OPERATOR)
    text = json.dumps([log, older, agents])
    assert not any(secret in text for secret in ALL_SECRETS)
    assert "sha256:" not in text, "not even the hashes of credentials are shown"


@pytest_twisted.ensureDeferred
async def test_the_loopback_playground_opens_operator_routes_only(tmp_path: Path) -> None:
    server = Server(tmp_path, open_operator_routes=True)
    await server.store.set_fleet(AGENTS)
    await enrol_test_agents(server.store)
    code, body, _ = await server.call(
        "POST", "/api/v1/tasks/create", {"command": "echo hi", "frequency": "every 5 seconds"}
    )
    assert code == 201, body
    task_id = body["command_id"]
    code, _, _ = await server.call("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200
    # Agents' routes and enrolment still need their credentials; an agent is no operator.
    code, _, _ = await server.call("POST", f"/api/v1/tasks/{task_id}/complete", {})
    assert code == 401
    code, _, _ = await server.call("POST", "/api/v1/agents/enrol", {})
    assert code == 401
    code, _, _ = await server.call("GET", f"/api/v1/tasks/{task_id}", token=CREDENTIALS[AGENT_A])
    assert code == 403
    code, _, _ = await server.call("GET", f"/api/v1/tasks/{task_id}", token="garbage")
    assert code == 401
    code, log, _ = await server.call("GET", "/api/v1/audit")
    assert log["events"][0]["actor"] == "operator:anonymous-local"


@pytest.mark.parametrize(
    "header", ["Basic YWxpY2U6c2VjcmV0", "Bearer", "Bearer a b", "Bearer tso_\xe9", "Token abc"]
)
@pytest_twisted.ensureDeferred
async def test_malformed_authorization_headers_are_401(tmp_path: Path, header: str) -> None:
    server = Server(tmp_path)
    response = await server.http.get(
        "http://server/api/v1/tasks/" + str(uuid.uuid4()),
        headers={"Authorization": header.encode("latin-1")},
    )
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_a_database_outage_while_checking_a_credential_is_503(tmp_path: Path) -> None:
    server = Server(tmp_path)

    async def unavailable(credential_hash: str) -> None:
        raise StoreUnavailable("connection refused")

    server.store.agent_by_credential = unavailable  # type: ignore[method-assign,assignment]
    code, body, headers = await server.call(
        "POST", "/api/v1/results", {"results": []}, token=CREDENTIALS[AGENT_A]
    )
    assert (code, body["error"]["code"]) == (503, "database_unavailable")
    assert headers.getRawHeaders("Retry-After") == ["5"]


@pytest_twisted.ensureDeferred
async def test_a_join_secret_cannot_take_over_a_revoked_agents_url_until_an_operator_releases_it(
    server: Server,
) -> None:
    harness = Harness(server.store)
    task_id = await harness.create()
    code, _, _ = await server.call("DELETE", f"/api/v1/agents/{AGENT_A}", token=OPERATOR)
    assert code == 200
    # Whoever holds the join secret tries to enrol a fresh identity in A's place.
    usurper = {"agent_id": str(uuid.uuid4()), "url": AGENTS[0]}
    code, body, _ = await server.call("POST", "/api/v1/agents/enrol", usurper, token=JOIN)
    assert code == 409 and body["error"]["code"] == "url_revoked", body
    assert "release" in body["error"]["message"]
    assert await server.store.agent_for_url(AGENTS[0]) is None
    release = f"/api/v1/agents/{AGENT_A}/release-url"
    for token in (JOIN, CREDENTIALS[AGENT_B], None):
        code, _, _ = await server.call("POST", release, token=token)
        assert code in (401, 403), "only an operator releases a URL"
    code, body, _ = await server.call(
        "POST", f"/api/v1/agents/{AGENT_B}/release-url", token=OPERATOR
    )
    assert code == 409 and body["error"]["code"] == "agent_live"
    code, body, _ = await server.call(
        "POST", f"/api/v1/agents/{uuid.uuid4()}/release-url", token=OPERATOR
    )
    assert (code, body["error"]) == (
        404,
        {"code": "unknown_agent", "message": "no agent has this id"},
    )
    code, body, _ = await server.call("POST", "/api/v1/agents/x/release-url", token=OPERATOR)
    assert (code, body["error"]["code"]) == (400, "invalid_agent_id")
    code, body, _ = await server.call("POST", release, token=OPERATOR)
    assert code == 200 and body["url_released_at"] is not None and body["url"] == AGENTS[0]
    code, log, _ = await server.call("GET", "/api/v1/audit?limit=1", token=OPERATOR)
    assert [(e["action"], e["actor"], e["target"]) for e in log["events"]] == [
        ("agent.url_released", "operator:alice", str(AGENT_A))
    ]
    # Now a new agent may enrol there, and its results for the URL's tasks are stored.
    code, enrolled, _ = await server.call("POST", "/api/v1/agents/enrol", usurper, token=JOIN)
    assert code == 201, enrolled
    new_id = uuid.UUID(usurper["agent_id"])
    result = result_to_json(harness.result(task_id, new_id, 1))
    code, _, _ = await server.call(
        "POST", f"/api/v1/tasks/{task_id}/complete", result, token=enrolled["credential"]
    )
    assert code == 200


@pytest_twisted.ensureDeferred
async def test_an_enrolment_url_that_is_not_unicode_text_is_a_400(server: Server) -> None:
    body = {"agent_id": str(uuid.uuid4()), "url": "http://agent-\ud800:8081"}
    code, answer, _ = await server.call("POST", "/api/v1/agents/enrol", body, token=JOIN)
    assert (code, answer["error"]["code"]) == (400, "invalid_request")
    assert "'url' is not valid Unicode text" in answer["error"]["message"]
    assert server.enrolled == []
