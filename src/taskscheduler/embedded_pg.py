"""The embedded PostgreSQL the server uses when no ``--database`` DSN is given.

A thin layer over the ``pgserver`` package (which ships PostgreSQL binaries as a wheel),
adding what a daemon needs from it:

- Start-up blocks (``initdb``, ``pg_ctl -w start``), so :meth:`EmbeddedPostgres.start`
  runs it in a thread and returns a Deferred-friendly coroutine.
- Data persists: the folder is reused across restarts; ``initdb`` runs only once.
- Stopping follows pgserver's ``cleanup_mode='stop'``: PostgreSQL stops when the last
  process using the folder lets go of it, so it is never stopped under another user of
  a shared folder, and never left running after our server stops alone.
- A crash leaves traces that pgserver trips over, which are cleared before it starts:
  a ``postmaster.pid`` whose pid now belongs to some other process (common in containers,
  where pids repeat), and the pid of a killed process still counted as a user of the
  folder (which would keep the database running forever after).
- It is watched: :class:`~taskscheduler.embedded_pg_supervisor.PostgresSupervisor`
  starts it again, with back-off, when its postmaster dies, so the API recovers without
  a restart of the server.
- pgserver has no public API for what this needs (its instance cache, its lock, its
  clean-up hook): :func:`pgserver_incompatibilities` names what is missing in an
  installed version, checked at every start and by a test, so an upgrade that renames
  one fails loudly instead of misbehaving.
- The DSN is built in key/value form, so folders with spaces or other URI-unsafe
  characters work; long folder paths are handled by pgserver, which puts the unix socket
  in a short runtime folder when the data folder's path is too long for one.

As root, pgserver runs PostgreSQL as an OS user ``pgserver`` (created with ``useradd``
if missing; PostgreSQL refuses to run as root), chowns the data folder to it, and makes
every parent folder traversable by others (``chmod g+rx,o+rx``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import psutil
from psycopg2.extensions import make_dsn
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

#: How many times to try starting PostgreSQL before giving up. A postmaster killed with
#: SIGKILL leaves backends that hold its shared memory for a moment; a retry outlives them.
START_ATTEMPTS = 4


#: What this module uses of ``pgserver.PostgresServer`` beyond ``get_server``: private
#: names among them, so the version is pinned and these are checked.
PGSERVER_CLASS_NAMES = ("_instances", "_lock", "_cleanup", "cleanup", "get_postmaster_info")
#: What it uses of a running ``PostgresServer`` instance.
PGSERVER_INSTANCE_NAMES = ("_postmaster_info", "global_process_id_list")
#: The file in which pgserver lists the pids of the processes using a data folder.
PGSERVER_HANDLES_FILE = ".handle_pids.json"


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be started; the message says where to look."""


