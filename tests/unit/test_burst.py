"""Issue 8, finding 5: a burst of tasks does not starve everyone else. Tasks reach an agent
many to a signed request, and each operator token creates at a bounded rate."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.python import usage

from taskscheduler.agent.api import MAX_BATCH_TASKS
from taskscheduler.auth import OPERATOR_PREFIX, TokenFile, hash_token, new_token
from taskscheduler.schedule import format_instant, utc_now_from
from taskscheduler.server import tap
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.ratelimit import RateLimiter
from taskscheduler.server.store.memory import MemoryStore
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, Agent, FakeServer
from tests.unit.test_dispatch import FakeAgent, settle, setup, spec

SCHEDULE = "/api/v1/tasks/schedule"


def task(command: str = "echo hi", task_id: uuid.UUID | None = None) -> dict[str, Any]:
    return {
        "task_id": str(task_id or uuid.uuid4()),
        "command": command,
        "frequency": "every 10 seconds",
        "anchor": format_instant(ANCHOR),
    }


async def post(agent: Agent, body: Any, signed: bool = True) -> tuple[int, Any]:
    data = json.dumps(body).encode()
    headers = agent.signed("POST", SCHEDULE, data) if signed else {}
    api: Any = agent.api
    response = await api.post("http://agent.test" + SCHEDULE, data=data, headers=headers)
    return response.code, json.loads(await api.content(response))


@pytest_twisted.ensureDeferred
async def test_the_agent_takes_a_signed_batch_each_task_on_its_own(tmp_path: Any) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    agent = Agent(tmp_path / "data", clock, FakeServer())
    first, second = uuid.uuid4(), uuid.uuid4()
    batch = [
        task("echo one", first),
        {**task(), "frequency": "every so often"},
        task("echo two", second),
        task("echo one again", first),  # the same task twice: the last entry wins
    ]
    code, _ = await post(agent, {"tasks": batch}, signed=False)
    assert code == 401
    code, answer = await post(agent, {"tasks": batch})
    assert code == 200, answer
    results = answer["results"]
    assert [r.get("status") for r in results] == ["scheduled", None, "scheduled", "scheduled"]
    assert results[1]["error"]["code"] == "invalid_request"
    assert [r["task_id"] for r in results] == [e["task_id"] for e in batch]
    tasks = agent.service.scheduler.tasks  # type: ignore[union-attr]
    assert set(tasks) == {first, second}
    assert tasks[first].command == "echo one again"
    # On disk before the answer: a restarted agent has them.
    await agent.stop()
    again = Agent(tmp_path / "data", clock, FakeServer())
    assert set(again.service.scheduler.tasks) == {first, second}  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_batch_says_which_tasks_the_disk_or_a_fault_refused(tmp_path: Any) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    agent = Agent(tmp_path / "data", clock, FakeServer())
    api: Any = agent.service.api

    def full(spec: object) -> None:
        raise OSError(28, "No space left on device")

    api._task_store.save = full
    code, answer = await post(agent, {"tasks": [task(), task()]})
    assert code == 200, answer
    refused = {
        "code": "storage_unavailable",
        "message": "the agent could not store the task; nothing changed, retry later",
    }
    assert [r["error"] for r in answer["results"]] == [refused, refused]
    del api._task_store.save

    def broken(spec: object) -> None:
        raise RuntimeError("secret detail")

    agent.service.scheduler.schedule = broken  # type: ignore[union-attr]
    code, answer = await post(agent, {"tasks": [task()]})
    assert code == 200, answer
    [entry] = answer["results"]
    assert entry["error"] == {"code": "internal_error", "message": "internal error"}


@pytest_twisted.ensureDeferred
async def test_a_batch_past_its_bound_or_malformed_is_refused_whole(tmp_path: Any) -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + 5)
    agent = Agent(tmp_path / "data", clock, FakeServer())
    small = {"task_id": str(uuid.uuid4()), "command": ":", "frequency": "every 10 seconds"}
    for body in (
        {"tasks": [small] * (MAX_BATCH_TASKS + 1)},
        {"tasks": []},
        {"tasks": "no"},
        {"tasks": [small], "command": "echo smuggled"},
    ):
        code, answer = await post(agent, body)
        assert code == 400, (code, answer)
    assert agent.service.scheduler.tasks == {}  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_tasks_reach_an_agent_many_to_a_request() -> None:
    agent = FakeAgent()
    store, dispatcher, clock, http = await setup(agent)
    dispatcher.startService()
    settle(clock, http)
    requests = agent.requests
    created = [await store.create_task(spec(), utc_now_from(0)) for _ in range(450)]
    dispatcher.task_created(created[-1])
    settle(clock, http)
    assert set(agent.tasks) == {t.task_id for t in created}
    assert sorted(agent.batches) == [50, 200, 200]
    assert agent.requests - requests == 3
    assert await store.undelivered_tasks("http://agent-a:8081", 10) == []
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_large_task_goes_in_a_batch_within_the_bytes_bound() -> None:
    agent = FakeAgent()
    store, dispatcher, clock, http = await setup(agent)
    dispatcher.startService()
    settle(clock, http)
    big = "echo " + "x" * 60_000
    created = [await store.create_task(spec(big), utc_now_from(0)) for _ in range(20)]
    dispatcher.task_created(created[-1])
    settle(clock, http)
    assert set(agent.tasks) == {t.task_id for t in created}
    # 512 KiB of specs a request at most: 8 of these 60 KB tasks.
    assert max(agent.batches) == 8 and sum(agent.batches) == 20
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_an_agent_from_before_batches_gets_its_tasks_one_by_one() -> None:
    agent = FakeAgent()
    agent.takes_batches = False
    store, dispatcher, clock, http = await setup(agent)
    dispatcher.startService()
    settle(clock, http)
    created = [await store.create_task(spec(), utc_now_from(0)) for _ in range(5)]
    dispatcher.task_created(created[-1])
    settle(clock, http)
    assert set(agent.tasks) == {t.task_id for t in created}
    assert agent.batches == []
    assert await store.undelivered_tasks("http://agent-a:8081", 10) == []
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_batch_refused_for_another_reason_is_sent_again_as_a_batch() -> None:
    """Only a 400 says the agent predates batches: a 401 (a signature from before the
    agent's restart, say) is retried as a batch."""
    agent = FakeAgent()
    store, dispatcher, clock, http = await setup(agent)
    dispatcher.startService()
    settle(clock, http)
    agent.refuse_next = 401
    created = [await store.create_task(spec(), utc_now_from(0)) for _ in range(5)]
    dispatcher.task_created(created[-1])
    settle(clock, http, 60)
    assert agent.refuse_next is None, "the batch was refused once"
    assert set(agent.tasks) == {t.task_id for t in created}
    assert agent.batches == [5], "then sent again as a batch"
    dispatcher.stopService()


ALICE, BOB = new_token(OPERATOR_PREFIX), new_token(OPERATOR_PREFIX)


async def create(http: StubTreq, token: str) -> tuple[int, Any, Any]:
    response = await http.post(
        "http://server/api/v1/tasks/create",
        data=json.dumps({"command": "echo hi", "frequency": "every 1 hour"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    return response.code, json.loads(await response.content()), response.headers


@pytest_twisted.ensureDeferred
async def test_each_operator_token_creates_at_a_bounded_rate() -> None:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS)
    store = MemoryStore()
    tokens = TokenFile.from_env_value(f"alice {hash_token(ALICE)},bob {hash_token(BOB)}")
    api = ServerAPI(
        store,
        clock,
        ServerAccess(store, clock, tokens, None),
        create_limiter=RateLimiter(clock, rate=2, burst=3),
    )
    http = StubTreq(api.resource())
    for _ in range(3):
        code, _, _ = await create(http, ALICE)
        assert code == 201
    code, answer, headers = await create(http, ALICE)
    assert code == 429 and answer["error"]["code"] == "rate_limited", answer
    assert headers.getRawHeaders("Retry-After") == ["1"]
    code, _, _ = await create(http, BOB)
    assert code == 201, "another token is not held back"
    clock.advance(0.5)  # one token back at 2 a second
    assert (await create(http, ALICE))[0] == 201
    assert (await create(http, ALICE))[0] == 429


def test_the_create_rate_is_an_option() -> None:
    options = tap.Options()
    options.parseOptions(["--create-rate", "0", "--create-burst", "5"])
    assert options["create-rate"] == 0 and options["create-burst"] == 5
    default = tap.Options()
    default.parseOptions([])
    assert default["create-rate"] > 0
    for bad in (["--create-rate", "-1"], ["--create-rate", "nan"], ["--create-burst", "0"]):
        with pytest.raises(usage.UsageError):
            tap.Options().parseOptions(bad)


def test_a_rate_of_zero_limits_nothing() -> None:
    limiter = RateLimiter(Clock(), rate=0, burst=1)
    assert all(limiter.take("alice") == 0 for _ in range(10_000))
