"""An agent without a credential enrols with its server, once.

``POST {server}/api/v1/agents/enrol`` with the join secret as bearer token and
``{"agent_id", "url"}``; the answer holds the agent's own credential (stored 0600 in its
data folder; the server keeps only its hash) and the server's public key, which the
agent pins to check the signature of every instruction from then on. Until it succeeds
the agent retries with back-off: the server may not be up yet, or an operator may still
have to revoke a previous agent at the same URL, or release the URL of a revoked one.

The join secret is best given in a file (``--join-secret-file``, 0600). One given in
``TASKSCHEDULER_JOIN_SECRET`` is taken out of the agent's environment as soon as the
options are read (:func:`taskscheduler.hardening.take_secret_from_environment`), so
that neither a process the agent starts nor ``/proc/PID/environ`` shows it.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from taskscheduler.agent.identity import save_credential, save_server_key
from taskscheduler.auth import AGENT_PREFIX, parse_bearer
from taskscheduler.backoff import backoff_delay
from taskscheduler.httpclient import read_body
from taskscheduler.redact import redact_tokens
from taskscheduler.signing import KeyFileError, key_fingerprint, parse_public_key, public_key_text

#: Seconds to wait for the server's answer.
REQUEST_TIMEOUT = 30.0
#: Largest answer read from the server: a credential and a public key, or an error.
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Enrolled:
    credential: str
    server_key: Ed25519PublicKey


class EnrolmentRefused(Exception):
    """The server answered, and said no."""


class Enroller:
    """Enrols until it succeeds, then calls ``on_enrolled`` once."""

    log = Logger()

    def __init__(
        self,
        http: Any,
        clock: IReactorTime,
        server_url: str,
        data_dir: Path,
        agent_id: uuid.UUID,
        advertise_url: str,
        join_secret: str,
        on_enrolled: Callable[[Enrolled], None],
        *,
        pinned_key: Ed25519PublicKey | None = None,
        retry_base: float = 0.5,
        retry_cap: float = 10.0,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._http = http
        self._clock = clock
        self._url = server_url.rstrip("/") + "/api/v1/agents/enrol"
        self._data_dir = data_dir
        self._agent_id = agent_id
        self._advertise_url = advertise_url
        self._join_secret = join_secret
        self._on_enrolled = on_enrolled
        self._pinned_key = pinned_key
        self._retry_base = retry_base
        self._retry_cap = retry_cap
        self._jitter = jitter
        self._failures = 0
        self._pending: IDelayedCall | None = None
        self._attempt: Deferred[None] | None = None
        self._stopped = True

    def start(self) -> None:
        self._stopped = False
        self._pending = self._clock.callLater(0, self._try)

    def stop(self) -> None:
        self._stopped = True
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        if self._attempt is not None:
            self._attempt.cancel()

    def _try(self) -> None:
        self._pending = None
        self._attempt = Deferred.fromCoroutine(self._enrol())

    async def _enrol(self) -> None:
        try:
            enrolled = await self._request()
        except CancelledError:
            return
        except Exception as e:
            if self._stopped:
                return
            self._failures += 1
            delay = backoff_delay(self._failures, self._retry_base, self._retry_cap, self._jitter)
            log = self.log.error if isinstance(e, EnrolmentRefused) else self.log.warn
            log(
                "could not enrol with the server at {url} ({error}); retrying in {delay:.1f}s",
                url=self._url,
                error=redact_tokens(str(e))[:300],
                delay=delay,
            )
            self._pending = self._clock.callLater(delay, self._try)
            return
        finally:
            self._attempt = None
        # The public key first: a credential without a pinned key would let the agent
        # report but refuse every instruction, and the next start would not enrol again.
        save_server_key(self._data_dir, enrolled.server_key)
        save_credential(self._data_dir, enrolled.credential)
        self.log.info(
            "enrolled with the server as agent {agent_id} at {url}; pinned server key {key}",
            agent_id=str(self._agent_id),
            url=self._advertise_url,
            key=key_fingerprint(enrolled.server_key),
        )
        if not self._stopped:
            self._on_enrolled(enrolled)

    async def _request(self) -> Enrolled:
        body = json.dumps({"agent_id": str(self._agent_id), "url": self._advertise_url})
        try:
            response = await self._http.post(
                self._url,
                data=body.encode("utf-8"),
                headers={
                    b"Content-Type": [b"application/json"],
                    b"Authorization": [f"Bearer {self._join_secret}".encode("ascii")],
                },
                timeout=REQUEST_TIMEOUT,
                reactor=self._clock,
                unbuffered=True,  # read_body bounds what is read; treq would read it all
            )
            raw = await read_body(response, MAX_ANSWER_BYTES, self._clock, REQUEST_TIMEOUT)
        except CancelledError:
            raise
        except Exception as e:
            raise ConnectionError(f"{type(e).__name__}: {e}") from e
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if response.code != 201 or not isinstance(answer, dict):
            message = ""
            if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
                message = str(answer["error"].get("message", ""))[:200]
            error = f"the server answered {response.code} {message}".strip()
            if response.code == 401:
                # Enrolment sends nothing but the join secret: a 401 can only refuse it.
                detail = message.removeprefix("join secret refused: ")
                raise EnrolmentRefused(
                    f"join secret refused (401{': ' + detail if detail else ''}); check the "
                    "agent's --join-secret-file or TASKSCHEDULER_JOIN_SECRET"
                )
            if response.code in (403, 409):
                raise EnrolmentRefused(error)
            raise ConnectionError(error)
        credential = answer.get("credential")
        if (
            not isinstance(credential, str)
            or not credential.startswith(AGENT_PREFIX)
            or parse_bearer(f"Bearer {credential}") != credential
        ):
            raise EnrolmentRefused("the server's answer holds no valid credential")
        try:
            key = parse_public_key(str(answer.get("server_public_key", "")))
        except KeyFileError as e:
            raise EnrolmentRefused(f"the server's public key is unusable: {e}") from None
        if self._pinned_key is not None and public_key_text(key) != public_key_text(
            self._pinned_key
        ):
            # Someone answering in the server's place: keep nothing it gave.
            raise EnrolmentRefused(
                "the server's public key is not the one given by --server-public-key-file"
            )
        return Enrolled(credential, key)