def pgserver_incompatibilities(server: Any = None) -> list[str]:
    """What this module needs and the installed pgserver lacks (empty when compatible).

    Checks the class, and ``server`` (a running ``PostgresServer``) when given.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver
        from pgserver.postgres_server import PostgresServer

    missing = [] if hasattr(pgserver, "get_server") else ["pgserver.get_server"]
    missing += [
        f"PostgresServer.{name}"
        for name in PGSERVER_CLASS_NAMES
        if not hasattr(PostgresServer, name)
    ]
    if server is not None:
        missing += [
            f"PostgresServer().{name}"
            for name in PGSERVER_INSTANCE_NAMES
            if not hasattr(server, name)
        ]
        info = getattr(server, "_postmaster_info", None)
        if info is not None and not hasattr(info, "process"):
            missing.append("PostmasterInfo.process")
        handles = getattr(getattr(server, "global_process_id_list", None), "path", None)
        if handles is None or Path(handles).name != PGSERVER_HANDLES_FILE:
            missing.append(f"PostgresServer().global_process_id_list ({PGSERVER_HANDLES_FILE})")
    return missing


def _check_pgserver(server: Any = None) -> None:
    missing = pgserver_incompatibilities(server)
    if missing:
        from importlib.metadata import version

        raise EmbeddedPostgresError(
            f"the installed pgserver {version('pgserver')} lacks what taskscheduler uses of it "
            f"({', '.join(missing)}): install the version pyproject.toml names"
        )


class EmbeddedPostgres:
    """A PostgreSQL server kept in ``data_dir``, started and stopped by this process."""

    log = Logger()

    def __init__(self, data_dir: str | os.PathLike[str], reactor: Any = None) -> None:
        self.data_dir = Path(data_dir).expanduser().absolute()
        self._reactor = reactor
        self._server: Any = None
        self.dsn: str | None = None
        # Start and stop run in the reactor's thread pool, maybe at once (a server
        # stopped while it starts PostgreSQL): the stop must wait, or it stops nothing.
        self._lock = threading.Lock()

    # -- from a reactor -------------------------------------------------------------------

    async def start(self) -> str:
        """Start (or join) the server without blocking the reactor; return its DSN."""
        return await self._in_thread(self.start_blocking)

    async def stop(self) -> None:
        """Let go of the server; it stops when no other process uses the folder."""
        await self._in_thread(self.stop_blocking)

    async def _in_thread(self, function: Any) -> Any:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        return await deferToThreadPool(reactor, reactor.getThreadPool(), function)

    # -- blocking -------------------------------------------------------------------------

    def alive(self) -> bool:
        """Whether the PostgreSQL we started (or joined) is running."""
        server = self._server
        return server is not None and _running(server)

    def start_blocking(self) -> str:
        """Initialise the folder if new, start PostgreSQL if not running; return a DSN."""
        with self._lock:
            return self._start_locked()

    def _start_locked(self) -> str:
        _check_pgserver()
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI);
            # its /tmp fallback is fine for pgserver's lock and socket folders.
            warnings.simplefilter("ignore")
            import pgserver
            from pgserver.postgres_server import PostgresServer

        if self._server is not None:
            if _running(self._server):
                assert self.dsn is not None
                return self.dsn
            self._server = None  # it died: start it again (PostgresSupervisor says so)
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        cached = PostgresServer._instances.get(self.data_dir.resolve())
        if cached is not None and not _running(cached):
            self._discard_failed_instance()
        last_error: Exception | None = None
        for attempt in range(START_ATTEMPTS):
            if attempt:
                time.sleep(attempt)
            with PostgresServer._lock:
                self._forget_dead_users()
                self._remove_foreign_pidfile()
            try:
                server = pgserver.get_server(self.data_dir, cleanup_mode="stop")
            except (subprocess.SubprocessError, OSError, AssertionError) as e:
                last_error = e
                self._discard_failed_instance()
                continue
            _check_pgserver(server)
            self._server = server
            info = server.get_postmaster_info()
            if info.socket_dir is not None:
                self.dsn = make_dsn(
                    host=str(info.socket_dir), port=info.port, user="postgres", dbname="postgres"
                )
            else:
                self.dsn = make_dsn(
                    host=info.hostname, port=info.port, user="postgres", dbname="postgres"
                )
            return self.dsn
        log_file = self.data_dir / "log"
        raise EmbeddedPostgresError(
            f"could not start the embedded PostgreSQL in {self.data_dir} "
            f"({last_error!r}); see {log_file}"
        )

    @property
    def postmaster_pid(self) -> int | None:
        """The pid of the running postmaster, if we started or joined one."""
        return None if self._server is None else int(self._server.get_pid())

    def stop_blocking(self) -> None:
        """Release this process's hold on the server, stopping it if we were the last."""
        with self._lock:
            server, self._server = self._server, None
            if server is None:
                return
            with type(server)._lock:
                self._forget_dead_users()
            server.cleanup()
            atexit.unregister(server._cleanup)

    # -- what a crash leaves behind -------------------------------------------------------

    def _forget_dead_users(self) -> None:
        """Drop pids of processes that died while using the folder (pgserver counts them)."""
        handles = self.data_dir / PGSERVER_HANDLES_FILE
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))

    def _remove_foreign_pidfile(self) -> None:
        """Remove ``postmaster.pid`` if its pid is not a running postgres on this folder.

        pgserver (and PostgreSQL itself) take a live pid in that file for a running
        server; after a crash the pid may be a zombie or reused by an unrelated process.
        """
        pidfile = self.data_dir / "postmaster.pid"
        try:
            lines = pidfile.read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return
        try:
            process = psutil.Process(pid)
            # A killed postmaster nobody has reaped yet is a zombie: dead, but its pid
            # still answers kill(pid, 0), so PostgreSQL would refuse to start.
            alive = process.status() != psutil.STATUS_ZOMBIE
            ours = (
                alive
                and process.name() == "postgres"
                and str(self.data_dir) in " ".join(process.cmdline())
            )
        except psutil.Error:
            return  # gone: PostgreSQL recognises a stale file by itself
        if not ours:
            self.log.warn(
                "removing stale {pidfile}: pid {pid} is not a running postgres",
                pidfile=str(pidfile),
                pid=pid,
            )
            pidfile.unlink(missing_ok=True)
            # The unix socket's lock file names the same dead pid.
            if len(lines) > 4 and lines[3].strip() and lines[4].strip():
                socket_lock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock"
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if int(socket_lock.read_text().splitlines()[0]) == pid:
                        socket_lock.unlink()

    def _discard_failed_instance(self) -> None:
        """pgserver caches an instance even when starting it failed; forget it."""
        from pgserver.postgres_server import PostgresServer

        instance = PostgresServer._instances.pop(self.data_dir.resolve(), None)
        if instance is not None:
            atexit.unregister(instance._cleanup)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a killed one nobody reaped is a zombie: dead)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _running(server: Any) -> bool:
    """Whether a pgserver instance's postmaster is still alive (zombies are dead)."""
    info = server._postmaster_info
    if info is None or info.process is None:
        return False
    try:
        # is_running() also says no when the pid now names another process.
        return bool(info.process.is_running() and info.process.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
