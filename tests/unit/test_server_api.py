"""The server's REST API through StubTreq over the real Klein resource."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from taskscheduler import protocol
from taskscheduler.agent.options import DEFAULT_OUTPUT_CAP
from taskscheduler.auth import AGENT_PREFIX, OPERATOR_PREFIX, TokenFile, hash_token, new_token
from taskscheduler.protocol import Output, ResultStatus, RunResult, result_to_json
from taskscheduler.schedule import format_instant, instant, parse_instant, utc_now_from
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import DEFAULT_MAX_OUTPUT_BYTES, ServerAPI
from taskscheduler.server.retention import HistoryPruner
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.records import AuditEvent, CommitInDoubt, StoreUnavailable
from taskscheduler.web.guards import make_site
from tests.unit.agent_fakes import fired
from tests.unit.hostile import (
    digits,
    extreme_instants,
    has_surrogate,
    hostile_text,
    raw_json_values,
)
from tests.unit.route_sweep import METHODS, fixed_routes

AGENTS = ["http://agent-a:8081", "http://agent-b:8081"]
AGENT_A = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")
AGENT_B = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")
JSON = {"Content-Type": "application/json"}
START = 1_795_000_000.0
OPERATOR = new_token(OPERATOR_PREFIX)
CREDENTIALS = {AGENT_A: new_token(AGENT_PREFIX), AGENT_B: new_token(AGENT_PREFIX)}
AGENT_ROUTE_SUFFIXES = ("/complete", "/results")


def operator_tokens() -> TokenFile:
    return TokenFile.from_env_value(f"alice {hash_token(OPERATOR)}")


async def enrol_test_agents(store: MemoryStore) -> None:
    for (agent_id, credential), url in zip(CREDENTIALS.items(), AGENTS, strict=True):
        event = AuditEvent(utc_now_from(START), "join:test", "agent.enrolled", str(agent_id), "")
        await store.enrol_agent(agent_id, url, hash_token(credential), utc_now_from(START), event)


class Harness:
    def __init__(self, store: MemoryStore | None = None, **options: Any) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = MemoryStore() if store is None else store
        self.created: list[Any] = []
        self.deleted: list[Any] = []
        self.access = ServerAccess(self.store, self.clock, operator_tokens(), None)
        self.api = ServerAPI(
            self.store,
            self.clock,
            self.access,
            on_task_created=self.created.append,
            report_grace=timedelta(seconds=30),
            on_task_deleted=self.deleted.append,
            **options,
        )
        self.http = StubTreq(self.api.resource())

    def headers_for(self, path: str, agent: uuid.UUID = AGENT_A) -> dict[str, str]:
        """Operator routes get the operator's token; the agents' routes agent A's."""
        token = CREDENTIALS[agent] if path.endswith(AGENT_ROUTE_SUFFIXES) else OPERATOR
        return {**JSON, "Authorization": f"Bearer {token}"}

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = await self.http.request(
            method,
            "http://server" + path,
            data=data,
            headers=self.headers_for(path) if headers is None else headers,
        )
        content = await response.content()
        assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
        return response.code, json.loads(content)

    async def create(
        self, command: str = "echo hello world", frequency: str = "every 30 seconds"
    ) -> str:
        code, body = await self.request(
            "POST", "/api/v1/tasks/create", {"command": command, "frequency": frequency}
        )
        assert code == 201, body
        return body["command_id"]

    def result(
        self,
        task_id: str,
        agent: uuid.UUID,
        k: int,
        stdout: bytes = b"",
        stderr: bytes = b"",
        exit_code: int = 0,
    ) -> RunResult:
        anchor = utc_now_from(START)
        at = instant(anchor, timedelta(seconds=30), k)
        return RunResult(
            task_id=uuid.UUID(task_id),
            agent_id=agent,
            scheduled_at=at,
            status=ResultStatus.SUCCEEDED if exit_code == 0 else ResultStatus.FAILED,
            exit_code=exit_code,
            started_at=at,
            finished_at=at + timedelta(milliseconds=5),
            stdout=Output.of(stdout),
            stderr=Output.of(stderr),
        )

    async def report(self, result: RunResult) -> tuple[int, Any]:
        path = f"/api/v1/tasks/{result.task_id}/complete"
        return await self.request(
            "POST", path, result_to_json(result), headers=self.headers_for(path, result.agent_id)
        )


async def started(h: Harness) -> Harness:
    await h.store.start()
    await h.store.set_fleet(AGENTS)
    await enrol_test_agents(h.store)
    return h


@pytest_twisted.async_fixture
async def harness() -> Harness:
    return await started(Harness())


@pytest_twisted.ensureDeferred
async def test_create_returns_a_command_id_and_hands_the_task_to_dispatch(harness: Harness) -> None:
    task_id = await harness.create()
    assert uuid.UUID(task_id).version == 4
    [task] = harness.created
    assert str(task.task_id) == task_id
    code, body = await harness.request("GET", f"/api/v1/tasks/{task_id}")
    assert code == 200
    assert body["command"] == "echo hello world"
    assert body["frequency"] == "every 30 seconds"
    assert parse_instant(body["anchor"]) == utc_now_from(START)
    assert body["time_limit_seconds"] == 30
    assert await harness.store.assigned_task_ids(AGENTS[0]) == {uuid.UUID(task_id)}


