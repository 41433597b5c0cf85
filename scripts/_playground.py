"""What scripts/playground needs beyond bash: checking ports, waiting until the playground
answers (and is ours), and stopping everything it started.

    _playground.py check-ports SERVER_PORT AGENT_PORT...
    _playground.py wait-up DATA SERVER_PORT SERVER_PID AGENT_PORT:AGENT_PID...
    _playground.py stop DATA PID...

Exit status 0 on success; otherwise the reason is on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

#: How long the daemons may take to answer after their start (a first start makes the
#: embedded PostgreSQL, which takes a while on a busy machine).
UP_TIMEOUT = 120.0
#: How long the daemons may take to stop at SIGTERM before they are killed: an agent lets
#: runs finish for its --shutdown-grace (30 s) and then kills them (5 s more).
STOP_TIMEOUT = 45.0
#: How long the embedded PostgreSQL may take for a fast shutdown.
POSTGRES_STOP_TIMEOUT = 15.0
#: The server's answer to a credential it does not know carries this challenge.
OUR_CHALLENGE = 'Bearer realm="taskscheduler"'


def fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(1)


# -- check-ports ------------------------------------------------------------------------------


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        fail(
            f"{text!r} is not a port number (1-65535); see PLAYGROUND_PORT and "
            "PLAYGROUND_AGENT_PORTS in the README"
        )
    return port


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` now (as Twisted would)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def check_ports(args: list[str]) -> None:
    ports = [port_number(arg) for arg in args]
    if len(set(ports)) != len(ports):
        fail(f"the playground's ports must all differ: {' '.join(map(str, ports))}")
    for port in ports:
        if port_is_free(port):
            continue
        who = (
            "a taskscheduler server (another playground?)"
            if is_taskscheduler_server(port)
            else "another program"
        )
        fail(
            f"port {port} on 127.0.0.1 is already in use by {who}; stop it, or choose other "
            "ports, e.g. PLAYGROUND_PORT=9080 PLAYGROUND_AGENT_PORTS=9081,9082 scripts/playground"
        )


# -- wait-up ----------------------------------------------------------------------------------


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """GET ``url``: (status, headers, decoded JSON or None)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            status, answer_headers, body = response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        status, answer_headers, body = e.code, e.headers, e.read()
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    return status, dict(answer_headers.items()), document


def is_taskscheduler_server(port: int) -> bool:
    """Whether what answers on ``port`` is a taskscheduler server: its health check says
    ok, and a credential it does not know gets its own challenge."""
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        status, _, health = get(f"{base}/health")
        if status != 200 or not isinstance(health, dict) or health.get("status") != "ok":
            return False
        status, headers, _ = get(f"{base}/agents", {"Authorization": "Bearer playground-probe"})
    except OSError:
        return False
    challenge = next((v for k, v in headers.items() if k.lower() == "www-authenticate"), "")
    return status == 401 and challenge.startswith(OUR_CHALLENGE)


def agent_is_up(data: Path, port: int) -> bool:
    """Whether our agent answers on ``port`` (its id is the one in its data folder) and
    has enrolled with the server."""
    try:
        agent_id = (data / f"agent-{port}" / "agent_id").read_text().strip()
        status, _, health = get(f"http://127.0.0.1:{port}/api/v1/health")
    except OSError:
        return False
    return (
        status == 200
        and isinstance(health, dict)
        and health.get("agent_id") == agent_id
        and health.get("enrolled") is True
    )


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie the shell has not reaped yet is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_up(args: list[str]) -> None:
    data, server_port, server_pid = Path(args[0]), int(args[1]), int(args[2])
    agents = {int(port): int(pid) for port, pid in (spec.split(":") for spec in args[3:])}
    deadline = time.monotonic() + UP_TIMEOUT
    server_up = False
    waiting: set[int] = set(agents)
    while time.monotonic() < deadline:
        if not alive(server_pid):
            log = data / "server.log"
            fail(f"the taskscheduler server stopped during start-up; {log} ends with:\n{tail(log)}")
        for port, pid in agents.items():
            if not alive(pid):
                log = data / f"agent-{port}.log"
                fail(
                    f"the agent on port {port} stopped during start-up; {log} ends with:\n"
                    f"{tail(log)}"
                )
        # Something else may answer on the port if it took it after the check: only our
        # server (alive, answering as taskscheduler does) counts.
        server_up = server_up or is_taskscheduler_server(server_port)
        if server_up:
            waiting = {port for port in waiting if not agent_is_up(data, port)}
            if not waiting:
                ports = " and ".join(f":{port}" for port in agents)
                print(
                    f"\ntaskscheduler is up: server http://localhost:{server_port}, agents on "
                    f"{ports}.\nLogs are in {data}/*.log. Ctrl-C stops everything.\n",
                    flush=True,
                )
                return
        time.sleep(0.2)
    what = "the agents on " + ", ".join(map(str, sorted(waiting))) if server_up else "the server"
    fail(
        f"taskscheduler did not come up within {UP_TIMEOUT:.0f} s ({what} did not answer "
        f"as expected); see {data}/*.log"
    )


# -- stop -------------------------------------------------------------------------------------


def stop(args: list[str]) -> None:
    data, pids = Path(args[0]), [int(arg) for arg in args[1:]]
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            print(
                f"pid {pid} did not stop within {STOP_TIMEOUT:.0f} s; killing it",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    stop_orphaned_postgres(data / "server" / "postgres")


def stop_orphaned_postgres(folder: Path) -> None:
    """Stop the embedded PostgreSQL in ``folder`` if the server left it running and no
    live process still uses it (the rule the server's own embedded_pg follows)."""
    import psutil

    try:
        pid = int((folder / "postmaster.pid").read_text().splitlines()[0])
        postmaster = psutil.Process(pid)
        ours = postmaster.name() == "postgres" and str(folder) in " ".join(postmaster.cmdline())
    except (OSError, ValueError, IndexError, psutil.Error):
        return
    if not ours:
        return
    with contextlib.suppress(OSError, ValueError):
        users = json.loads((folder / ".handle_pids.json").read_text())
        if any(isinstance(user, int) and alive(user) for user in users):
            return  # someone else still uses it
    print(
        f"stopping the embedded PostgreSQL the server left running (pid {pid})",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(psutil.Error):
        postmaster.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
        try:
            postmaster.wait(POSTGRES_STOP_TIMEOUT)
        except psutil.TimeoutExpired:
            postmaster.send_signal(signal.SIGQUIT)  # immediate shutdown
            postmaster.wait(POSTGRES_STOP_TIMEOUT)


COMMANDS = {"check-ports": check_ports, "wait-up": wait_up, "stop": stop}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        fail(__doc__ or "")
    COMMANDS[sys.argv[1]](sys.argv[2:])
