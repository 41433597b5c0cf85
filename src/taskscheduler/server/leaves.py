"""Tells agents to leave the fleet (their URL was removed from it, or they were revoked)
until each confirms: the store keeps who is due (``pending_leaves``), so a server restart
carries on where it stopped."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskscheduler.httpclient import describe
from taskscheduler.retry import Backoff, RetryLoop
from taskscheduler.server.agent_client import DEFAULT_MAX_ANSWER_BYTES, Accepted, AgentClient
from taskscheduler.server.store.interface import Store
from taskscheduler.signing import InstructionSigner


class LeavesNotConfirmed(Exception):
    """Some agents due to leave did not confirm it (retried after a back-off)."""


class LeaveSender:
    """Tells each agent due to leave (its URL left the fleet, or it was revoked) to drop
    every task, signed for that agent, until it confirms: kicked on a change, retried
    with back-off while any is unconfirmed. The store keeps what is due, so a restart
    picks it up."""

    log = Logger()

    def __init__(
        self,
        store: Store,
        http: Any,
        clock: IReactorTime,
        *,
        signer: InstructionSigner | None = None,
        retry_base: float = 1.0,
        retry_cap: float = 60.0,
        jitter: Callable[[], float] = random.random,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        **_: Any,
    ) -> None:
        self._store = store
        self._http = http
        self._clock = clock
        self._signer = signer
        self._max_answer_bytes = max_answer_bytes
        backoff = Backoff(retry_base, retry_cap, jitter)
        self._loop = RetryLoop(clock, self._send_all, backoff, self._failed)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def kick(self) -> None:
        self._loop.retry_now()

    async def _send_all(self) -> None:
        leaves = await self._store.pending_leaves(100)
        problems = []
        for leave in leaves:
            client = AgentClient(
                leave.url,
                self._http,
                self._clock,
                self._signer,
                max_answer_bytes=self._max_answer_bytes,
            )
            audience = leave.agent_id if self._signer is not None else None
            outcome = await client.leave(leave.reason, audience)
            if isinstance(outcome, Accepted):
                await self._store.mark_left(leave.agent_id, leave.reason)
                self.log.info(
                    "agent {agent_id} at {url} dropped its tasks ({reason})",
                    agent_id=str(leave.agent_id),
                    url=leave.url,
                    reason=leave.reason,
                )
            else:
                problems.append(f"{leave.url}: {outcome}")
        if problems:
            raise LeavesNotConfirmed("; ".join(problems))

    def _failed(self, error: Exception, delay: float) -> None:
        self.log.warn(
            "could not tell agents to leave ({error}); retrying in {delay:.1f}s",
            error=describe(error),
            delay=delay,
        )
