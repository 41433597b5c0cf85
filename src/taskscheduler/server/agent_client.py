"""The server's client of one agent's API: schedule (one task or a batch), unschedule,
run now, list, leave; each request signed for the agent enrolled at the URL, each answer a typed
outcome.

An agent is not trusted with the server's memory: every answer is read up to a bound
(:func:`taskscheduler.httpclient.exchange`) and refused past it, the connection dropped.
What to send when, and what to do with an outcome, is :mod:`taskscheduler.server.agent_link`'s.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime

from taskscheduler import protocol
from taskscheduler.httpclient import Answer, NoAnswer, describe, exchange
from taskscheduler.schedule import format_instant
from taskscheduler.signing import InstructionSigner

#: Seconds to wait for an agent's answer.
REQUEST_TIMEOUT = 10.0
#: Largest answer read from an agent to an instruction (a batch's answer is ~100 bytes a task).
DEFAULT_MAX_ANSWER_BYTES = 1024 * 1024

SCHEDULE_PATH = "/api/v1/tasks/schedule"
LIST_PATH = "/api/v1/agent/tasks"
LEAVE_PATH = "/api/v1/agent/leave"


@dataclass(frozen=True)
class Accepted:
    """The agent did what it was asked, answering as ``agent_id``."""

    agent_id: uuid.UUID


@dataclass(frozen=True)
class Refused:
    """The agent answered and said no to this request (``status``) or to this task of a
    batch (``status`` None): it is up, so this is no reason to back off from it."""

    status: int | None
    code: str | None
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Failed:
    """Not done, for a reason that is the agent's or the network's (no answer, a 5xx,
    408 or 429, an answer that is not the agent's, a disk it could not write): try again
    after a back-off."""

    reason: str

    def __str__(self) -> str:
        return self.reason


Outcome = Accepted | Refused | Failed


@dataclass(frozen=True)
class BatchAnswered:
    """The agent answered a batch: one outcome per task, in the order sent."""

    outcomes: list[Outcome]


@dataclass(frozen=True)
class TaskList:
    """The tasks the agent holds."""

    agent_id: uuid.UUID
    task_ids: set[uuid.UUID]


@dataclass(frozen=True)
class _Answered:
    """A 200 from the agent meant: who it is, and its JSON answer."""

    agent_id: uuid.UUID
    body: dict[str, Any]


class AgentClient:
    """Signed instructions to the agent at ``url``, for the identity ``audience`` each
    method is given (None: unsigned, when the server has no signer)."""

    def __init__(
        self,
        url: str,
        http: Any,  # a DaemonHTTP, or a treq.testing.StubTreq in tests
        clock: IReactorTime,
        signer: InstructionSigner | None = None,
        *,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.url = url.rstrip("/")
        self._http = http
        self._clock = clock
        self._signer = signer
        self._max_answer_bytes = max_answer_bytes
        self._timeout = timeout

    async def schedule(self, spec_json: bytes, audience: uuid.UUID | None) -> Outcome:
        """Hand the agent one task (its JSON spec, as :mod:`protocol` writes it)."""
        answered = await self._instruct("POST", SCHEDULE_PATH, spec_json, audience)
        return Accepted(answered.agent_id) if isinstance(answered, _Answered) else answered

    async def schedule_batch(
        self, specs: Sequence[tuple[uuid.UUID, bytes]], audience: uuid.UUID | None
    ) -> BatchAnswered | Refused | Failed:
        """Hand the agent several tasks (id, JSON spec) in one request."""
        body = b'{"tasks":[' + b",".join(encoded for _, encoded in specs) + b"]}"
        answered = await self._instruct("POST", SCHEDULE_PATH, body, audience)
        if not isinstance(answered, _Answered):
            return answered
        results = answered.body.get("results")
        if not isinstance(results, list) or len(results) != len(specs):
            return Failed("the agent's answer to a batch does not list every task")
        outcomes: list[Outcome] = []
        for (task_id, _), result in zip(specs, results, strict=True):
            if not isinstance(result, dict) or result.get("task_id") != str(task_id):
                outcomes.append(Failed("the agent's answer to a batch is out of order"))
                continue
            if result.get("status") == "scheduled":
                outcomes.append(Accepted(answered.agent_id))
                continue
            item = Answer(200, result)
            message = f"agent refused task {task_id}: {item.error_message}"
            # A disk the agent could not write is its trouble, not the task's: back off.
            if item.error_code == "storage_unavailable":
                outcomes.append(Failed(message))
            else:
                outcomes.append(Refused(None, item.error_code, message))
        return BatchAnswered(outcomes)

    async def unschedule(self, task_id: uuid.UUID, audience: uuid.UUID | None) -> Outcome:
        """Tell the agent to drop a task (it answers 200 whether it had it or not)."""
        answered = await self._instruct("DELETE", f"/api/v1/tasks/{task_id}", b"", audience)
        return Accepted(answered.agent_id) if isinstance(answered, _Answered) else answered

    async def run_now(
        self,
        spec: protocol.TaskSpec,
        scheduled_at: datetime,
        revision: int,
        audience: uuid.UUID | None,
    ) -> Outcome:
        """Tell the agent to run the task once, as the run-now at ``scheduled_at``.

        The task's spec goes along (agents read the fields they know): an agent that does
        not hold the task, paused, can still run it.
        """
        body = json.dumps(
            {
                "scheduled_at": format_instant(scheduled_at),
                "revision": revision,
                "task": protocol.task_spec_to_json(spec),
            }
        ).encode("utf-8")
        path = f"/api/v1/tasks/{spec.task_id}/run"
        answered = await self._instruct("POST", path, body, audience)
        return Accepted(answered.agent_id) if isinstance(answered, _Answered) else answered

    async def leave(self, reason: str, audience: uuid.UUID | None) -> Outcome:
        """Tell the agent to drop every task: it left the fleet (``removed``) or was
        ``revoked``."""
        body = json.dumps({"reason": reason}).encode("utf-8")
        answered = await self._instruct("POST", LEAVE_PATH, body, audience)
        return Accepted(answered.agent_id) if isinstance(answered, _Answered) else answered

    async def list_tasks(
        self, audience: uuid.UUID | None, max_answer_bytes: int
    ) -> TaskList | Refused | Failed:
        """The ids of the tasks the agent holds, read within ``max_answer_bytes``."""
        answered = await self._instruct("GET", LIST_PATH, b"", audience, max_answer_bytes)
        if not isinstance(answered, _Answered):
            return answered
        try:
            listed = answered.body.get("task_ids", [])
            ids = {protocol.parse_uuid(t, "task_ids[]") for t in listed}
        except (protocol.InvalidMessage, TypeError) as e:
            return Failed(f"the agent's task list is unreadable: {describe(e)}")
        return TaskList(answered.agent_id, ids)

    async def _instruct(
        self,
        method: str,
        path: str,
        body: bytes,
        audience: uuid.UUID | None,
        max_answer_bytes: int | None = None,
    ) -> _Answered | Refused | Failed:
        """Send one signed instruction: who answered and its JSON answer, if the agent
        meant (``audience``, when known) answered 200; else why not."""
        url = f"{self.url}{path}"
        try:
            answer = await exchange(
                self._http,
                self._clock,
                method,
                url,
                body,
                self._headers(method, url, body, audience),
                timeout=self._timeout,
                max_answer_bytes=max_answer_bytes or self._max_answer_bytes,
            )
        except NoAnswer as e:
            return Failed(f"{method} {path}: {e}")
        if answer.status not in (200, 202):  # 202: a run-now the agent took
            message = f"agent answered {answer.status}: {answer.error_message}"
            if is_refusal(answer.status):
                return Refused(answer.status, answer.error_code, message)
            return Failed(message)
        if not isinstance(answer.body, dict):
            return Failed("the agent's answer is not a JSON object")
        try:
            answered = protocol.parse_uuid(answer.body.get("agent_id"), "agent_id")
        except protocol.InvalidMessage as e:
            return Failed(describe(e))
        if audience is not None and answered != audience:
            return Failed(f"the agent answered as {answered}, not as {audience}")
        return _Answered(answered, answer.body)

    def _headers(
        self, method: str, url: str, body: bytes, audience: uuid.UUID | None
    ) -> dict[bytes, list[bytes]]:
        headers = {b"Content-Type": [b"application/json"]}
        if self._signer is None or audience is None:
            return headers
        parts = urlsplit(url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        authorization = self._signer.authorization(method, path, audience, body)
        headers[b"Authorization"] = [authorization.encode("ascii")]
        return headers


def is_refusal(status: int) -> bool:
    """A 4xx that is about the request, not about the agent being busy or slow."""
    return 400 <= status < 500 and status not in (408, 429)
