"""The agent accepts instructions only from its server: the route sweep, signatures,
audience, freshness and replay; and enrolment against the real server API."""

from __future__ import annotations

import json
import stat
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from taskscheduler.agent.api import AgentAPI
from taskscheduler.agent.identity import load_credential, load_server_key
from taskscheduler.agent.service import AgentConfig, AgentService
from taskscheduler.auth import JOIN_PREFIX, TokenFile, hash_token, new_token
from taskscheduler.protocol import task_spec_to_json
from taskscheduler.schedule import format_instant
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.signing import InstructionSigner, NonceCache, public_key_text
from taskscheduler.web.gate import Access
from tests.unit.agent_fakes import (
    ANCHOR,
    ANCHOR_SECONDS,
    SERVER,
    Agent,
    FakeRunner,
    FakeServer,
    spec,
)
from tests.unit.route_sweep import METHODS, PUBLIC, concrete, disguises, fixed_routes, routes

URL = "http://agent.test:8081"


@pytest.fixture
def agent(tmp_path: Path) -> Agent:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    return Agent(tmp_path / "data", clock, FakeServer())


def task_body() -> bytes:
    return json.dumps(
        {
            "task_id": str(uuid.uuid4()),
            "command": "echo hi",
            "frequency": "every 10 seconds",
            "anchor": format_instant(ANCHOR),
        }
    ).encode()


async def send(agent: Agent, method: str, path: str, body: bytes, authorization: str | None) -> Any:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    api: Any = agent.api
    response = await api.request(method, URL + path, data=body or None, headers=headers)
    raw = await api.content(response)
    return response.code, (json.loads(raw) if raw else None), response.headers


def agent_id(agent: Agent) -> uuid.UUID:
    return uuid.UUID((agent.service.config.data_dir / "agent_id").read_text().strip())


def test_every_agent_route_is_classified() -> None:
    endpoints = {endpoint for _, _, endpoint in routes(AgentAPI.app)}
    assert endpoints <= set(AgentAPI.ACCESS), endpoints - set(AgentAPI.ACCESS)
    public = {
        (method, rule)
        for method, rule, endpoint in routes(AgentAPI.app)
        if AgentAPI.ACCESS[endpoint] is Access.PUBLIC
    }
    assert public <= PUBLIC


@pytest_twisted.ensureDeferred
async def test_route_sweep_refuses_unsigned_forged_stale_and_replayed(agent: Agent) -> None:
    impostor = InstructionSigner(Ed25519PrivateKey.generate(), agent.clock)
    me = agent_id(agent)
    # A task the agent runs, for the routes about one task that must find it.
    known = task_body()
    signed = agent.signer.authorization("POST", "/api/v1/tasks/schedule", me, known)
    assert (await send(agent, "POST", "/api/v1/tasks/schedule", known, signed))[0] == 200
    known_id = json.loads(known)["task_id"]
    swept = 0
    for method, rule, endpoint in routes(AgentAPI.app):
        if endpoint == "metrics":
            # Not an instruction: read with a bearer token of its own, never with the
            # server's signature (tests/unit/test_agent_metrics.py sweeps its credentials).
            continue
        path = concrete(rule)
        body = task_body() if method == "POST" else b""
        accepted = 200
        if endpoint == "run_now":
            path = rule.replace("<task_id>", known_id)
            now = format_instant(ANCHOR + timedelta(seconds=5))
            body = json.dumps({"scheduled_at": now, "revision": 1}).encode()
            accepted = 202
        if rule == "/api/v1/agent/leave":
            body = b'{"reason": "removed"}'
        if (method, rule) in PUBLIC:
            code, answer, _ = await send(agent, method, path, b"", None)
            assert code == 200
            continue
        stale_clock = Clock()
        stale_clock.advance(agent.clock.seconds() - 120)
        stale = InstructionSigner(agent.signer._key, stale_clock)
        valid = agent.signer.authorization(method, path, me, body)
        cases = {
            "missing": None,
            "bearer": "Bearer tso_" + "x" * 43,
            "forged": impostor.authorization(method, path, me, body),
            "stale": stale.authorization(method, path, me, body),
            "garbled": valid[:-4] + "AAAA",
        }
        for label, authorization in cases.items():
            code, answer, headers = await send(agent, method, path, body, authorization)
            assert code == 401, f"{method} {rule} {label}: {code} {answer}"
            assert headers.getRawHeaders("WWW-Authenticate") == [
                'TS-Ed25519 realm="taskscheduler-agent"'
            ]
        if rule == "/api/v1/agent/leave":
            # Only the valid instructions ran so far; no refused leave dropped anything.
            assert len(agent.service.scheduler.tasks) == 2  # type: ignore[union-attr]
            assert agent.service.api.membership.state == "member"  # type: ignore[union-attr]
        code, _, _ = await send(agent, method, path, body, valid)
        assert code == accepted, (method, rule)
        code, answer, _ = await send(agent, method, path, body, valid)
        assert code == 401, (method, rule)
        assert method == "HEAD" or "replay" in answer["error"]["message"]
        swept += 1
    assert swept >= 4
    # The valid leave (swept after the others) dropped every task; one manual run ran.
    assert len(agent.service.scheduler.tasks) == 0  # type: ignore[union-attr]
    assert agent.service.api.membership.state == "removed"  # type: ignore[union-attr]
    assert [run.command for run in agent.runner.runs] == ["echo hi"], "one manual run only"


