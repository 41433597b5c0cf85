"""The agent's identity: a UUID created once in ``<data-dir>/agent_id`` and kept forever.

It is ``server_id`` in the results the agent reports and ``agent_id`` in its answers.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from taskscheduler.agent.durable import atomic_create, ensure_directory

FILE_NAME = "agent_id"


class CorruptIdentity(Exception):
    """``agent_id`` exists but does not hold a UUID; a person must look at it."""


def load_or_create_agent_id(data_dir: Path) -> uuid.UUID:
    """Read the agent's UUID, creating it atomically the first time.

    A file that is there but unreadable is an error, never silently replaced: a new
    identity would orphan every result the server holds for the old one.
    """
    ensure_directory(data_dir)
    path = data_dir / FILE_NAME
    if not path.exists():
        atomic_create(path, f"{uuid.uuid4()}\n".encode("ascii"))
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        return uuid.UUID(text)
    except ValueError:
        raise CorruptIdentity(f"{path} does not hold a UUID: {text[:64]!r}") from None
