"""An agent without a credential enrols with its server, once.

``POST {server}/api/v1/agents/enrol`` with the join secret as bearer token and
``{"agent_id", "url", "labels"}`` (:meth:`taskscheduler.agent.server_client.ServerClient.enrol`);
the answer holds the agent's own credential (stored 0600 in its data folder; the server
keeps only its hash, and the client sends it from then on) and the server's public key,
which the agent pins to check the signature of every instruction from then on. Until it succeeds
the agent retries with back-off: the server may not be up yet, or an operator may still
have to revoke a previous agent at the same URL, or release the URL of a revoked one.

The join secret is best given in a file (``--join-secret-file``, 0600). One given in
``TASKSCHEDULER_JOIN_SECRET`` is taken out of the agent's environment as soon as the
options are read (:func:`taskscheduler.hardening.take_secret_from_environment`), so
that neither a process the agent starts nor ``/proc/PID/environ`` shows it.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskscheduler.agent.identity import save_credential, save_server_key
from taskscheduler.agent.server_client import Enrolled, Refused, ServerClient
from taskscheduler.protocol.labels import NO_LABELS
from taskscheduler.redact import redact_tokens
from taskscheduler.retry import Backoff, RetryLoop
from taskscheduler.signing import key_fingerprint, public_key_text


class EnrolmentRefused(Exception):
    """The server answered, and said no."""


class _NotYet(Exception):
    """The server could not be asked, or could not answer: ask again later."""


class Enroller:
    """Enrols through ``client`` until it succeeds; then gives the client the agent's
    credential and calls ``on_enrolled`` once."""

    log = Logger()

    def __init__(
        self,
        client: ServerClient,
        clock: IReactorTime,
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
        labels: Mapping[str, str] = NO_LABELS,
    ) -> None:
        self._client = client
        self._data_dir = data_dir
        self._agent_id = agent_id
        self._advertise_url = advertise_url
        self._join_secret = join_secret
        self._on_enrolled = on_enrolled
        self._pinned_key = pinned_key
        self._labels = labels
        self._attempts = RetryLoop(
            clock, self._enrol, Backoff(retry_base, retry_cap, jitter), self._failed
        )

    def start(self) -> None:
        self._attempts.start()

    def stop(self) -> None:
        self._attempts.stop()

    def _failed(self, error: Exception, delay: float) -> None:
        log = self.log.error if isinstance(error, EnrolmentRefused) else self.log.warn
        log(
            "could not enrol with the server at {url} ({error}); retrying in {delay:.1f}s",
            url=self._client.url + "/api/v1/agents/enrol",
            error=redact_tokens(str(error))[:300],
            delay=delay,
        )

    async def _enrol(self) -> None:
        outcome = await self._client.enrol(
            self._agent_id, self._advertise_url, self._join_secret, self._labels
        )
        if isinstance(outcome, Refused):
            raise EnrolmentRefused(outcome.reason)
        if not isinstance(outcome, Enrolled):
            raise _NotYet(outcome.reason)
        if self._pinned_key is not None and public_key_text(outcome.server_key) != public_key_text(
            self._pinned_key
        ):
            # Someone answering in the server's place: keep nothing it gave.
            raise EnrolmentRefused(
                "the server's public key is not the one given by --server-public-key-file"
            )
        # The public key first: a credential without a pinned key would let the agent
        # report but refuse every instruction, and the next start would not enrol again.
        save_server_key(self._data_dir, outcome.server_key)
        save_credential(self._data_dir, outcome.credential)
        self._client.credential = outcome.credential
        self.log.info(
            "enrolled with the server as agent {agent_id} at {url}; pinned server key {key}",
            agent_id=str(self._agent_id),
            url=self._advertise_url,
            key=key_fingerprint(outcome.server_key),
        )
        if not self._attempts.stopped:
            self._on_enrolled(outcome)
