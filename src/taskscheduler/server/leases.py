"""Work that must happen once across the server's replicas, done by a lease's holder.

A :class:`LeaseKeeper` (one per replica) beats every ``renew_every`` seconds
(:meth:`~taskscheduler.server.store.leases.LeaseStore.beat`): it says the replica is
alive, renews its leases for ``ttl`` seconds, gives back those it let go, and claims the
free or expired ones its listeners want. A listener follows a set of lease names and is
told when this replica starts and stops acting on each (``lease_gained`` /
``lease_lost``):

- a job (``job:retention``, ``job:leaves``, ...) is wanted by every replica and held
  by one (:class:`LeasedService` runs a child service only while its lease is held);
- the agents (``agent:<url>``) are shared fairly: a replica holds at most
  ``ceil(agents / live replicas)`` of them, and one over that share (a replica just
  joined) lets the extra ones go, for the newcomer to claim.

Expiry is the database's clock; this replica's own rule is stricter. A beat sent at
(monotonic) time ``t`` that succeeds lets it act on what it holds until
``t + ttl - margin``: the database cannot expire the rows before ``t + ttl``, since the
transaction starts after ``t``. Past that deadline without another successful beat (the
database is out of reach, or the beat is slow), the keeper stops acting on every lease,
so that the replica that claims them after expiry never acts beside it. A dead
replica's leases are taken over within ``ttl`` plus one beat of the others.

The deadline is kept on ``monotonic`` (``time.monotonic``), not on the reactor's
wall-clock ``seconds()``; the reactor's timer that wakes the keeper at the deadline is
checked against it, and so is every beat.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from taskscheduler.httpclient import describe
from taskscheduler.server.store.leases import Beat, LeaseGroup, LeaseStore, fair_share

DEFAULT_TTL = 10.0
DEFAULT_RENEW_EVERY = 2.0


class LeaseListener(Protocol):
    def lease_gained(self, name: str) -> None:
        """This replica may act on ``name`` from now on."""

    def lease_lost(self, name: str) -> None:
        """This replica must stop acting on ``name`` now."""


class LeaseKeeper(Service):
    """This replica's leases: beats, renews, claims, and tells listeners (see module)."""

    log = Logger()

    def __init__(
        self,
        store: LeaseStore,
        clock: IReactorTime,
        replica_id: str,
        *,
        ttl: float = DEFAULT_TTL,
        renew_every: float = DEFAULT_RENEW_EVERY,
        margin: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if renew_every * 2 >= ttl:
            raise ValueError("a lease must outlive two renewals")
        self._store = store
        self._clock = clock
        self.replica_id = replica_id
        self.ttl = ttl
        self.renew_every = renew_every
        #: Time to stop acting before the database could expire a lease: one renewal.
        self._margin = renew_every if margin is None else margin
        self._monotonic = monotonic
        self._follows: dict[LeaseListener, LeaseGroup] = {}
        #: What each listener acts on now.
        self._acting: dict[LeaseListener, set[str]] = {}
        #: Let go locally, to give back in the next beat.
        self._release: set[str] = set()
        self._deadline = float("-inf")
        self._expiry: IDelayedCall | None = None
        self._loop: LoopingCall | None = None
        self._beating: Deferred[None] | None = None
        self._soon: IDelayedCall | None = None
        #: Asked for a beat while one was under way: another right after it.
        self._again = False
        self.live = 0

    # -- what listeners see ------------------------------------------------------------

    def follow(self, listener: LeaseListener, names: Iterable[str], *, fair: bool) -> None:
        """``listener`` wants ``names`` (replacing what it wanted): it is told as this
        replica gains and loses each. Names it no longer wants are lost at once."""
        group = LeaseGroup(frozenset(names), fair)
        self._follows[listener] = group
        acting = self._acting.setdefault(listener, set())
        for name in sorted(acting - group.names):
            self._lose(listener, name)
            self._release.add(name)
        self._beat_soon()

    def unfollow(self, listener: LeaseListener) -> None:
        """``listener`` wants nothing more: it loses what it acts on."""
        self.follow(listener, (), fair=False)
        del self._follows[listener]
        del self._acting[listener]

    def holds(self, name: str) -> bool:
        """Whether this replica acts on ``name`` now."""
        return self.valid() and any(name in acting for acting in self._acting.values())

    def valid(self) -> bool:
        """Whether the last successful beat still lets this replica act on its leases."""
        return self._monotonic() < self._deadline

    # -- the service ---------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self.renew_every, now=True)

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        for delayed in (self._soon, self._expiry):
            if delayed is not None and delayed.active():
                delayed.cancel()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._lose_all()
        return Deferred.fromCoroutine(self._release_all())

    async def _release_all(self) -> None:
        if self._beating is not None:
            # Its claims must not land after the release (_beat never raises).
            await self._beating
        try:
            await self._store.release_all(self.replica_id)
        except Exception as e:
            # They expire by themselves: the others wait ``ttl`` for them.
            self.log.warn("could not give back this replica's leases: {error}", error=describe(e))

    def _beat_soon(self) -> None:
        """Beat now (or right after the beat under way): something new is wanted."""
        if not self.running or (self._soon is not None and self._soon.active()):
            return
        if self._beating is not None:
            self._again = True
            return
        self._soon = self._clock.callLater(0, self._tick)

    def _tick(self) -> None:
        # Never raises (a LoopingCall stops for good when its call does).
        if self._beating is not None:
            return  # the last beat is slow; the deadline watches over it
        beating = Deferred.fromCoroutine(self._beat())
        if not beating.called:
            self._beating = beating

    async def _beat(self) -> None:
        sent = self._monotonic()
        release = set(self._release)
        groups = list(self._follows.values())
        try:
            beat = await self._store.beat(self.replica_id, self.ttl, groups, release)
        except Exception as e:
            if self.running:
                self.log.warn(
                    "could not renew this replica's leases: {error}; acting on them for "
                    "{left:.1f}s more at most",
                    error=describe(e),
                    left=max(0.0, self._deadline - self._monotonic()),
                )
            return
        finally:
            self._beating = None
            if self._again:
                self._again = False
                self._beat_soon()
        if not self.running:
            return
        self._release -= release
        deadline = sent + self.ttl - self._margin
        if self._monotonic() >= deadline:
            self.log.warn("renewing this replica's leases took too long; acting on none")
            self._lose_all()
            return
        self._deadline = deadline
        self._watch_deadline()
        try:
            self._apply(beat)
        except Exception:
            self.log.failure("following this replica's leases")

    def _apply(self, beat: Beat) -> None:
        """Act on what the beat says this replica holds, within its share."""
        if beat.live != self.live:
            self.log.info(
                "{live} server replica(s) alive; this one is {replica_id}",
                live=beat.live,
                replica_id=self.replica_id,
            )
        self.live = beat.live
        wanted: set[str] = set()
        for listener, group in list(self._follows.items()):
            wanted |= group.names
            mine = beat.held & group.names
            acting = self._acting[listener]
            if group.fair:
                # Over its share (a replica joined): keep what it acts on, first.
                share = fair_share(len(group.names), beat.live)
                keep = set(sorted(mine, key=lambda name: (name not in acting, name))[:share])
            else:
                keep = set(mine)
            for name in sorted(acting - keep):
                self._lose(listener, name)
            self._release |= mine - keep
            for name in sorted(keep - acting):
                acting.add(name)
                self._tell(listener.lease_gained, name)
        self._release |= beat.held - wanted

    def _watch_deadline(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = self._clock.callLater(
            max(0.0, self._deadline - self._monotonic()), self._check_deadline
        )

    def _check_deadline(self) -> None:
        left = self._deadline - self._monotonic()
        if left > 0:
            self._expiry = self._clock.callLater(left, self._check_deadline)
            return
        if any(self._acting.values()):
            self.log.warn("this replica's leases could not be renewed in time: acting on none")
        self._lose_all()

    def _lose_all(self) -> None:
        self._deadline = float("-inf")
        for listener, acting in list(self._acting.items()):
            for name in sorted(acting):
                self._lose(listener, name)

    def _lose(self, listener: LeaseListener, name: str) -> None:
        self._acting[listener].discard(name)
        self._tell(listener.lease_lost, name)

    def _tell(self, hook: Callable[[str], Any], name: str) -> None:
        try:
            hook(name)
        except Exception:
            self.log.failure("acting on the lease {name}", name=name)


class LeasedService(Service):
    """Runs ``child`` only while this replica holds the lease ``name``: started when it
    is gained (once a stop under way is over), stopped when it is lost (and when this
    service stops)."""

    log = Logger()

    def __init__(self, keeper: LeaseKeeper, name: str, child: IService) -> None:
        self.setName(name)
        self._keeper = keeper
        self.lease = name
        self.child = child
        self._held = False
        self._stopping: Deferred[Any] | None = None

    def startService(self) -> None:
        super().startService()
        self._keeper.follow(self, [self.lease], fair=False)

    def stopService(self) -> Deferred[Any] | None:  # type: ignore[override]
        super().stopService()
        self._keeper.unfollow(self)
        return self._stopping

    def lease_gained(self, name: str) -> None:
        self._held = True
        self.log.info("this replica now runs {job}", job=name)
        self._start_child()

    def lease_lost(self, name: str) -> None:
        self._held = False
        if not self.child.running:
            return
        self.log.info("this replica no longer runs {job}", job=name)
        stopped = self.child.stopService()
        if isinstance(stopped, Deferred) and not stopped.called:
            self._stopping = stopped

            def done(result: object) -> None:
                self._stopping = None
                self._start_child()  # gained again meanwhile

            stopped.addBoth(done)

    def _start_child(self) -> None:
        # Not while a stop is under way (a tick finishing): started once it is over.
        if self.running and self._held and self._stopping is None and not self.child.running:
            self.child.startService()
