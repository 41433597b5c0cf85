"""Schemathesis against a live ``twistd taskscheduler-server`` (embedded PostgreSQL, an
operator token, no agents, so that no generated command ever runs): every operator and
public route of the OpenAPI document it serves, with valid and invalid inputs, must
answer no 5xx, nothing the document does not describe (status, content type, body,
headers), and no invalid input with a success.

So that the answers about real records are checked too (a task, its outputs, an agent),
a few are made first: tasks, and an agent identity enrolled at a URL where nothing
listens, whose credential reports results for them; generated cases then name those ids
now and then. The agent and join routes are described in the document but left out
here: their credentials belong to agents. Bounded to a minute or two: few examples per
operation, no shrinking, a fixed seed (the same cases every run)."""

from __future__ import annotations

import base64
import contextlib
import re
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from urllib.parse import quote, unquote

import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from taskscheduler.schedule import format_instant, parse_instant
from taskscheduler.server.openapi import document
from taskscheduler.server.openapi.operations import UUID_PATTERN
from tests.integration.daemons import Fleet, free_port, http, running_fleet

pytestmark = pytest.mark.integration

#: Fixed, so that a failure seen once is seen again (and one run is like the next).
SEED = 20261130
#: Examples of each kind per operation, beside the coverage phase's own cases.
MAX_EXAMPLES = 40
#: The fleet's one URL: nothing listens there.
NOWHERE = f"http://127.0.0.1:{free_port()}"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


def operator_or_public(ctx: Any) -> bool:
    """Operations an operator's token (or no credential) may call."""
    security = ctx.operation.definition.raw.get("security", [])
    return all(set(requirement) <= {"operatorToken"} for requirement in security)


#: The document the server serves (``seeded`` checks that it is this one), loaded at
#: collection, so that each operation is a test of its own.
schema = schemathesis.openapi.from_dict(
    document(),
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {
                "mode": "all",
                "max-examples": MAX_EXAMPLES,
                "no-shrink": True,
                "deterministic": True,
                # The operator token is sent with every case (below), not generated.
                "with-security-parameters": False,
            },
            "request-timeout": 10,
        }
    ),
).include(func=operator_or_public)


@dataclass
class Seeded:
    fleet: Fleet
    #: Tasks with a result each (the last one deleted), and the instant of that result.
    tasks: list[str] = field(default_factory=list)
    instants: dict[str, str] = field(default_factory=dict)
    #: What a DELETE may name: a task and a fleet member kept for it (so that the other
    #: routes still find the tasks above), and the task already deleted.
    doomed_task: str = ""
    doomed_member: str = ""
    agents: list[str] = field(default_factory=list)

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        token = token or self.fleet.operator_token
        code, answer = http(
            method,
            self.fleet.server_url + path,
            body,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert code < 300, (method, path, code, answer)
        return answer


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    prepared = Fleet(tmp_path_factory.mktemp("schemathesis"), agents=0)
    # The fleet is one URL where nothing listens: tasks are assigned there, and never run.
    prepared.server.env["AVAILABLE_SERVERS"] = NOWHERE
    # Generated tasks come quickly: the create rate limit is tested elsewhere.
    prepared.server.env["TASKSCHEDULER_CREATE_RATE"] = "1000000"
    prepared.server.env["TASKSCHEDULER_CREATE_BURST"] = "1000000"
    with running_fleet(prepared.root, prepared=prepared) as started:
        yield started


@pytest.fixture(scope="module")
def seeded(fleet: Fleet) -> Seeded:
    code, served = http("GET", f"{fleet.server_url}/api/v1/openapi.json")
    assert code == 200
    assert served == document()
    seeded = Seeded(fleet)
    agent_id = str(uuid.uuid4())
    enrolled = seeded.api(
        "POST",
        "/api/v1/agents/enrol",
        {"agent_id": agent_id, "url": NOWHERE},
        token=fleet.join_secret,
    )
    seeded.agents.append(agent_id)
    outputs = [
        {"status": "succeeded", "exit_code": 0, "stdout": "hello\n"},
        {"status": "failed", "exit_code": 3, "stderr_base64": base64.b64encode(b"\xff").decode()},
        {"status": "skipped", "reason": "the previous run was still going", "exit_code": None},
    ]
    for output in outputs:
        task_id = seeded.api(
            "POST", "/api/v1/tasks/create", {"command": "true", "frequency": "every 1 second"}
        )["command_id"]
        seeded.tasks.append(task_id)
        anchor = parse_instant(seeded.api("GET", f"/api/v1/tasks/{task_id}")["anchor"])
        at = format_instant(anchor + timedelta(seconds=1))
        ran = {"started_at": at, "finished_at": at} if output["status"] != "skipped" else {}
        seeded.api(
            "POST",
            f"/api/v1/tasks/{task_id}/complete",
            {"server_id": agent_id, "scheduled_at": at, **ran, **output},
            token=enrolled["credential"],
        )
        seeded.instants[task_id] = at
    # And one deleted: its answers differ.
    seeded.api("DELETE", f"/api/v1/tasks/{seeded.tasks[-1]}")
    seeded.doomed_task = seeded.api(
        "POST", "/api/v1/tasks/create", {"command": "true", "frequency": "every 1 hour"}
    )["command_id"]
    seeded.doomed_member = f"http://127.0.0.1:{free_port()}"
    seeded.api("POST", "/api/v1/fleet", {"url": seeded.doomed_member})
    return seeded


_UUID = re.compile(UUID_PATTERN)


def _now_and_then(value: str) -> bool:
    """True for about half of the values, the same every run."""
    return zlib.crc32(value.encode("utf-8", "replace")) % 2 == 0


def name_seeded_records(case: Any, seeded: Seeded) -> None:
    """Now and then (by the generated value, so the same every run) make a case's valid
    id, instant or URL one of the seeded records', so that answers about real ones are
    checked too."""
    params = case.path_parameters or {}
    deleting = case.method.upper() == "DELETE"
    tasks = [seeded.doomed_task, seeded.tasks[-1]] if deleting else seeded.tasks
    for name, ids in (("task_id", tasks), ("agent_id", seeded.agents)):
        value = params.get(name)
        if isinstance(value, str) and _UUID.fullmatch(value):
            choice = uuid.UUID(value).int % (len(ids) + 1)
            if choice < len(ids):
                params[name] = ids[choice]
    # (path parameters are held percent-encoded)
    at = params.get("scheduled_at")
    if isinstance(at, str) and params.get("task_id") in seeded.instants and _now_and_then(at):
        with contextlib.suppress(ValueError):
            parse_instant(unquote(at))
            params["scheduled_at"] = quote(seeded.instants[params["task_id"]], safe="")
    url = params.get("url")
    if deleting and isinstance(url, str) and _now_and_then(url):
        params["url"] = quote(seeded.doomed_member, safe="")


@schema.parametrize()
def test_the_server_answers_as_its_openapi_document_says(case: Any, seeded: Seeded) -> None:
    name_seeded_records(case, seeded)
    case.call_and_validate(
        base_url=seeded.fleet.server_url,
        headers={"Authorization": f"Bearer {seeded.fleet.operator_token}"},
        checks=CHECKS,
    )
