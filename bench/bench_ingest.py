"""How many results a second one real server stores, end to end over HTTP.

Starts ``twistd taskscheduler-server`` on an embedded PostgreSQL, enrols one fake agent
per client thread (with a join secret; the task is assigned to their URLs, which nobody
listens on), creates a task, then posts results as those agents, with their credentials,
in batches, and prints results stored per second for each batch size. Run by hand, from
a checkout where ``scripts/test`` has installed .venv:

    .venv/bin/python bench/bench_ingest.py [--seconds 10] [--clients 4]

Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import http.client as httpclient
import json
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from taskscheduler.auth import JOIN_PREFIX, hash_token, new_token
from tests.integration.daemons import Daemon, free_port, http, wait_for


def post(conn: httpclient.HTTPConnection, path: str, body: object, credential: str) -> dict:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {credential}"}
    conn.request("POST", path, json.dumps(body), headers)
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"{response.status}: {data[:300]!r}")
    return json.loads(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--batches", default="1,100,1000")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    port = free_port()
    join = new_token(JOIN_PREFIX)
    agent_urls = [f"http://bench-agent-{i}.invalid:1" for i in range(args.clients)]
    server = Daemon(
        "server",
        [
            "taskscheduler-server",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--data-dir",
            str(root / "data"),
        ],
        root,
        {
            "AVAILABLE_SERVERS": ",".join(agent_urls),
            "TASKSCHEDULER_JOIN_SECRETS": f"bench {hash_token(join)}",
        },
    )
    server.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http("GET", base + "/api/v1/health")[0] == 200, 90, "the server")
        agents: list[tuple[str, str]] = []
        for url in agent_urls:
            agent_id = str(uuid.uuid4())
            code, enrolled = http(
                "POST",
                base + "/api/v1/agents/enrol",
                {"agent_id": agent_id, "url": url},
                headers={"Authorization": f"Bearer {join}"},
            )
            assert code == 201, enrolled
            agents.append((agent_id, enrolled["credential"]))
        _, created = http(
            "POST",
            base + "/api/v1/tasks/create",
            # Results of instants up to now + the time limit + 60 s are taken: the
            # longest limit (a week) leaves room for 600,000 instants, one a second.
            {
                "command": "echo bench",
                "frequency": "every 1 second",
                "time_limit_seconds": 7 * 24 * 3600,
            },
        )
        task_id = created["command_id"]
        _, task = http("GET", f"{base}/api/v1/tasks/{task_id}")
        anchor = datetime.fromisoformat(task["anchor"].replace("Z", "+00:00")).astimezone(UTC)
        print(
            f"server pid {server.process.pid if server.process else '?'}, "
            f"{args.clients} clients, {args.seconds:g} s per batch size"
        )
        next_k = [1]
        lock = threading.Lock()

        def instants(n: int) -> int:
            with lock:
                k = next_k[0]
                next_k[0] += n
                return k

        for batch in (int(b) for b in args.batches.split(",")):
            stored = [0] * args.clients
            deadline = time.monotonic() + args.seconds

            def client(
                i: int, batch: int = batch, deadline: float = deadline, stored: list[int] = stored
            ) -> None:
                conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=60)
                agent, credential = agents[i]
                while time.monotonic() < deadline:
                    k0 = instants(batch)
                    results = []
                    for k in range(k0, k0 + batch):
                        at = (anchor + timedelta(seconds=k)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                        results.append(
                            {
                                "task_id": task_id,
                                "server_id": agent,
                                "scheduled_at": at,
                                "status": "succeeded",
                                "exit_code": 0,
                                "started_at": at,
                                "finished_at": at,
                                "stdout": "bench output line\n",
                            }
                        )
                    if batch == 1:
                        post(conn, f"/api/v1/tasks/{task_id}/complete", results[0], credential)
                    else:
                        answer = post(conn, "/api/v1/results", {"results": results}, credential)
                        assert all(r["status"] == "stored" for r in answer["results"])
                    stored[i] += batch

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            started = time.monotonic()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - started
            print(
                f"batch {batch:>5}: {sum(stored) / elapsed:>9,.0f} results/s stored "
                f"({sum(stored):,} in {elapsed:.1f} s)"
            )
    finally:
        server.stop()


if __name__ == "__main__":
    main()
