"""The canary's delay: how long a task created right after a burst of tasks takes to reach
every agent. Hand-run; prints figures, asserts nothing.

    .venv/bin/python bench/bench_canary.py [--tasks 5000] [--agents 2] [--threads 8]
        [--create-rate R] [--create-burst B]

It measures whichever ``taskscheduler`` the interpreter imports (``twistd`` is taken from
beside it), so the same file measures the code before and after a change. It starts a
real server (on its embedded PostgreSQL) and real agents on loopback, secured as in
production, with two operator tokens: ``burst`` creates ``--tasks`` tasks from
``--threads`` threads as fast as the server answers, never waiting on a 429 (a client that
ignores the limit), then ``canary`` creates one task. An agent holds a task once its file
is in the agent's ``tasks/`` folder (written before the agent acknowledges it).

Figures: the burst's duration, how many creations got 201 and 429; the canary's delay
(creation answered -> every agent holds it); the time until every agent holds every task.
``--create-rate``/``--create-burst`` set the server's TASKSCHEDULER_CREATE_RATE/_BURST
(a server without the limit ignores them).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taskscheduler.auth import OPERATOR_PREFIX, hash_token, new_token
from tests.integration.daemons import Fleet, http, wait_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--create-rate", default=None)
    parser.add_argument("--create-burst", default=None)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait at most")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="canary-") as folder:
        root = Path(folder)
        fleet = Fleet(root, args.agents)
        canary_token = new_token(OPERATOR_PREFIX)
        fleet.server.env["TASKSCHEDULER_TOKENS"] += f",canary {hash_token(canary_token)}"
        if args.create_rate is not None:
            fleet.server.env["TASKSCHEDULER_CREATE_RATE"] = args.create_rate
        if args.create_burst is not None:
            fleet.server.env["TASKSCHEDULER_CREATE_BURST"] = args.create_burst
        try:
            fleet.start()
            run(fleet, root, canary_token, args)
        except BaseException:
            print(fleet.logs()[-5000:], file=sys.stderr)
            raise
        finally:
            fleet.stop()


def create(fleet: Fleet, token: str, command: str) -> tuple[int, str | None]:
    code, body = http(
        "POST",
        fleet.server_url + "/api/v1/tasks/create",
        {"command": command, "frequency": "every 1 hour"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    return code, body.get("command_id") if code == 201 else None


def holders(root: Path, agents: int, task_id: str) -> int:
    return sum(
        (root / f"agent-{i}" / "data" / "tasks" / f"{task_id}.json").exists() for i in range(agents)
    )


def run(fleet: Fleet, root: Path, canary_token: str, args: argparse.Namespace) -> None:
    counter = itertools.count()
    codes: dict[int, int] = {}
    lock = threading.Lock()

    def burst() -> None:
        while next(counter) < args.tasks:
            code, _ = create(fleet, fleet.operator_token, ":")
            with lock:
                codes[code] = codes.get(code, 0) + 1

    started = time.monotonic()
    threads = [threading.Thread(target=burst) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    burst_seconds = time.monotonic() - started
    created = codes.get(201, 0)
    code, canary = create(fleet, canary_token, "echo canary")
    asked = time.monotonic()
    assert code == 201 and canary is not None, code
    wait_for(
        lambda: holders(root, args.agents, canary) == args.agents,
        args.timeout,
        "every agent to hold the canary",
        interval=0.01,
    )
    canary_delay = time.monotonic() - asked

    def all_held() -> bool:
        return all(
            len(list((root / f"agent-{i}" / "data" / "tasks").glob("*.json"))) >= created + 1
            for i in range(args.agents)
        )

    wait_for(all_held, args.timeout, "every agent to hold every task", interval=0.2)
    everything = time.monotonic() - started
    print(
        f"burst: {args.tasks} creations from {args.threads} threads in {burst_seconds:.1f} s "
        f"({args.tasks / burst_seconds:.0f}/s); answers {dict(sorted(codes.items()))}"
    )
    print(f"canary: every one of {args.agents} agents held it {canary_delay:.2f} s after creation")
    print(f"all {created + 1} tasks on every agent {everything:.1f} s after the burst began")


if __name__ == "__main__":
    main()
