"""The OpenAPI document stays true: it validates, it describes every route of the server's
Klein app (methods, credential) and no other, every error code the server can answer,
the bounds the routes enforce, and the grammar of the fields the parsers read.

The schemathesis run against a live server (tests/integration/test_openapi_schemathesis.py)
checks the answers themselves."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from taskscheduler.protocol import InvalidMessage, result_to_json
from taskscheduler.protocol.fields import parse_command, parse_uuid
from taskscheduler.schedule import InvalidFrequency, parse_frequency
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.api.dashboard import DASHBOARD_ENDPOINTS
from taskscheduler.server.openapi import document, document_bytes
from taskscheduler.server.openapi.operations import UUID_PATTERN
from taskscheduler.server.openapi.responses import (
    AGENT_ONLY,
    error_kinds,
    server_codes,
    server_kinds,
)
from taskscheduler.server.openapi.task_schemas import FREQUENCY_PATTERN
from taskscheduler.web.errors import STORAGE_UNAVAILABLE
from taskscheduler.web.gate import Access
from tests.unit.test_server_api import (
    AGENT_A,
    AGENTS,
    CREDENTIALS,
    JSON,
    Harness,
    enrol_test_agents,
)

DOC = document()
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
#: Who may call a route, as the access table and as the document say it.
SECURITY = {
    Access.OPERATOR: [{"operatorToken": []}],
    Access.AGENT: [{"agentCredential": []}],
    Access.JOIN: [{"joinSecret": []}],
    Access.PUBLIC: [],
}


#: Routes that are not the JSON API, so not in the document: ``GET /metrics`` answers
#: Prometheus text (tests/unit/test_server_metrics.py checks it; the README lists it); the
#: dashboard's page and files are HTML, JS and CSS (tests/unit/test_dashboard.py).
NOT_JSON_API = {"metrics", *DASHBOARD_ENDPOINTS}


def app_routes() -> dict[tuple[str, str], str]:
    """(method, OpenAPI path) -> endpoint, for every rule of the server's Klein app.
    HEAD goes: werkzeug adds it to every GET rule (checked here) and the document says
    so once rather than doubling every GET."""
    found: dict[tuple[str, str], str] = {}
    for rule in ServerAPI.app.url_map.iter_rules():
        if rule.endpoint in NOT_JSON_API:
            continue
        methods = set(rule.methods or ())
        assert ("HEAD" in methods) == ("GET" in methods), rule.rule
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in methods - {"HEAD"}:
            found[(method.lower(), path)] = str(rule.endpoint)
    return found


def documented() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (method, path): op
        for path, item in DOC["paths"].items()
        for method, op in item.items()
        if method in METHODS
    }


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1.")
    validate(DOC)


def test_every_route_of_the_app_is_documented_and_nothing_else() -> None:
    app = app_routes()
    doc = documented()
    undocumented = sorted(set(app) - set(doc))
    not_in_app = sorted(set(doc) - set(app))
    assert not undocumented, f"routes of the app the document lacks: {undocumented}"
    assert not not_in_app, f"routes of the document the app lacks: {not_in_app}"


def test_each_operation_is_its_route_with_its_credential() -> None:
    for key, endpoint in app_routes().items():
        op = documented()[key]
        assert op["operationId"] == endpoint, key
        assert op["security"] == SECURITY[ServerAPI.ACCESS[endpoint]], key


def documented_codes() -> dict[tuple[str, str, str], set[str]]:
    """(method, path, status) -> the error codes the document lists there."""
    found = {}
    for key, op in documented().items():
        for status, response in op["responses"].items():
            schema = response.get("content", {}).get("application/json", {}).get("schema", {})
            for part in schema.get("allOf", []):
                codes = part.get("properties", {}).get("error", {}).get("properties", {})
                if "code" in codes:
                    found[(*key, status)] = set(codes["code"]["enum"])
    return found


def test_every_error_code_the_server_can_answer_is_documented() -> None:
    listed = set().union(*documented_codes().values())
    missing = server_codes() - listed
    assert not missing, f"error codes of the table no route documents: {sorted(missing)}"
    assert listed <= server_codes(), sorted(listed - server_codes())
    assert (
        set(
            DOC["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"][
                "enum"
            ]
        )
        == server_codes()
    )
    assert all(any(kind is row for row in error_kinds()) for kind in AGENT_ONLY)
    assert STORAGE_UNAVAILABLE.code not in server_codes()


def test_each_documented_error_has_its_status_in_the_table() -> None:
    statuses: dict[str, set[int]] = {}
    for kind in server_kinds():
        statuses.setdefault(kind.code, set()).add(kind.status)
    for (method, path, status), codes in documented_codes().items():
        for code in codes:
            if status.endswith("XX"):
                continue  # werkzeug's own status (http_error)
            assert int(status) in statuses[code], (method, path, status, code)


def test_every_route_needing_a_credential_documents_401_and_403() -> None:
    for key, op in documented().items():
        if op["security"]:
            assert {"401", "403"} <= set(op["responses"]), key
            assert op["responses"]["401"]["headers"]["WWW-Authenticate"]["required"], key


# -- what the routes enforce, as the document says ---------------------------------------------
def integer_query_bounds() -> list[tuple[str, str, str, int, int]]:
    bounds = []
    for (method, path), op in documented().items():
        for parameter in op.get("parameters", []):
            schema = parameter["schema"]
            if parameter["in"] == "query" and schema.get("type") == "integer":
                low, high = schema["minimum"], schema["maximum"]
                bounds.append((method, path, parameter["name"], low, high))
    return bounds


def test_the_documented_query_bounds_are_found() -> None:
    assert len(integer_query_bounds()) >= 3


@pytest_twisted.ensureDeferred
async def test_the_routes_enforce_the_documented_query_bounds() -> None:
    h = Harness()
    task_id = await h.create()
    for method, path, name, low, high in integer_query_bounds():
        url = path.replace("{task_id}", task_id)
        for value, refused in [(low - 1, True), (low, False), (high, False), (high + 1, True)]:
            code, body = await h.request(method.upper(), f"{url}?{name}={value}")
            assert (code == 400) == refused, (method, path, name, value, code, body)


@pytest_twisted.ensureDeferred
async def test_the_document_is_served_to_anyone() -> None:
    h = Harness()
    response = await h.http.get("http://server/api/v1/openapi.json")
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    assert json.loads(await response.content()) == DOC
    assert document_bytes() == document_bytes()


# -- the app's answers, as the document says (schemathesis checks many more, live) ----------
def answer_validator(method: str, path: str, status: int) -> Draft202012Validator:
    response = DOC["paths"][path][method.lower()]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    return Draft202012Validator({**schema, "components": DOC["components"]})


@pytest_twisted.ensureDeferred
async def test_a_walk_through_the_routes_answers_as_documented() -> None:
    h = Harness()
    await h.store.set_fleet(AGENTS)
    await enrol_test_agents(h.store)
    task_id = await h.create()
    h.clock.advance(31)
    result = h.result(task_id, AGENT_A, 1, stdout=b"hi\xff")
    agent = {**JSON, "Authorization": f"Bearer {CREDENTIALS[AGENT_A]}"}
    for method, path, documented_path, body in [
        ("POST", f"/api/v1/tasks/{task_id}/complete", "/api/v1/tasks/{task_id}/complete", None),
        ("POST", "/api/v1/results", "/api/v1/results", {"results": [result_to_json(result)]}),
        ("POST", "/api/v1/agents/heartbeat", "/api/v1/agents/heartbeat", {"tasks": 1}),
    ]:
        code, answer = await h.request(method, path, body or result_to_json(result), headers=agent)
        assert code == 200, (path, answer)
        errors = list(answer_validator(method, documented_path, code).iter_errors(answer))
        assert not errors, (method, path, [e.message for e in errors])
    at = (await h.request("GET", f"/api/v1/tasks/{task_id}/executions"))[1]["executions"][0]
    walk = [
        ("GET", "/api/v1/tasks", "/api/v1/tasks", None),
        ("GET", f"/api/v1/tasks/{task_id}", "/api/v1/tasks/{task_id}", None),
        ("PATCH", f"/api/v1/tasks/{task_id}", "/api/v1/tasks/{task_id}", {"command": "id"}),
        ("POST", f"/api/v1/tasks/{task_id}/pause", "/api/v1/tasks/{task_id}/pause", None),
        ("POST", f"/api/v1/tasks/{task_id}/resume", "/api/v1/tasks/{task_id}/resume", None),
        ("POST", f"/api/v1/tasks/{task_id}/run", "/api/v1/tasks/{task_id}/run", None),
        (
            "GET",
            f"/api/v1/tasks/{task_id}/latest_output",
            "/api/v1/tasks/{task_id}/latest_output",
            None,
        ),
        ("GET", f"/api/v1/tasks/{task_id}/executions", "/api/v1/tasks/{task_id}/executions", None),
        (
            "GET",
            f"/api/v1/tasks/{task_id}/executions/{at['scheduled_at']}",
            "/api/v1/tasks/{task_id}/executions/{scheduled_at}",
            None,
        ),
        ("GET", "/api/v1/agents", "/api/v1/agents", None),
        ("GET", f"/api/v1/agents/{AGENT_A}", "/api/v1/agents/{agent_id}", None),
        ("DELETE", f"/api/v1/agents/{AGENT_A}", "/api/v1/agents/{agent_id}", None),
        (
            "POST",
            f"/api/v1/agents/{AGENT_A}/release-url",
            "/api/v1/agents/{agent_id}/release-url",
            None,
        ),
        ("GET", "/api/v1/fleet", "/api/v1/fleet", None),
        ("POST", "/api/v1/fleet", "/api/v1/fleet", {"url": "http://agent-c:8081"}),
        ("DELETE", "/api/v1/fleet/http%3A%2F%2Fagent-c%3A8081", "/api/v1/fleet/{url}", None),
        ("DELETE", f"/api/v1/tasks/{task_id}", "/api/v1/tasks/{task_id}", None),
        ("GET", "/api/v1/audit", "/api/v1/audit", None),
    ]
    for method, path, documented_path, body in walk:
        code, answer = await h.request(method, path, body)
        assert code < 300, (method, path, code, answer)
        errors = list(answer_validator(method, documented_path, code).iter_errors(answer))
        assert not errors, (method, path, [e.message for e in errors])


# -- the grammar of fields: whatever the server accepts, the document accepts ------------------
def test_the_uuid_pattern_is_the_parsers() -> None:
    pattern = re.compile(UUID_PATTERN)
    samples = [
        "0f8fad5b-d9cb-469f-a165-70867728950e",
        "0F8FAD5B-D9CB-469F-A165-70867728950E",
        "{0f8fad5b-d9cb-469f-a165-70867728950e}",
        "urn:uuid:0f8fad5b-d9cb-469f-a165-70867728950e",
        "0f8fad5bd9cb469fa16570867728950e",
        "0f8fad5b-d9cb-469f-a165-70867728950",
        "",
    ]
    for sample in samples:
        try:
            parse_uuid(sample, "id")
            accepted = True
        except InvalidMessage:
            accepted = False
        assert accepted == bool(pattern.search(sample)), sample


FREQUENCY_TEXT = st.one_of(
    st.text(max_size=40),
    st.from_regex(FREQUENCY_PATTERN),
    st.builds(
        lambda sp, n, unit, s: f"{sp}every{sp or ' '}{n} {unit}{s}{sp}",
        st.sampled_from(["", " ", "\t", "\u00a0", "\n"]),
        st.integers(-5, 10**9).map(str) | st.sampled_from(["1.5", "1e3", "\u0661", "+1"]),
        st.sampled_from(["second", "MINUTE", "Hour", "day", "sec"]),
        st.sampled_from(["", "s", "S"]),
    ),
)


@given(FREQUENCY_TEXT)
def test_every_frequency_the_server_takes_matches_the_document(text: str) -> None:
    try:
        parse_frequency(text)
    except InvalidFrequency:
        return
    assert re.search(FREQUENCY_PATTERN, text), text


COMMAND = Draft202012Validator(DOC["components"]["schemas"]["NewTask"]["properties"]["command"])


@given(st.text(max_size=20) | st.sampled_from(["", " ", "\t\n", "a\x00b", "\u2003", "ls\u2003"]))
def test_every_command_the_server_takes_matches_the_document(text: str) -> None:
    try:
        parse_command(text)
    except InvalidMessage:
        return
    assert COMMAND.is_valid(text), repr(text)


@pytest.mark.parametrize("text", ["", "   ", "a\x00b", "\u2003"])
def test_blank_or_nul_commands_are_outside_the_document(text: str) -> None:
    assert not COMMAND.is_valid(text)
