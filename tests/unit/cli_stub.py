"""A stub of the server's REST API for the command's unit tests (httpx.MockTransport),
and the command run in-process against it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
from click.testing import CliRunner, Result

from taskscheduler.cli.context import Overrides
from taskscheduler.cli.main import cli

NOW = datetime(2026, 11, 30, 16, 0, 0, tzinfo=UTC)
URL = "http://ts.test:8080"
A = "3f1e0000-0000-4000-8000-000000000001"
B = "3f2a0000-0000-4000-8000-000000000002"
C = "9c000000-0000-4000-8000-000000000003"
AGENT_1 = "aa110000-0000-4000-8000-000000000001"
AGENT_2 = "bb220000-0000-4000-8000-000000000002"


def task(task_id: str, command: str = "echo hello", **extra: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "command": command,
        "frequency": "every 30 seconds",
        "anchor": "2026-11-30T15:00:00.000000Z",
        "time_limit_seconds": 30,
        "created_at": "2026-11-30T15:00:00.000000Z",
        "deleted_at": None,
        "state": "active",
        **extra,
    }


Handler = Callable[[httpx.Request], httpx.Response]


class StubApi:
    """Routes (method, path) to an answer; records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Handler] = {}
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []
        self.tasks: list[dict[str, Any]] = []
        self.agents: list[dict[str, Any]] = []
        self.route("GET", "/api/v1/tasks", self._list_tasks)
        self.route("GET", "/api/v1/agents", lambda r: answer({"agents": self.agents}))

    def route(self, method: str, path: str, handler: Handler | dict[str, Any]) -> None:
        if isinstance(handler, dict):
            body = handler
            self.routes[(method, path)] = lambda r: answer(body)
        else:
            self.routes[(method, path)] = handler

    def _list_tasks(self, request: httpx.Request) -> httpx.Response:
        # Pages of two, so that a resolution must follow the cursor.
        query = parse_qs(request.url.query.decode())
        start = int(query.get("cursor", ["0"])[0])
        page = self.tasks[start : start + 2]
        more = start + 2 < len(self.tasks)
        return answer({"tasks": page, "next_cursor": str(start + 2) if more else None})

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        handler = self.routes.get((request.method, request.url.raw_path.decode().split("?")[0]))
        if handler is None:
            return answer(error("not_found", "no such endpoint"), 404)
        return handler(request)

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.raw_path.decode()}" for r in self.requests]


def answer(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def run(api: StubApi, *args: str, env: dict[str, str] | None = None, stdin: str = "") -> Result:
    overrides = Overrides(
        transport=httpx.MockTransport(api.handle), now=lambda: NOW, sleep=api.sleeps.append
    )
    environment = {"TASKSCHEDULER_URL": URL, "TASKSCHEDULER_TOKEN": "", **(env or {})}
    return CliRunner().invoke(cli, list(args), obj=overrides, env=environment, input=stdin)
