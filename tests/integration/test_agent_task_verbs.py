"""A real agent (``twistd taskscheduler-agent``) told, signed as its server signs, to run a
task, then a newer revision of it, then an older one, and to run a task once now.

The agent reports to a small recording server in this process, which acknowledges every
result: the test sees each result as the agent sent it (revision, trigger, output).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from taskscheduler.agent.identity import (
    load_or_create_agent_id,
    save_credential,
    save_server_key,
)
from taskscheduler.auth import AGENT_PREFIX, new_token
from taskscheduler.protocol import RunResult, Trigger, parse_result
from taskscheduler.schedule import format_instant
from taskscheduler.signing import InstructionSigner
from tests.integration.daemons import Daemon, free_port, http, wait_for

#: Seconds to wait for what the agent does within a second or two, on a loaded machine.
DEADLINE = 60


class Recorder(BaseHTTPRequestHandler):
    """The server's two result routes: every result stored, and kept for the test."""

    results: list[RunResult] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        items = body["results"] if self.path == "/api/v1/results" else [body]
        with self.lock:
            self.results.extend(parse_result(item) for item in items)
        answer: Any = {"status": "stored"}
        if self.path == "/api/v1/results":
            answer = {"results": [{"status": "stored"} for _ in items]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class WallClock:
    def seconds(self) -> float:
        return time.time()


class RealAgent:
    """The agent daemon, enrolled beforehand with ``key``'s public half pinned."""

    def __init__(self, root: Path, server_url: str) -> None:
        self.key = Ed25519PrivateKey.generate()
        data = root / "data"
        self.agent_id = load_or_create_agent_id(data)
        save_credential(data, new_token(AGENT_PREFIX))
        save_server_key(data, self.key.public_key())
        self.url = f"http://127.0.0.1:{free_port()}"
        listen = f"tcp:{self.url.rsplit(':', 1)[1]}:interface=127.0.0.1"
        self.daemon = Daemon(
            "agent",
            [
                "taskscheduler-agent",
                "--listen",
                listen,
                "--server",
                server_url,
                "--data-dir",
                str(data),
            ],
            root,
            {},
        )
        self.signer = InstructionSigner(self.key, WallClock())  # type: ignore[arg-type]

    def signed(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = b"" if body is None else json.dumps(body).encode()
        authorization = self.signer.authorization(method, path, self.agent_id, data)
        return http(method, self.url + path, body, headers={"Authorization": authorization})


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RealAgent]:
    Recorder.results = []
    recorder = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=recorder.serve_forever, daemon=True)
    thread.start()
    real = RealAgent(tmp_path, f"http://127.0.0.1:{recorder.server_address[1]}")
    real.daemon.start()
    try:
        # Signatures are dated to the second, and the agent refuses those dated before
        # it started (they may be replays): the first second of its life, it refuses all.
        wait_for(
            lambda: real.signed("GET", "/api/v1/agent/tasks")[0] == 200,
            DEADLINE,
            "the agent to take signed instructions",
        )
        yield real
    except BaseException:
        print(real.daemon.log())
        raise
    finally:
        real.daemon.stop()
        recorder.shutdown()
        recorder.server_close()


def results_of(task_id: str) -> list[RunResult]:
    with Recorder.lock:
        found = [r for r in Recorder.results if str(r.task_id) == task_id]
    return sorted(found, key=lambda r: r.scheduled_at)


def task(task_id: str, revision: int, command: str, every: str = "every 1 second") -> Any:
    return {
        "task_id": task_id,
        "command": command,
        "frequency": every,
        "anchor": format_instant(datetime.now(UTC).replace(microsecond=0)),
        "time_limit_seconds": 30,
        "revision": revision,
    }


def test_a_newer_revision_replaces_the_task_and_an_older_one_changes_nothing(
    agent: RealAgent,
) -> None:
    task_id = str(uuid.uuid4())
    code, answer = agent.signed("POST", "/api/v1/tasks/schedule", task(task_id, 1, "echo one"))
    assert (code, answer["status"]) == (200, "scheduled"), answer

    def ran(stdout: bytes, revision: int) -> RunResult | None:
        return next(
            (r for r in results_of(task_id) if r.stdout.data == stdout and r.revision == revision),
            None,
        )

    wait_for(lambda: ran(b"one\n", 1), DEADLINE, "a run of revision 1")
    code, _ = agent.signed("POST", "/api/v1/tasks/schedule", task(task_id, 2, "echo two"))
    assert code == 200
    first_two = wait_for(lambda: ran(b"two\n", 2), DEADLINE, "a run of revision 2")
    # A late delivery of revision 1: answered, and nothing changes.
    code, answer = agent.signed("POST", "/api/v1/tasks/schedule", task(task_id, 1, "echo one"))
    assert (code, answer["status"]) == (200, "scheduled")
    sent_at = datetime.now(UTC)
    wait_for(
        lambda: any(r.scheduled_at > sent_at + timedelta(seconds=2) for r in results_of(task_id)),
        DEADLINE,
        "runs after revision 1 was sent again",
    )
    later = [r for r in results_of(task_id) if r.scheduled_at > first_two.scheduled_at]
    assert later and all(r.revision == 2 for r in later), [
        (r.scheduled_at, r.revision) for r in later
    ]
    assert all(r.stdout.data == b"two\n" for r in later if r.stdout.data)
    assert all(r.trigger is Trigger.SCHEDULE for r in results_of(task_id))
    assert [r.revision for r in results_of(task_id)] == sorted(
        r.revision or 0 for r in results_of(task_id)
    ), "an instant of revision 1 never follows one of revision 2"


def test_a_manual_run_runs_once_and_is_reported_as_manual(agent: RealAgent) -> None:
    task_id = str(uuid.uuid4())
    code, _ = agent.signed(
        "POST",
        "/api/v1/tasks/schedule",
        task(task_id, 3, 'echo "by hand at $TASKSCHEDULER_SCHEDULED_AT"', every="every 1 hour"),
    )
    assert code == 200
    scheduled_at = format_instant(datetime.now(UTC))  # the server's now
    path = f"/api/v1/tasks/{task_id}/run"
    body = {"scheduled_at": scheduled_at, "revision": 3}
    code, answer = agent.signed("POST", path, body)
    assert (code, answer) == (
        202,
        {
            "agent_id": str(agent.agent_id),
            "task_id": task_id,
            "scheduled_at": scheduled_at,
            "status": "accepted",
        },
    )
    code, answer = agent.signed("POST", path, body)
    assert (code, answer["status"]) == (202, "duplicate")
    [result] = wait_for(lambda: results_of(task_id), DEADLINE, "the manual run's result")
    assert format_instant(result.scheduled_at) == scheduled_at
    assert (result.trigger, result.revision, result.status.value) == (
        Trigger.MANUAL,
        3,
        "succeeded",
    )
    assert result.stdout.data == f"by hand at {scheduled_at}\n".encode()
    code, answer = agent.signed("POST", f"/api/v1/tasks/{uuid.uuid4()}/run", body)
    assert (code, answer["error"]["code"]) == (404, "unknown_task")
    assert len(results_of(task_id)) == 1, "the duplicate delivery ran nothing"
