"""A real server without operator tokens, configured as docker-compose.yml runs it, against
what a web page can make a browser send (DNS rebinding, cross-site forms)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemons import Daemon, free_port, http, wait_for

pytestmark = pytest.mark.integration

TASK = {"command": "true", "frequency": "every 3600 seconds"}


@pytest.fixture(scope="module")
def server(private_folder: Callable[[], Path]) -> Iterator[tuple[Daemon, int]]:
    # Not tmp_path: a concurrent pytest session may delete it under a running PostgreSQL.
    root = private_folder()
    port = free_port()
    daemon = Daemon(
        "server",
        [
            "taskscheduler-server",
            "--listen",
            f"tcp:{port}",  # every interface, as in its container
            "--insecure-allow-anonymous-operators",
            "--accept-hosts",
            "localhost,127.0.0.1,::1,server",
            "--data-dir",
            str(root / "data"),
        ],
        root,
        {},
    )
    daemon.start()
    try:
        wait_for(
            lambda: daemon.assert_running() or health(port)[0] == 200, 120, "the server to answer"
        )
        yield daemon, port
    except BaseException:
        print(daemon.log())
        raise
    finally:
        daemon.stop()


def health(port: int) -> tuple[int, Any]:
    return http("GET", f"http://127.0.0.1:{port}/api/v1/health", timeout=2)


def create(port: int, **headers: str) -> tuple[int, Any]:
    return http("POST", f"http://127.0.0.1:{port}/api/v1/tasks/create", TASK, headers=headers)


def created_tasks(port: int) -> int:
    code, body = http("GET", f"http://127.0.0.1:{port}/api/v1/audit")
    assert code == 200, body
    return sum(1 for event in body["events"] if event["action"] == "task.created")


def test_a_page_reaching_the_server_under_its_own_name_changes_nothing(
    server: tuple[Daemon, int],
) -> None:
    _, port = server
    before = created_tasks(port)
    code, body = create(port, Host=f"evil.example:{port}", Origin="http://evil.example")
    assert code == 403 and body["error"]["code"] == "host_not_allowed", body
    code, body = create(port, Host=f"localhost:{port}", Origin="http://evil.example")
    assert code == 403 and body["error"]["code"] == "origin_not_allowed", body
    assert created_tasks(port) == before


def test_the_seeds_curl_and_the_agents_name_are_answered(server: tuple[Daemon, int]) -> None:
    _, port = server
    before = created_tasks(port)
    assert create(port, Host=f"localhost:{port}")[0] == 201
    assert create(port, Host=f"server:{port}")[0] == 201
    assert create(port, Host=f"localhost:{port}", Origin=f"http://localhost:{port}")[0] == 201
    assert created_tasks(port) == before + 3
