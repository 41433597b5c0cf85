"""Server -> agent task delivery on a task.Clock, through StubTreq over the agent's real
Klein app (a real agent service, checking the server's signatures, over a fake runner);
over a fake agent only for what the real one cannot be made to do (refuse a given task
or removal, predate batches, answer a hostile list)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest_twisted
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource

from taskscheduler.protocol import TaskSpec, parse_task_spec, task_spec_to_json
from taskscheduler.schedule import parse_frequency, utc_now_from
from taskscheduler.server.dispatch import Dispatcher
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.server.store.records import AuditEvent, Task
from taskscheduler.signing import InstructionSigner
from tests.unit.agent_fakes import SERVER_KEY, Agent, FakeServer

URL = "http://agent-a:8081"
AGENT_ID = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")


class AgentFront(Resource):
    """The agent's real app, behind a front that can take it down (503); it counts the
    instructions that change something, and the removals."""

    isLeaf = True

    def __init__(self, data_dir: Path, clock: Clock) -> None:
        super().__init__()
        data_dir.mkdir(parents=True)
        (data_dir / "agent_id").write_text(f"{AGENT_ID}\n")
        self.agent = Agent(data_dir, clock, FakeServer())
        assert self.agent.service.api is not None
        self._app = self.agent.service.api.resource()
        self.down = False
        self.requests = 0
        self.removals: list[uuid.UUID] = []

    @property
    def tasks(self) -> dict[uuid.UUID, TaskSpec]:
        assert self.agent.service.scheduler is not None
        return self.agent.service.scheduler.tasks

    def render(self, request: Any) -> Any:
        if request.method != b"GET":
            self.requests += 1
        if self.down:
            request.setResponseCode(503)
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"error": {"code": "down", "message": "down"}}'
        if request.method == b"DELETE":
            self.removals.append(uuid.UUID(request.path.decode().rsplit("/", 1)[1]))
        return self._app.render(request)

    async def behind_the_servers_back(self, method: str, path: str, body: bytes = b"") -> None:
        """An instruction the server did not send (a task lost, a backup restored)."""
        api: Any = self.agent.api
        d = api.request(
            method, URL + path, data=body or None, headers=self.agent.signed(method, path, body)
        )
        self.agent.settle()
        response = await d
        assert response.code == 200, await api.content(response)


async def enrol(store: MemoryStore, clock: Clock) -> None:
    now = utc_now_from(clock.seconds())
    await store.enrol_agent(
        AGENT_ID, URL, "sha256:" + "a" * 64, now, AuditEvent(now, "join:t", "x", "y", "")
    )


async def real_setup(
    tmp_path: Path, enrolled: bool = True
) -> tuple[MemoryStore, Dispatcher, Clock, StubTreq, AgentFront]:
    clock = Clock()
    store = MemoryStore()
    await store.start()
    await store.set_fleet([URL])
    if enrolled:
        await enrol(store, clock)
    agent = AgentFront(tmp_path / "agent", clock)
    http = StubTreq(agent)
    dispatcher = Dispatcher(
        store, http, clock, [URL], signer=signer(clock), reconcile_interval=30, jitter=lambda: 1.0
    )
    return store, dispatcher, clock, http, agent


def signer(clock: Clock) -> InstructionSigner:
    return InstructionSigner(SERVER_KEY, clock)


class FakeAgent:
    """Just enough of the agent's API for the faults the real one cannot be made to show:
    it refuses given tasks or removals, or predates batches; it can be 'down'."""

    app = Klein()

    def __init__(self) -> None:
        self.tasks: dict[uuid.UUID, TaskSpec] = {}
        self.down = False
        self.requests = 0
        self.batches: list[int] = []  # the number of tasks in each batch received
        self.takes_batches = True
        self.refuse_next: int | None = None  # the status of the next schedule's answer
        self.removals: list[uuid.UUID] = []
        self.refused_tasks: set[str] = set()  # commands it answers 400 to
        self.refused_removals: set[uuid.UUID] = set()  # task ids it answers 400 to
        self.hang = False  # never answer a task sent alone

    @app.route("/api/v1/tasks/schedule", methods=["POST"])
    def schedule(self, request: Any) -> bytes:
        self.requests += 1
        request.setHeader(b"Content-Type", b"application/json")
        if self.down:
            request.setResponseCode(503)
            return b'{"error": {"code": "down", "message": "down"}}'
        if self.refuse_next is not None:  # e.g. 401: a signature from before its restart
            request.setResponseCode(self.refuse_next)
            self.refuse_next = None
            return b'{"error": {"code": "refused", "message": "refused once"}}'
        body = json.loads(request.content.read())
        if "tasks" in body and not self.takes_batches:  # an agent from before batches
            request.setResponseCode(400)
            return b'{"error": {"code": "invalid_request", "message": "task_id is required"}}'
        if "tasks" in body:  # a batch, as the real agent takes it: each task on its own
            self.batches.append(len(body["tasks"]))
            results = []
            for item in body["tasks"]:
                spec = parse_task_spec(item, utc_now_from(0))
                if spec.command in self.refused_tasks:
                    error = {"code": "invalid_request", "message": "not this one"}
                    results.append({"task_id": str(spec.task_id), "error": error})
                else:
                    self.tasks[spec.task_id] = spec
                    results.append({"task_id": str(spec.task_id), "status": "scheduled"})
            return json.dumps({"agent_id": str(AGENT_ID), "results": results}).encode()
        if self.hang:
            return Deferred()  # type: ignore[return-value]
        spec = parse_task_spec(body, utc_now_from(0))
        if spec.command in self.refused_tasks:
            request.setResponseCode(400)
            return b'{"error": {"code": "invalid_request", "message": "not this one"}}'
        self.tasks[spec.task_id] = spec
        return json.dumps({"agent_id": str(AGENT_ID), "task_id": str(spec.task_id)}).encode()

    @app.route("/api/v1/tasks/<task_id>", methods=["DELETE"])
    def unschedule(self, request: Any, task_id: str) -> bytes:
        self.requests += 1
        request.setHeader(b"Content-Type", b"application/json")
        if self.down:
            request.setResponseCode(503)
            return b'{"error": {"code": "down", "message": "down"}}'
        if uuid.UUID(task_id) in self.refused_removals:
            request.setResponseCode(400)
            return b'{"error": {"code": "invalid_request", "message": "not this one"}}'
        self.removals.append(uuid.UUID(task_id))
        self.tasks.pop(uuid.UUID(task_id), None)  # idempotent, like the real agent
        return json.dumps({"agent_id": str(AGENT_ID), "task_id": task_id}).encode()

    @app.route("/api/v1/agent/tasks", methods=["GET"])
    def task_ids(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        if self.down:
            request.setResponseCode(503)
            return b'{"error": {"code": "down", "message": "down"}}'
        return json.dumps(
            {"agent_id": str(AGENT_ID), "task_ids": [str(t) for t in self.tasks]}
        ).encode()


def spec(command: str = "echo hi") -> TaskSpec:
    return TaskSpec(
        task_id=uuid.uuid4(),
        command=command,
        frequency=parse_frequency("every 10 seconds"),
        anchor=utc_now_from(1_795_000_000),
        time_limit=timedelta(seconds=10),
    )


async def setup(agent: FakeAgent) -> tuple[MemoryStore, Dispatcher, Clock, StubTreq]:
    clock = Clock()
    store = MemoryStore()
    await store.start()
    await store.set_fleet([URL])
    http = StubTreq(agent.app.resource())
    dispatcher = Dispatcher(store, http, clock, [URL], reconcile_interval=30, jitter=lambda: 1.0)
    return store, dispatcher, clock, http


def settle(clock: Clock, http: StubTreq, seconds: float = 0) -> None:
    clock.advance(seconds)
    http.flush()
    clock.advance(0)
    http.flush()


@pytest_twisted.ensureDeferred
async def test_a_created_task_reaches_the_agent_with_its_anchor_and_limit(
    tmp_path: Path,
) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(1_795_000_000))
    dispatcher.task_created(task)
    settle(clock, http)
    assert agent.tasks == {task.task_id: task.spec}
    assert await store.undelivered_tasks(URL, 10) == []
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_an_agent_that_is_down_gets_its_tasks_when_it_comes_back(tmp_path: Path) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    agent.down = True
    dispatcher.startService()
    tasks = [await store.create_task(spec(f"echo {i}"), utc_now_from(0)) for i in range(3)]
    for task in tasks:
        dispatcher.task_created(task)
    settle(clock, http)
    assert agent.tasks == {}
    # Back-off: 1 s, 2 s, 4 s ... (jitter pinned to the ceiling); no hammering meanwhile.
    for delay in (1, 2, 4):
        settle(clock, http, delay)
    before = agent.requests
    dispatcher.task_created(tasks[0])
    settle(clock, http)
    assert agent.requests == before, "a create must not bypass the back-off"
    agent.down = False
    settle(clock, http, 8)
    assert set(agent.tasks) == {t.task_id for t in tasks}
    assert await store.undelivered_tasks(URL, 10) == []
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_stopped_dispatcher_sends_nothing_more(tmp_path: Path) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    agent.down = True
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(0))
    dispatcher.task_created(task)
    settle(clock, http)
    settle(clock, http, 1)  # the first retry; the next is due in 2 s
    before = agent.requests
    dispatcher.stopService()
    dispatcher.task_created(task)
    agent.down = False
    settle(clock, http, 120)
    assert agent.requests == before, "no request after stop"
    assert agent.tasks == {}


@pytest_twisted.ensureDeferred
async def test_reconciliation_resends_what_an_agent_lost(tmp_path: Path) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(0))
    dispatcher.task_created(task)
    settle(clock, http)
    assert task.task_id in agent.tasks
    await agent.behind_the_servers_back("DELETE", f"/api/v1/tasks/{task.task_id}")
    assert agent.tasks == {}
    settle(clock, http, 30)
    assert set(agent.tasks) == {task.task_id}
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_server_restart_delivers_what_was_never_acknowledged(tmp_path: Path) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    agent.down = True
    task = await store.create_task(spec(), utc_now_from(0))
    # The server went down before delivering; a new dispatcher over the same store starts.
    agent.down = False
    fresh = Dispatcher(store, http, clock, [URL], signer=signer(clock), jitter=lambda: 1.0)
    fresh.startService()
    settle(clock, http)
    assert set(agent.tasks) == {task.task_id}
    fresh.stopService()
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_instructions_are_signed_for_the_agent_enrolled_at_the_url_only(
    tmp_path: Path,
) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path, enrolled=False)
    with capturedLogs() as events:
        dispatcher.startService()
        task = await store.create_task(spec(), utc_now_from(0))
        dispatcher.task_created(task)
        settle(clock, http)
        assert agent.requests == 0, "nobody enrolled at the URL: nothing is sent"
        await enrol(store, clock)
        dispatcher.agent_enrolled(URL)
        settle(clock, http)
        assert set(agent.tasks) == {task.task_id}
        assert await store.undelivered_tasks(URL, 10) == []
        settle(clock, http, 30)  # a signed reconciliation too
        await delete(store, task)
        dispatcher.task_deleted(task)
        settle(clock, http)
    assert agent.removals == [task.task_id] and agent.tasks == {}, "the removal is signed too"
    assert await store.pending_removals(URL, 10) == []
    refused = [formatEvent(e) for e in events if "401" in formatEvent(e)]
    assert refused == [], refused
    dispatcher.stopService()


# -- deleted tasks -----------------------------------------------------------------------------


async def delete(store: MemoryStore, task: Task) -> None:
    now = utc_now_from(1_795_000_100)
    deleted = await store.delete_task(
        task.task_id, now, AuditEvent(now, "operator:t", "task.deleted", str(task.task_id), "")
    )
    assert deleted is not None


@pytest_twisted.ensureDeferred
async def test_a_deleted_task_is_dropped_by_the_agent_and_the_store_knows(tmp_path: Path) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    kept, gone = [await store.create_task(spec(c), utc_now_from(0)) for c in ("kept", "gone")]
    dispatcher.task_created(gone)
    settle(clock, http)
    assert set(agent.tasks) == {kept.task_id, gone.task_id}
    await delete(store, gone)
    dispatcher.task_deleted(gone)
    settle(clock, http)
    assert agent.removals == [gone.task_id]
    assert set(agent.tasks) == {kept.task_id}
    assert await store.pending_removals(URL, 10) == []
    settle(clock, http, 30)  # reconciliation finds nothing to do
    assert agent.removals == [gone.task_id] and set(agent.tasks) == {kept.task_id}
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_task_deleted_before_delivery_is_never_sent(tmp_path: Path) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    agent.down = True
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(0))
    dispatcher.task_created(task)
    settle(clock, http)
    await delete(store, task)
    agent.down = False
    dispatcher.task_deleted(task)
    settle(clock, http, 1)
    assert agent.tasks == {}
    assert agent.removals == [task.task_id], "the agent is told anyway: it may have it"
    assert await store.pending_removals(URL, 10) == []
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_removal_is_retried_with_back_off_and_survives_a_server_restart(
    tmp_path: Path,
) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(0))
    dispatcher.task_created(task)
    settle(clock, http)
    agent.down = True
    await delete(store, task)
    dispatcher.task_deleted(task)
    settle(clock, http)
    for delay in (1, 2):
        settle(clock, http, delay)
    before = agent.requests
    settle(clock, http, 1)
    assert agent.requests == before, "backing off, not hammering"
    settle(clock, http, 3)
    assert agent.requests == before + 1, "retried after the back-off"
    assert task.task_id in agent.tasks
    assert await store.pending_removals(URL, 10) == [task.task_id]

    # The server stops before the agent came back; a new one over the same store finishes.
    dispatcher.stopService()
    agent.down = False
    fresh = Dispatcher(store, http, clock, [URL], signer=signer(clock), jitter=lambda: 1.0)
    fresh.startService()
    settle(clock, http)
    assert agent.tasks == {}
    assert await store.pending_removals(URL, 10) == []
    fresh.stopService()


@pytest_twisted.ensureDeferred
async def test_reconciliation_removes_a_deleted_task_the_agent_still_has(tmp_path: Path) -> None:
    store, dispatcher, clock, http, agent = await real_setup(tmp_path)
    dispatcher.startService()
    task = await store.create_task(spec(), utc_now_from(0))
    dispatcher.task_created(task)
    settle(clock, http)
    await delete(store, task)
    dispatcher.task_deleted(task)
    settle(clock, http)
    assert agent.tasks == {}
    # The agent was restored from a backup taken before the deletion.
    body = json.dumps(task_spec_to_json(task.spec)).encode()
    await agent.behind_the_servers_back("POST", "/api/v1/tasks/schedule", body)
    assert set(agent.tasks) == {task.task_id}
    settle(clock, http, 30)
    assert agent.tasks == {}
    assert agent.removals == [task.task_id, task.task_id]
    assert await store.pending_removals(URL, 10) == []
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_task_the_agent_refuses_holds_back_no_removal_and_no_other_task() -> None:
    agent = FakeAgent()
    store, dispatcher, clock, http = await setup(agent)
    dispatcher.startService()
    gone = await store.create_task(spec("gone"), utc_now_from(0))
    dispatcher.task_created(gone)
    settle(clock, http)
    agent.refused_tasks.add("refused")
    refused = await store.create_task(spec("refused"), utc_now_from(0))
    await delete(store, gone)
    dispatcher.task_deleted(gone)
    settle(clock, http)
    assert agent.removals == [gone.task_id], "the removal went despite the refused task"
    assert await store.pending_removals(URL, 10) == []
    assert [t.task_id for t in await store.undelivered_tasks(URL, 10)] == [refused.task_id]
    # The agent answers: a task created meanwhile goes at once, not after the back-off.
    later = await store.create_task(spec("later"), utc_now_from(0))
    dispatcher.task_created(later)
    settle(clock, http)
    assert set(agent.tasks) == {later.task_id}
    # The refused task is still offered, with back-off, until the agent takes it.
    agent.refused_tasks.clear()
    settle(clock, http, 60)
    assert set(agent.tasks) == {later.task_id, refused.task_id}
    assert await store.undelivered_tasks(URL, 10) == []
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_a_removal_the_agent_refuses_holds_back_no_delivery() -> None:
    agent = FakeAgent()
    store, dispatcher, clock, http = await setup(agent)
    dispatcher.startService()
    gone = await store.create_task(spec("gone"), utc_now_from(0))
    dispatcher.task_created(gone)
    settle(clock, http)
    agent.refused_removals.add(gone.task_id)
    await delete(store, gone)
    fresh = await store.create_task(spec("fresh"), utc_now_from(0))
    dispatcher.task_deleted(gone)
    settle(clock, http)
    assert fresh.task_id in agent.tasks, "the delivery went despite the refused removal"
    assert await store.pending_removals(URL, 10) == [gone.task_id]
    later = await store.create_task(spec("later"), utc_now_from(0))
    dispatcher.task_created(later)
    settle(clock, http)
    assert later.task_id in agent.tasks, "and so does one made meanwhile, at once"
    agent.refused_removals.clear()
    settle(clock, http, 60)
    assert agent.removals == [gone.task_id]
    assert await store.pending_removals(URL, 10) == []
    dispatcher.stopService()


@pytest_twisted.ensureDeferred
async def test_stopping_mid_pass_sends_no_next_request() -> None:
    agent = FakeAgent()
    agent.takes_batches = False  # so that a pass sends one request after another
    agent.hang = True
    store, dispatcher, clock, http = await setup(agent)
    dispatcher.startService()
    settle(clock, http)
    created = [await store.create_task(spec(), utc_now_from(0)) for _ in range(3)]
    dispatcher.task_created(created[-1])
    settle(clock, http)
    assert agent.requests == 2, "the batch refused, then the first task alone, unanswered"
    dispatcher.stopService()
    settle(clock, http, 60)
    assert agent.requests == 2, "no request after stop"