@pytest_twisted.ensureDeferred
async def test_create_accepts_a_kind_frequency_and_a_time_limit(harness: Harness) -> None:
    code, body = await harness.request(
        "POST",
        "/api/v1/tasks/create",
        {"command": "backup", "frequency": "  Every 1 Hour ", "time_limit_seconds": 600},
    )
    assert code == 201
    code, task = await harness.request("GET", f"/api/v1/tasks/{body['command_id']}")
    assert (task["frequency"], task["time_limit_seconds"]) == ("every 1 hour", 600)


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"command": "ls"}, "'frequency' is"),
        ({"frequency": "every 5 seconds"}, "'command' is required"),
        ({"command": "", "frequency": "every 5 seconds"}, "'command' must be"),
        ({"command": "ls", "frequency": "every 0 seconds"}, "at least"),
        ({"command": "ls", "frequency": "every -5 seconds"}, "not of the form"),
        ({"command": "ls", "frequency": "every 1.5 minutes"}, "not of the form"),
        ({"command": "ls", "frequency": "every 5 days"}, "not of the form"),
        ({"command": "ls", "frequency": "every 99999999999 hours"}, "longer than a year"),
        ({"command": "ls", "frequency": 30}, "must be a string"),
        ({"command": ["ls"], "frequency": "every 5 seconds"}, "'command' must be"),
        ({"command": "ls", "frequency": "every 5 seconds", "time_limit_seconds": 0}, "from 1"),
        ([1, 2], "JSON object"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_create_rejects_bad_input_with_a_clear_400_and_stores_nothing(
    harness: Harness, body: Any, fragment: str
) -> None:
    code, error = await harness.request("POST", "/api/v1/tasks/create", body)
    assert code == 400
    assert fragment in error["error"]["message"]
    assert harness.created == []
    assert await harness.store.assigned_task_ids(AGENTS[0]) == set()


@pytest_twisted.ensureDeferred
async def test_malformed_bodies_and_wrong_content_types(harness: Harness) -> None:
    code, error = await harness.request("POST", "/api/v1/tasks/create", raw=b"{not json")
    assert (code, error["error"]["code"]) == (400, "invalid_json")
    code, error = await harness.request("POST", "/api/v1/tasks/create", raw=b"")
    assert (code, error["error"]["code"]) == (400, "invalid_json")
    code, error = await harness.request("POST", "/api/v1/tasks/create", raw=b"\xff\xfe")
    assert (code, error["error"]["code"]) == (400, "invalid_json")
    code, error = await harness.request(
        "POST",
        "/api/v1/tasks/create",
        raw=b"command=ls",
        headers={
            **harness.headers_for("/api/v1/tasks/create"),
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )
    assert (code, error["error"]["code"]) == (415, "unsupported_media_type")
    code, _ = await harness.request(
        "POST",
        "/api/v1/tasks/create",
        {"command": "ls", "frequency": "every 5 seconds"},
        headers={
            **harness.headers_for("/api/v1/tasks/create"),
            "Content-Type": "application/json; charset=utf-8",
        },
    )
    assert code == 201


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_methods_get_json_errors(harness: Harness) -> None:
    code, error = await harness.request("GET", "/api/v1/nothing-here")
    assert (code, error["error"]["code"]) == (404, "not_found")
    task_id = await harness.create()
    code, error = await harness.request("DELETE", f"/api/v1/tasks/{task_id}/latest_output")
    assert (code, error["error"]["code"]) == (405, "method_not_allowed")
    code, error = await harness.request("GET", f"/api/v1/tasks/{task_id}/complete")
    assert code == 405


@pytest_twisted.ensureDeferred
async def test_a_wrong_method_on_a_fixed_route_is_405_with_allow(harness: Harness) -> None:
    """``GET /api/v1/tasks/create`` is not ``GET /api/v1/tasks/<task_id>`` with the id
    "create"; nor is ``DELETE /api/v1/agents/enrol`` a revocation of agent "enrol"."""
    fixed = fixed_routes(ServerAPI.app)
    assert {"/api/v1/tasks/create", "/api/v1/agents/enrol", "/api/v1/results"} <= set(fixed)
    tried = 0
    for path, allowed in fixed.items():
        for method in set(METHODS) - allowed:
            response = await harness.http.request(
                method, "http://server" + path, headers=harness.headers_for(path)
            )
            content = await response.content()
            assert response.code == 405, (method, path, content)
            assert response.headers.getRawHeaders("Allow") == [", ".join(sorted(allowed))]
            if method != "HEAD":
                assert json.loads(content)["error"]["code"] == "method_not_allowed"
            tried += 1
    assert tried >= 20
    assert harness.created == [] and await harness.store.list_agents() != []


@pytest_twisted.ensureDeferred
async def test_latest_output_for_unknown_malformed_and_fresh_tasks(harness: Harness) -> None:
    code, error = await harness.request("GET", f"/api/v1/tasks/{uuid.uuid4()}/latest_output")
    assert (code, error["error"]) == (
        404,
        {"code": "unknown_task", "message": "no task has this id"},
    )
    code, error = await harness.request("GET", "/api/v1/tasks/not-a-uuid/latest_output")
    assert (code, error["error"]["code"]) == (400, "invalid_task_id")
    task_id = await harness.create()
    code, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200
    assert body["completion_time"] is None
    assert body["outputs"] == []


@pytest_twisted.ensureDeferred
async def test_latest_output_shows_the_newest_complete_execution_only(harness: Harness) -> None:
    task_id = await harness.create()
    assert (await harness.report(harness.result(task_id, AGENT_A, 1, b"a1\n")))[0] == 200
    # Half an execution is not shown.
    code, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert body["outputs"] == []
    assert (await harness.report(harness.result(task_id, AGENT_B, 1, b"", b"b1 err\n", 3)))[
        0
    ] == 200
    # Execution 2 is half-filled: execution 1 is still the one shown.
    await harness.report(harness.result(task_id, AGENT_A, 2, b"a2\n"))
    code, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200
    first = instant(utc_now_from(START), timedelta(seconds=30), 1)
    assert parse_instant(body["scheduled_at"]) == first
    assert parse_instant(body["completion_time"]) == first + timedelta(milliseconds=5)
    by_agent = {o["agent_id"]: o for o in body["outputs"]}
    assert by_agent[str(AGENT_A)]["stdout"] == "a1\n"
    assert "stderr" not in by_agent[str(AGENT_A)]
    assert by_agent[str(AGENT_A)]["exit_code"] == 0
    assert "stdout" not in by_agent[str(AGENT_B)]
    assert by_agent[str(AGENT_B)]["stderr"] == "b1 err\n"
    assert (by_agent[str(AGENT_B)]["exit_code"], by_agent[str(AGENT_B)]["status"]) == (3, "failed")


@pytest_twisted.ensureDeferred
async def test_a_skipped_run_shows_its_reason_and_others_show_none(harness: Harness) -> None:
    task_id = await harness.create()
    why = "the previous run was still going"
    skipped = dataclasses.replace(
        harness.result(task_id, AGENT_A, 1),
        status=ResultStatus.SKIPPED,
        exit_code=None,
        started_at=None,
        finished_at=None,
        reason=why,
    )
    assert (await harness.report(skipped))[0] == 200
    assert (await harness.report(harness.result(task_id, AGENT_B, 1, b"ran\n")))[0] == 200
    _, latest = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    _, history = await harness.request("GET", f"/api/v1/tasks/{task_id}/executions")
    for outputs in (latest["outputs"], history["executions"][0]["outputs"]):
        by_agent = {o["agent_id"]: o for o in outputs}
        assert by_agent[str(AGENT_A)]["status"] == "skipped"
        assert by_agent[str(AGENT_A)]["reason"] == why
        assert "reason" not in by_agent[str(AGENT_B)]
    # The reason is checked like every field: too long is a clear 400.
    too_long = dataclasses.replace(
        skipped, scheduled_at=harness.result(task_id, AGENT_A, 2).scheduled_at
    )
    body = result_to_json(too_long)
    body["reason"] = "x" * 501
    path = f"/api/v1/tasks/{task_id}/complete"
    code, error = await harness.request("POST", path, body)
    assert code == 400
    assert "'reason' must be a string of at most 500 characters" in error["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_an_execution_missing_an_agent_completes_at_its_deadline(harness: Harness) -> None:
    task_id = await harness.create()
    await harness.report(harness.result(task_id, AGENT_A, 1, b"only a\n"))
    # Execution 1 is due at +30 s; limit 30 s; grace 30 s: complete after +90 s.
    harness.clock.advance(89)
    _, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert body["outputs"] == []
    harness.clock.advance(2)
    _, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert [o["stdout"] for o in body["outputs"]] == ["only a\n"]
    assert body["expected_agents"] == 2


@pytest_twisted.ensureDeferred
async def test_output_that_is_not_text_comes_back_as_valid_json(harness: Harness) -> None:
    task_id = await harness.create()
    raw = b"nul\x00byte and bad \xff utf-8"
    await harness.report(harness.result(task_id, AGENT_A, 1, raw))
    await harness.report(harness.result(task_id, AGENT_B, 1, b"ok"))
    _, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    [a] = [o for o in body["outputs"] if o["agent_id"] == str(AGENT_A)]
    assert a["stdout"] == "nul\x00byte and bad \ufffd utf-8"
    import base64

    assert base64.b64decode(a["stdout_base64"]) == raw


@pytest_twisted.ensureDeferred
async def test_results_are_stored_once_and_conflicts_are_refused(harness: Harness) -> None:
    task_id = await harness.create()
    result = harness.result(task_id, AGENT_A, 1, b"first\n")
    assert await harness.report(result) == (200, {"status": "stored"})
    assert await harness.report(result) == (200, {"status": "duplicate"})
    code, error = await harness.report(harness.result(task_id, AGENT_A, 1, b"different\n"))
    assert (code, error["error"]["code"]) == (409, "conflict")
    await harness.report(harness.result(task_id, AGENT_B, 1))
    _, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert [o.get("stdout") for o in body["outputs"]] == ["first\n", None]


@pytest_twisted.ensureDeferred
async def test_complete_rejects_unknown_tasks_misaligned_instants_and_bad_bodies(
    harness: Harness,
) -> None:
    task_id = await harness.create()
    other = str(uuid.uuid4())
    code, error = await harness.report(harness.result(other, AGENT_A, 1))
    # Not assigned to this agent (it exists nowhere): no oracle of which task ids exist.
    assert (code, error["error"]["code"]) == (403, "not_assigned")
    body = result_to_json(harness.result(task_id, AGENT_A, 1))
    body["scheduled_at"] = format_instant(
        parse_instant(body["scheduled_at"]) + timedelta(seconds=1)
    )
    code, error = await harness.request("POST", f"/api/v1/tasks/{task_id}/complete", body)
    assert (code, error["error"]["code"]) == (400, "misaligned")
    code, error = await harness.request(
        "POST", f"/api/v1/tasks/{task_id}/complete", {"stdout": "x"}
    )
    assert code == 400
    assert "'server_id' is required" in error["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_batch_reports_one_outcome_per_result(harness: Harness) -> None:
    task_id = await harness.create()
    stored = harness.result(task_id, AGENT_A, 1, b"x")
    await harness.report(stored)
    await harness.report(harness.result(task_id, AGENT_B, 1, b"y"))
    batch = [
        stored,
        harness.result(task_id, AGENT_A, 2, b"y"),
        harness.result(task_id, AGENT_A, 1, b"changed"),
        harness.result(str(uuid.uuid4()), AGENT_A, 1),
    ]
    code, body = await harness.request(
        "POST", "/api/v1/results", {"results": [result_to_json(r) for r in batch]}
    )
    assert code == 200
    assert [r["status"] for r in body["results"]] == [
        "duplicate",
        "stored",
        "conflict",
        "forbidden",
    ]
    code, _ = await harness.request("POST", "/api/v1/results", {"results": []})
    assert code == 400


class UnavailableStore(MemoryStore):
    async def create_task(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("connection refused")

    async def latest_complete_execution(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable("connection refused")


@pytest_twisted.ensureDeferred
async def test_a_database_outage_is_a_503_not_a_crash() -> None:
    harness = Harness(UnavailableStore())
    response = await harness.http.post(
        "http://server/api/v1/tasks/create",
        data=json.dumps({"command": "ls", "frequency": "every 5 seconds"}).encode(),
        headers=harness.headers_for("/api/v1/tasks/create"),
    )
    body = json.loads(await response.content())
    assert response.code == 503
    assert body["error"]["code"] == "database_unavailable"
    assert response.headers.getRawHeaders("Retry-After") == ["5"]


class InDoubtStore(MemoryStore):
    async def create_task(self, *args: Any, **kwargs: Any) -> Any:
        raise CommitInDoubt("server closed the connection unexpectedly")


@pytest_twisted.ensureDeferred
async def test_a_commit_in_doubt_is_a_503_that_does_not_say_nothing_changed() -> None:
    harness = Harness(InDoubtStore())
    response = await harness.http.post(
        "http://server/api/v1/tasks/create",
        data=json.dumps({"command": "ls", "frequency": "every 5 seconds"}).encode(),
        headers=harness.headers_for("/api/v1/tasks/create"),
    )
    body = json.loads(await response.content())
    assert (response.code, body["error"]["code"]) == (503, "database_unavailable")
    assert "may or may not have been made" in body["error"]["message"]
    assert "nothing was changed" not in body["error"]["message"]
    assert response.headers.getRawHeaders("Retry-After") == ["5"]


class BrokenStore(MemoryStore):
    async def get_task(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret detail")


@pytest_twisted.ensureDeferred
async def test_an_unexpected_error_is_a_500_that_tells_the_client_nothing() -> None:
    harness = Harness(BrokenStore())
    code, body = await harness.request("GET", f"/api/v1/tasks/{uuid.uuid4()}")
    assert (code, body) == (
        500,
        {
            "error": {
                "code": "internal_error",
                "message": "the server hit an unexpected error; see its log",
            }
        },
    )


def test_an_oversized_body_is_refused_with_413_before_it_is_read() -> None:
    rendered: list[bytes] = []

    class Resource:
        isLeaf = True

        def render(self, request: Any) -> bytes:
            rendered.append(request.content.read())
            return b"{}"

    site = make_site(Resource(), max_body_bytes=1024)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST /api/v1/tasks/create HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n" + b"x" * 2048
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    error = json.loads(transport.value().split(b"\r\n\r\n", 1)[1])["error"]
    # The limit is named, so that an agent can trim a result to fit instead of dropping it.
    assert (error["code"], error["max_body_bytes"]) == ("payload_too_large", 1024)
    assert error["message"] == "the request body is larger than 1024 bytes"
    assert transport.disconnecting
    assert rendered == []


def test_a_chunked_body_over_the_limit_is_refused_too() -> None:
    site = make_site(object(), max_body_bytes=1024)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    chunk = b"x" * 800
    channel.dataReceived(
        b"POST /api/v1/results HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"320\r\n" + chunk + b"\r\n") * 2
    )
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_history_lists_executions_newest_first_and_pages(harness: Harness) -> None:
    task_id = await harness.create()
    harness.clock.advance(1)  # reported once they ran: ahead by no more than a limit + 60 s
    for k in (1, 2, 3):
        await harness.report(harness.result(task_id, AGENT_A, k, b"a%d" % k))
    await harness.report(harness.result(task_id, AGENT_B, 1, b"b1"))
    code, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/executions?limit=2")
    assert code == 200
    page = body["executions"]
    assert [[o["stdout"] for o in e["outputs"]] for e in page] == [["a3"], ["a2"]]
    assert [e["complete"] for e in page] == [False, False]
    code, body = await harness.request(
        "GET", f"/api/v1/tasks/{task_id}/executions?limit=2&before={body['next_before']}"
    )
    [oldest] = body["executions"]
    assert (oldest["complete"], len(oldest["outputs"])) == (True, 2)
    assert body["next_before"] is None
    for query in ("limit=0", "limit=abc", "limit=1001", "before=yesterday"):
        code, error = await harness.request("GET", f"/api/v1/tasks/{task_id}/executions?{query}")
        assert code == 400, query
        assert "query parameter" in error["error"]["message"]
    code, _ = await harness.request("GET", f"/api/v1/tasks/{uuid.uuid4()}/executions")
    assert code == 404


@pytest_twisted.ensureDeferred
async def test_history_and_latest_output_agree_on_what_is_complete(harness: Harness) -> None:
    task_id = await harness.create()  # every 30 s from START, a 30 s limit, a 30 s grace
    harness.clock.advance(1)
    await harness.report(harness.result(task_id, AGENT_A, 1, b"a1"))  # B never reports
    # Past the time limit but within the grace, then past both: execution 1 is given up on.
    for now, complete in ((START + 61, False), (START + 91, True)):
        harness.clock.advance(now - harness.clock.seconds())
        _, history = await harness.request("GET", f"/api/v1/tasks/{task_id}/executions")
        _, latest = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
        assert [e["complete"] for e in history["executions"]] == [complete]
        assert (latest["outputs"] != []) is complete


@pytest_twisted.ensureDeferred
async def test_pruned_history_leaves_the_history_and_latest_output(harness: Harness) -> None:
    task_id = await harness.create()
    harness.clock.advance(1)  # reported once they ran: ahead by no more than a limit + 60 s
    for k in (1, 2, 3):
        for agent in (AGENT_A, AGENT_B):
            await harness.report(harness.result(task_id, agent, k, b"run %d" % k))
    # Keep ten minutes of history; execution k is due at +30k s.
    pruner = HistoryPruner(harness.store, harness.clock, timedelta(minutes=10), interval=60)
    harness.clock.advance(600 + 75)  # executions 1 and 2 are now older than that
    pruner.startService()
    _, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/executions")
    assert [e["outputs"][0]["stdout"] for e in body["executions"]] == ["run 3"]
    _, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert [o["stdout"] for o in body["outputs"]] == ["run 3", "run 3"]
    harness.clock.advance(60)  # execution 3 ages out at the next tick
    _, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/executions")
    assert body["executions"] == []
    # Like a task that has not run yet, not a 404: the task itself is kept.
    code, body = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200
    assert (body["completion_time"], body["outputs"]) == (None, [])
    await pruner.stopService()


# -- deleting a task -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_delete_marks_the_task_deleted_keeps_its_history_and_audits(
    harness: Harness,
) -> None:
    task_id = await harness.create()
    for agent in (AGENT_A, AGENT_B):
        assert (await harness.report(harness.result(task_id, agent, 1, b"before\n")))[0] == 200
    harness.clock.advance(45)

    code, body = await harness.request("DELETE", f"/api/v1/tasks/{task_id}")
    assert (code, body) == (200, {"task_id": task_id, "status": "deleted"})
    [task] = harness.deleted
    assert str(task.task_id) == task_id and task.deleted_at == utc_now_from(START + 45)

    code, body = await harness.request("GET", f"/api/v1/tasks/{task_id}")
    assert code == 200
    assert parse_instant(body["deleted_at"]) == utc_now_from(START + 45)
    assert body["command"] == "echo hello world"
    code, latest = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    assert code == 200 and [o["stdout"] for o in latest["outputs"]] == ["before\n"] * 2
    code, history = await harness.request("GET", f"/api/v1/tasks/{task_id}/executions")
    assert code == 200 and len(history["executions"]) == 1

    [event, *_] = await harness.store.audit_events(10)
    assert (event.action, event.actor, event.target) == (
        "task.deleted",
        "operator:alice",
        task_id,
    )
    assert event.peer and event.at == utc_now_from(START + 45)

    # A second deletion is a 404 that says why; nothing more is written or dispatched.
    code, error = await harness.request("DELETE", f"/api/v1/tasks/{task_id}")
    assert (code, error["error"]["code"]) == (404, "task_deleted")
    assert len(harness.deleted) == 1
    assert [e.action for e in await harness.store.audit_events(10)].count("task.deleted") == 1


@pytest_twisted.ensureDeferred
async def test_delete_of_unknown_or_malformed_ids(harness: Harness) -> None:
    code, error = await harness.request("DELETE", f"/api/v1/tasks/{uuid.uuid4()}")
    assert (code, error["error"]["code"]) == (404, "unknown_task")
    code, error = await harness.request("DELETE", "/api/v1/tasks/not-a-uuid")
    assert (code, error["error"]["code"]) == (400, "invalid_task_id")
    assert harness.deleted == []
    assert all(e.action != "task.deleted" for e in await harness.store.audit_events(10))
    code, body = await harness.request("GET", f"/api/v1/tasks/{await harness.create()}")
    assert code == 200 and body["deleted_at"] is None


@pytest_twisted.ensureDeferred
async def test_results_of_a_deleted_task_are_taken_up_to_the_deletion_only(
    harness: Harness,
) -> None:
    task_id = await harness.create()
    # Agent A's first report warms the server's memory of its assignments.
    assert (await harness.report(harness.result(task_id, AGENT_A, 1, b"a1")))[0] == 200
    harness.clock.advance(60)
    code, _ = await harness.request("DELETE", f"/api/v1/tasks/{task_id}")
    assert code == 200

    # Instant 2 (START + 60) is the deletion's own instant: its runs began before any agent
    # could know, and are kept. Instant 3 came after: refused for good, even for agent A.
    assert (await harness.report(harness.result(task_id, AGENT_B, 1, b"b1")))[0] == 200
    assert (await harness.report(harness.result(task_id, AGENT_A, 2, b"a2")))[0] == 200
    code, error = await harness.report(harness.result(task_id, AGENT_A, 3, b"a3"))
    assert (code, error["error"]["code"]) == (404, "task_deleted")
    batch = [harness.result(task_id, AGENT_B, 2, b"b2"), harness.result(task_id, AGENT_B, 3)]
    code, body = await harness.request(
        "POST",
        "/api/v1/results",
        {"results": [result_to_json(r) for r in batch]},
        headers=harness.headers_for("/api/v1/results", AGENT_B),
    )
    assert code == 200
    assert [r["status"] for r in body["results"]] == ["stored", "deleted"]
    code, history = await harness.request("GET", f"/api/v1/tasks/{task_id}/executions")
    assert [len(e["outputs"]) for e in history["executions"]] == [2, 2]


# -- hostile input: 400s that say what is wrong, never a 500 ------------------------------


@pytest_twisted.ensureDeferred
async def test_malformed_values_are_400s_that_say_what_is_wrong(harness: Harness) -> None:
    task_id = await harness.create()
    create = "/api/v1/tasks/create"
    ok = '"command": "ls", "frequency": "every 5 seconds"'
    for raw, words in [
        (b'{"command": "echo \\ud800", "frequency": "every 5 seconds"}', "lone surrogate"),
        (b"{" + ok.encode() + b', "time_limit_seconds": ' + b"9" * 5000 + b"}", "too many digits"),
        (
            json.dumps(
                {"command": "\U0001f600" * 32 * 1024, "frequency": "every 5 seconds"}
            ).encode(),
            "bytes in UTF-8",
        ),
    ]:
        code, error = await harness.request("POST", create, raw=raw)
        assert code == 400, (raw[:80], error)
        assert words in error["error"]["message"], error
    assert len(harness.created) == 1  # only the task made above
    executions = f"/api/v1/tasks/{task_id}/executions"
    for query, words in [
        ("before=9999-12-31T23:59:59-23:59", "out of range"),
        ("before=0001-01-01T00:00:00%2B23:59", "out of range"),
        ("limit=" + "9" * 5000, "query parameter 'limit' must be an integer"),
    ]:
        code, error = await harness.request("GET", f"{executions}?{query}")
        assert code == 400, (query, error)
        assert words in error["error"]["message"], error
    good = result_to_json(harness.result(task_id, AGENT_A, 1))
    for change, words in [
        ({"scheduled_at": "9999-12-31T23:59:59-23:59"}, "'scheduled_at': timestamp"),
        ({"started_at": "0001-01-01T00:00:00+23:59"}, "'started_at': timestamp"),
        ({"finished_at": "9999-12-31T23:59:59Z"}, "out of range"),
        ({"reason": "\ud800"}, "'reason' is not valid Unicode text"),
        ({"stdout": "x", "stdout_bytes": 2**62}, "'stdout_bytes' must be an integer from 1"),
    ]:
        code, error = await harness.request(
            "POST", f"/api/v1/tasks/{task_id}/complete", {**good, **change}
        )
        assert (code, error["error"]["code"]) == (400, "invalid_request"), (change, error)
        assert words in error["error"]["message"], error
        code, error = await harness.request(
            "POST", "/api/v1/results", {"results": [{**good, **change}]}
        )
        assert code == 400 and "results[0]: " in error["error"]["message"], error
    assert await harness.store.list_executions(uuid.UUID(task_id), 10) == []


def sync_harness() -> Harness:
    """A harness for hypothesis, which cannot drive coroutines: the memory store and
    StubTreq answer at once."""
    h = Harness()
    fired(Deferred.fromCoroutine(started(h)))
    return h


def answer(h: Harness, method: str, path: str, raw: bytes | None = None) -> tuple[int, Any]:
    d = h.http.request(method, "http://server" + path, data=raw, headers=h.headers_for(path))
    h.http.flush()
    response = fired(d)
    content = fired(response.content())
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    return response.code, json.loads(content)


def raw_object(base: dict[str, Any], change: dict[str, str]) -> str:
    fields = {name: json.dumps(value) for name, value in base.items()}
    fields.update(change)
    return "{" + ",".join(f"{json.dumps(name)}:{raw}" for name, raw in fields.items()) + "}"


def surrogate_text(raw: str | None) -> bool:
    """Whether the JSON text ``raw`` is a string holding a lone surrogate."""
    try:
        value = json.loads(raw or "null")
    except ValueError:  # a number too long for Python
        return False
    return isinstance(value, str) and has_surrogate(value)


def stored_text(text: str | None) -> None:
    """What was accepted can go into PostgreSQL's text (which the memory store skips)."""
    if text is not None:
        text.encode("utf-8")


TASK_FIELDS = ["command", "frequency", "time_limit_seconds", "extra"]
RESULT_FIELDS = [
    "task_id",
    "server_id",
    "scheduled_at",
    "status",
    "exit_code",
    "signal",
    "started_at",
    "finished_at",
    "stdout",
    "stdout_bytes",
    "stdout_base64",
    "stdout_truncated",
    "stderr_bytes",
    "reason",
]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    route=st.sampled_from(["create", "complete", "results"]),
    task_change=st.dictionaries(st.sampled_from(TASK_FIELDS), raw_json_values, max_size=3),
    result_change=st.dictionaries(st.sampled_from(RESULT_FIELDS), raw_json_values, max_size=3),
)
def test_no_hostile_body_gets_a_500(
    route: str, task_change: dict[str, str], result_change: dict[str, str]
) -> None:
    h = sync_harness()
    base = {"command": "echo hi", "frequency": "every 30 seconds", "time_limit_seconds": 30}
    if route == "create":
        code, body = answer(
            h, "POST", "/api/v1/tasks/create", raw_object(base, task_change).encode()
        )
        assert code in (201, 400), body
        assert code == 400 or not surrogate_text(task_change.get("command"))
        for task in h.created:
            stored_text(task.spec.command)
        return
    code, body = answer(h, "POST", "/api/v1/tasks/create", json.dumps(base).encode())
    task_id = body["command_id"]
    item = raw_object(result_to_json(h.result(task_id, AGENT_A, 1, b"out\n")), result_change)
    if route == "complete":
        code, body = answer(h, "POST", f"/api/v1/tasks/{task_id}/complete", item.encode())
    else:
        code, body = answer(h, "POST", "/api/v1/results", f'{{"results":[{item}]}}'.encode())
    assert 200 <= code < 500, body
    assert code == 400 or not surrogate_text(result_change.get("reason"))
    for execution in fired(Deferred.fromCoroutine(h.store.list_executions(uuid.UUID(task_id), 10))):
        for result in execution.results:
            stored_text(result.reason)


query_text = st.one_of(
    extreme_instants,
    hostile_text,
    digits.map(lambda n: "9" * n),
    st.integers().map(str),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.none() | query_text, limit=st.none() | query_text, path=st.none() | hostile_text)
def test_no_hostile_query_or_path_gets_a_500(
    before: str | None, limit: str | None, path: str | None
) -> None:
    h = sync_harness()
    _, body = answer(
        h, "POST", "/api/v1/tasks/create", b'{"command":"ls","frequency":"every 5 seconds"}'
    )
    task_id = (
        body["command_id"]
        if path is None
        else quote(path.encode("utf-8", "surrogatepass"), safe="")
    )
    query = "&".join(
        f"{name}={quote(value.encode('utf-8', 'surrogatepass'), safe='')}"
        for name, value in (("before", before), ("limit", limit))
        if value is not None
    )
    for suffix in ("/executions?" + query, "/latest_output", ""):
        url = f"http://server/api/v1/tasks/{task_id}{suffix}"
        d = h.http.get(url, headers=h.headers_for(url), allow_redirects=False)
        h.http.flush()
        response = fired(d)
        content = fired(response.content())
        assert response.code < 500, content
        if response.headers.getRawHeaders("Content-Type") != ["application/json"]:
            # Klein's own answers to a path that is not UTF-8 (400) or holds "//" (308)
            assert response.code in (400, 308), content


# -- results dated ahead of the server's clock (too early, not refused for good) ---------


@pytest_twisted.ensureDeferred
async def test_a_result_from_the_future_is_refused_for_now_and_taken_once_it_is_due(
    harness: Harness,
) -> None:
    task_id = await harness.create()  # every 30 s, a time limit of 30 s
    later = harness.result(task_id, AGENT_A, 5, b"from the future\n")  # 150 s ahead
    code, error = await harness.report(later)
    assert (code, error["error"]["code"]) == (409, "too_early")
    assert error["error"]["code"] not in protocol.FINAL_RESULT_ERRORS
    assert "'scheduled_at' is 150 s ahead of this server's clock" in error["error"]["message"]
    # The penetration test's result dated 2028 (aligned, or not: refused before either).
    body = result_to_json(later)
    for key in ("scheduled_at", "started_at", "finished_at"):
        body[key] = "2028-11-18T00:00:00Z"
    code, error = await harness.request("POST", f"/api/v1/tasks/{task_id}/complete", body)
    assert (code, error["error"]["code"]) == (409, "too_early")
    assert await harness.store.list_executions(uuid.UUID(task_id), 10) == []
    # Nothing listed ahead of the real results, and the real one is no conflict.
    assert await harness.report(harness.result(task_id, AGENT_A, 1, b"now\n")) == (
        200,
        {"status": "stored"},
    )
    _, history = await harness.request("GET", f"/api/v1/tasks/{task_id}/executions")
    assert [o["stdout"] for e in history["executions"] for o in e["outputs"]] == ["now\n"]
    # Once the clock has come near enough, the same result is taken.
    harness.clock.advance(150 - 90 + 0.005)
    assert await harness.report(later) == (200, {"status": "stored"})


@pytest_twisted.ensureDeferred
async def test_an_agent_labelling_ahead_after_its_clock_stepped_back_is_believed(
    harness: Harness,
) -> None:
    task_id = await harness.create()
    # Labelled by up to the time limit (30 s) and the clock allowance (60 s) ahead; its
    # own readings of the wall clock are now.
    ahead = dataclasses.replace(
        harness.result(task_id, AGENT_A, 3),
        started_at=utc_now_from(START),
        finished_at=utc_now_from(START + 1),
    )
    assert await harness.report(ahead) == (200, {"status": "stored"})


@pytest_twisted.ensureDeferred
async def test_a_larger_clock_allowance_takes_results_of_an_agent_an_hour_ahead() -> None:
    harness = await started(Harness(clock_allowance=timedelta(hours=2)))
    task_id = await harness.create()
    hour_ahead = harness.result(task_id, AGENT_A, 120)  # its clock an hour fast
    assert await harness.report(hour_ahead) == (200, {"status": "stored"})
    code, error = await harness.report(harness.result(task_id, AGENT_A, 242))
    assert (code, error["error"]["code"]) == (409, "too_early")
    assert "and 7200 s of clock difference allow" in error["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_batch_keeps_too_early_items_for_later_and_stores_the_others(
    harness: Harness,
) -> None:
    task_id = await harness.create()
    batch = [harness.result(task_id, AGENT_A, 1), harness.result(task_id, AGENT_A, 40)]
    code, body = await harness.request(
        "POST", "/api/v1/results", {"results": [result_to_json(r) for r in batch]}
    )
    assert code == 200
    assert [r["status"] for r in body["results"]] == ["stored", "too_early"]
    assert "too_early" in protocol.RETRY_LATER_BATCH_STATUSES
    assert "too_early" not in protocol.FINAL_BATCH_STATUSES
    [execution] = await harness.store.list_executions(uuid.UUID(task_id), 10)
    assert execution.scheduled_at == batch[0].scheduled_at


# -- output over --max-output-bytes ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_output_over_the_servers_cap_is_stored_as_head_and_tail_flagged_truncated() -> None:
    harness = await started(Harness(max_output_bytes=100))
    task_id = await harness.create()
    out = b"head" + b"\xff" * 10_000 + b"tail"
    big = harness.result(task_id, AGENT_A, 1, out, b"short\n")
    assert await harness.report(big) == (200, {"status": "stored"})
    assert await harness.report(big) == (200, {"status": "duplicate"})  # trimmed alike
    other = harness.result(task_id, AGENT_B, 1, b"x" * 1000)
    _, body = await harness.request(
        "POST",
        "/api/v1/results",
        {"results": [result_to_json(other)]},
        headers=harness.headers_for("/api/v1/results", AGENT_B),
    )
    assert body == {"results": [{"status": "stored"}]}
    [execution] = await harness.store.list_executions(uuid.UUID(task_id), 10)
    a, b = sorted(execution.results, key=lambda r: r.agent_id)
    assert a.stdout == Output.of(out).trimmed(100)
    assert (len(a.stdout.data), a.stdout.size, a.stdout.truncated) == (100, 10_008, True)
    assert a.stdout.data.startswith(b"head") and a.stdout.data.endswith(b"tail")
    assert a.stderr == Output.of(b"short\n")
    assert (len(b.stdout.data), b.stdout.size, b.stdout.truncated) == (100, 1000, True)
    _, latest = await harness.request("GET", f"/api/v1/tasks/{task_id}/latest_output")
    [shown] = [o for o in latest["outputs"] if o["agent_id"] == str(AGENT_A)]
    assert (shown["stdout_bytes"], shown["stdout_truncated"]) == (10_008, True)


@pytest_twisted.ensureDeferred
async def test_the_default_cap_is_the_agents_and_a_12_mb_output_is_not_stored_whole(
    harness: Harness,
) -> None:
    assert DEFAULT_MAX_OUTPUT_BYTES == DEFAULT_OUTPUT_CAP == 1024 * 1024
    task_id = await harness.create()
    out = bytes(range(256)) * (12 * 4096)  # 12 MiB, not UTF-8: sent as base64
    assert await harness.report(harness.result(task_id, AGENT_A, 1, out)) == (
        200,
        {"status": "stored"},
    )
    [execution] = await harness.store.list_executions(uuid.UUID(task_id), 10)
    [stored] = execution.results
    assert (len(stored.stdout.data), stored.stdout.size) == (DEFAULT_MAX_OUTPUT_BYTES, len(out))
