"""The agent's place in the fleet: its heartbeat to the server, and its membership.

Every ``interval`` seconds the agent tells its server it is alive, with a few counters
(``POST /api/v1/agents/heartbeat``); the answer says whether its URL is in the fleet.
The server may tell it to leave (``POST /api/v1/agent/leave``, :mod:`.api`): it drops
every task and says why in its health (``membership``: ``member``, ``removed`` or
``revoked``), kept in ``<data-dir>/membership`` so that a restart still says it.
Each change is logged once, not once a heartbeat.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.server_client import HeartbeatAnswer, Refused, ServerClient

#: Seconds between heartbeats (``--heartbeat-interval``).
DEFAULT_HEARTBEAT_INTERVAL = 10.0

MEMBER = "member"
REASONS = ("removed", "revoked")


class Membership:
    """Whether the agent is a member of its server's fleet, as it was told."""

    log = Logger()

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self.state = MEMBER
        #: What the last heartbeat's answer said (None: no answer yet).
        self.in_fleet: bool | None = None
        if path is not None and path.exists():
            text = path.read_text(encoding="utf-8").strip()
            self.state = text if text in REASONS else MEMBER

    def left(self, reason: str, dropped: int) -> None:
        """The server told the agent to leave for ``reason`` (it dropped ``dropped`` tasks)."""
        if self.state != reason:
            self.log.warn(
                "the server told this agent to leave the fleet ({reason}): dropped {count} "
                "tasks; it runs nothing until an operator adds it again",
                reason=reason,
                count=dropped,
            )
        self._set(reason)
        if reason == "removed":
            self.in_fleet = False

    def heard(self, in_fleet: bool) -> None:
        """The server answered a heartbeat: log whether the agent is in the fleet, once
        per change."""
        if in_fleet != self.in_fleet:
            if in_fleet:
                self.log.info("this agent's URL is in its server's fleet")
            else:
                self.log.warn(
                    "this agent's URL is not in its server's fleet: it is given no task; an "
                    "operator adds it with POST /api/v1/fleet (or AVAILABLE_SERVERS)"
                )
        self.in_fleet = in_fleet
        if in_fleet and self.state == "removed":
            self._set(MEMBER)  # added again: the server delivers its tasks anew

    def _set(self, state: str) -> None:
        if state == self.state and (self._path is None or self._path.exists() == (state != MEMBER)):
            return
        self.state = state
        if self._path is None:
            return
        if state == MEMBER:
            self._path.unlink(missing_ok=True)
            return
        partial = self._path.with_suffix(".partial")
        partial.write_text(state + "\n", encoding="utf-8")
        os.replace(partial, self._path)


class HeartbeatLoop:
    """Sends a heartbeat every ``interval`` seconds; never stops on an error."""

    log = Logger()

    def __init__(
        self,
        client: ServerClient,
        clock: IReactorTime,
        membership: Membership,
        report: Callable[[], dict[str, Any]],
        interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    ) -> None:
        self._client = client
        self._membership = membership
        self._report = report
        self._interval = interval
        self._loop = LoopingCall(self._beat_safely)
        self._loop.clock = clock
        #: The last problem logged (None: the last heartbeat was answered).
        self._problem: str | None = None

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _beat_safely(self) -> Deferred[None]:
        # A LoopingCall stops for good when its function fails: never let it.
        d = Deferred.fromCoroutine(self._beat())
        d.addErrback(self._failed)
        return d

    def _failed(self, failure: Failure) -> None:
        self.log.failure("could not send a heartbeat", failure)

    async def _beat(self) -> None:
        answer = await self._client.heartbeat(self._report())
        if isinstance(answer, HeartbeatAnswer):
            if self._problem is not None:
                self.log.info("the server answers heartbeats again")
            self._problem = None
            self._membership.heard(answer.in_fleet)
            return
        problem = answer.reason
        if isinstance(answer, Refused) and "401" in problem:
            problem = f"{problem} (was this agent revoked?)"
        if problem != self._problem:
            self.log.warn("the server did not take a heartbeat: {problem}", problem=problem)
        self._problem = problem
