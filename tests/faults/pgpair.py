"""A PostgreSQL primary and a streaming standby with synchronous replication, on this
machine, from the binaries the ``pgserver`` wheel ships (``initdb``, ``pg_basebackup``,
``pg_ctl``): what the database failover scenario kills and promotes.

Each runs as the OS user ``pgserver`` when the tests run as root (PostgreSQL refuses to
run as root; pgserver does the same), listens on 127.0.0.1 on a port of its own, and
logs to a file beside its data folder. Every commit on the primary waits until the
standby has flushed its WAL (``synchronous_commit = on``): a commit the primary
acknowledged survives the primary's death once the standby is promoted.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import warnings
from pathlib import Path

import psutil
import psycopg2
from psycopg2.extensions import make_dsn

from tests.integration.daemons import free_port, wait_for

#: The standby's name in ``synchronous_standby_names`` and its ``application_name``.
STANDBY_NAME = "standby"


def postgres_bin() -> Path:
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset: nothing we use.
        warnings.simplefilter("ignore")
        import pgserver

    return Path(pgserver.__file__).parent / "pginstall" / "bin"


class Node:
    """One PostgreSQL server of the pair: its data folder, port and log."""

    def __init__(self, pair: StreamingPair, name: str) -> None:
        self.pair = pair
        self.name = name
        self.data = pair.root / name
        self.port = free_port()
        self.logfile = pair.root / f"{name}.log"

    @property
    def dsn(self) -> str:
        return make_dsn(host="127.0.0.1", port=str(self.port), user="postgres", dbname="postgres")

    def start(self) -> None:
        self.pair.run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "30", "start"
        )

    def promote(self) -> None:
        self.pair.run("pg_ctl", "-D", str(self.data), "-w", "-t", "30", "promote")

    def postmaster(self) -> psutil.Process | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            return psutil.Process(pid)
        except (OSError, ValueError, IndexError, psutil.NoSuchProcess):
            return None

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend at once: the machine is gone."""
        postmaster = self.postmaster()
        if postmaster is None:
            return
        processes = [postmaster, *postmaster.children(recursive=True)]
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        psutil.wait_procs(processes, timeout=10)

    def stop(self) -> None:
        if self.postmaster() is not None:
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self.pair.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def query(self, sql: str) -> list[tuple[object, ...]]:
        conn = psycopg2.connect(self.dsn, connect_timeout=3)
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(sql)
                return cursor.fetchall() if cursor.description else []
        finally:
            conn.close()


class StreamingPair:
    """A primary, and a standby made from it with ``pg_basebackup -R`` that it replicates
    to synchronously. :meth:`start` builds and starts both; :meth:`close` stops both and
    removes their folders."""

    def __init__(self) -> None:
        # A short path of our own that the ``pgserver`` user may enter.
        self.root = Path(tempfile.mkdtemp(prefix="tspair-"))
        self.root.chmod(0o755)
        self.user = None
        if os.geteuid() == 0:
            postgres_bin()  # pgserver imported quietly first
            from pgserver.utils import ensure_user_exists

            ensure_user_exists("pgserver")
            self.user = "pgserver"
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.primary = Node(self, "primary")
        self.standby = Node(self, "standby")

    def run(self, program: str, *args: str) -> str:
        done = subprocess.run(
            [str(postgres_bin() / program), *args],
            user=self.user,
            cwd=self.root,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise AssertionError(f"{program} {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def start(self, synchronous_commit: str = "on") -> None:
        self.run(
            "initdb",
            "-D",
            str(self.primary.data),
            "--auth=trust",
            "-U",
            "postgres",
            "--encoding=UTF8",
            "--no-sync",
        )
        with (self.primary.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.primary.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                "wal_level = replica\nmax_wal_senders = 4\nmax_connections = 60\n"
                "shared_buffers = 32MB\n"
                f"synchronous_standby_names = '{STANDBY_NAME}'\n"
                f"synchronous_commit = {synchronous_commit}\n"
            )
        self.primary.start()
        self.run(
            "pg_basebackup",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.primary.port),
            "-U",
            "postgres",
            "-D",
            str(self.standby.data),
            "-R",
            "-X",
            "stream",
            "-c",
            "fast",
            "--no-sync",
        )
        with (self.standby.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(
                f"port = {self.standby.port}\n"
                f"primary_conninfo = 'host=127.0.0.1 port={self.primary.port} user=postgres "
                f"application_name={STANDBY_NAME}'\n"
                # Promoted, it has no standby of its own: it must not wait for one.
                "synchronous_standby_names = ''\n"
            )
        self.standby.start()
        wait_for(
            lambda: self.primary.query(
                "SELECT 1 FROM pg_stat_replication "
                f"WHERE application_name = '{STANDBY_NAME}' AND sync_state = 'sync'"
            ),
            30,
            "the standby to replicate synchronously",
        )

    def multi_host_uri(self, dbname: str) -> str:
        """The server's DSN: both hosts, the session that takes writes."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            f"/{dbname}?target_session_attrs=read-write"
        )

    def logs(self) -> str:
        parts = []
        for node in (self.primary, self.standby):
            with contextlib.suppress(OSError):
                parts.append(f"--- {node.name} log ---\n{node.logfile.read_text()[-4000:]}")
        return "\n".join(parts)

    def close(self) -> None:
        for node in (self.standby, self.primary):
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)
