"""What a server replica keeps in memory, and how it hears of the changes other replicas
make (issue 14: any number of replicas share one PostgreSQL and hold no state it does not).

:class:`CacheSync` is both sides. The API's callbacks act on this replica as a single
server does and announce the change (:meth:`ChangeBus.publish
<taskscheduler.server.changes.ChangeBus.publish>`); a change another replica announces
calls the same handlers here; a resync (the bus reconnected, or a replica could not
announce everything) drops every cache and makes the dispatcher read again.

Every per-process cache of the server, and why each is right with several replicas:

- ``ServerAccess``'s agent credentials (5 s): dropped when an agent is enrolled or revoked
  through any replica, and on a resync, so a revoked agent is refused by every replica
  as soon as its listener hears of it (milliseconds), not 5 s later.
- ``Notifier``'s tasks (10 s; whether a task has a webhook): told of a task created or
  changed on any replica (read again here), dropped on a resync.
- ``AgentLink``'s agent identity (the id instructions are signed for): forgotten by
  ``Dispatcher.fleet_changed`` (any replica's fleet change or revocation) and renewed by
  ``agent_enrolled`` (any replica's enrolment); a resync does both for every link.
- What each link delivers is read from the database at each pass; a link is kicked on any
  replica's task change and on a resync, and reconciles periodically anyway.
- The results routes' assignments (``(agent URL, task)`` pairs seen assigned): positive
  answers only, kept as a single server keeps them (it does not drop them on a change of
  its own either); whether a result comes too late is decided by the store, against the
  task's ``deleted_at``, in the statement that inserts it. Safe per replica.
- The heartbeat gauge of ``/metrics`` is per replica (each says what reached it); a
  revoked agent's series goes on every replica.
- The create-rate limiter (``--create-rate``) is per replica: N replicas let an operator
  token create up to N times the rate.
- Operator tokens and join secrets: files every replica reads (and re-reads) itself.
- Per-agent "outside the fleet" warnings: only what this replica has logged already.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from taskscheduler.server.access import ServerAccess
from taskscheduler.server.changes import Change, ChangeBus, Kind
from taskscheduler.server.dispatch import Dispatcher
from taskscheduler.server.metrics import ServerMetrics
from taskscheduler.server.notify.notifier import Notifier
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import AgentRecord, Task

#: Other replicas' task changes waiting to be read; past it, a resync instead.
MAX_PENDING_TASKS = 10_000


class CacheSync:
    """The API's callbacks (act here, then tell the other replicas) and the bus's
    subscriber (act here on what another replica did)."""

    log = Logger()

    def __init__(
        self,
        bus: ChangeBus,
        store: Store,
        dispatcher: Dispatcher,
        notifier: Notifier,
        access: ServerAccess,
        metrics: ServerMetrics,
    ) -> None:
        self._bus = bus
        self._store = store
        self._dispatcher = dispatcher
        self._notifier = notifier
        self._access = access
        self._metrics = metrics
        #: Other replicas' task changes not yet read, with the latest kind of each.
        self._pending: dict[uuid.UUID, Kind] = {}
        self._reading = False
        bus.subscribe(self)

    # -- this replica's changes (the API's callbacks, after the commit) ------------------

    def task_created(self, task: Task) -> None:
        self._task(Kind.TASK_CREATED, task)
        self._bus.publish(Change(Kind.TASK_CREATED, task.task_id))

    def task_changed(self, task: Task) -> None:
        self._task(Kind.TASK_CHANGED, task)
        self._bus.publish(Change(Kind.TASK_CHANGED, task.task_id))

    def task_deleted(self, task: Task) -> None:
        self._task(Kind.TASK_DELETED, task)
        self._bus.publish(Change(Kind.TASK_DELETED, task.task_id))

    def fleet_changed(self) -> None:
        self._dispatcher.fleet_changed()
        self._bus.publish(Change(Kind.FLEET_CHANGED))

    def agent_enrolled(self, agent: AgentRecord) -> None:
        self._access.forget_agents()
        self._dispatcher.agent_enrolled(agent.url)
        self._bus.publish(Change(Kind.AGENT_ENROLLED, agent.agent_id, agent.url))

    def agent_relabelled(self, url: str) -> None:
        self._dispatcher.agent_relabelled(url)
        self._bus.publish(Change(Kind.AGENT_RELABELLED, url=url))

    def agent_revoked(self, agent: AgentRecord) -> None:
        # The route dropped this replica's cache and series already.
        self._bus.publish(Change(Kind.AGENT_REVOKED, agent.agent_id))

    # -- other replicas' changes ---------------------------------------------------------

    def changed(self, change: Change) -> None:
        kind = change.kind
        if kind in (Kind.TASK_CREATED, Kind.TASK_CHANGED, Kind.TASK_DELETED):
            assert change.id is not None
            self._task_elsewhere(kind, change.id)
        elif kind is Kind.FLEET_CHANGED:
            self._dispatcher.fleet_changed()
        elif kind is Kind.AGENT_ENROLLED:
            assert change.url is not None
            self._access.forget_agents()
            self._dispatcher.agent_enrolled(change.url)
        elif kind is Kind.AGENT_RELABELLED:
            assert change.url is not None
            self._dispatcher.agent_relabelled(change.url)
        elif kind is Kind.AGENT_REVOKED:
            assert change.id is not None
            self._access.forget_agents()
            self._metrics.forget_agent(change.id)
        else:
            self.resync()

    def resync(self) -> None:
        """Anything may have changed: drop the caches, read the fleet, deliver."""
        self._pending.clear()
        self._access.forget_agents()
        self._notifier.forget_tasks()
        self._dispatcher.fleet_changed()
        for link in list(self._dispatcher.links):
            link.kick()

    def _task(self, kind: Kind, task: Task) -> None:
        if kind is Kind.TASK_CREATED:
            self._dispatcher.task_created(task)
        elif kind is Kind.TASK_DELETED:
            self._dispatcher.task_deleted(task)
        else:
            self._dispatcher.task_changed(task)
        self._notifier.task_changed(task)

    def _task_elsewhere(self, kind: Kind, task_id: uuid.UUID) -> None:
        self._notifier.forget_task(task_id)  # never judged on the old one meanwhile
        if len(self._pending) >= MAX_PENDING_TASKS:
            self.log.warn("other replicas changed tasks faster than they are read: resyncing")
            self.resync()
            return
        self._pending[task_id] = kind
        if not self._reading:
            self._reading = True
            Deferred.fromCoroutine(self._read_tasks()).addErrback(self._read_failed)

    async def _read_tasks(self) -> None:
        # One at a time: the handlers want the task; a burst of notices is read in turn.
        try:
            while self._pending:
                task_id = next(iter(self._pending))
                kind = self._pending.pop(task_id)
                try:
                    task = await self._store.get_task(task_id)
                except Exception as e:
                    # The links reconcile with the database by themselves.
                    self.log.warn(
                        "could not read task {task_id}, changed by another replica: {error}",
                        task_id=str(task_id),
                        error=str(e),
                    )
                    continue
                if task is None:
                    continue
                try:
                    self._task(kind, task)
                except Exception:
                    self.log.failure("acting on task {task_id}", task_id=str(task_id))
        finally:
            self._reading = False

    def _read_failed(self, failure: Any) -> None:
        self.log.failure("acting on another replica's task change", failure)
