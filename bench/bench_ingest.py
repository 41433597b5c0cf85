"""Scenario ``4-ingest``: how many results a second one real server stores, end to end.

Starts ``twistd taskscheduler-server`` on an embedded PostgreSQL, secured as in production
(:class:`tests.integration.daemons.Fleet`: an operator token, a join secret), with
``--agents`` (64) agent URLs in its fleet (:class:`StubAgents` take the tasks the server
delivers there, so delivery is done before the measure begins). Each simulated
agent enrols with the join secret and posts results with its own credential, over its
own keep-alive connection, as a real agent's reporter does: single results
(``POST /api/v1/tasks/<id>/complete``, one result per request, the next once the last is
answered), then batches (``POST /api/v1/results``) of each size of ``--batches``.

The results are of ``--tasks`` (100) tasks ``every 1 second``, every one assigned to every
agent; each agent reports the instants in order, every task's instant before the next
instant, so the 64 results of one execution arrive together and complete it, as they do
when a task runs on the whole fleet. An instant is reported at most
:data:`LEAD_SECONDS` ahead of the clock (inside the protocol's clock allowance, so no
result needs its task looked up); past that the agent waits. The agents run in
``--processes`` client processes (asyncio, raw HTTP/1.1), each answer is checked
(``stored``, nothing else), and a figure is the results stored per second.

    .venv/bin/python bench/bench_ingest.py [--quick] [--ceilings FILE] [--json-out FILE]
        [--seconds 20] [--agents 64] [--processes 2] [--tasks 100] [--batches 1,100,1000]

The suite contract (``bench/suite.py``): ``--quick`` is a small scale for a shared
machine; ``--ceilings`` is the file ``bench/ceilings.py`` writes, for the ratios (single
results to ``web-requests``, batches to ``insert-rows``; without it, no ratio);
``--json-out`` gets one JSON line per figure appended. Exits non-zero only if it could
not measure. Not a test: it asserts nothing about speed. (Over 400 lines: the simulated
agents' raw HTTP client and their listening side live here, used by no other script.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.contract import Figure, add_arguments, ceiling_value, emit, load_ceilings, ratio
from bench.loadkit import percentile
from tests.integration.daemons import Fleet, free_port, http

SCENARIO = "4-ingest"
#: Targets of issue 13 (results stored per second).
SINGLE_TARGET = 3_000.0
BATCHED_TARGET = 10_000.0
#: How far ahead of the clock an instant is reported (the protocol allows 60 s of
#: clock difference without looking the task up).
LEAD_SECONDS = 50.0


@dataclass
class Schedule:
    """The (task, instant) pairs every agent reports, in order: pair ``k`` is task
    ``k % len(tasks)`` at its ``k // len(tasks) + 1``-th instant."""

    tasks: list[str]
    anchors: list[datetime]

    def pair(self, k: int) -> tuple[str, datetime]:
        n = len(self.tasks)
        return self.tasks[k % n], self.anchors[k % n] + timedelta(seconds=k // n + 1)


@dataclass
class Agent:
    agent_id: str
    credential: str
    next_pair: int = 0


@dataclass
class Tally:
    requests: int = 0
    stored: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    waited: float = 0.0
    elapsed: float = 0.0


def result_body(schedule: Schedule, agent: Agent, k: int) -> dict[str, Any]:
    task_id, at = schedule.pair(k)
    stamp = at.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "task_id": task_id,
        "server_id": agent.agent_id,
        "scheduled_at": stamp,
        "status": "succeeded",
        "exit_code": 0,
        "started_at": stamp,
        "finished_at": stamp,
        "stdout": "bench output line\n",
    }


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, body: bytes
) -> tuple[int, bytes]:
    writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    headers = await reader.readuntil(b"\r\n\r\n")
    status = int(headers[9:12])
    length = 0
    chunked = False
    for line in headers.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
        elif name.lower() == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    if not chunked:
        return status, await reader.readexactly(length)
    # An asynchronous twisted.web resource answers in chunks.
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def _agent_loop(
    port: int, schedule: Schedule, agent: Agent, batch: int, deadline: float, tally: Tally
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {agent.credential}\r\n".encode()
    common = b"Host: 127.0.0.1\r\nContent-Type: application/json\r\n" + auth
    try:
        while time.monotonic() < deadline:
            last = agent.next_pair + batch - 1
            ahead = (schedule.pair(last)[1] - datetime.now(UTC)).total_seconds()
            if ahead > LEAD_SECONDS:
                pause = min(0.2, ahead - LEAD_SECONDS)
                tally.waited += pause
                await asyncio.sleep(pause)
                continue
            results = [result_body(schedule, agent, k) for k in range(agent.next_pair, last + 1)]
            if batch == 1:
                path = f"/api/v1/tasks/{results[0]['task_id']}/complete"
                body = json.dumps(results[0]).encode()
            else:
                path = "/api/v1/results"
                body = json.dumps({"results": results}).encode()
            started = time.monotonic()
            status, answer = await _exchange(
                reader, writer, f"POST {path} HTTP/1.1\r\n".encode() + common, body
            )
            tally.latencies.append(time.monotonic() - started)
            tally.requests += 1
            agent.next_pair = last + 1
            if status != 200:
                tally.statuses[f"http {status}"] += batch
                continue
            try:
                decoded = json.loads(answer)
            except ValueError:
                raise RuntimeError(f"not JSON: {status} {answer[:200]!r}") from None
            outcomes = [decoded] if batch == 1 else decoded["results"]
            for outcome in outcomes:
                tally.statuses[outcome["status"]] += 1
            tally.stored += sum(o["status"] == "stored" for o in outcomes)
    finally:
        writer.close()


def _client_process(
    port: int, schedule: Schedule, agents: list[Agent], batch: int, start: float, seconds: float
) -> tuple[list[int], Tally]:
    """One client process: its agents post for ``seconds`` from ``start`` (a wall time,
    so every process begins together)."""

    async def run() -> Tally:
        tally = Tally()
        await asyncio.sleep(max(0.0, start - time.time()))
        began = time.monotonic()
        deadline = began + seconds
        await asyncio.gather(
            *(_agent_loop(port, schedule, a, batch, deadline, tally) for a in agents)
        )
        # Until the last answer: a request sent just before the deadline counts.
        tally.elapsed = time.monotonic() - began
        return tally

    tally = asyncio.run(run())
    return [a.next_pair for a in agents], tally


class StubAgents:
    """The simulated agents' listening side: each URL answers what the server pushes
    (``schedule``: every task taken; anything else: an empty answer) as its agent, so
    the server's deliveries succeed at once and leave the measured path. The
    instructions' signatures are not checked: this is not an agent under test."""

    def __init__(self, ports: dict[int, str]) -> None:
        self._ports = ports  # port -> agent id
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(30)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        for port, agent_id in self._ports.items():
            self._loop.run_until_complete(
                asyncio.start_server(
                    lambda r, w, a=agent_id: self._serve(r, w, a), "127.0.0.1", port
                )
            )
        ready.set()
        self._loop.run_forever()

    @staticmethod
    async def _serve(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, agent_id: str
    ) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                answer: dict[str, Any] = {"agent_id": agent_id, "task_ids": []}
                if head.startswith(b"POST /api/v1/tasks/schedule "):
                    sent = json.loads(body)
                    if "tasks" in sent:
                        answer["results"] = [
                            {"task_id": t["task_id"], "status": "scheduled"} for t in sent["tasks"]
                        ]
                    else:
                        answer["status"] = "scheduled"
                encoded = json.dumps(answer).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(encoded), encoded)
                )
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


