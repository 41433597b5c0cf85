"""Many simulated agents in one Twisted process, speaking the real protocol with real
credentials: a library for benchmarks (``bench/bench_fleet.py``, and issue 14's replicas
run), with a small CLI.

Each :class:`SimAgent` enrols with the join secret through the agent's own
:class:`~taskscheduler.agent.server_client.ServerClient` (it gets its own credential and
pins the server's key), heartbeats with it, and answers the agent API the server pushes
to (schedule, batch schedule, unschedule, run now, list, leave), each instruction checked
by the agent's own :class:`~taskscheduler.signing.InstructionVerifier` (signature,
audience, clock skew, nonce) and each task parsed by :func:`protocol.parse_task_spec`.
Nothing is written to disk and nothing runs: the simulator records when each task first
arrived at each agent (its own clock), which is what a fan-out benchmark measures. With
``results=True`` each agent also "runs" its tasks' instants and reports a synthetic
result of each like a real agent (:mod:`bench.simresults`: its own credential, the
reporter's single and batch endpoints, back-off).

Several server URLs (replicas) may be given: agent ``i``'s client gets the list
starting at ``servers[i % n]`` (so the fleet is spread over them) and fails over to the
next on trouble exactly as a real agent's ``--server a,b`` does (it is the agent's own
``ServerClient``), for enrolment, heartbeats and results alike.

The server keeps a URL's path (``AgentClient`` appends ``/api/v1/...`` to it), so many
agents share a listening port: agent ``i`` is ``http://HOST:PORT/a/i`` on port
``ports[i % len(ports)]``. One port per agent is the most realistic (the server keeps a
connection pool per host and port), but costs two descriptors per agent on this machine;
a few hundred ports are a fair middle. :func:`raise_fd_limit` lifts the soft limit.

CLI (a fleet against running servers, until Ctrl-C)::

    python bench/fleetsim.py --server http://127.0.0.1:8080[,http://...:8081] \\
        --join-secret-file F --agents 1000 [--ports 100] [--heartbeat-interval 10] \\
        [--add-to-fleet TOKEN_FILE] [--results]

A little over 400 lines: the agent API's answers and the fleet's life cycle are one
class; the runs and reports are in :mod:`bench.simresults`.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from bench.simresults import SimReporter, SimRuns
from taskscheduler import protocol
from taskscheduler.agent.server_client import Enrolled, HeartbeatAnswer, ServerClient
from taskscheduler.agent.servers import ServerChooser
from taskscheduler.httpclient import DaemonHTTP
from taskscheduler.schedule import format_instant, utc_now_from
from taskscheduler.signing import BadSignature, InstructionVerifier

#: Path of agent ``i`` under its port.
PREFIX = "/a/"


def raise_fd_limit(wanted: int) -> int:
    """Lift this process's soft descriptor limit towards ``wanted`` (within the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard if hard != resource.RLIM_INFINITY else wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


@dataclass
class SimAgent:
    """One simulated agent: its identity, credential, verifier and the tasks it holds."""

    index: int
    url: str
    agent_id: uuid.UUID
    client: ServerClient
    verifier: InstructionVerifier
    #: task id -> revision held.
    tasks: dict[uuid.UUID, int] = field(default_factory=dict)
    #: task id -> when (reactor seconds) it first arrived here.
    arrived: dict[uuid.UUID, float] = field(default_factory=dict)
    left: str | None = None
    enrolled: bool = False
    instructions: int = 0
    refused: int = 0


