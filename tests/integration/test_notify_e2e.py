"""Webhooks on real parts: a real server and agent run a command that fails three times
then succeeds; a real HTTP receiver in this process (http.server on a free port) gets
one signed alert and one signed recovery, and the task's history says both arrived."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from taskscheduler.server.notify.payload import verify
from tests.integration.daemons import Fleet, free_port, running_fleet, wait_for

pytestmark = pytest.mark.integration

SECRET = b"e2e-webhook-secret-0123456789abcdef"


class Receiver(http.server.ThreadingHTTPServer):
    def __init__(self, port: int) -> None:
        self.received: list[tuple[float, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def posts(self) -> list[tuple[float, dict[str, str], bytes]]:
        with self.lock:
            return list(self.received)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        headers = {name.lower(): value for name, value in self.headers.items()}
        with self.server.lock:
            self.server.received.append((time.time(), headers, body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(free_port())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def failing_thrice(counter: Path) -> str:
    return (
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n + 1)); echo $n > {counter}; "
        "test $n -ge 4"
    )


def test_a_failing_then_succeeding_task_sends_one_signed_alert_and_one_recovery(
    tmp_path: Path, receiver: Receiver
) -> None:
    secret_file = tmp_path / "notify-secret"
    secret_file.write_bytes(SECRET + b"\n")
    os.chmod(secret_file, 0o600)
    fleet = Fleet(tmp_path, agents=1)
    fleet.server.args += ["--notify-secret-file", str(secret_file)]
    fleet.server.args += ["--notify-base-url", "https://scheduler.example.com"]
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
    counter = tmp_path / "counter"
    with running_fleet(tmp_path, prepared=fleet):
        code, body = fleet.api(
            "POST",
            "/api/v1/tasks/create",
            {
                "command": failing_thrice(counter) + " # secret-in-command",
                "frequency": "every 1 second",
                "notify": {"url": url},
            },
        )
        assert code == 201, body
        task_id = body["command_id"]
        posts = wait_for(lambda: len(receiver.posts()) >= 2 and receiver.posts(), 60, "2 posts")
        # A few more successful runs: still two.
        ran = int(counter.read_text())
        wait_for(lambda: int(counter.read_text()) >= ran + 3, 30, "three more runs")
        code, history = fleet.api("GET", f"/api/v1/tasks/{task_id}/notifications")
        assert code == 200, history
    posts = receiver.posts()
    payloads = [json.loads(body) for _, _, body in posts]
    assert [p["event"] for p in payloads] == ["failed", "recovered"]
    alert, recovery = payloads
    assert (alert["task_id"], alert["status"], alert["exit_code"]) == (task_id, "failed", 1)
    assert alert["schedule"] == "every 1 second"
    assert alert["execution_url"] == "https://scheduler.example.com" + alert["execution"]
    assert recovery["status"] == "succeeded"
    for at, headers, raw in posts:
        assert b"secret-in-command" not in raw
        assert verify(
            SECRET,
            raw,
            headers["x-taskscheduler-timestamp"],
            headers["x-taskscheduler-signature"],
            now=at,
        )
        assert not verify(
            b"some other secret of enough bytes",
            raw,
            headers["x-taskscheduler-timestamp"],
            headers["x-taskscheduler-signature"],
            now=at,
        )
    assert [
        (n["event"], n["status"], n["attempts"], n["response_code"])
        for n in history["notifications"]
    ] == [("recovered", "delivered", 1, 200), ("failed", "delivered", 1, 200)]
