"""Issue 11's task options end to end on the server: what operators may send (and the
clear 400s), that both stores keep them, that GET shows them, that a PATCH of one is a
revision audited without the environment's values, that agents are told them, and the CLI
flags that set them."""

from __future__ import annotations

import dataclasses
import json
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
import pytest_twisted

from taskscheduler.protocol import InvalidMessage, parse_task_spec, task_spec_to_json
from taskscheduler.protocol.options import (
    Overlap,
    RunOn,
    Target,
    TaskOptions,
    options_from_json,
    options_to_json,
    parse_options,
)
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AuditEvent, TaskChange
from tests.unit.cli_stub import A, StubApi, answer, run
from tests.unit.test_server_api import AGENT_A, START, Harness, started
from tests.unit.test_store_contract import ANCHOR, make_spec
from tests.unit.test_store_task_verbs import at

AGENT = uuid.UUID("6b0c1a55-34f5-4f55-8a43-5a0c4a4c2f10")


# -- the rules of the fields ----------------------------------------------------------------


def test_no_options_means_every_default_as_before() -> None:
    options = parse_options({"command": "true", "frequency": "every 1 second"})
    assert options == TaskOptions()
    assert options_to_json(options) == {
        "target": None,
        "run_on": "all",
        "overlap": "skip",
        "max_concurrent": 1,
        "retries": 0,
        "retry_delay_seconds": 10,
        "env": {},
        "working_dir": None,
        "notify": None,
    }


def test_every_option_is_read_and_shown_back_as_sent() -> None:
    sent = {
        "target": {"labels": {"role": "web", "dc": "eu-1"}},
        "run_on": "one",
        "overlap": "allow",
        "max_concurrent": 3,
        "retries": 2,
        "retry_delay_seconds": 5,
        "env": {"MODE": "fast", "_X1": ""},
        "working_dir": "/srv/app",
        "notify": {"on": ["failed", "recovered"], "url": "https://hooks.example.com/x"},
    }
    options = parse_options(sent)
    assert options.target.matches(AGENT, {"role": "web", "dc": "eu-1", "os": "linux"})
    assert not options.target.matches(AGENT, {"role": "web"})
    assert (options.run_on, options.overlap, options.max_concurrent) == (
        RunOn.ONE,
        Overlap.ALLOW,
        3,
    )
    assert (options.retries, options.retry_delay) == (2, timedelta(seconds=5))
    shown = options_to_json(options)
    assert shown == {**sent, "target": {"labels": {"dc": "eu-1", "role": "web"}}}
    assert options_from_json(shown) == options


def test_a_target_of_agents_matches_those_agents_only() -> None:
    target = parse_options({"target": {"agents": [str(AGENT)]}}).target
    assert target == Target(agents=frozenset({AGENT}))
    assert target.matches(AGENT, {}) and not target.matches(uuid.uuid4(), {})
    assert not target.matches(None, {})  # a member not enrolled yet has no id
    assert Target().matches(None, {})  # no target: every agent


