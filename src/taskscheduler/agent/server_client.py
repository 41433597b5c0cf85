"""The agent's client of its server's API: enrol, report one result, report a batch,
claim an instant of a run-on-one task;
it holds the agent's credential, and reads each answer into a typed outcome. Each
request goes to the current replica of the server's list, and on to the next on
trouble (:mod:`taskscheduler.agent.servers`): every caller follows the same choice.

Which answers are verdicts is decided here, once: only a taskscheduler server's own
(status *and* JSON error code, :data:`taskscheduler.protocol.FINAL_RESULT_ERRORS`);
anything else (a proxy's page, a wrong path prefix, a 5xx) is "retry later", flagged
``foreign`` when no taskscheduler server gives it. What to send and what to do with an
outcome is the reporter's and the enroller's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.interfaces import IReactorTime

from taskscheduler.agent.servers import ServerChooser
from taskscheduler.auth import AGENT_PREFIX, parse_bearer
from taskscheduler.httpclient import Answer, NoAnswer, exchange
from taskscheduler.protocol import (
    ACKNOWLEDGED_STATUSES,
    FINAL_BATCH_STATUSES,
    FINAL_RESULT_ERRORS,
    RETRY_LATER_BATCH_STATUSES,
    RETRY_LATER_RESULT_ERRORS,
)
from taskscheduler.protocol.claims import CLAIM_STATUSES, FINAL_CLAIM_ERRORS, claim_body
from taskscheduler.protocol.labels import NO_LABELS
from taskscheduler.signing import KeyFileError, parse_public_key
from taskscheduler.web.errors import PAYLOAD_TOO_LARGE

#: Seconds to wait for the server's answer.
REQUEST_TIMEOUT = 30.0
#: Largest answer read from the server, beside 100 bytes per result of a batch: its
#: answers are small (a credential and a public key, a verdict per result), and it is
#: not trusted with the agent's memory.
MAX_ANSWER_BYTES = 64 * 1024

ENROL_PATH = "/api/v1/agents/enrol"
HEARTBEAT_PATH = "/api/v1/agents/heartbeat"
BATCH_PATH = "/api/v1/results"


@dataclass(frozen=True)
class Acknowledged:
    """The server has the result (``stored``, or a ``duplicate`` of one it had)."""

    status: str


@dataclass(frozen=True)
class Refused:
    """A verdict from a taskscheduler server: this request (or result) is refused for good."""

    reason: str


@dataclass(frozen=True)
class TooLarge:
    """The server's own 413: the ``sent`` bytes are over its limit (``limit`` if it said,
    else None)."""

    limit: int | None
    sent: int
    reason: str


@dataclass(frozen=True)
class RetryLater:
    """Not taken now, nothing lost: send it again after a back-off. ``foreign`` when the
    answer is one no taskscheduler server gives (a proxy or a wrong URL is in the way)."""

    reason: str
    foreign: bool = False


@dataclass(frozen=True)
class SendSingly:
    """The server refused a batch whole (a malformed or impersonating result in it, a
    413, no batch route): its results may pass one by one."""

    reason: str


@dataclass(frozen=True)
class BatchAnswered:
    """A verdict per result of a batch, in the order sent."""

    items: list[Acknowledged | Refused | RetryLater]


@dataclass(frozen=True)
class HeartbeatAnswer:
    """The server took a heartbeat: whether the agent's URL is in its fleet."""

    in_fleet: bool
    state: str
    interval_seconds: float | None


@dataclass(frozen=True)
class Claimed:
    """The server's answer to a claim (run on one): ``granted`` (run it), ``held``
    (another agent runs it) or ``wait`` (ask again in ``retry_after`` seconds)."""

    status: str
    retry_after: float = 0.0


@dataclass(frozen=True)
class Enrolled:
    credential: str
    server_key: Ed25519PublicKey


#: Answers to a whole batch, by (status, error code), that call for sending its results
#: one by one: one of them is malformed or not the agent's own, or the server has no
#: batch route. A 413 does too, whoever sent it: smaller requests may pass.
_SEND_SINGLY = frozenset(
    {
        (400, "invalid_json"),
        (400, "invalid_request"),
        (403, "impersonation"),
        (404, "not_found"),
        (405, "method_not_allowed"),
    }
)

#: Answers our server gives to a result that are no verdict on it, beside 5xx, 408 and
#: 429: retried quietly.
_RETRYABLE = frozenset(
    {
        (401, "unauthorized"),
        (403, "forbidden"),  # a credential of another kind: an operator must fix it
        (413, PAYLOAD_TOO_LARGE),
        # dated ahead of the server's clock: taken once it has reached them
        *((status, code) for code, status in RETRY_LATER_RESULT_ERRORS.items()),
    }
)


