"""Tells agents to leave the fleet (their URL was removed from it, or they were revoked)
until each confirms: the store keeps who is due (``pending_leaves``), so a server restart
carries on where it stopped."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from taskscheduler.httpclient import describe
from taskscheduler.retry import Backoff, RetryLoop
from taskscheduler.server.agent_client import DEFAULT_MAX_ANSWER_BYTES, Accepted, AgentClient
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import Leave
from taskscheduler.signing import InstructionSigner

#: Most leaves sent in one pass (each to its own agent, at once).
MAX_LEAVES_A_PASS = 100


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
        self._answer_bytes = max_answer_bytes
        backoff = Backoff(retry_base, retry_cap, jitter)
        self._loop = RetryLoop(clock, self._send_all, backoff, self._failed)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def kick(self) -> None:
        self._loop.retry_now()

    async def _send_all(self) -> None:
        """Every leave due, all at once (an agent that does not answer holds up no other);
        raises if any was not confirmed (the loop backs off and tries again)."""
        leaves = await self._store.pending_leaves(MAX_LEAVES_A_PASS)
        outcomes: list[tuple[bool, Any]] = await DeferredList(
            [Deferred.fromCoroutine(self._send(leave)) for leave in leaves], consumeErrors=True
        )
        problems = [
            f"{leave.url}: {value if ok else describe(value.value)}"
            for leave, (ok, value) in zip(leaves, outcomes, strict=True)
            if not ok or value is not None
        ]
        if problems:
            raise LeavesNotConfirmed("; ".join(problems))
        if len(leaves) == MAX_LEAVES_A_PASS:
            self._loop.kick()  # more are due

    async def _send(self, leave: Leave) -> str | None:
        """Tell one agent to leave; None once it confirmed, else why not."""
        client = AgentClient(
            leave.url,
            self._http,
            self._clock,
            self._signer,
            max_answer_bytes=self._answer_bytes,
        )
        audience = leave.agent_id if self._signer is not None else None
        outcome = await client.leave(leave.reason, audience)
        if not isinstance(outcome, Accepted):
            return str(outcome)
        await self._store.mark_left(leave.agent_id, leave.reason)
        self.log.info(
            "agent {agent_id} at {url} dropped its tasks ({reason})",
            agent_id=str(leave.agent_id),
            url=leave.url,
            reason=leave.reason,
        )
        return None

    def _failed(self, error: Exception, delay: float) -> None:
        self.log.warn(
            "could not tell agents to leave ({error}); retrying in {delay:.1f}s",
            error=describe(error),
            delay=delay,
        )