@pytest_twisted.ensureDeferred
async def test_an_encoded_path_is_checked_as_the_route_it_reaches(agent: Agent) -> None:
    """``POST /api/v1/tasks%2Fschedule`` reaches the schedule route once twisted.web has
    decoded it: unsigned, it must be refused like the plain path, not run a command."""
    tried = 0
    for method, rule, _ in routes(AgentAPI.app):
        if (method, rule) in PUBLIC:
            continue
        for path in disguises(concrete(rule)):
            body = task_body() if method == "POST" else b""
            code, answer, _ = await send(agent, method, path, body, None)
            assert code == 401, f"{method} {path}: {code} {answer}"
            tried += 1
    assert tried >= 10
    assert agent.service.scheduler.tasks == {}  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_wrong_method_on_a_fixed_route_is_405_with_allow(agent: Agent) -> None:
    tried = 0
    for path, allowed in fixed_routes(AgentAPI.app).items():
        for method in set(METHODS) - allowed:
            code, answer, headers = await send(agent, method, path, b"", None)
            assert code == 405, (method, path, answer)
            assert headers.getRawHeaders("Allow") == [", ".join(sorted(allowed))]
            tried += 1
    assert tried >= 10


@pytest_twisted.ensureDeferred
async def test_an_instruction_is_bound_to_its_audience_path_and_body(agent: Agent) -> None:
    me = agent_id(agent)
    body = task_body()
    path = "/api/v1/tasks/schedule"
    another = agent.signer.authorization("POST", path, uuid.uuid4(), body)
    code, answer, _ = await send(agent, "POST", path, body, another)
    assert code == 401 and "another agent" in answer["error"]["message"]
    for_listing = agent.signer.authorization("GET", "/api/v1/agent/tasks", me, b"")
    code, _, _ = await send(agent, "POST", path, body, for_listing)
    assert code == 401
    signed = agent.signer.authorization("POST", path, me, body)
    tampered = body.replace(b"echo hi", b"rm -rf ~")
    code, _, _ = await send(agent, "POST", path, tampered, signed)
    assert code == 401
    assert agent.service.scheduler.tasks == {}  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_an_instruction_captured_before_a_restart_is_refused_after_it(
    tmp_path: Path,
) -> None:
    """Finding 7 of issue 8: a new agent over the same data folder, well within the
    minute a timestamp is accepted, refuses the replay of an instruction it was sent."""
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    first = Agent(tmp_path / "data", clock, FakeServer())
    me = agent_id(first)
    path = "/api/v1/tasks/schedule"
    body = task_body()
    captured = first.signer.authorization("POST", path, me, body)
    code, _, _ = await send(first, "POST", path, body, captured)
    assert code == 200
    unschedule = f"/api/v1/tasks/{json.loads(body)['task_id']}"
    removal = first.signer.authorization("DELETE", unschedule, me, b"")
    code, _, _ = await send(first, "DELETE", unschedule, b"", removal)
    assert code == 200
    await first.stop()
    clock.advance(2)
    second = Agent(tmp_path / "data", clock, FakeServer())
    assert second.service.scheduler.tasks == {}  # type: ignore[union-attr]
    code, answer, _ = await send(second, "POST", path, body, captured)
    assert code == 401 and "before this agent started" in answer["error"]["message"]
    assert second.service.scheduler.tasks == {}, "the deleted task came back"  # type: ignore[union-attr]
    fresh = second.signer.authorization("POST", path, me, body)
    code, _, _ = await send(second, "POST", path, body, fresh)
    assert code == 200


