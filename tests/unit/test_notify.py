"""Webhooks on the server's real API (StubTreq) with ``task.Clock``: results reported by
agents reach a receiver (a twisted.web resource behind its own StubTreq) as signed
POSTs, de-duplicated, retried with back-off, recorded in the task's history."""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.usage import UsageError
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from taskscheduler.protocol import InvalidMessage, RunResult
from taskscheduler.protocol.notify import NotifyConfig, NotifyEvent
from taskscheduler.protocol.options import (
    RunOn,
    TaskOptions,
    options_from_json,
    options_to_json,
    parse_options,
)
from taskscheduler.retry import no_jitter
from taskscheduler.server.notify.notifier import Notifier
from taskscheduler.server.notify.payload import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    load_or_create_secret,
    signature,
    verify,
)
from taskscheduler.server.notify.rules import WHOLE_TASK, agent_key
from taskscheduler.server.options import Options as ServerOptions
from taskscheduler.server.store.memory import MemoryStore
from taskscheduler.signing import KeyFileError
from tests.unit.test_openapi import answer_validator
from tests.unit.test_server_api import AGENT_A, AGENT_B, Harness, started

SECRET = b"0123456789abcdef0123456789abcdef"
HOOK = "https://hooks.example.com/services/T1"
DEFAULT_HOOK = "https://chat.example.com/default"
COMMAND = "curl -H 'Authorization: Bearer sekrit' https://x"


@dataclass
class Received:
    at: float
    url: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


