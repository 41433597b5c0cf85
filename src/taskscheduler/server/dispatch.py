"""The :class:`Dispatcher` service: one :class:`~taskscheduler.server.agent_link.AgentLink`
per member of the fleet, adding and dropping links as the fleet changes at run time
(:meth:`Dispatcher.fleet_changed`), and the
:class:`~taskscheduler.server.leaves.LeaveSender` that tells agents which must leave it.
What a link delivers, when, and how it reconciles is :mod:`taskscheduler.server.agent_link`.

Among replicas (given a :class:`~taskscheduler.server.leases.LeaseKeeper`), a replica
keeps a link only for the members whose ``agent:<url>`` lease it holds, its fair share
of them (:mod:`taskscheduler.server.leases`), and tells agents to leave only while it
holds ``job:leaves``: deliveries, removals, run-nows and reconciliation of an agent
follow its link, so each is done by one replica. A change made through another replica
reaches this one through the same methods (``task_created``, ``fleet_changed``, ...),
which act on the links it holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.server.agent_link import AgentLink
from taskscheduler.server.leases import LeasedService, LeaseKeeper
from taskscheduler.server.leaves import LeaveSender
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.records import Task
from taskscheduler.services import Step

#: The lease of the agent at a URL (``agent:http://host:port``).
AGENT_LEASE = "agent:"


class Dispatcher(Service):
    """One :class:`AgentLink` per member of the fleet, following the fleet as it changes,
    and the :class:`LeaveSender`."""

    log = Logger()

    def __init__(
        self,
        store: Store,
        http: Any,
        clock: IReactorTime,
        agent_urls: Sequence[str],
        *,
        keeper: LeaseKeeper | None = None,
        **link_options: Any,
    ) -> None:
        self._store = store
        self._http = http
        self._clock = clock
        self._keeper = keeper
        self._link_options = link_options
        #: The fleet's members, as last read (links: those this replica delivers to).
        self.members = [url.rstrip("/") for url in agent_urls]
        # Among replicas, the links follow the leases held (the members are stored).
        self.links = (
            []
            if keeper is not None
            else [AgentLink(url, store, http, clock, **link_options) for url in agent_urls]
        )
        self.leaves = LeaveSender(store, http, clock, **link_options)
        self._leaves_job = (
            None
            if keeper is None
            else LeasedService(
                keeper, "job:leaves", Step("leave notices", self.leaves.start, self.leaves.stop)
            )
        )
        #: A read of the fleet after a change is under way; another change came meanwhile.
        self._following = False
        self._follow_again = False

    def startService(self) -> None:
        super().startService()
        for link in self.links:
            link.start()
            link.kick()
        if self._leaves_job is None:
            self.leaves.start()
        else:
            self._leaves_job.startService()
        # The members stored (AVAILABLE_SERVERS unset, or added at run time) too.
        d = Deferred.fromCoroutine(self._follow_fleet(remove=False))
        d.addErrback(self._follow_failed)

    def stopService(self) -> None:
        if self._keeper is not None:
            self._keeper.unfollow(self)  # stops the links it holds
        if self._leaves_job is not None:
            self._leaves_job.stopService()
        for link in self.links:
            link.stop()
        self.leaves.stop()
        return super().stopService()

    def lease_gained(self, name: str) -> None:
        """This replica holds the agent's lease: deliver to it and reconcile it now."""
        url = name.removeprefix(AGENT_LEASE)
        if not self.running or any(link.url == url for link in self.links):
            return
        link = AgentLink(url, self._store, self._http, self._clock, **self._link_options)
        self.links.append(link)
        link.start()
        self.log.info("delivering tasks to {url} (this replica holds its lease)", url=url)

    def lease_lost(self, name: str) -> None:
        """Another replica has (or may soon have) the agent: stop acting on it at once."""
        url = name.removeprefix(AGENT_LEASE)
        for link in [link for link in self.links if link.url == url]:
            link.stop()
            self.links.remove(link)
            self.log.info("no longer delivering tasks to {url} from this replica", url=url)

    def fleet_changed(self) -> None:
        """A member was added or removed, or an agent revoked: follow the stored fleet
        and tell whoever must leave."""
        for link in self.links:
            link.forget_identity()  # an agent revoked, or one enrolled at a member's URL
        self.leaves.kick()
        if self._following:
            # One read of the fleet after the one under way sees this change and any
            # other meanwhile: members added one by one cost a read each, not a pile.
            self._follow_again = True
            return
        self._following = True
        d = Deferred.fromCoroutine(self._follow_fleet(remove=True))
        d.addErrback(self._follow_failed)
        d.addBoth(self._followed)

    def _followed(self, _: object) -> None:
        self._following = False
        if self._follow_again:
            self._follow_again = False
            self.fleet_changed()

    async def _follow_fleet(self, remove: bool) -> None:
        members = {m.url for m in await self._store.list_fleet()}
        if not self.running:
            return
        self.members = sorted(members)
        if self._keeper is not None:
            # Links come and go with the leases (lease_gained, lease_lost).
            self._keeper.follow(self, [AGENT_LEASE + url for url in members], fair=True)
            return
        current = {link.url for link in self.links}
        for url in sorted(members - current):
            link = AgentLink(url, self._store, self._http, self._clock, **self._link_options)
            self.links.append(link)
            link.start()
            self.log.info("delivering tasks to {url}, new in the fleet", url=url)
        if remove:
            for link in [link for link in self.links if link.url not in members]:
                link.stop()
                self.links.remove(link)
                self.log.info("no longer delivering tasks to {url}", url=link.url)

    def _follow_failed(self, failure: Failure) -> None:
        self.log.failure("could not follow the fleet", failure)

    def task_created(self, task: Task) -> None:
        for link in self.links:
            link.kick()

    def task_deleted(self, task: Task) -> None:
        for link in self.links:
            link.kick()

    def task_changed(self, task: Task) -> None:
        """Changed, paused, resumed or run now: the store says what each agent is due."""
        for link in self.links:
            link.kick()

    def agent_relabelled(self, url: str) -> None:
        """The agent at ``url`` has other labels: deliver the tasks it now matches and
        remove those it no longer does, now."""
        for link in self.links:
            if link.url == url.rstrip("/"):
                link.retry_now()

    def agent_enrolled(self, url: str) -> None:
        """An agent enrolled at ``url``: deliver it every task of its URL now, rather than
        after a back-off or at the next reconciliation."""
        for link in self.links:
            if link.url == url.rstrip("/"):
                link.new_identity()