class SimFleet:
    """``count`` simulated agents of the server(s) at ``server_url`` (one URL, or a list
    of replicas' URLs the agents are spread over)."""

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        server_url: str | Sequence[str],
        join_secret: str,
        count: int,
        *,
        host: str = "127.0.0.1",
        ports: int = 1,
        heartbeat_interval: float = 10.0,
        concurrency: int = 32,
        on_arrival: Callable[[SimAgent, uuid.UUID, float], None] | None = None,
        results: bool = False,
        run_seconds: float = 0.01,
        connections: int = 8,
    ) -> None:
        self._reactor = reactor
        urls = [server_url] if isinstance(server_url, str) else list(server_url)
        self.servers = [url.rstrip("/") for url in urls]
        self.server_url = self.servers[0]
        self._join_secret = join_secret
        self._count = count
        self._host = host
        self._port_count = max(1, min(ports, count))
        self._heartbeat_interval = heartbeat_interval
        self._semaphore = DeferredSemaphore(concurrency)
        self._on_arrival = on_arrival
        # Kept-alive connections per server: a real fleet holds one per agent, which a
        # bench may ask for (``connections=count``); 8 by default, as issue 13's runs.
        self.http = DaemonHTTP(reactor, max_per_host=connections)
        self.agents: list[SimAgent] = []
        self.reporter = SimReporter(reactor)
        self.runs: SimRuns | None = None
        if results:
            self.runs = SimRuns(reactor, self.agents, self.reporter, run_seconds=run_seconds)
        self._listening: list[Any] = []
        self._heartbeats: list[LoopingCall] = []
        self.heartbeats_sent = 0
        self._started_at = format_instant(utc_now_from(reactor.seconds()))
        self.heartbeats_failed = 0

    # -- set-up -----------------------------------------------------------------------

    def listen(self) -> list[str]:
        """Listen on the ports (free ones) and make the agents; their URLs."""
        raise_fd_limit(4 * self._port_count + 2 * self._count + 1024)
        site = Site(_FleetResource(self))
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        for _ in range(self._port_count):
            self._listening.append(self._reactor.listenTCP(0, site, interface=self._host))
        started = self._reactor.seconds()
        for i in range(self._count):
            port = self._listening[i % self._port_count].getHost().port
            agent_id = uuid.uuid4()
            self.agents.append(
                SimAgent(
                    i,
                    f"http://{self._host}:{port}{PREFIX}{i}",
                    agent_id,
                    ServerClient(self.http, self._reactor, rotated(self.servers, i)),
                    # Started a second ago: an instruction signed in the agent's first
                    # second is not refused as one from before it started.
                    InstructionVerifier(agent_id, self._reactor, started_at=started - 1),
                )
            )
        return [a.url for a in self.agents]

    def set_servers(self, servers: Sequence[str], join_secret: str) -> None:
        """Point the agents at ``servers`` (before they enrol): for servers started after
        the agents listen, e.g. given the agents' URLs as their fleet."""
        self.servers = [url.rstrip("/") for url in servers]
        self.server_url = self.servers[0]
        self._join_secret = join_secret
        for agent in self.agents:
            agent.client.servers = ServerChooser(rotated(self.servers, agent.index))

    async def enrol_all(self, retries: int = 5) -> float:
        """Enrol every agent (``concurrency`` at once); the seconds it took."""
        started = self._reactor.seconds()
        await gatherResults(
            [self._semaphore.run(self._enrol, agent, retries) for agent in self.agents],
            consumeErrors=True,
        )
        return self._reactor.seconds() - started

    async def _enrol(self, agent: SimAgent, retries: int) -> None:
        for attempt in range(retries):
            outcome = await agent.client.enrol(agent.agent_id, agent.url, self._join_secret)
            if isinstance(outcome, Enrolled):
                agent.client.credential = outcome.credential
                agent.verifier.trust(outcome.server_key)
                agent.enrolled = True
                return
            self.log.warn(
                "agent {i} could not enrol (attempt {n}): {reason}",
                i=agent.index,
                n=attempt + 1,
                reason=getattr(outcome, "reason", outcome),
            )
            await _sleep(self._reactor, 0.5 * (attempt + 1))
        raise RuntimeError(f"agent {agent.index} could not enrol")

    def start_heartbeats(self) -> None:
        """A heartbeat per agent every ``heartbeat_interval`` s, their phases spread."""
        for agent in self.agents:
            loop = LoopingCall(self._beat, agent)
            loop.clock = self._reactor
            self._heartbeats.append(loop)
            offset = self._heartbeat_interval * agent.index / max(1, self._count)
            self._reactor.callLater(offset, _start_loop, loop, self._heartbeat_interval)

    def _beat(self, agent: SimAgent) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._beat_once(agent))
        d.addErrback(lambda _: None)
        return d

    async def _beat_once(self, agent: SimAgent) -> None:
        answer = await agent.client.heartbeat(
            {
                "agent_id": str(agent.agent_id),
                "version": "fleetsim",
                "hostname": f"sim-{agent.index}",
                "started_at": self._started_at,
                "tasks": len(agent.tasks),
                "running": 0,
                "spooled": len(self.reporter.outbox(agent).pending),
                "dropped_results": 0,
                "labels": {},
            }
        )
        if isinstance(answer, HeartbeatAnswer):
            self.heartbeats_sent += 1
        else:
            self.heartbeats_failed += 1

    async def stop(self) -> None:
        if self.runs is not None:
            self.runs.stop()
        self.reporter.stop()
        for loop in self._heartbeats:
            if loop.running:
                loop.stop()
        for port in self._listening:
            await port.stopListening()
        await self.http.close()

    # -- what the agents hold ---------------------------------------------------------

    def holders(self, task_id: uuid.UUID) -> int:
        return sum(1 for a in self.agents if task_id in a.tasks)

    def arrivals(self, task_id: uuid.UUID) -> list[float]:
        """When ``task_id`` reached each agent holding it (reactor seconds)."""
        return [a.arrived[task_id] for a in self.agents if task_id in a.arrived]

    def counters(self) -> dict[str, Any]:
        return {
            "instructions": sum(a.instructions for a in self.agents),
            "refused": sum(a.refused for a in self.agents),
            "heartbeats": self.heartbeats_sent,
            "heartbeats_failed": self.heartbeats_failed,
            "enrolled": sum(a.enrolled for a in self.agents),
            **(
                {}
                if self.runs is None
                else {"instants": self.runs.instants, "runs": self.runs.runs}
            ),
            **self.reporter.stats.counters(),
            "failovers": sum(a.client.servers.failovers for a in self.agents),
            "waiting": self.reporter.waiting(),
        }

    # -- the agent API ----------------------------------------------------------------

    def answer(self, request: Any) -> tuple[int, dict[str, Any]]:
        """The simulated agent's answer to one request (status, JSON body)."""
        path = request.path.decode("utf-8", "replace")
        if not path.startswith(PREFIX):
            return 404, _error("not_found", "no such agent")
        index_text, _, rest = path[len(PREFIX) :].partition("/")
        if not index_text.isdigit() or int(index_text) >= len(self.agents):
            return 404, _error("not_found", "no such agent")
        agent = self.agents[int(index_text)]
        rest = "/" + rest
        method = request.method.decode("ascii")
        if rest == "/api/v1/health":
            return 200, {"status": "ok", "enrolled": agent.enrolled, "tasks": len(agent.tasks)}
        body = request.content.read()
        values = request.requestHeaders.getRawHeaders(b"authorization") or []
        try:
            agent.verifier.verify(
                method,
                request.uri.decode("utf-8", "replace"),
                values[0] if len(values) == 1 else None,
                body,
            )
        except BadSignature as e:
            agent.refused += 1
            return 401, _error("unauthorized", str(e))
        agent.instructions += 1
        now = self._reactor.seconds()
        me = str(agent.agent_id)
        if method == "POST" and rest == "/api/v1/tasks/schedule":
            parsed = json.loads(body)
            if isinstance(parsed, dict) and "tasks" in parsed:
                results = [self._schedule(agent, t, now) for t in parsed["tasks"]]
                return 200, {"agent_id": me, "results": results}
            result = self._schedule(agent, parsed, now)
            if "error" in result:
                return 400, result["error"]
            return 200, {"agent_id": me, **result}
        if method == "GET" and rest == "/api/v1/agent/tasks":
            return 200, {"agent_id": me, "task_ids": sorted(str(t) for t in agent.tasks)}
        if method == "POST" and rest == "/api/v1/agent/leave":
            agent.left = str(json.loads(body).get("reason"))
            agent.tasks.clear()
            return 200, {"agent_id": me, "status": "left", "dropped": 0}
        parts = rest.split("/")  # "", api, v1, tasks, <id>[, run]
        if len(parts) >= 5 and parts[1:4] == ["api", "v1", "tasks"]:
            task_id = uuid.UUID(parts[4])
            if method == "DELETE" and len(parts) == 5:
                agent.tasks.pop(task_id, None)
                return 200, {"agent_id": me, "task_id": str(task_id), "status": "removed"}
            if method == "POST" and parts[5:] == ["run"]:
                run = json.loads(body)
                return 202, {
                    "agent_id": me,
                    "task_id": str(task_id),
                    "scheduled_at": run.get("scheduled_at"),
                    "status": "accepted",
                }
        return 404, _error("not_found", "no such route")

    def _schedule(self, agent: SimAgent, body: Any, now: float) -> dict[str, Any]:
        try:
            spec = protocol.parse_task_spec(body, utc_now_from(now))
        except protocol.InvalidMessage as e:
            return {"error": _error("bad_request", str(e))}
        if spec.task_id not in agent.arrived:
            agent.arrived[spec.task_id] = now
            if self._on_arrival is not None:
                self._on_arrival(agent, spec.task_id, now)
        agent.tasks[spec.task_id] = max(spec.revision, agent.tasks.get(spec.task_id, 0))
        if self.runs is not None:
            self.runs.held(spec.task_id, spec.schedule)
        return {"task_id": str(spec.task_id), "status": "scheduled"}