class Receiver(Resource):
    """A webhook receiver: records each POST; answers the next of ``codes`` (then 200),
    or never (``hang``)."""

    isLeaf = True

    def __init__(self, clock: Clock, codes: list[int] | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.codes = list(codes or [])
        self.hang = False
        self.received: list[Received] = []
        self.gets: list[str] = []

    def render_POST(self, request: Any) -> Any:
        headers = {
            name.decode().lower(): values[0].decode()
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        url = request.uri.decode()
        self.received.append(Received(self.clock.seconds(), url, headers, request.content.read()))
        if self.hang:
            return NOT_DONE_YET
        code = self.codes.pop(0) if self.codes else 200
        request.setResponseCode(code)
        if 300 <= code < 400:
            request.setHeader(b"Location", b"http://169.254.169.254/latest/meta-data/")
        return b"ok"

    def render_GET(self, request: Any) -> bytes:
        self.gets.append(request.uri.decode())
        return b"ok"

    def events(self) -> list[str]:
        return [r.json["event"] for r in self.received]


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def get_task(self, task_id: uuid.UUID) -> Any:
        self.count("get_task")
        return await super().get_task(task_id)

    async def observe_results(self, observed: Any, at: Any) -> Any:
        self.count("observe_results")
        return await super().observe_results(observed, at)


class World:
    """The server's API and a notifier on one clock, and a receiver."""

    def __init__(
        self, store: MemoryStore | None = None, codes: list[int] | None = None, **notifier: Any
    ) -> None:
        self.harness = Harness(store)
        self.clock = self.harness.clock
        self.receiver = Receiver(self.clock, codes)
        self.notifier_options = {"backoff": (10.0, 600.0), "jitter": no_jitter, **notifier}
        self.notifier = self.new_notifier()

    def new_notifier(self, **options: Any) -> Notifier:
        notifier = Notifier(
            self.harness.store,
            StubTreq(self.receiver),
            self.clock,
            SECRET,
            **{**self.notifier_options, **options},
        )
        self.harness.api._on_results_stored = notifier.results_stored
        self.notifier = notifier
        return notifier

    async def start(self) -> World:
        await started(self.harness)
        self.notifier.startService()
        return self

    async def create(self, notify: Any = None, **fields: Any) -> str:
        body = {"command": COMMAND, "frequency": "every 30 seconds", **fields}
        if notify is not None:
            body["notify"] = notify
        code, answer = await self.harness.request("POST", "/api/v1/tasks/create", body)
        assert code == 201, answer
        return str(answer["command_id"])

    async def report(
        self, task_id: str, k: int, exit_code: int, agent: uuid.UUID = AGENT_A
    ) -> None:
        """Agent ``agent``'s final result of the task's ``k``-th instant (30 s apart, the
        first after its creation: ``k`` 0), reported then."""
        target = self.harness.result(task_id, agent, k + 1, exit_code=exit_code)
        now = self.clock.seconds()
        due = target.finished_at.timestamp() + 1
        if due > now:
            self.clock.advance(due - now)
        code, body = await self.harness.report(target)
        assert (code, body) == (200, {"status": "stored"})

    async def report_result(self, result: RunResult) -> None:
        due = result.finished_at.timestamp() + 1 if result.finished_at else 0
        if due > self.clock.seconds():
            self.clock.advance(due - self.clock.seconds())
        code, body = await self.harness.report(result)
        assert (code, body) == (200, {"status": "stored"})

    async def history(self, task_id: str) -> list[dict[str, Any]]:
        code, body = await self.harness.request("GET", f"/api/v1/tasks/{task_id}/notifications")
        assert code == 200, body
        return list(body["notifications"])


@pytest_twisted.async_fixture
async def world() -> World:
    return await World().start()


# -- the option ------------------------------------------------------------------------


def test_notify_option_round_trips_and_defaults_to_every_event() -> None:
    options = parse_options({"notify": {"url": HOOK}})
    assert options.notify == NotifyConfig(HOOK, frozenset(NotifyEvent))
    shown = options_to_json(options)
    assert shown["notify"] == {"on": ["failed", "lost", "recovered", "timed_out"], "url": HOOK}
    assert options_from_json(shown) == options
    assert options_to_json(TaskOptions())["notify"] is None
    # null in a PATCH: back to the server's default
    assert parse_options({"notify": None}, options).notify is None
    only = parse_options({"notify": {"url": HOOK, "on": ["recovered"]}})
    assert only.notify is not None and only.notify.on == {NotifyEvent.RECOVERED}


@pytest.mark.parametrize(
    "notify, fragment",
    [
        ({"url": HOOK, "on": []}, "non-empty"),
        ({"url": HOOK, "on": ["failed", "failed"]}, "distinct"),
        ({"url": HOOK, "on": ["succeeded"]}, "non-empty list"),
        ({"url": HOOK, "on": "failed"}, "non-empty list"),
        ({"on": ["failed"]}, "must be null"),
        ({"url": HOOK, "secret": "x"}, "must be null"),
        ("https://x", "must be null"),
        ({"url": "ftp://hooks.example.com/x"}, "http:// or https://"),
        ({"url": "file:///etc/passwd"}, "http:// or https://"),
        ({"url": "https://"}, "with a host"),
        ({"url": "https://user:pw@hooks.example.com/"}, "user name or password"),
        ({"url": "https://hooks.example.com/a b"}, "spaces"),
        ({"url": "http://169.254.169.254/latest/meta-data/"}, "link-local"),
        ({"url": "http://[fe80::1]/x"}, "link-local"),
        ({"url": "http://[::ffff:169.254.169.254]/x"}, "link-local"),
        ({"url": "http://0.0.0.0/x"}, "unspecified"),
        ({"url": "http://metadata.google.internal/computeMetadata/v1/"}, "metadata"),
        ({"url": "https://hooks.example.com:99999/"}, "not a valid URL"),
        ({"url": "https://hooks.example.com/" + "a" * 2100}, "at most 2048"),
        ({"url": 42}, "at most 2048"),
    ],
)
def test_notify_option_refuses(notify: Any, fragment: str) -> None:
    with pytest.raises(InvalidMessage, match=fragment):
        parse_options({"notify": notify})


@pytest_twisted.ensureDeferred
async def test_a_bad_webhook_is_a_400_and_no_task(world: World) -> None:
    code, body = await world.harness.request(
        "POST",
        "/api/v1/tasks/create",
        {"command": "ls", "frequency": "every 30 seconds", "notify": {"url": "gopher://x"}},
    )
    assert code == 400 and "notify.url" in body["error"]["message"]
    assert world.harness.created == []


# -- the signature ---------------------------------------------------------------------


def test_signature_verifies_only_the_exact_body_recent_and_with_the_secret() -> None:
    body = b'{"event":"failed"}'
    header = signature(SECRET, 1000, body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify(SECRET, body, "1000", header, now=1100)
    assert not verify(SECRET, body + b" ", "1000", header, now=1100)
    assert not verify(b"another secret of 32 bytes......", body, "1000", header, now=1100)
    assert not verify(SECRET, body, "1001", header, now=1100)  # the timestamp is signed
    assert not verify(SECRET, body, "1000", header, now=1000 + 301)  # a replay, later
    assert not verify(SECRET, body, "soon", header, now=1000)


# -- de-duplication, end to end through the API ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fail_fail_fail_succeed_sends_one_alert_and_one_recovery(world: World) -> None:
    task_id = await world.create({"url": HOOK})
    for k, code in enumerate([3, 3, 3, 0, 0]):
        await world.report(task_id, k, code)
    assert world.receiver.events() == ["failed", "recovered"]
    alert, recovery = [r.json for r in world.receiver.received]
    assert world.receiver.received[0].url == "/services/T1"
    assert alert["task_id"] == task_id and alert["agent_id"] == str(AGENT_A)
    assert (alert["status"], alert["exit_code"], alert["schedule"]) == (
        "failed",
        3,
        "every 30 seconds",
    )
    assert alert["execution"] == f"/api/v1/tasks/{task_id}/executions/{alert['scheduled_at']}"
    assert "failed" in alert["text"] and task_id in alert["text"]
    assert recovery["status"] == "succeeded"
    for received in world.receiver.received:
        # The command is never sent anywhere: it may hold a secret.
        assert b"sekrit" not in received.body and b"curl" not in received.body
        assert received.headers["content-type"] == "application/json"
        assert verify(
            SECRET,
            received.body,
            received.headers[TIMESTAMP_HEADER.lower()],
            received.headers[SIGNATURE_HEADER.lower()],
            now=world.clock.seconds(),
        )
    history = await world.history(task_id)
    assert [(n["event"], n["status"], n["attempts"], n["response_code"]) for n in history] == [
        ("recovered", "delivered", 1, 200),
        ("failed", "delivered", 1, 200),
    ]
    # The history and the task, as the OpenAPI document describes them.
    for path, documented in [
        (f"/api/v1/tasks/{task_id}/notifications", "/api/v1/tasks/{task_id}/notifications"),
        (f"/api/v1/tasks/{task_id}", "/api/v1/tasks/{task_id}"),
    ]:
        code, body = await world.harness.request("GET", path)
        errors = list(answer_validator("GET", documented, code).iter_errors(body))
        assert not errors, [e.message for e in errors]
    assert body["notify"] == {"on": ["failed", "lost", "recovered", "timed_out"], "url": HOOK}


@pytest_twisted.ensureDeferred
async def test_an_attempt_the_agent_will_retry_alerts_nobody(world: World) -> None:
    task_id = await world.create({"url": HOOK}, retries=1, retry_delay_seconds=0)
    first = world.harness.result(task_id, AGENT_A, 1, exit_code=3)
    await world.report_result(dataclasses.replace(first, attempt=1, final=False))
    retried = world.harness.result(task_id, AGENT_A, 1, exit_code=0)
    await world.report_result(dataclasses.replace(retried, attempt=2))
    await world.report(task_id, 1, 0)
    assert world.receiver.events() == []
    await world.report(task_id, 2, 3)  # a final failure does
    assert world.receiver.events() == ["failed"]


def test_a_run_on_one_task_has_one_state_an_other_task_one_per_agent() -> None:
    assert agent_key(RunOn.ONE, AGENT_A) == agent_key(RunOn.ONE, AGENT_B) == WHOLE_TASK
    assert agent_key(RunOn.ALL, AGENT_A) == AGENT_A


@pytest_twisted.ensureDeferred
async def test_alerts_per_agent_and_only_the_events_asked_for(world: World) -> None:
    task_id = await world.create({"url": HOOK, "on": ["timed_out", "recovered"]})
    await world.report(task_id, 0, 3, AGENT_A)  # failed: not asked for, but A is failing
    await world.report(task_id, 0, 0, AGENT_B)
    await world.report(task_id, 1, 3, AGENT_A)
    await world.report(task_id, 2, 0, AGENT_A)
    assert world.receiver.events() == ["recovered"]
    assert world.receiver.received[0].json["agent_id"] == str(AGENT_A)


@pytest_twisted.ensureDeferred
async def test_the_server_default_serves_tasks_without_a_webhook_of_their_own() -> None:
    world = await World(default=NotifyConfig(DEFAULT_HOOK, frozenset({NotifyEvent.FAILED}))).start()
    plain = await world.create()
    own = await world.create({"url": HOOK})
    await world.report(plain, 0, 3)
    await world.report(own, 0, 3)
    assert [r.url for r in world.receiver.received] == ["/default", "/services/T1"]


@pytest_twisted.ensureDeferred
async def test_tasks_without_a_webhook_cost_no_store_call_per_result() -> None:
    store = CountingStore()
    world = await World(store).start()
    task_id = await world.create()
    store.calls.clear()
    for k in range(6):  # 6 results 30 s apart: the task is looked up once a cache period
        await world.report(task_id, k, 3)
    assert store.calls.get("observe_results", 0) == 0
    assert store.calls.get("get_task", 0) == 6  # 30 s apart > the 10 s cache: once each
    store.calls.clear()
    for k in range(6, 12):
        await world.report(task_id, k, 3, AGENT_A)
        await world.report(task_id, k, 3, AGENT_B)  # same instant: the cached task
    assert store.calls.get("get_task", 0) == 6
    assert world.receiver.received == []


# -- delivery: retries, give-up, a dead receiver -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_failing_receiver_is_retried_with_back_off_until_it_answers() -> None:
    world = await World(codes=[503, 500, 200]).start()
    task_id = await world.create({"url": HOOK})
    await world.report(task_id, 0, 3)
    start = world.receiver.received[0].at
    [pending] = await world.history(task_id)
    assert (pending["status"], pending["attempts"], pending["response_code"]) == (
        "pending",
        1,
        503,
    )
    world.clock.advance(9)
    assert len(world.receiver.received) == 1
    world.clock.advance(1)
    world.clock.advance(20)
    waits = [r.at - start for r in world.receiver.received]
    assert waits == pytest.approx([0, 10, 30])  # 10 s, then 20 s
    # Each attempt is signed afresh, over the same body.
    assert len({r.body for r in world.receiver.received}) == 1
    [delivered] = await world.history(task_id)
    assert (delivered["status"], delivered["attempts"], delivered["response_code"]) == (
        "delivered",
        3,
        200,
    )


@pytest_twisted.ensureDeferred
async def test_a_receiver_down_for_too_long_is_given_up() -> None:
    world = await World(codes=[500] * 10, give_up_after=60.0).start()
    task_id = await world.create({"url": HOOK})
    await world.report(task_id, 0, 3)
    world.clock.pump([1] * 100)
    assert len(world.receiver.received) == 3  # at 0, 10, 30; the next (70) is past 60
    [failed] = await world.history(task_id)
    assert (failed["status"], failed["attempts"], failed["response_code"]) == ("failed", 3, 500)


@pytest_twisted.ensureDeferred
async def test_a_receiver_refusing_is_not_retried() -> None:
    world = await World(codes=[410]).start()
    task_id = await world.create({"url": HOOK})
    await world.report(task_id, 0, 3)
    world.clock.advance(1000)
    assert len(world.receiver.received) == 1
    [failed] = await world.history(task_id)
    assert (failed["status"], failed["attempts"], failed["response_code"]) == ("failed", 1, 410)


@pytest_twisted.ensureDeferred
async def test_a_redirect_is_not_followed() -> None:
    world = await World(codes=[303]).start()
    task_id = await world.create({"url": HOOK})
    await world.report(task_id, 0, 3)
    world.clock.advance(1000)
    assert (len(world.receiver.received), world.receiver.gets) == (1, [])
    [failed] = await world.history(task_id)
    assert (failed["status"], failed["attempts"], failed["response_code"]) == ("failed", 1, 303)


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_never_answers_blocks_no_report() -> None:
    world = await World(timeout=10.0).start()
    world.receiver.hang = True
    task_id = await world.create({"url": HOOK})
    other = await world.create({"url": HOOK})
    await world.report(task_id, 0, 3)  # answered at once, while the webhook hangs
    await world.report(other, 0, 3)  # another task's report, also at once
    assert len(world.receiver.received) == 2
    world.clock.advance(10)  # the attempts time out, to be retried
    [pending] = await world.history(task_id)
    assert (pending["status"], pending["attempts"], pending["response_code"]) == (
        "pending",
        1,
        None,
    )
    assert pending["error"]
    world.clock.advance(10)
    assert len(world.receiver.received) == 4  # tried again after the back-off


@pytest_twisted.ensureDeferred
async def test_a_host_resolving_to_a_link_local_address_is_refused() -> None:
    async def resolve(host: str) -> list[str]:
        return ["10.0.0.5", "169.254.169.254"]

    world = await World(resolve=resolve).start()
    task_id = await world.create({"url": "https://sneaky.example.com/x"})
    await world.report(task_id, 0, 3)
    world.clock.advance(1000)
    assert world.receiver.received == []
    [refused] = await world.history(task_id)
    assert refused["status"] == "failed" and "link-local" in refused["error"]


@pytest_twisted.ensureDeferred
async def test_results_past_the_queue_bound_are_dropped_and_reports_still_answer() -> None:
    stuck: Deferred[Any] = Deferred()

    class SlowStore(MemoryStore):
        slow = False

        async def get_task(self, task_id: uuid.UUID) -> Any:
            if self.slow:
                return await stuck
            return await super().get_task(task_id)

    store = SlowStore()
    world = await World(store, max_queued=2).start()
    task_id = await world.create({"url": HOOK})
    store.slow = True  # the API's own look-ups stay fast: only the notifier's wait
    world.notifier._tasks.clear()
    for k in range(5):
        await world.report(task_id, k, 3)
    # One being judged (stuck), two queued, two dropped.
    assert world.notifier.dropped == 2
    stuck.cancel()


# -- restarts --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_state_and_pending_webhooks_survive_a_restart_of_the_notifier() -> None:
    world = await World(codes=[503]).start()
    task_id = await world.create({"url": HOOK})
    await world.report(task_id, 0, 3)  # alert: the receiver answers 503, retry pending
    world.notifier.stopService()
    world.clock.advance(60)
    assert len(world.receiver.received) == 1  # stopped: no retry

    world.new_notifier().startService()  # the server starts again (same store)
    assert world.receiver.events() == ["failed", "failed"]  # the pending one, sent again
    await world.report(task_id, 1, 3)  # still failing: nothing new
    await world.report(task_id, 2, 0)
    assert world.receiver.events() == ["failed", "failed", "recovered"]
    history = await world.history(task_id)
    assert [(n["event"], n["status"], n["attempts"]) for n in history] == [
        ("recovered", "delivered", 1),
        ("failed", "delivered", 2),
    ]


# -- the server's options and secret -----------------------------------------------------


def test_server_options_give_the_default_webhook(monkeypatch: pytest.MonkeyPatch) -> None:
    options = ServerOptions()
    options.parseOptions(["--notify-url", HOOK, "--notify-on", "failed,recovered"])
    assert options["notify-default"] == NotifyConfig(
        HOOK, frozenset({NotifyEvent.FAILED, NotifyEvent.RECOVERED})
    )
    assert options["notify-base-url"] is None
    monkeypatch.setenv("TASKSCHEDULER_NOTIFY_URL", DEFAULT_HOOK)
    options = ServerOptions()
    options.parseOptions([])
    assert options["notify-default"] == NotifyConfig(DEFAULT_HOOK)
    for argv, fragment in [
        (["--notify-url", "http://169.254.169.254/"], "link-local"),
        (["--notify-url", HOOK, "--notify-on", "failed,exploded"], "--notify-on"),
        (["--notify-base-url", "scheduler.example.com"], "--notify-base-url"),
    ]:
        with pytest.raises(UsageError, match=fragment):
            ServerOptions().parseOptions(argv)
    monkeypatch.delenv("TASKSCHEDULER_NOTIFY_URL")
    with pytest.raises(UsageError, match="needs --notify-url"):
        ServerOptions().parseOptions(["--notify-on", "failed"])


def test_the_secret_is_made_once_private_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "data" / "notify-secret"
    secret = load_or_create_secret(path, create=True)
    assert len(secret) == 64 and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_secret(path, create=True) == secret
    with pytest.raises(KeyFileError, match="cannot read"):
        load_or_create_secret(tmp_path / "missing", create=False)
    short = tmp_path / "short"
    short.write_text("tiny\n")
    short.chmod(0o600)
    with pytest.raises(KeyFileError, match="shorter than 16"):
        load_or_create_secret(short, create=False)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        load_or_create_secret(path, create=False)
