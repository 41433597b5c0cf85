"""Leases in PostgreSQL (migration 15): the rows through which server replicas share the
work that must happen once (an agent's deliveries, retention, leave notices, ...).

A lease is a row of ``leases`` held by a replica until ``expires_at``. Its expiry is
judged by the database's clock (``now()``) alone, so that replicas whose clocks disagree
never disagree on who holds what. Each replica calls :meth:`Leases.beat` every few
seconds; one transaction says the replica is alive (``replicas.seen_at``), gives back
what it asks to release, renews what it still holds, counts the live replicas, and
claims free or expired leases with ``FOR UPDATE SKIP LOCKED``: two replicas claiming at
once each take other rows, never the same one. :class:`MemoryLeases` is the same for
unit tests, with a clock of their own as ``now()``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.interfaces import IReactorTime

from taskscheduler.server.store.pool import Cursor, Database

#: Replicas not seen, and leases not renewed, for this long are forgotten.
FORGET_AFTER = 3600.0


@dataclass(frozen=True)
class Claimant:
    """A replica claiming rows (pending notifications) for ``ttl`` seconds at a time."""

    replica_id: str
    ttl: float


def fair_share(names: int, live: int) -> int:
    """How many of ``names`` leases one of ``live`` replicas may hold: every lease has a
    holder however the replicas split them, and none holds more than one over another."""
    return math.ceil(names / max(live, 1))


@dataclass(frozen=True)
class LeaseGroup:
    """Leases a replica wants: ``fair``, at most its :func:`fair_share` of them (an
    agent's deliveries); otherwise every one it can get (a job run by one replica)."""

    names: frozenset[str]
    fair: bool


@dataclass(frozen=True)
class Beat:
    """What a replica holds after a beat, and how many replicas are alive (itself too)."""

    held: frozenset[str]
    live: int


def claim_limit(group: LeaseGroup, held: Collection[str], live: int) -> int:
    """How many more of ``group`` a replica holding ``held`` may claim."""
    mine = sum(1 for name in held if name in group.names)
    wanted = fair_share(len(group.names), live) if group.fair else len(group.names)
    return max(0, wanted - mine)


class LeaseStore(Protocol):
    async def beat(
        self, replica_id: str, ttl: float, groups: Sequence[LeaseGroup], release: Collection[str]
    ) -> Beat:
        """Say ``replica_id`` is alive, release ``release``, renew the rest it holds for
        ``ttl`` seconds, and claim what ``groups`` allow (:func:`claim_limit`)."""
        ...

    async def release_all(self, replica_id: str) -> None:
        """Give back every lease of ``replica_id`` and say it is gone (a clean stop)."""
        ...


_RENEW_SQL = """
INSERT INTO replicas (replica_id, started_at, seen_at) VALUES (%(me)s, now(), now())
ON CONFLICT (replica_id) DO UPDATE SET seen_at = now();
UPDATE leases SET holder = NULL, expires_at = now()
WHERE holder = %(me)s AND name = ANY(%(release)s::text[]);
UPDATE leases SET expires_at = now() + %(ttl)s * interval '1 second'
WHERE holder = %(me)s RETURNING name
"""

# Rows nobody renewed for long are forgotten: replicas gone, and leases nobody wants
# (a member removed from the fleet); one wanted again gets a new row.
_LIVE_SQL = """
DELETE FROM replicas WHERE seen_at < now() - %(forget)s * interval '1 second';
DELETE FROM leases WHERE expires_at < now() - %(forget)s * interval '1 second';
SELECT count(*) FROM replicas WHERE seen_at > now() - %(ttl)s * interval '1 second'
"""

# Rows for names new to the table; NOT EXISTS first, so that a name that has a row
# (perhaps locked by its holder's renewal) never waits on a unique check.
_CLAIM_SQL = """
INSERT INTO leases (name, holder, expires_at)
SELECT n, NULL, now() FROM unnest(%(names)s::text[]) AS v (n)
WHERE NOT EXISTS (SELECT 1 FROM leases WHERE name = v.n)
ORDER BY n
ON CONFLICT DO NOTHING;
WITH free AS (
    SELECT name FROM leases
    WHERE name = ANY(%(names)s::text[]) AND (holder IS NULL OR expires_at <= now())
    ORDER BY name LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
UPDATE leases l SET holder = %(me)s, expires_at = now() + %(ttl)s * interval '1 second'
FROM free WHERE l.name = free.name
RETURNING l.name
"""


class Leases:
    """:class:`LeaseStore` on PostgreSQL."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def beat(
        self, replica_id: str, ttl: float, groups: Sequence[LeaseGroup], release: Collection[str]
    ) -> Beat:
        async def operation(cursor: Cursor) -> Beat:
            await cursor.execute(
                _RENEW_SQL, {"me": replica_id, "release": sorted(release), "ttl": ttl}
            )
            held = {name for (name,) in cursor.fetchall()}
            await cursor.execute(_LIVE_SQL, {"ttl": ttl, "forget": FORGET_AFTER})
            (live,) = cursor.fetchone()
            for group in groups:
                limit = claim_limit(group, held, live)
                if not limit:
                    continue
                await cursor.execute(
                    _CLAIM_SQL,
                    {"names": sorted(group.names), "limit": limit, "me": replica_id, "ttl": ttl},
                )
                held.update(name for (name,) in cursor.fetchall())
            return Beat(frozenset(held), int(live))

        return await self._db.run(operation)

    async def release_all(self, replica_id: str) -> None:
        async def operation(cursor: Cursor) -> None:
            await cursor.execute(
                """
                UPDATE leases SET holder = NULL, expires_at = now() WHERE holder = %(me)s;
                DELETE FROM replicas WHERE replica_id = %(me)s
                """,
                {"me": replica_id},
            )

        await self._db.run(operation)


class MemoryLeases:
    """:class:`LeaseStore` in memory for unit tests: ``clock`` is the database's
    ``now()``; replicas sharing one instance share its leases."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self.holders: dict[str, tuple[str | None, float]] = {}
        self.seen: dict[str, float] = {}
        #: Replicas whose beats fail, as if the database were out of their reach.
        self.unreachable: set[str] = set()

    async def beat(
        self, replica_id: str, ttl: float, groups: Sequence[LeaseGroup], release: Collection[str]
    ) -> Beat:
        if replica_id in self.unreachable:
            raise ConnectionError("the database is out of reach")
        now = self._clock.seconds()
        self.seen[replica_id] = now
        held = set()
        for name, (holder, _) in list(self.holders.items()):
            if holder != replica_id:
                continue
            if name in release:
                self.holders[name] = (None, now)
            else:
                self.holders[name] = (replica_id, now + ttl)
                held.add(name)
        live = sum(1 for seen in self.seen.values() if seen > now - ttl)
        for group in groups:
            limit = claim_limit(group, held, live)
            for name in sorted(group.names):
                if limit <= 0:
                    break
                holder, expires = self.holders.get(name, (None, now))
                if holder is None or expires <= now:
                    self.holders[name] = (replica_id, now + ttl)
                    held.add(name)
                    limit -= 1
        return Beat(frozenset(held), live)

    async def release_all(self, replica_id: str) -> None:
        if replica_id in self.unreachable:
            raise ConnectionError("the database is out of reach")
        now = self._clock.seconds()
        for name, (holder, _) in list(self.holders.items()):
            if holder == replica_id:
                self.holders[name] = (None, now)
        self.seen.pop(replica_id, None)

    def holder(self, name: str) -> str | None:
        """Who holds ``name`` now (None: nobody, or its lease expired)."""
        holder, expires = self.holders.get(name, (None, 0.0))
        return holder if expires > self._clock.seconds() else None