class _FleetResource(Resource):
    isLeaf = True

    def __init__(self, fleet: SimFleet) -> None:
        super().__init__()
        self._fleet = fleet

    def render(self, request: Any) -> bytes:
        try:
            status, body = self._fleet.answer(request)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            status, body = 400, _error("bad_request", str(e))
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(body).encode("utf-8")


def rotated(servers: Sequence[str], i: int) -> list[str]:
    """Agent ``i``'s list of the replicas: from ``servers[i % n]`` on, round."""
    start = i % len(servers)
    return [*servers[start:], *servers[:start]]


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def _start_loop(loop: LoopingCall, interval: float) -> None:
    loop.start(interval, now=True).addErrback(lambda _: None)


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


# -- CLI ---------------------------------------------------------------------------------


def add_to_fleet(
    reactor: Any, http: DaemonHTTP, server_url: str, token: str, urls: Sequence[str]
) -> Deferred[Any]:
    """Add ``urls`` to the server's fleet (``POST /api/v1/fleet``), a few at a time."""
    semaphore = DeferredSemaphore(8)
    headers = {b"Authorization": [f"Bearer {token}".encode()]}

    def add(url: str) -> Deferred[Any]:
        d = http.post(
            server_url.rstrip("/") + "/api/v1/fleet",
            data=json.dumps({"url": url}).encode(),
            headers={**headers, b"Content-Type": [b"application/json"]},
        )
        d.addCallback(http.content)
        return d

    return gatherResults([semaphore.run(add, url) for url in urls], consumeErrors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--join-secret-file", required=True, type=Path)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--ports", type=int, default=100)
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    parser.add_argument("--add-to-fleet", type=Path, help="operator token file: add the URLs")
    parser.add_argument("--results", action="store_true", help="run the tasks, report results")
    args = parser.parse_args(argv)
    from twisted.internet import reactor, task

    async def run(r: Any) -> None:
        fleet = SimFleet(
            r,
            args.server.split(","),
            args.join_secret_file.read_text().strip(),
            args.agents,
            ports=args.ports,
            heartbeat_interval=args.heartbeat_interval,
            results=args.results,
        )
        fleet.listen()
        print(f"enrolled {args.agents} agents in {await fleet.enrol_all():.1f} s", flush=True)
        if args.add_to_fleet:
            token = args.add_to_fleet.read_text().strip()
            urls = [a.url for a in fleet.agents]
            await add_to_fleet(r, fleet.http, fleet.server_url, token, urls)
        fleet.start_heartbeats()
        report = LoopingCall(lambda: print(json.dumps(fleet.counters()), flush=True))
        report.start(10)
        await Deferred()  # until Ctrl-C

    task.react(lambda r: Deferred.fromCoroutine(run(r)))
    del reactor
    return 0


if __name__ == "__main__":
    sys.exit(main())