def load(
    port: int,
    schedule: Schedule,
    agents: list[Agent],
    batch: int,
    seconds: float,
    processes: int,
) -> tuple[float, Tally]:
    """Every agent posts batches of ``batch`` for ``seconds``: (elapsed, merged tally)."""
    shares = [agents[i::processes] for i in range(processes)]
    start = time.time() + 1.0
    context = multiprocessing.get_context("fork")
    with context.Pool(processes) as pool:
        answers = pool.starmap(
            _client_process, [(port, schedule, share, batch, start, seconds) for share in shares]
        )
    total = Tally()
    for share, (cursors, tally) in zip(shares, answers, strict=True):
        for agent, cursor in zip(share, cursors, strict=True):
            agent.next_pair = cursor
        total.requests += tally.requests
        total.stored += tally.stored
        total.statuses += tally.statuses
        total.latencies += tally.latencies
        total.waited += tally.waited
        total.elapsed = max(total.elapsed, tally.elapsed)
    return total.elapsed, total


def figure(
    name: str,
    value: float,
    ceiling_name: str,
    ceilings: dict[str, Any],
    target: float,
    detail: dict[str, Any],
) -> Figure:
    of = ceiling_value(ceilings, ceiling_name)
    return Figure(
        SCENARIO,
        name,
        round(value, 1),
        "/s",
        ceiling=ceiling_name if of else None,
        ratio=ratio(value, of),
        target=f">= {target:,.0f}/s",
        met=value >= target,
        detail=detail,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--seconds", type=float, help="per batch size (20; quick: 6)")
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--tasks", type=int, default=100)
    parser.add_argument("--batches", default="1,100,1000")
    args = parser.parse_args()
    seconds = args.seconds or (6.0 if args.quick else 20.0)
    ceilings = load_ceilings(args.ceilings)

    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    fleet = Fleet(root, agents=0)
    ports = {free_port(): str(uuid.uuid4()) for _ in range(args.agents)}
    StubAgents(ports)
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    fleet.server.env["AVAILABLE_SERVERS"] = ",".join(urls)
    try:
        fleet.start()
    except Exception as e:
        print(f"the server did not start: {e}\n{fleet.logs()}", file=sys.stderr)
        fleet.stop()
        shutil.rmtree(root, ignore_errors=True)
        return 1
    figures: list[Figure] = []
    try:
        agents = []
        for url, agent_id in zip(urls, ports.values(), strict=True):
            code, enrolled = http(
                "POST",
                fleet.server_url + "/api/v1/agents/enrol",
                {"agent_id": agent_id, "url": url},
                headers={"Authorization": f"Bearer {fleet.join_secret}"},
            )
            if code != 201:
                raise RuntimeError(f"enrolment refused: {code} {enrolled}")
            agents.append(Agent(agent_id, enrolled["credential"]))
        tasks, anchors = [], []
        for _ in range(args.tasks):
            code, created = fleet.api(
                "POST",
                "/api/v1/tasks/create",
                {"command": "echo bench", "frequency": "every 1 second"},
            )
            if code != 201:
                raise RuntimeError(f"task refused: {code} {created}")
            _, task = fleet.api("GET", f"/api/v1/tasks/{created['command_id']}")
            tasks.append(created["command_id"])
            anchors.append(datetime.fromisoformat(task["anchor"].replace("Z", "+00:00")))
        schedule = Schedule(tasks, anchors)
        # From the current instant on, as agents report runs that just ended (a result
        # older than the report grace is counted late, which looks its task up).
        since = (datetime.now(UTC) - max(anchors)).total_seconds()
        for agent in agents:
            agent.next_pair = len(tasks) * max(0, int(since) - 1)
        print(
            f"server pid {fleet.server.process.pid if fleet.server.process else '?'}; "
            f"{args.agents} agents in {args.processes} processes, {args.tasks} tasks, "
            f"{seconds:g} s per batch size"
        )
        print(
            f"{'batch':>6} {'stored/s':>10} {'requests/s':>11} {'p50 ms':>7} {'p99 ms':>7}  other"
        )
        for batch in (int(b) for b in args.batches.split(",")):
            elapsed, tally = load(
                fleet.server_port, schedule, agents, batch, seconds, args.processes
            )
            rate = tally.stored / elapsed
            others = {s: n for s, n in tally.statuses.items() if s != "stored"}
            ordered = sorted(tally.latencies) or [float("nan")]
            p50 = percentile(ordered, 50) * 1000
            p99 = percentile(ordered, 99) * 1000
            print(
                f"{batch:>6} {rate:>10,.0f} {tally.requests / elapsed:>11,.0f} "
                f"{p50:>7.1f} {p99:>7.1f}  {others or ''}"
                + (f" (agents waited {tally.waited:.0f} s for instants)" if tally.waited else "")
            )
            detail = {
                "batch": batch,
                "agents": args.agents,
                "processes": args.processes,
                "tasks": args.tasks,
                "seconds": elapsed,
                "stored": tally.stored,
                "requests": tally.requests,
                "not_stored": others,
                "latency_ms_p50": round(p50, 2),
                "latency_ms_p99": round(p99, 2),
                "quick": args.quick,
            }
            if batch == 1:
                figures.append(
                    figure(
                        f"single results stored/s ({args.agents} agents)",
                        rate,
                        "web-requests",
                        ceilings,
                        SINGLE_TARGET,
                        detail,
                    )
                )
            else:
                figures.append(
                    figure(
                        f"batched results stored/s (batch {batch})",
                        rate,
                        "insert-rows",
                        ceilings,
                        BATCHED_TARGET,
                        detail,
                    )
                )
    except Exception as e:
        print(f"could not measure: {e}\n{fleet.logs()}", file=sys.stderr)
        return 1
    finally:
        fleet.stop()
        shutil.rmtree(root, ignore_errors=True)
    for line in figures:
        emit(args.json_out, line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
