"""The agent's identity: a UUID created once in ``<data-dir>/agent_id`` and kept forever.

It is ``server_id`` in the results the agent reports and ``agent_id`` in its answers.
Enrolment adds the credential the server issued (``<data-dir>/credential``, 0600) and the
server's public key the agent pins (``<data-dir>/server_key.pub``).

Every secret the agent holds lives in a file only its user may read (a file others may
read is refused, credential and join secret alike), in a data folder only its user may
enter, and the agent's process is made non-dumpable at start (see
:mod:`taskscheduler.hardening`): a process of the same user, such as a task run
without ``--run-as``, can then read neither its memory nor its ``/proc/PID/environ``.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from taskscheduler.agent.durable import atomic_create, ensure_directory
from taskscheduler.auth import AGENT_PREFIX, parse_bearer
from taskscheduler.hardening import private_file_problem
from taskscheduler.signing import KeyFileError, public_key_text, read_public_key, write_private_file

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


# -- what enrolment gave the agent ------------------------------------------------------------

CREDENTIAL_FILE = "credential"
SERVER_KEY_FILE = "server_key.pub"


class CorruptCredential(Exception):
    """The credential or pinned server key in the data folder is unusable."""


def load_credential(data_dir: Path) -> str | None:
    """The agent's credential (``tsa_...``), or None before it has enrolled."""
    path = data_dir / CREDENTIAL_FILE
    if not path.exists():
        return None
    text = read_private_text(path)
    if not text.startswith(AGENT_PREFIX) or parse_bearer(f"Bearer {text}") != text:
        raise CorruptCredential(f"{path} does not hold an agent credential")
    return text


def read_private_text(path: Path) -> str:
    """The text of a secret file, which no one but its owner may read or write.

    Raises :class:`CorruptCredential` for a file others may read, as ssh does for a key:
    a secret others could read may already be known to them.
    """
    problem = private_file_problem(path)
    if problem is not None:
        raise CorruptCredential(problem)
    return path.read_text(encoding="ascii", errors="replace").strip()


def save_credential(data_dir: Path, credential: str) -> None:
    """Store the credential 0600, atomically: a crash leaves the old state or the new."""
    write_private_file(data_dir / CREDENTIAL_FILE, (credential + "\n").encode("ascii"))


def load_server_key(data_dir: Path) -> Ed25519PublicKey | None:
    """The server's public key pinned at enrolment, or None."""
    path = data_dir / SERVER_KEY_FILE
    if not path.exists():
        return None
    try:
        return read_public_key(path)
    except KeyFileError as e:
        raise CorruptCredential(str(e)) from None


def save_server_key(data_dir: Path, key: Ed25519PublicKey) -> None:
    write_private_file(
        data_dir / SERVER_KEY_FILE, (public_key_text(key) + "\n").encode("ascii"), mode=0o644
    )
