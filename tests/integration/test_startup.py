"""Real twistd daemons that cannot start: each exits 1 and says why in one line on stderr
(also with --logfile), and an aborted start leaves no embedded PostgreSQL running."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from taskscheduler.auth import JOIN_PREFIX, OPERATOR_PREFIX, hash_token, new_token
from tests.integration.daemons import Daemon, free_port, wait_for

pytestmark = pytest.mark.integration

TOKENS = {"TASKSCHEDULER_TOKENS": f"ops {hash_token(new_token(OPERATOR_PREFIX))}"}
JOIN = {"TASKSCHEDULER_JOIN_SECRET": new_token(JOIN_PREFIX)}


def loopback(port: int) -> str:
    return f"tcp:{port}:interface=127.0.0.1"


def server(folder: Path, *args: str, env: dict[str, str] | None = None) -> Daemon:
    return Daemon(
        "server",
        # --logfile: the reason must reach stderr too, not only the log file.
        ["--logfile=server.log", "taskscheduler-server", "--data-dir", "data", *args],
        folder,
        env or {},
        separate_stderr=True,
    )


def agent(folder: Path, name: str, *args: str, env: dict[str, str] | None = None) -> Daemon:
    return Daemon(
        name,
        [f"--logfile={name}.log", "taskscheduler-agent", "--data-dir", "data", *args],
        folder,
        env or {},
        separate_stderr=True,
    )


def refuses_to_start(daemon: Daemon, *expected: str) -> str:
    """Start ``daemon``; check that it exits 1 with one stderr line holding ``expected``."""
    daemon.start()
    try:
        status = daemon.wait(timeout=60)
    finally:
        daemon.stop()  # if it did not exit: a test failure must not leave it running
    stderr = daemon.stderr()
    assert status == 1, f"{daemon.name} exited with {status}\n{stderr}\n{daemon.log()}"
    said = [line for line in stderr.splitlines() if "could not start:" in line]
    assert len(said) == 1, stderr
    for text in expected:
        assert text in said[0], said[0]
    reason = said[0].split("could not start: ", 1)[1]
    assert reason in daemon.log(), "the log says it too"
    return said[0]


def postgres_processes(data_dir: Path) -> list[psutil.Process]:
    """The live postgres processes serving ``data_dir``."""
    found = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        command = " ".join(process.info["cmdline"] or [])
        if (
            process.info["name"] == "postgres"
            and str(data_dir) in command
            and process.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(process)
    return found


@pytest.fixture
def folder(private_folder: Callable[[], Path]) -> Path:
    """A folder pytest's clean-up of old tmp_path trees (another session's) cannot remove
    under a running PostgreSQL."""
    return private_folder()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port something else listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield int(holder.getsockname()[1])


# -- the server -------------------------------------------------------------------------------


def test_a_server_beyond_loopback_without_tokens_exits_1(folder: Path) -> None:
    line = refuses_to_start(
        server(folder, "--listen", f"tcp:{free_port()}"),
        "taskscheduler server could not start: refusing to listen on",
        "--insecure-allow-anonymous-operators",
    )
    assert line.startswith("taskscheduler server could not start:")
    assert not (folder / "data" / "postgres").exists()


@pytest.mark.parametrize("listen", ["tcp:eighty", "tcp:8080:interface=127.0.0.1:colour=red"])
def test_an_unparseable_listen_is_called_unparseable(folder: Path, listen: str) -> None:
    for env in ({}, TOKENS):
        line = refuses_to_start(
            server(folder / str(len(env)), "--listen", listen, env=env),
            f"cannot parse --listen {listen!r}",
        )
        assert "token" not in line


def test_a_server_whose_database_never_answers_exits_1(folder: Path) -> None:
    nowhere = f"host=127.0.0.1 port={free_port()} dbname=tasks connect_timeout=1"
    refuses_to_start(
        server(
            folder,
            "--listen",
            loopback(free_port()),
            "--database",
            nowhere,
            "--database-wait",
            "1",
        ),
        "the database did not answer within 1 s",
    )


def test_a_server_with_a_bad_signing_key_exits_1(folder: Path) -> None:
    key = folder / "key.pem"
    key.write_text("not a key\n")
    key.chmod(0o600)
    refuses_to_start(
        server(folder, "--listen", loopback(free_port()), "--signing-key-file", str(key)),
        "holds no usable PEM private key",
    )


def test_a_server_that_cannot_listen_exits_1_having_started_nothing(
    folder: Path, busy_port: int
) -> None:
    # The port is bound first (as Twisted's endpoint services bind, before privileges
    # are dropped): the embedded PostgreSQL is never started. That a failure after it
    # started stops it: tests/unit/test_services.py (children stop in reverse) and the
    # test below (stopped while initdb runs).
    refuses_to_start(
        server(folder, "--listen", loopback(busy_port)),
        f"Couldn't listen on 127.0.0.1:{busy_port}",
    )
    assert not (folder / "data" / "postgres").exists()


def test_a_server_stopped_while_starting_its_postgres_leaves_none_running(
    folder: Path,
) -> None:
    daemon = server(folder, "--listen", loopback(free_port()))
    daemon.start()
    data = folder / "data" / "postgres"
    # initdb is under way (it takes seconds): stop the server in the middle of it.
    wait_for(data.exists, 60, "the server to start its embedded PostgreSQL")
    daemon.stop()  # SIGTERM, and a wait
    assert daemon.wait(timeout=1) == -signal.SIGTERM
    assert "could not start" not in daemon.stderr(), daemon.log()  # stopped on request
    assert postgres_processes(data) == [], daemon.log()


# -- the agent --------------------------------------------------------------------------------


def test_an_agent_with_neither_credential_nor_join_secret_exits_1(folder: Path) -> None:
    refuses_to_start(
        agent(folder, "agent", "--listen", loopback(free_port())),
        "taskscheduler agent could not start:",
        "no join secret is given",
    )


def test_an_agent_whose_folder_is_in_use_exits_1(folder: Path) -> None:
    first = agent(folder, "first", "--listen", loopback(free_port()), env=JOIN)
    first.start()
    try:
        wait_for(lambda: "agent listening on" in first.log(), 60, "the first agent to listen")
        refuses_to_start(
            agent(folder, "second", "--listen", loopback(free_port()), env=JOIN),
            "is in use by another process",
        )
        first.assert_running()
    finally:
        first.stop()


def test_an_agent_that_cannot_listen_exits_1(folder: Path, busy_port: int) -> None:
    refuses_to_start(
        agent(folder, "agent", "--listen", loopback(busy_port), env=JOIN),
        f"Couldn't listen on 127.0.0.1:{busy_port}",
    )


def test_an_agent_with_a_bad_server_key_file_exits_1(folder: Path) -> None:
    key = folder / "server.pub"
    key.write_text("ssh-rsa AAAA\n")
    refuses_to_start(
        agent(
            folder,
            "agent",
            "--listen",
            loopback(free_port()),
            "--server-public-key-file",
            str(key),
            env=JOIN,
        ),
        str(key),
    )
