"""The database password stays out of `ps` (issue 8, finding 10), on real PostgreSQL and a
real twistd server: a DSN without password connects through libpq's passfile, the DSN can
come from a 0600 file, and a password on the command line is warned about."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg2
import pytest
from psycopg2.extensions import make_dsn, parse_dsn

from tests.integration.daemons import Daemon, free_port, http, run_as_nobody, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def password_role(
    request: pytest.FixtureRequest, database_dsn: str
) -> Iterator[tuple[str, str, str]]:
    """(DSN without password, role, password) of a role that must give its password."""
    if os.environ.get("TASKSCHEDULER_TEST_DSN"):
        pytest.skip("needs the embedded PostgreSQL, whose pg_hba.conf the test may edit")
    role = "ts_pw_" + secrets.token_hex(6)
    password = secrets.token_urlsafe(18)
    conn = psycopg2.connect(database_dsn)
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,))
        cursor.execute(f"ALTER DATABASE {parse_dsn(database_dsn)['dbname']} OWNER TO {role}")
        cursor.execute("SHOW hba_file")
        (hba_file,) = cursor.fetchone()
    hba = Path(hba_file)
    original = hba.read_text()
    # This role only, over the socket the tests use: a password is demanded.
    hba.write_text(f"local all {role} scram-sha-256\n" + original)
    with conn.cursor() as cursor:
        cursor.execute("SELECT pg_reload_conf()")
    try:
        yield make_dsn(database_dsn, user=role), role, password
    finally:
        hba.write_text(original)
        with conn.cursor() as cursor, contextlib.suppress(psycopg2.Error):
            cursor.execute("SELECT pg_reload_conf()")
        conn.close()


class Server(Daemon):
    """A server on a free loopback port, giving up on the database after 5 s."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], env: dict[str, str]) -> None:
        self.port = free_port()
        listen = f"tcp:{self.port}:interface=127.0.0.1"
        super().__init__(
            name,
            ["taskscheduler-server", "--listen", listen, *args],
            tmp_path / name,
            {"TASKSCHEDULER_DATABASE_WAIT": "5", **env},
        )

    def healthy(self) -> bool:
        self.assert_running()
        return http("GET", f"http://127.0.0.1:{self.port}/api/v1/health", timeout=2)[0] == 200


def test_the_dsn_comes_from_a_file_and_the_password_from_libpqs_passfile(
    tmp_path: Path, password_role: tuple[str, str, str]
) -> None:
    dsn, role, password = password_role
    dsn_file = tmp_path / "database"
    dsn_file.write_text(dsn + "\n")
    dsn_file.chmod(0o600)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"*:*:*:{role}:{password}\n")
    passfile.chmod(0o600)
    data = ["--data-dir", str(tmp_path / "data")]
    # Without the passfile the role cannot connect: the password is really demanded.
    refused = Server(
        tmp_path,
        "refused",
        [*data, "--database-file", str(dsn_file)],
        {"PGPASSFILE": str(tmp_path / "none")},
    )
    refused.start()
    assert refused.wait(60) == 1
    assert "password" in refused.log()
    # With it, the server starts; nothing on its command line holds the password.
    daemon = Server(
        tmp_path,
        "passfile",
        [*data, "--database-file", str(dsn_file)],
        {"PGPASSFILE": str(passfile)},
    )
    daemon.start()
    try:
        wait_for(daemon.healthy, 60, "the server on a passfile")
        assert daemon.process is not None
        cmdline = Path(f"/proc/{daemon.process.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        assert "password is on the command line" not in daemon.log_path.read_text()
    finally:
        daemon.stop()
    # A 0644 DSN file is refused, as every secret file is.
    dsn_file.chmod(0o644)
    loose = Server(tmp_path, "loose", [*data, "--database-file", str(dsn_file)], {})
    loose.start()
    assert loose.wait(60) == 1
    assert f"{dsn_file} is readable by others; chmod 600 it" in loose.log()


def test_a_password_on_the_command_line_is_warned_about(
    tmp_path: Path, password_role: tuple[str, str, str]
) -> None:
    dsn, _, password = password_role
    daemon = Server(
        tmp_path,
        "argv",
        ["--data-dir", str(tmp_path / "data"), "--database", make_dsn(dsn, password=password)],
        {},
    )
    daemon.start()
    try:
        wait_for(daemon.healthy, 60, "the server")
        log = daemon.log_path.read_text()
        assert "the database password is on the command line (--database)" in log
        assert password not in log
    finally:
        daemon.stop()


def test_the_server_is_non_dumpable_and_narrows_its_data_folder(
    private_folder: Callable[[], Path],
) -> None:
    root = private_folder()
    root.chmod(0o755)
    # A database it keeps trying to reach meanwhile: what is checked happens before.
    daemon = Server(root, "server", ["--database", "host=/nonexistent dbname=none"], {})
    daemon.env["TASKSCHEDULER_DATABASE_WAIT"] = "60"
    # An unprivileged server (root's /proc files are root's whether dumpable or not).
    user = (os.getuid(), os.getgid())
    if os.geteuid() == 0:
        made = run_as_nobody(daemon)
        if made is None:
            pytest.skip("needs setpriv and a Python that user nobody may run")
        user = made
    data = daemon.workdir / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    os.chown(data, *user)
    daemon.args += ["--data-dir", str(data)]
    daemon.start()
    try:
        wait_for(
            lambda: "database not reachable yet" in daemon.log_path.read_text(),
            60,
            "the server to try its database",
        )
        assert daemon.process is not None
        environ = os.stat(f"/proc/{daemon.process.pid}/environ")
        assert user[0] != 0 and environ.st_uid == 0, "a non-dumpable process's /proc is root's"
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert "was open to other users: made it 0700" in daemon.log_path.read_text()
    finally:
        daemon.stop()
