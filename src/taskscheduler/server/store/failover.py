"""What the pool does for a database that fails over (:mod:`~taskscheduler.server.store.pool`
uses it): the session every connection asks for, what a failed connect says, and which
operations run again when their connection breaks.

The DSN may name several hosts (libpq's ``host=a,b port=5432,5433`` or
``postgresql://a:5432,b:5433/db``): libpq tries them in order, and with
``target_session_attrs=read-write`` (the default here when the DSN does not say) keeps
the first that takes writes, so after a failover new connections find the new primary.
What happens to the operations under way when the primary fails:

- an idle connection whose server has gone (its socket reads as closed, or has something
  to say while nobody asked) is thrown away before use, so nothing is sent on it
  (:func:`idle_is_dead`);
- an operation whose connection breaks is run once more on a fresh connection, within the
  same deadline, if that cannot do anything twice (:func:`may_run_again`): it ran in a
  transaction that never reached COMMIT (it changed nothing), or its caller marked it
  ``idempotent`` (running it twice leaves what running it once does, e.g. results by key
  and digest);
- otherwise (a COMMIT in doubt, or a statement of an autocommit operation sent) it fails
  with :class:`~taskscheduler.server.store.records.CommitInDoubt` (a StoreUnavailable): the
  client hears 503, and that the change may or may not have been made.
"""

from __future__ import annotations

import select
from typing import Any

import psycopg2
import psycopg2.errors
from psycopg2.extensions import parse_dsn

#: How often an operation whose connection broke is run again on a fresh connection (when
#: :func:`may_run_again`): once is enough to leave a dead server's pooled connections behind,
#: and a database that is still failing over answers the next one fast with a refusal.
RECONNECT_RETRIES = 1

#: What the server's sessions must be: every one of them may write.
SESSION_ATTRS = "read-write"


def is_read_only(error: BaseException) -> bool:
    """Whether ``error`` is a write refused by a read-only session (a standby's)."""
    return isinstance(error, psycopg2.errors.ReadOnlySqlTransaction)


def may_run_again(*, transaction: bool, idempotent: bool, reached_commit: bool) -> bool:
    """Whether an operation whose connection broke under it may be run again.

    Yes if running it twice cannot do anything twice: it is ``idempotent``, or it ran in a
    transaction that never reached COMMIT, so it changed nothing. A broken COMMIT may or
    may not have committed, and each statement of an operation run without a transaction
    commits by itself: those are run again only when idempotent.
    """
    return idempotent or (transaction and not reached_commit)


def connect_error(error: BaseException) -> str:
    """libpq's reasons for a failed connection: one per host it tried (a multi-host DSN
    fails with a line per host), on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    failed = [line for line in lines if "failed:" in line]
    text = "; ".join(failed or lines[:1]) or type(error).__name__
    if "read-only" in text or "hot standby" in text:
        text += (
            " (no host listed is a writable primary now: a standby is being promoted, or "
            "the primary is missing from the DSN)"
        )
    return text


def session_params(dsn: str, connect_timeout: float) -> dict[str, str]:
    """What the server adds to ``dsn`` for every connection it opens (the DSN's own values
    win): use it for any connection of the server's own, e.g. one that LISTENs, which on a
    standby would hear nothing the primary notifies.

    Keepalives make a vanished server (no RST) fail a query within ~15 s on TCP, and
    tcp_user_timeout a connect to one, so that libpq moves on to the next host. Each
    applies to every host of a multi-host DSN; libpq ignores them for sockets.
    """
    given = parse_dsn(dsn)
    defaults = {
        "application_name": "taskscheduler",
        "keepalives": "1",
        "keepalives_idle": "5",
        "keepalives_interval": "2",
        "keepalives_count": "3",
        "tcp_user_timeout": str(max(1, round(connect_timeout * 1000))),
        "target_session_attrs": SESSION_ATTRS,
    }
    return {k: v for k, v in defaults.items() if k not in given}


def host_count(dsn: str) -> int:
    """How many hosts a DSN lists (libpq tries each in turn)."""
    try:
        given = parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return 1
    hosts = given.get("hostaddr") or given.get("host") or ""
    return max(1, len(hosts.split(",")))


def idle_is_dead(conn: Any) -> bool:
    """Whether an idle connection's socket has something to read: nobody asked, so the
    server closed it (or is closing it, or reports a change such as a promotion)."""
    raw = conn.pollable()
    if raw is None or raw.closed:
        return True
    try:
        poller = select.poll()
        poller.register(raw.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except (OSError, ValueError, psycopg2.InterfaceError):
        return True
