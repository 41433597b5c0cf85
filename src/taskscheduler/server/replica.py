"""Who this server process is among its replicas (issue 14).

Every replica of the server runs against the same PostgreSQL and holds no state the
database does not. Each names itself once at start with :func:`new_replica_id`: the name
holds leases (:mod:`taskscheduler.server.leases`) and signs the changes it announces to
the others, so that it is told apart from a replica that died and came back.
"""

from __future__ import annotations

import os
import socket
import uuid


def new_replica_id() -> str:
    """``host:pid:random``: readable in ``replicas`` and ``leases``, never reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
