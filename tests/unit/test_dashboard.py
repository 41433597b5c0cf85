"""The dashboard's page and static files (StubTreq over the server's real resource):
served to anyone with their content types and a strict Content-Security-Policy, nothing
else under ``/dashboard/`` (no path, no hidden file), and assets that never insert data
as HTML. The browser itself is tested in tests/integration/test_dashboard_browser.py."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import timedelta
from importlib.resources import files

import pytest
import pytest_twisted

from taskscheduler.server.api.dashboard import CONTENT_SECURITY_POLICY, assets
from tests.unit.test_server_api import AGENT_A, AGENT_B, Harness, started

FOLDER = files("taskscheduler.server") / "dashboard"
DASHBOARD_FILES = sorted(entry.name for entry in FOLDER.iterdir())


async def fetch(
    h: Harness, path: str, method: str = "GET", **headers: str
) -> tuple[int, dict, bytes]:
    response = await h.http.request(method, "http://server" + path, headers=headers)
    content = await response.content()
    found = {
        name.decode().lower(): values[0].decode()
        for name, values in response.headers.getAllRawHeaders()
    }
    return response.code, found, content


def csp_directives(value: str) -> dict[str, str]:
    return {
        part.strip().split(" ", 1)[0]: part.strip().partition(" ")[2]
        for part in value.split(";")
        if part.strip()
    }


@pytest_twisted.ensureDeferred
async def test_the_page_is_served_at_the_root_with_a_strict_policy_to_anyone() -> None:
    h = Harness()  # a server with operator tokens: the page needs none, the API does
    code, headers, content = await fetch(h, "/")
    assert code == 200
    assert headers["content-type"] == "text/html; charset=utf-8"
    assert content == (FOLDER / "index.html").read_bytes()
    assert b'<script type="module" src="/dashboard/app.js">' in content
    policy = csp_directives(headers["content-security-policy"])
    assert policy["default-src"] == "'self'"
    assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["object-src"] == "'none'" and policy["base-uri"] == "'none'"
    assert all("unsafe" not in v and "*" not in v for v in policy.values()), policy
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    code, _, _ = await fetch(h, "/api/v1/tasks")
    assert code == 401


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("task.js", "text/javascript; charset=utf-8"),
        ("charts.js", "text/javascript; charset=utf-8"),
        ("app.css", "text/css; charset=utf-8"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_each_asset_is_served_with_its_type_and_the_policy(
    name: str, content_type: str
) -> None:
    code, headers, content = await fetch(Harness(), f"/dashboard/{name}")
    assert code == 200
    assert headers["content-type"] == content_type
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY.decode()
    assert headers["x-content-type-options"] == "nosniff"
    assert content == (FOLDER / name).read_bytes()


@pytest_twisted.ensureDeferred
async def test_every_file_the_page_loads_is_served() -> None:
    """index.html's links and every module's imports name files the server serves."""
    h = Harness()
    wanted = set(
        re.findall(rb'(?:src|href)="/dashboard/([^"]+)"', (FOLDER / "index.html").read_bytes())
    )
    for name in DASHBOARD_FILES:
        if name.endswith(".js"):
            text = (FOLDER / name).read_text()
            wanted |= {m.encode() for m in re.findall(r"from '\./([^']+)'", text)}
    assert {b"app.js", b"app.css", b"task.js", b"charts.js"} <= wanted
    for name in sorted(wanted):
        code, _, _ = await fetch(h, "/dashboard/" + name.decode())
        assert code == 200, name


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/nothing.js",
        "/dashboard/index.html",  # the page is at / only
        "/dashboard/",
        "/dashboard/..%2Fapi%2Fdashboard.py",
        "/dashboard/%2E%2E%2F__init__.py",
        "/dashboard/%2E%2E",
        "/dashboard/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/dashboard/app.js%00.css",
        "/dashboard/.app.js",
        "/dashboard/APP.JS",
        "/dashboard/app.js/x",
        "/index.html",
    ],
)
@pytest_twisted.ensureDeferred
async def test_nothing_else_is_served(path: str) -> None:
    code, headers, content = await fetch(Harness(), path)
    assert code == 404, (path, code, content[:200])
    assert headers["content-type"] == "application/json"
    assert b"import" not in content and b"root:" not in content


@pytest_twisted.ensureDeferred
async def test_the_page_takes_no_state_changing_method() -> None:
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        for path in ("/", "/dashboard/app.js"):
            code, _, _ = await fetch(Harness(), path, method)
            assert code == 405, (method, path)


def test_only_known_file_names_are_served() -> None:
    served = set(assets())
    assert served == {
        n for n in DASHBOARD_FILES if re.fullmatch(r"[a-z0-9_-]+\.(js|css|html|svg)", n)
    }
    assert "index.html" in served


def test_no_asset_inserts_html_or_runs_inline_code() -> None:
    """Data goes into the page as text only (dom.js), and there is no inline script or
    style for the policy to have to allow."""
    for name in DASHBOARD_FILES:
        text = _code_of((FOLDER / name).read_text())
        for unsafe in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert unsafe not in text, (name, unsafe)
        assert "new Function" not in text and "javascript:" not in text, name
        assert not re.search(r"\sstyle=|setAttribute\('style'|\son[a-z]+=", text), name
    html = (FOLDER / "index.html").read_text()
    assert re.findall(r"<script[^>]*>", html) == ['<script type="module" src="/dashboard/app.js">']
    assert "<style" not in html and "http:" not in html and "https:" not in html


def _code_of(text: str) -> str:
    """The text without its ``//`` comment lines (dom.js names what it never does)."""
    return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))


# -- what the pages need from the API -------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_task_list_shows_each_agents_status_in_the_last_execution() -> None:
    h = await started(Harness())
    task_id = await h.create()
    h.clock.advance(31)
    assert (await h.report(h.result(task_id, AGENT_B, 1, exit_code=3)))[0] == 200
    assert (await h.report(h.result(task_id, AGENT_A, 1)))[0] == 200
    code, body = await h.request("GET", "/api/v1/tasks")
    assert code == 200
    assert body["tasks"][0]["last_execution"]["agents"] == [
        {"agent_id": str(AGENT_A), "status": "succeeded"},
        {"agent_id": str(AGENT_B), "status": "failed"},
    ]


@pytest_twisted.ensureDeferred
async def test_the_agents_list_shows_start_lateness_percentiles() -> None:
    h = await started(Harness())
    task_id = await h.create(frequency="every 30 seconds")
    h.clock.advance(30 * 101)
    for k in range(1, 101):  # agent A starts k ms late at instant k; agent B never ran
        result = h.result(task_id, AGENT_A, k)
        late = replace(result, started_at=result.scheduled_at + timedelta(milliseconds=k))
        assert (await h.report(late))[0] == 200
    code, body = await h.request("GET", "/api/v1/agents")
    assert code == 200
    lateness = {a["agent_id"]: a["start_lateness"] for a in body["agents"]}
    assert lateness[str(AGENT_A)] == {"samples": 100, "p50_seconds": 0.05, "p99_seconds": 0.099}
    assert lateness[str(AGENT_B)] is None
