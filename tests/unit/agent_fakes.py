"""Fakes for the agent's unit tests: a runner, a server, and an agent built over them."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from klein import Klein
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from taskscheduler.agent.identity import (
    CorruptIdentity,
    load_credential,
    load_or_create_agent_id,
    save_credential,
    save_server_key,
)
from taskscheduler.agent.service import AgentConfig, AgentService
from taskscheduler.auth import AGENT_PREFIX, new_token
from taskscheduler.protocol import (
    InvalidMessage,
    Output,
    ResultStatus,
    RunResult,
    TaskSpec,
    Trigger,
    parse_result,
    parse_result_batch,
)
from taskscheduler.schedule import parse_frequency, utc_now_from
from taskscheduler.signing import InstructionSigner

#: A round number of seconds since the epoch: every instant of the tests is exact.
ANCHOR_SECONDS = 1_795_000_000
ANCHOR = utc_now_from(ANCHOR_SECONDS)
SERVER = "http://server.test:8080"
#: The server's signing key in agent tests; the fake agents are enrolled with it.
SERVER_KEY = Ed25519PrivateKey.generate()


def provision(data_dir: Path) -> None:
    """Make ``data_dir`` look enrolled: a credential and the pinned server key."""
    load_or_create_agent_id(data_dir)
    if load_credential(data_dir) is None:
        save_credential(data_dir, new_token(AGENT_PREFIX))
        save_server_key(data_dir, SERVER_KEY.public_key())


def spec(
    command: str = "echo hi",
    every: str = "every 10 seconds",
    task_id: uuid.UUID | None = None,
    time_limit: float = 10,
) -> TaskSpec:
    return TaskSpec(
        task_id=task_id or uuid.uuid4(),
        command=command,
        frequency=parse_frequency(every),
        anchor=ANCHOR,
        time_limit=timedelta(seconds=time_limit),
    )


def result(task_id: uuid.UUID, k: int, agent_id: uuid.UUID, stdout: bytes = b"hi\n") -> RunResult:
    at = ANCHOR + timedelta(seconds=10 * k)
    return RunResult(
        task_id=task_id,
        agent_id=agent_id,
        scheduled_at=at,
        status=ResultStatus.SUCCEEDED,
        exit_code=0,
        started_at=at,
        finished_at=at + timedelta(seconds=1),
        stdout=Output.of(stdout),
    )


def fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must have fired already."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d!r} has not fired"
    return results[0]


@dataclass(frozen=True)
class FakeOutcome:
    status: ResultStatus
    exit_code: int | None
    signal: int | None
    started_at: datetime
    finished_at: datetime
    duration: float
    stdout: Output
    stderr: Output


@dataclass
class FakeRun:
    command: str
    time_limit: float
    extra_env: dict[str, str]
    deferred: Deferred[FakeOutcome]
    started_at: datetime
    key: tuple[uuid.UUID, datetime] | None = None
    revision: int | None = None
    trigger: Trigger = Trigger.SCHEDULE
    working_dir: str | None = None
    attempt: int = 1

    @property
    def done(self) -> bool:
        return self.deferred.called


@dataclass
class FakeRunner:
    """Records every run; a test ends each one with :meth:`finish`."""

    clock: Clock
    runs: list[FakeRun] = field(default_factory=list)
    fail_to_start: bool = False
    terminated: int = 0
    #: What :meth:`recover` hands the agent at start-up (runs a crashed agent left).
    recovered: list[Any] = field(default_factory=list)

    #: Runs whose files the agent let go, their result being durable in the spool.
    discarded: list[tuple[uuid.UUID, datetime]] = field(default_factory=list)
    #: Runs the agent replaced (each ended at once, ``replaced``), in order.
    replaced: list[tuple[uuid.UUID, datetime]] = field(default_factory=list)

    def recover(self, reported: Any = None) -> list[Any]:
        recovered, self.recovered = self.recovered, []
        return recovered

    def discard(self, key: tuple[uuid.UUID, datetime], attempt: int = 1) -> None:
        self.discarded.append(key)

    @property
    def running(self) -> int:
        return sum(1 for run in self.runs if not run.done)

    def run(
        self,
        command: str,
        time_limit: float,
        extra_env: Mapping[str, str] = {},
        *,
        key: tuple[uuid.UUID, datetime] | None = None,
        revision: int | None = None,
        trigger: Trigger = Trigger.SCHEDULE,
        working_dir: str | None = None,
        attempt: int = 1,
    ) -> Deferred[FakeOutcome]:
        if self.fail_to_start:
            raise OSError(24, "Too many open files")
        run = FakeRun(
            command,
            time_limit,
            dict(extra_env),
            Deferred(),
            self._now(),
            key,
            revision,
            trigger,
            working_dir,
            attempt,
        )
        self.runs.append(run)
        return run.deferred

    def _now(self) -> datetime:
        return utc_now_from(self.clock.seconds())

    def finish(
        self,
        run: FakeRun,
        stdout: bytes = b"",
        exit_code: int | None = 0,
        status: ResultStatus = ResultStatus.SUCCEEDED,
        signal: int | None = None,
    ) -> None:
        run.deferred.callback(
            FakeOutcome(
                status=status,
                exit_code=exit_code,
                signal=signal,
                started_at=run.started_at,
                finished_at=self._now(),
                duration=(self._now() - run.started_at).total_seconds(),
                stdout=Output.of(stdout),
                stderr=Output(),
            )
        )

    def replace(self, key: tuple[uuid.UUID, datetime], attempt: int = 1) -> bool:
        for run in self.runs:
            if run.key == key and run.attempt == attempt and not run.done:
                self.replaced.append(key)
                self.finish(run, exit_code=None, status=ResultStatus.REPLACED, signal=15)
                return True
        return False

    def terminate_all(self) -> Deferred[None]:
        for run in self.runs:
            if not run.done:
                self.terminated += 1
                self.finish(run, exit_code=None, status=ResultStatus.FAILED, signal=15)
        return succeed(None)


#: The error code the real server gives with each status ``refuse_with`` may be set to.
_REFUSAL_CODES = {401: "unauthorized", 403: "impersonation"}


class FakeServer:
    """The server's two result endpoints, with switches for its failures; its error
    answers carry the real server's codes (the agent decides on them)."""

    app = Klein()

    def __init__(self) -> None:
        self.stored: dict[tuple[uuid.UUID, uuid.UUID, datetime], RunResult] = {}
        self.requests: list[tuple[str, int]] = []  # ("single" | "batch", results)
        self.down = False  # answer 503
        self.hang = False  # never answer
        self.conflicting: set[uuid.UUID] = set()  # task ids whose results conflict
        self.deleted: set[uuid.UUID] = set()  # task ids deleted before every result
        self.superseded: set[uuid.UUID] = set()  # task ids whose results ran an old revision
        self.task_paused: set[uuid.UUID] = set()  # task ids paused at every result's instant
        self.garbled = False  # answer a batch with one answer too few, storing nothing
        self.hanging: list[Any] = []
        self.refuse_with: int | None = None  # answer every request with this status (401, 403)
        self.authorizations: list[str | None] = []

    def _record(self, item: RunResult) -> str:
        if item.task_id in self.conflicting:
            return "conflict"
        if item.task_id in self.deleted:
            return "deleted"
        if item.task_id in self.superseded:
            return "superseded"
        if item.task_id in self.task_paused:
            return "task_paused"
        if item.key in self.stored:
            return "duplicate"
        self.stored[item.key] = item
        return "stored"

    def _answer(self, request: Any, status: int, body: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(body).encode()

    def _unavailable(self, request: Any) -> bytes | None:
        header = request.getHeader(b"authorization")
        self.authorizations.append(None if header is None else header.decode())
        if self.refuse_with is not None:
            code = _REFUSAL_CODES[self.refuse_with]
            return self._answer(
                request, self.refuse_with, {"error": {"code": code, "message": "no"}}
            )
        if self.hang:
            never: Deferred[bytes] = Deferred()
            self.hanging.append(never)
            return never  # type: ignore[return-value]
        if self.down:
            return self._answer(
                request, 503, {"error": {"code": "database_unavailable", "message": "down"}}
            )
        return None

    @app.route("/api/v1/tasks/<task_id>/complete", methods=["POST"])
    def complete(self, request: Any, task_id: str) -> bytes:
        self.requests.append(("single", 1))
        refused = self._unavailable(request)
        if refused is not None:
            return refused
        try:
            item = parse_result(json.loads(request.content.read()), uuid.UUID(task_id))
        except (InvalidMessage, ValueError) as e:
            return self._answer(
                request, 400, {"error": {"code": "invalid_request", "message": str(e)}}
            )
        outcome = self._record(item)
        if outcome == "conflict":
            return self._answer(request, 409, {"error": {"code": "conflict", "message": "no"}})
        if outcome == "deleted":
            return self._answer(
                request, 404, {"error": {"code": "task_deleted", "message": "deleted"}}
            )
        if outcome in ("superseded", "task_paused"):
            return self._answer(request, 409, {"error": {"code": outcome, "message": "no"}})
        return self._answer(request, 200, {"status": outcome})

    @app.route("/api/v1/results", methods=["POST"])
    def batch(self, request: Any) -> bytes:
        raw = request.content.read()
        self.requests.append(("batch", len(json.loads(raw)["results"])))
        refused = self._unavailable(request)
        if refused is not None:
            return refused
        if self.garbled:
            return self._answer(request, 200, {"results": [{"status": "stored"}]})
        try:
            items = parse_result_batch(json.loads(raw))
        except InvalidMessage as e:
            return self._answer(
                request, 400, {"error": {"code": "invalid_request", "message": str(e)}}
            )
        return self._answer(
            request, 200, {"results": [{"status": self._record(item)} for item in items]}
        )


class FakeThread:
    """Stands for the thread pool: keeps each job until the test runs it."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], None], Deferred[None]]] = []

    def __call__(self, function: Callable[[], None]) -> Deferred[None]:
        done: Deferred[None] = Deferred()
        self.jobs.append((function, done))
        return done

    def run_all(self) -> None:
        while self.jobs:
            function, done = self.jobs.pop(0)
            try:
                function()
            except Exception:
                done.errback()
            else:
                done.callback(None)


class UnreachableHttp:
    """treq that cannot connect while ``unreachable`` is set, else a StubTreq."""

    def __init__(self, stub: StubTreq) -> None:
        self.stub: Any = stub  # StubTreq grows its methods at run time
        self.unreachable = False
        self.attempts = 0

    def request(self, *args: Any, **kwargs: Any) -> Any:
        self.attempts += 1
        if self.unreachable:
            return Deferred.fromCoroutine(_refuse())
        return self.stub.request(*args, **kwargs)

    def content(self, response: Any) -> Any:
        return self.stub.content(response)

    def flush(self) -> None:
        self.stub.flush()


async def _refuse() -> None:
    raise ConnectionRefusedError("connection refused")


class Agent:
    """An agent over a data folder, with a fake runner and a fake server, on a Clock."""

    def __init__(
        self,
        data_dir: Path,
        clock: Clock,
        server: FakeServer,
        spool_max_bytes: int = 2**30,
        endpoint: Any = None,
        run_in_thread: Any = None,
        enrolled: bool = True,
        recovered: list[Any] | None = None,
    ) -> None:
        if enrolled:
            # A test of a broken data folder: the service will say what is wrong.
            with contextlib.suppress(CorruptIdentity):
                provision(data_dir)
        self.signer = InstructionSigner(SERVER_KEY, clock)
        self.clock = clock
        self.server = server
        self.runner = FakeRunner(clock, recovered=list(recovered or []))
        self.http = UnreachableHttp(StubTreq(server.app.resource()))
        self.fatal = 0
        self.service = AgentService(
            AgentConfig(data_dir, SERVER, spool_max_bytes=spool_max_bytes, shutdown_grace=30),
            clock,
            lambda: self.runner,
            self.http,
            endpoint=endpoint,
            on_fatal=self._on_fatal,
            jitter=lambda: 1.0,
            run_in_thread=run_in_thread,
        )
        self.service.startService()
        self.api = StubTreq(self.service.api.resource()) if self.service.api else None

    def _on_fatal(self, reason: str) -> None:
        self.fatal += 1

    def signed(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        """Headers of an instruction from the server to this agent."""
        agent_id = load_or_create_agent_id(self.service.config.data_dir)
        return {
            "Content-Type": "application/json",
            "Authorization": self.signer.authorization(method, path, agent_id, body),
        }

    def settle(self, seconds: float = 0) -> None:
        """Advance the clock, then let every request and answer go through."""
        self.clock.advance(seconds)
        for _ in range(3):
            self.http.flush()
            if self.api is not None:
                self.api.flush()
            self.clock.advance(0)

    def advance_to(self, seconds_after_anchor: float, step: float = 1.0) -> None:
        """Let time pass a step at a time, as a real reactor would, up to ``anchor + s``."""
        target = ANCHOR_SECONDS + seconds_after_anchor
        while self.clock.seconds() < target:
            self.settle(min(step, target - self.clock.seconds()))

    def stop(self) -> Deferred[None]:
        return self.service.stopService()

    def crash(self) -> None:
        """Die like SIGKILL: nothing more runs or is sent; the kernel drops the lock."""
        if self.service.scheduler is not None:
            self.service.scheduler.stop()
        if self.service.reporter is not None:
            self.service.reporter.stop()
        self.service._lock.release()


def older_agents_run_marker(
    folder: Path, task_id: uuid.UUID, scheduled_at: datetime, started_at: datetime
) -> None:
    """What an older agent left in ``<data-dir>/running/`` for a run under way (agents
    now keep a run journal instead): ``<instant>_<task id>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = scheduled_at.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    body = {"started_at": started_at.astimezone(UTC).isoformat().replace("+00:00", "Z")}
    (folder / f"{stamp}_{task_id}.json").write_text(json.dumps(body))
