"""What keeps a daemon's secrets its own, against other processes of the same host.

Tasks are commands from the network; run as the agent's own user (the default), they
could read whatever that user can: the agent's environment and memory through ``/proc``,
its credential, its join secret, a co-located server's signing key. Here are the
measures both daemons take at start, whatever user the tasks run as:

- :func:`make_non_dumpable`: other processes of the same user can no longer read the
  daemon's ``/proc/PID/environ``, memory or descriptors (only root can).
- :func:`take_secret_from_environment`: a secret given in the environment is taken out
  of it, including the block ``/proc/PID/environ`` shows.
- :func:`make_private_folder` and :func:`private_file_problem`: the data folder is 0700,
  and a secret file others may read is refused.

The real fence is a task user of its own (the agent's ``--run-as``): it can read none of
the agent's files, whatever their mode.
"""

from __future__ import annotations

import ctypes
import os
import stat
import sys
from collections.abc import MutableMapping
from pathlib import Path

_PR_SET_DUMPABLE = 4


def make_non_dumpable() -> bool:
    """``prctl(PR_SET_DUMPABLE, 0)`` on this process; False where there is none (not Linux).

    Other processes of the same user can then neither read its memory, its
    ``/proc/PID/environ`` or its open descriptors, nor ptrace it; root with
    ``CAP_SYS_PTRACE`` still can. What the daemons read of themselves stays readable
    (``/proc/self/fd``, which Twisted lists at every spawn, ``stat``, ``cgroup``), and
    reading the ``/proc/PID/environ`` of the processes the agent starts (which its
    containment does) depends on *their* dumpability, which ``execve`` gives back to
    every command. Children inherit the flag until they exec. Neither daemon dumps core
    from then on.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_DUMPABLE, 0): {os.strerror(code)}")
    return True


def take_secret_from_environment(environ: MutableMapping[str, str], name: str) -> str | None:
    """Remove ``name`` from ``environ`` and return its value (None if unset or empty).

    For the process's own ``os.environ`` the value is also overwritten where the kernel
    shows it: ``/proc/PID/environ`` reads the environment block the process started with,
    which ``unsetenv`` leaves as it was.
    """
    if environ is os.environ:
        _blank_initial_environment(name)
    value = environ.pop(name, None)
    return value or None


def _blank_initial_environment(name: str) -> None:
    """Overwrite the value of ``name`` in the C ``environ`` strings with zero bytes."""
    if not sys.platform.startswith("linux"):
        return
    prefix = name.encode("ascii") + b"="
    entries = ctypes.POINTER(ctypes.c_void_p).in_dll(ctypes.CDLL(None), "environ")
    index = 0
    while True:
        address = entries[index]
        if not address:
            return
        entry = ctypes.string_at(address)
        if entry.startswith(prefix):
            ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        index += 1


def make_private_folder(path: Path) -> bool:
    """Make the data folder ``path`` 0700, creating it if missing; True if it was wider.

    A folder made by hand, by a container image or by an older version may be 0755: the
    names in it are then listed, and any file written without an explicit mode read, by
    every local user. Raises OSError if the folder is not this user's to change.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077 == 0:
        return False
    os.chmod(path, mode & 0o700)
    return True


def private_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot hold a secret (others may read or write it), or None.

    As ssh does with a private key: a secret others could read may already be known.
    """
    if path.stat().st_mode & 0o077:
        return f"{path} is readable by others; chmod 600 it"
    return None