class ServerClient:
    """Requests to the server at ``server_url`` (one base URL, or the replicas' in a
    sequence: the first is tried first); results carry ``credential`` (None before
    enrolment) as a bearer token."""

    def __init__(
        self,
        http: Any,  # a DaemonHTTP, or a treq.testing.StubTreq in tests
        clock: IReactorTime,
        server_url: str | Sequence[str],
        *,
        credential: str | None = None,
        timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self._http = http
        self._clock = clock
        #: Which replica requests go to.
        self.servers = ServerChooser([server_url] if isinstance(server_url, str) else server_url)
        #: The agent's credential; the enroller sets it once the agent has one.
        self.credential = credential
        self._timeout = timeout

    @property
    def url(self) -> str:
        """The base URL of the replica requests go to now."""
        return self.servers.current

    async def enrol(
        self,
        agent_id: uuid.UUID,
        advertise_url: str,
        join_secret: str,
        labels: Mapping[str, str] = NO_LABELS,
    ) -> Enrolled | Refused | RetryLater:
        """Enrol with the join secret (and the agent's labels); the agent's credential and
        the server's key."""
        body = json.dumps(
            {"agent_id": str(agent_id), "url": advertise_url, "labels": dict(labels)}
        ).encode("utf-8")
        answer = await self._post(ENROL_PATH, body, join_secret, MAX_ANSWER_BYTES)
        if isinstance(answer, RetryLater):
            return answer
        if answer.status != 201 or not isinstance(answer.body, dict):
            message = answer.error_message
            error = f"the server answered {answer.status} {message}".strip()
            if answer.status == 401:
                # Enrolment sends nothing but the join secret: a 401 can only refuse it.
                detail = message.removeprefix("join secret refused: ")
                return Refused(
                    f"join secret refused (401{': ' + detail if detail else ''}); check the "
                    "agent's --join-secret-file or TASKSCHEDULER_JOIN_SECRET"
                )
            if answer.status in (403, 409):
                return Refused(error)
            return RetryLater(error)
        credential = answer.body.get("credential")
        if (
            not isinstance(credential, str)
            or not credential.startswith(AGENT_PREFIX)
            or parse_bearer(f"Bearer {credential}") != credential
        ):
            return Refused("the server's answer holds no valid credential")
        try:
            key = parse_public_key(str(answer.body.get("server_public_key", "")))
        except KeyFileError as e:
            return Refused(f"the server's public key is unusable: {e}")
        return Enrolled(credential, key)

    async def heartbeat(self, body: dict[str, Any]) -> HeartbeatAnswer | Refused | RetryLater:
        """Tell the server the agent is alive (``body``: the heartbeat's fields)."""
        encoded = json.dumps(body).encode("utf-8")
        answer = await self._post(HEARTBEAT_PATH, encoded, self.credential, MAX_ANSWER_BYTES)
        if isinstance(answer, RetryLater):
            return answer
        if answer.status == 200 and isinstance(answer.body, dict):
            in_fleet = answer.body.get("in_fleet")
            interval = answer.body.get("interval_seconds")
            if isinstance(in_fleet, bool):
                return HeartbeatAnswer(
                    in_fleet,
                    str(answer.body.get("state", "")),
                    float(interval) if isinstance(interval, int | float) else None,
                )
        if answer.status in (401, 403):
            return Refused(f"the server answered {answer.describe()}")
        return RetryLater(f"the server answered {answer.describe()}")

    async def claim(
        self, task_id: uuid.UUID, scheduled_at: datetime, revision: int, *, timeout: float
    ) -> Claimed | Refused | RetryLater:
        """Ask to run the instant ``scheduled_at`` of a run-on-one task, waiting at most
        ``timeout`` seconds. Refused: a verdict of the server's (the instant is not this
        agent's to run); RetryLater: no answer that says (the agent does not run it)."""
        path = f"/api/v1/tasks/{task_id}/claims"
        answer = await self._post(
            path,
            claim_body(scheduled_at, revision),
            self.credential,
            MAX_ANSWER_BYTES,
            timeout=min(timeout, self._timeout),
        )
        if isinstance(answer, RetryLater):
            return answer
        code = answer.error_code
        if answer.status == 200 and isinstance(answer.body, dict):
            status = answer.body.get("status")
            after = answer.body.get("retry_after_seconds", 0.0)
            if status in CLAIM_STATUSES and isinstance(after, int | float):
                return Claimed(str(status), max(0.0, float(after)))
        elif code is not None and FINAL_CLAIM_ERRORS.get(code) == answer.status:
            return Refused(f"{answer.status} {code}: {answer.error_message}")
        return RetryLater(f"the server answered {answer.describe()}")

    async def report(
        self, task_id: uuid.UUID, body: bytes
    ) -> Acknowledged | Refused | TooLarge | RetryLater:
        """Send one result (its wire body)."""
        path = f"/api/v1/tasks/{task_id}/complete"
        answer = await self._post(path, body, self.credential, MAX_ANSWER_BYTES)
        if isinstance(answer, RetryLater):
            return answer
        too_large = _too_large(answer, len(body))
        if too_large is not None:
            return too_large
        code = answer.error_code
        if answer.status == 200 and isinstance(answer.body, dict):
            status = answer.body.get("status")
            if status in ACKNOWLEDGED_STATUSES:
                return Acknowledged(status)
        elif code is not None and FINAL_RESULT_ERRORS.get(code) == answer.status:
            return Refused(f"{answer.status} {code}: {answer.error_message}")
        return _not_a_verdict(answer)

    async def report_batch(
        self, bodies: Sequence[bytes]
    ) -> BatchAnswered | SendSingly | TooLarge | RetryLater:
        """Send several results (their wire bodies) in one request."""
        body = b'{"results":[' + b",".join(bodies) + b"]}"
        bound = MAX_ANSWER_BYTES + 100 * len(bodies)  # a verdict is ~25 bytes a result
        answer = await self._post(BATCH_PATH, body, self.credential, bound)
        if isinstance(answer, RetryLater):
            return answer
        too_large = _too_large(answer, len(body))
        if too_large is not None:
            return too_large
        if answer.status == 413 or (answer.status, answer.error_code) in _SEND_SINGLY:
            return SendSingly(answer.describe())
        items = answer.body.get("results") if isinstance(answer.body, dict) else None
        if answer.status != 200 or not isinstance(items, list) or len(items) != len(bodies):
            return _not_a_verdict(answer)
        verdicts: list[Acknowledged | Refused | RetryLater] = []
        for item in items:
            status = item.get("status") if isinstance(item, dict) else None
            if status in ACKNOWLEDGED_STATUSES:
                verdicts.append(Acknowledged(str(status)))
            elif status in FINAL_BATCH_STATUSES:
                verdicts.append(Refused(str(status)))
            elif status in RETRY_LATER_BATCH_STATUSES:
                verdicts.append(RetryLater(str(status)))
            else:
                verdicts.append(RetryLater(f"an answer the agent does not know: {status!r}", True))
        return BatchAnswered(verdicts)

    async def _post(
        self,
        path: str,
        body: bytes,
        bearer: str | None,
        max_answer_bytes: int,
        *,
        timeout: float | None = None,
    ) -> Answer | RetryLater:
        """The answer of the first replica, from the current one on, that answers
        something other than a 5xx within ``timeout`` seconds in all; else what the last
        one tried gave (a 5xx answer, or a RetryLater saying why none came)."""
        headers = {b"Content-Type": [b"application/json"]}
        if bearer is not None:
            headers[b"Authorization"] = [f"Bearer {bearer}".encode("ascii")]
        deadline = self._clock.seconds() + (self._timeout if timeout is None else timeout)
        outcome: Answer | RetryLater = RetryLater("no time left to ask the server")
        for _ in self.servers.urls:
            url = self.servers.current
            started = self._clock.seconds()
            left = deadline - started
            if left <= 0:
                break
            attempt_timeout = min(left, self.servers.attempt_timeout(len(body)))
            first_timeout = self.servers.first_timeout(len(body))
            try:
                answer = await exchange(
                    self._http,
                    self._clock,
                    "POST",
                    url + path,
                    body,
                    headers,
                    timeout=attempt_timeout,
                    max_answer_bytes=max_answer_bytes,
                )
            except NoAnswer as e:
                outcome = RetryLater(str(e))
                trouble = str(e)
                # Told apart by the time it took: a refused connection fails at once.
                timed_out = self._clock.seconds() - started >= attempt_timeout - 0.001
                if timed_out and attempt_timeout < first_timeout:
                    # The caller's own short wait ran out (a claim's): a replica is
                    # allowed the first timeout before it counts as trouble.
                    break
            else:
                took = self._clock.seconds() - started
                if answer.status < 500:
                    self.servers.answered(url, quickly=took <= first_timeout)
                    return answer
                outcome = answer
                trouble = f"it answered {answer.describe()}"
                timed_out = False
            # Sent again to the next replica at once, as a retry to the same server
            # would be: results are de-duplicated (key and digest), heartbeats and
            # claims (granted again to the same agent) are idempotent.
            self.servers.failed(url, trouble, timed_out)
        return outcome


def _too_large(answer: Answer, sent: int) -> TooLarge | None:
    """The server's own 413, with the limit it names (if it is a whole number)."""
    if answer.status != 413 or answer.error_code != PAYLOAD_TOO_LARGE:
        return None
    limit = answer.body["error"].get("max_body_bytes")
    valid = isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
    return TooLarge(limit if valid else None, sent, answer.describe())


def _not_a_verdict(answer: Answer) -> RetryLater:
    """An answer that is neither an acknowledgement nor a verdict: retry it later.

    It is foreign when a taskscheduler server would not give it to results; a 5xx, 408
    or 429 from anyone (a proxy whose backend is restarting, say) is only a server that
    cannot take results now.
    """
    status = answer.status
    foreign = not (
        status >= 500 or status in (408, 429) or (status, answer.error_code) in _RETRYABLE
    )
    return RetryLater(f"the server answered {answer.describe()}", foreign)