def test_allow_defaults_to_ten_at_once_and_leaving_allow_goes_back_to_one() -> None:
    allow = parse_options({"overlap": "allow"})
    assert allow.max_concurrent == 10
    assert parse_options({"overlap": "replace"}, allow).max_concurrent == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"max_concurrent": 2}, '\'max_concurrent\' applies only with "overlap": "allow"'),
        ({"retry_delay_seconds": 5}, "'retry_delay_seconds' applies only with 'retries' above 0"),
        ({"overlap": "queue"}, '\'overlap\' must be one of "skip", "allow", "replace"'),
        ({"run_on": "some"}, '\'run_on\' must be one of "all", "one"'),
        ({"retries": 11}, "'retries' must be an integer from 0 to 10"),
        ({"overlap": "allow", "max_concurrent": 0}, "from 1 to 100"),
        ({"target": {"agents": []}}, "'target.agents' must be a list of 1 to 100 agent ids"),
        ({"target": {"agents": ["x"]}}, "'target.agents' is not a valid UUID"),
        ({"target": {"labels": {}}}, "'target.labels' must be an object of 1 to 20 labels"),
        ({"target": {"labels": {"role": "a b"}}}, "the value of label 'role' must be"),
        ({"target": {"agents": [str(AGENT)], "labels": {"a": "b"}}}, "'target' must be null"),
        ({"target": "web"}, "'target' must be null"),
        ({"env": {"1X": "a"}}, "'env': '1X' is not a variable name"),
        ({"env": {"TASKSCHEDULER_TASK_ID": "a"}}, "TASKSCHEDULER_TASK_ID is reserved"),
        ({"env": {"A": 1}}, "'env': the value of A must be a string"),
        ({"env": {"A": "x\x00"}}, "the value of A must be at most 4096 bytes"),
        ({"env": {"A": "x" * 4097}}, "the value of A must be at most 4096 bytes"),
        ({"working_dir": "srv"}, "'working_dir' must be an absolute path"),
    ],
)
def test_a_bad_option_is_refused_with_a_message_that_says_why(
    body: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_options(body)
    assert message in str(caught.value)


def test_an_env_value_never_appears_in_the_message_refusing_it() -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_options({"env": {"TOKEN": "s3cr3t" * 1000}})
    assert "s3cr3t" not in str(caught.value)


def test_agents_are_told_every_option_and_an_older_server_means_the_defaults() -> None:
    spec = dataclasses.replace(make_spec(), options=parse_options({"overlap": "replace"}))
    told = json.loads(json.dumps(task_spec_to_json(spec)))
    assert told["overlap"] == "replace" and told["env"] == {}
    assert parse_task_spec(told, ANCHOR) == spec
    for name in ("target", "run_on", "overlap", "max_concurrent", "retries", "env"):
        del told[name]
    assert parse_task_spec(told, ANCHOR).options == parse_options({"retry_delay_seconds": None})


# -- both stores ------------------------------------------------------------------------------


def audit(action: str) -> AuditEvent:
    return AuditEvent(at=ANCHOR, actor="operator:test", action=action, target="t", peer="-")


@pytest_twisted.ensureDeferred
async def test_both_stores_keep_the_options_and_a_change_of_one_is_a_revision(
    store: Store,
) -> None:
    options = parse_options({"overlap": "allow", "env": {"TOKEN": "s3cr3t"}, "retries": 1})
    task = await store.create_task(dataclasses.replace(make_spec(), options=options), ANCHOR)
    assert (await store.get_task(task.task_id)).spec.options == options  # type: ignore[union-attr]

    change = TaskChange(options={"max_concurrent": 4, "env": {"TOKEN": "n3w"}})
    answer_ = await store.update_task(task.task_id, change, at(2), audit("task.updated"))
    assert answer_ is not None and answer_[1]
    stored = await store.get_task(task.task_id)
    assert stored is not None and stored.spec.revision == 2
    assert stored.spec.options.max_concurrent == 4 and dict(stored.spec.options.env) == {
        "TOKEN": "n3w"
    }
    details = (await store.audit_events(1))[0].details
    assert details["old"] == {"max_concurrent": 10} and details["new"] == {"max_concurrent": 4}
    assert "s3cr3t" not in json.dumps(details) and "n3w" not in json.dumps(details)

    # An option that does not fit the task's changes nothing.
    with pytest.raises(InvalidMessage):
        await store.update_task(
            task.task_id,
            TaskChange(options={"overlap": "skip", "max_concurrent": 2}),
            at(3),
            audit("task.updated"),
        )
    assert await store.get_task(task.task_id) == stored


# -- the API ---------------------------------------------------------------------------------


async def create(h: Harness, **fields: Any) -> tuple[int, Any]:
    return await h.request(
        "POST", "/api/v1/tasks/create", {"command": "true", "frequency": "every 1 minute", **fields}
    )


@pytest_twisted.ensureDeferred
async def test_operators_set_options_on_create_see_them_and_change_them() -> None:
    h = await started(Harness())
    code, body = await create(
        h, target={"agents": [str(AGENT_A)]}, overlap="replace", env={"MODE": "fast"}
    )
    assert code == 201, body
    task_id = body["command_id"]
    code, task = await h.request("GET", f"/api/v1/tasks/{task_id}")
    assert code == 200
    assert task["target"] == {"agents": [str(AGENT_A)]}
    assert (task["overlap"], task["max_concurrent"], task["env"]) == (
        "replace",
        1,
        {"MODE": "fast"},
    )
    assert (task["run_on"], task["retries"], task["working_dir"]) == ("all", 0, None)

    code, task = await h.request(
        "PATCH", f"/api/v1/tasks/{task_id}", {"target": None, "working_dir": "/tmp"}
    )
    assert code == 200, task
    assert (task["target"], task["working_dir"], task["revision"]) == (None, "/tmp", 2)

    # A PATCH that does not fit the task: 400 saying why, and no revision.
    code, body = await h.request("PATCH", f"/api/v1/tasks/{task_id}", {"max_concurrent": 5})
    assert code == 400 and body["error"]["code"] == "invalid_request"
    assert "'max_concurrent' applies only with" in body["error"]["message"]
    code, task = await h.request("GET", f"/api/v1/tasks/{task_id}")
    assert task["revision"] == 2


@pytest_twisted.ensureDeferred
async def test_a_bad_option_on_create_is_a_400_and_creates_nothing() -> None:
    h = await started(Harness())
    code, body = await create(h, env={"TASKSCHEDULER_X": "1"})
    assert code == 400 and body["error"]["code"] == "invalid_request"
    assert "reserved" in body["error"]["message"]
    code, body = await h.request("GET", "/api/v1/tasks")
    assert body["tasks"] == []
    assert START and AGENT_A  # the harness's clock and agents are those of test_server_api


# -- the CLI ---------------------------------------------------------------------------------


def test_the_cli_flags_send_the_options() -> None:
    api = StubApi()
    bodies: list[Any] = []

    def created(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return answer({"command_id": A}, 201)

    api.route("POST", "/api/v1/tasks/create", created)
    args = ["--every", "1 minute", "--target-label", "role=web", "--target-label", "dc=eu"]
    args += ["--overlap", "allow", "--max-concurrent", "3", "--retries", "2"]
    args += ["--retry-delay", "5", "--env", "MODE=fast", "--env", "X=a=b", "--run-on", "one"]
    args += ["--working-dir", "/srv", "--", "./sync"]
    result = run(api, "tasks", "create", *args)
    assert result.exit_code == 0, result.output
    assert bodies[-1] == {
        "command": "./sync",
        "frequency": "every 1 minute",
        "target": {"labels": {"role": "web", "dc": "eu"}},
        "overlap": "allow",
        "max_concurrent": 3,
        "retries": 2,
        "retry_delay_seconds": 5,
        "env": {"MODE": "fast", "X": "a=b"},
        "run_on": "one",
        "working_dir": "/srv",
    }
    bad = run(api, "tasks", "create", "--every", "1 minute", "--env", "NOEQUALS", "--", "true")
    assert bad.exit_code == 2 and "is not NAME=VALUE" in bad.output