def test_the_nonce_cache_is_bounded_and_forgets_only_expired_nonces() -> None:
    cache = NonceCache(capacity=2)
    assert cache.add("a", expires_at=100, now=0)
    assert not cache.add("a", expires_at=100, now=1), "a replay"
    assert cache.add("b", expires_at=100, now=1)
    assert not cache.add("c", expires_at=100, now=2), "full of live nonces: refuse"
    assert cache.add("c", expires_at=200, now=101), "a and b expired"
    assert len(cache) == 1


@pytest_twisted.ensureDeferred
async def test_an_unenrolled_agent_refuses_every_instruction(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS)
    service = AgentService(
        AgentConfig(tmp_path / "data", SERVER, join_secret=new_token(JOIN_PREFIX)),
        clock,
        lambda: FakeRunner(clock),
        StubTreq(FakeServer().app.resource()),  # has no enrolment route: enrolment fails
    )
    service.startService()
    assert service.api is not None
    api = StubTreq(service.api.resource())
    signer = InstructionSigner(Ed25519PrivateKey.generate(), clock)
    me = uuid.UUID((tmp_path / "data" / "agent_id").read_text().strip())
    response = await api.get(
        URL + "/api/v1/agent/tasks",
        headers={"Authorization": signer.authorization("GET", "/api/v1/agent/tasks", me, b"")},
    )
    assert response.code == 401
    health = json.loads(await (await api.get(URL + "/api/v1/health")).content())
    assert health["enrolled"] is False
    await service.stopService()


def test_an_agent_with_neither_credential_nor_join_secret_refuses_to_start(
    tmp_path: Path,
) -> None:
    clock = Clock()
    fatal: list[str] = []
    service = AgentService(
        AgentConfig(tmp_path / "data", SERVER),
        clock,
        lambda: FakeRunner(clock),
        StubTreq(FakeServer().app.resource()),
        on_fatal=fatal.append,
    )
    service.startService()
    # The one-line reason the daemon prints on stderr before it exits 1.
    assert len(fatal) == 1 and "no join secret is given" in fatal[0]
    assert service.api is None


@pytest_twisted.ensureDeferred
async def test_an_agent_enrols_with_the_real_server_api_then_reports_with_its_credential(
    tmp_path: Path,
) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS)
    join = new_token(JOIN_PREFIX)
    store = MemoryStore()
    agent_url = "http://127.0.0.1:8081"
    await store.set_fleet([agent_url])
    server_key = Ed25519PrivateKey.generate()
    access = ServerAccess(store, clock, None, TokenFile.from_env_value(f"fleet {hash_token(join)}"))
    api = ServerAPI(
        store, clock, access, server_public_key=public_key_text(server_key.public_key())
    )
    server = StubTreq(api.resource())
    data = tmp_path / "data"
    runner = FakeRunner(clock)
    service = AgentService(
        AgentConfig(data, SERVER, advertise_url=agent_url, join_secret=join),
        clock,
        lambda: runner,
        server,
        jitter=lambda: 1.0,
    )
    service.startService()
    for _ in range(5):
        clock.advance(0)
        server.flush()
    credential = load_credential(data)
    assert credential is not None
    assert stat.S_IMODE((data / "credential").stat().st_mode) == 0o600
    pinned = load_server_key(data)
    assert pinned is not None and public_key_text(pinned) == public_key_text(
        server_key.public_key()
    )
    record = await store.agent_for_url(agent_url)
    me = uuid.UUID((data / "agent_id").read_text().strip())
    assert record is not None and record.agent_id == me
    assert await store.agent_by_credential(hash_token(credential)) == record
    assert join not in (data / "credential").read_text()
    # The server's signed instruction is accepted, and the result comes back credentialed.
    assert service.api is not None
    agent_api = StubTreq(service.api.resource())
    task = await store.create_task(spec(), ANCHOR)
    body = json.dumps(task_spec_to_json(task.spec)).encode()
    signer = InstructionSigner(server_key, clock)
    response = await agent_api.post(
        URL + "/api/v1/tasks/schedule",
        data=body,
        headers={
            "Content-Type": "application/json",
            "Authorization": signer.authorization("POST", "/api/v1/tasks/schedule", me, body),
        },
    )
    assert response.code == 200, await response.content()
    clock.advance(ANCHOR_SECONDS + 10 - clock.seconds())
    [run] = runner.runs
    runner.finish(run)
    for _ in range(5):
        clock.advance(0)
        server.flush()
    [execution] = await store.list_executions(task.task_id, 10)
    assert [r.agent_id for r in execution.results] == [me]
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_agent_with_a_wrong_join_secret_is_told_its_join_secret_was_refused(
    tmp_path: Path,
) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS)
    store = MemoryStore()
    known = TokenFile.from_env_value(f"fleet {hash_token(new_token(JOIN_PREFIX))}")
    api = ServerAPI(store, clock, ServerAccess(store, clock, None, known))
    server = StubTreq(api.resource())
    data = tmp_path / "data"
    service = AgentService(
        AgentConfig(data, SERVER, join_secret=new_token(JOIN_PREFIX)),
        clock,
        lambda: FakeRunner(clock),
        server,
        jitter=lambda: 1.0,
    )
    with capturedLogs() as events:
        service.startService()
        for _ in range(5):
            clock.advance(0)
            server.flush()
    refused = [formatEvent(e) for e in events if "join secret refused" in formatEvent(e)]
    assert refused, [formatEvent(e) for e in events]
    assert all(e["log_level"] is LogLevel.error for e in events if formatEvent(e) in refused)
    assert "--join-secret-file" in refused[0]
    assert not any("unknown or revoked" in formatEvent(e) for e in events)
    assert load_credential(data) is None
    await service.stopService()


@pytest_twisted.ensureDeferred
async def test_an_agent_pinned_to_another_key_keeps_nothing_from_enrolment(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS)
    join = new_token(JOIN_PREFIX)
    store = MemoryStore()
    access = ServerAccess(store, clock, None, TokenFile.from_env_value(f"fleet {hash_token(join)}"))
    served_key = Ed25519PrivateKey.generate().public_key()
    api = ServerAPI(store, clock, access, server_public_key=public_key_text(served_key))
    server = StubTreq(api.resource())
    pinned = tmp_path / "server.pub"
    pinned.write_text(public_key_text(Ed25519PrivateKey.generate().public_key()))
    data = tmp_path / "data"
    service = AgentService(
        AgentConfig(data, SERVER, join_secret=join, server_public_key_file=pinned),
        clock,
        lambda: FakeRunner(clock),
        server,
    )
    service.startService()
    for _ in range(5):
        clock.advance(0)
        server.flush()
    assert load_credential(data) is None
    assert load_server_key(data) is None
    assert service.reporter is not None and service.reporter.client.credential is None
    await service.stopService()
