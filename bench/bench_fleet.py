"""Scenarios 6 (fan-out) and 7 (server memory) of issue 13, against a real server.

    .venv/bin/python bench/bench_fleet.py [--quick] [--ceilings FILE] [--json-out FILE]
        [--scenario 6-fanout|7-server-memory|both] [--agents 1000,10000] [--tasks 10000]
        [--ports 500] [--probes 20] [--heartbeat-interval 10] [--keep]

A real ``twistd taskscheduler-server`` on an embedded PostgreSQL and one real agent,
secured as in production (:mod:`bench.bench_agent_load`'s helpers), and simulated agents
(:mod:`bench.fleetsim`) in this process: each enrols with the join secret, heartbeats,
and answers the server's signed instructions. They are added to the fleet through
``POST /api/v1/fleet``. Figures:

- ``6-fanout``, for each ``--agents`` count: ``--probes`` tasks created one at a time
  (0.5 s apart); for each, the seconds from sending its create to the moment the last
  agent (simulated ones and the real one) held it; p99 over the probes (targets: 2 s at
  1,000 agents, 10 s at 10,000). Enrolment and fleet-join times are reported too.
  Then, with the real agent alone in the fleet, ``--tasks`` tasks created by 8 clients
  as fast as they go: seconds from the last create's answer until the real agent holds
  them all (target 5 s).
- ``7-server-memory``: 1,000 simulated agents and ``--tasks`` tasks (10,000): the
  server's RSS, max of samples while the tasks are created and delivered (target
  < 250 MB); how many deliveries were done when sampling stopped.

``--quick``: 100 agents, 1,000 tasks. Exits non-zero only if it could not measure.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import threads
from twisted.internet.defer import Deferred

from bench.fleetsim import SimFleet
from bench.loadapi import Operator, Postgres, create_tasks, query
from bench.loadkit import ProcStat, percentile, start_fleet, stop_daemons
from tests.integration.daemons import Daemon, Fleet, http

COMMAND = ":"
SERVER_ENV = {"TASKSCHEDULER_MAX_PER_CLIENT": "30000", "TASKSCHEDULER_MAX_CONNECTIONS": "30000"}


class RssSampler(threading.Thread):
    """The server's RSS every ``interval`` s until :meth:`finish`."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.proc = ProcStat(pid)
        self.interval = interval
        self.samples: list[int] = []
        self.stopping = threading.Event()
        self.cpu0 = self.proc.cpu_seconds()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append(self.proc.rss_bytes())
            self.stopping.wait(self.interval)

    def finish(self) -> dict[str, Any]:
        self.stopping.set()
        self.join(5)
        elapsed = time.monotonic() - self.t0
        return {
            "rss_mb_max": round(max(self.samples, default=0) / 2**20, 1),
            "rss_mb_last": round((self.samples or [0])[-1] / 2**20, 1),
            "cpu_share": round((self.proc.cpu_seconds() - self.cpu0) / elapsed, 3),
        }


class Run:
    """The reactor-side state of one measurement."""

    def __init__(self, reactor: Any, args: argparse.Namespace, out: list[dict[str, Any]]):
        self.reactor = reactor
        self.args = args
        self.out = out
        self.root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
        self.daemons: list[Daemon] = []
        self.pg: Postgres | None = None

    def figure(
        self,
        scenario: str,
        name: str,
        value: float | None,
        unit: str,
        target: str | None = None,
        met: bool | None = None,
        **detail: Any,
    ) -> None:
        value = None if value is not None and not math.isfinite(value) else value
        self.out.append(
            {
                "scenario": scenario,
                "figure": name,
                "value": value,
                "unit": unit,
                "ceiling": None,
                "ratio": None,
                "target": target,
                "met": met,
                "detail": detail,
            }
        )
        shown = "-" if value is None else f"{value:g}"
        verdict = "" if met is None else ("  met" if met else "  NOT MET")
        print(f"  {scenario:16} {name:48} {shown:>10} {unit:4} {target or ''}{verdict}", flush=True)

    async def blocking(self, fn: Callable[..., Any], *a: Any) -> Any:
        return await threads.deferToThread(fn, *a)

    async def server(self, name: str) -> Fleet:
        if self.pg is None:
            self.pg = await self.blocking(Postgres, None, self.root / "postgres")
        dsn = await self.blocking(self.pg.create_database)
        fleet: Fleet = await self.blocking(start_fleet, self.root / name, 1, dsn, self.daemons)
        # Every simulated agent connects from 127.0.0.1, where a real fleet has an address
        # each: lift the per-address connection limit (and the total) for them.
        await self.blocking(fleet.server.stop)
        fleet.server.env.update(SERVER_ENV)
        await self.blocking(fleet.server.start)
        await self.blocking(fleet.wait_until_healthy)
        return fleet

    async def stop(self, fleet: Fleet) -> None:
        mine = [fleet.server, *fleet.agents]
        await self.blocking(stop_daemons, mine)
        for d in mine:
            self.daemons.remove(d)

    async def sim_fleet(self, fleet: Fleet, count: int) -> tuple[SimFleet, dict[str, float]]:
        sim = SimFleet(
            self.reactor,
            fleet.server_url,
            fleet.join_secret,
            count,
            ports=self.args.ports,
            heartbeat_interval=self.args.heartbeat_interval,
        )
        urls = sim.listen()
        enrol_s = await sim.enrol_all()
        api = Operator(fleet)
        started = time.monotonic()

        def add_all() -> None:
            failures = []

            def add(batch: Sequence[str]) -> None:
                for url in batch:
                    code, body = api.request("POST", "/api/v1/fleet", {"url": url})
                    if code not in (200, 201):
                        failures.append(f"{code} {body}")

            workers = [threading.Thread(target=add, args=(urls[i::8],)) for i in range(8)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if failures:
                raise RuntimeError(f"could not add to the fleet: {failures[:3]}")

        await self.blocking(add_all)
        join_s = time.monotonic() - started
        sim.start_heartbeats()
        return sim, {"enrol_s": round(enrol_s, 2), "fleet_add_s": round(join_s, 2)}

    async def fanout(self, count: int) -> None:
        scenario = "6-fanout"
        fleet = await self.server(f"fanout-{count}")
        self.real_expected = 0
        sampler = RssSampler(fleet.server.process.pid)  # type: ignore[union-attr]
        sampler.start()
        sim, setup = await self.sim_fleet(fleet, count)
        print(f"  {count} simulated agents: {setup}", flush=True)
        api = Operator(fleet)
        real_url = fleet.agent_urls[0]
        # Settle: the links are up and deliver (a first task reaches everyone).
        await self.probe(api, sim, real_url, timeout=max(60.0, count / 50))
        latencies: list[float] = []
        pairs: list[float] = []
        missing = 0
        for _ in range(self.args.probes):
            sent, task_id = await self.create_one(api)
            done = await self.probe_wait(sim, real_url, task_id, timeout=max(30.0, count / 100))
            arrivals = sim.arrivals(task_id)
            pairs.extend(a - sent for a in arrivals)
            if done is None:
                missing += count - len(arrivals)
                latencies.append(math.inf)
            else:
                latencies.append(done - sent)
            await _sleep(self.reactor, 0.5)
        ordered = sorted(latencies)
        p99 = percentile(ordered, 99)
        target = 2.0 if count <= 1000 else 10.0
        self.figure(
            scenario,
            f"create -> held by all {count} agents, p99",
            round(p99, 3),
            "s",
            f"< {target:g} s",
            p99 < target,
            p50=round(percentile(ordered, 50), 3),
            max=round(ordered[-1], 3) if math.isfinite(ordered[-1]) else None,
            probes=len(ordered),
            per_agent_p50=round(percentile(sorted(pairs), 50), 3) if pairs else None,
            per_agent_p99=round(percentile(sorted(pairs), 99), 3) if pairs else None,
            never_arrived=missing,
            **setup,
            sim=sim.counters(),
            server=sampler.finish(),
        )
        await sim.stop()
        await self.stop(fleet)

    async def create_one(self, api: Operator) -> tuple[float, uuid.UUID]:
        def create() -> tuple[float, uuid.UUID]:
            sent = time.time()
            code, body = api.request(
                "POST", "/api/v1/tasks/create", {"command": COMMAND, "frequency": "every 24 hours"}
            )
            if code != 201:
                raise RuntimeError(f"create answered {code} {body}")
            return sent, uuid.UUID(body["command_id"])

        result: tuple[float, uuid.UUID] = await self.blocking(create)
        return result

    async def probe(self, api: Operator, sim: SimFleet, real_url: str, timeout: float) -> None:
        _, task_id = await self.create_one(api)
        if await self.probe_wait(sim, real_url, task_id, timeout) is None:
            raise RuntimeError(f"the first task did not reach every agent in {timeout:.0f} s")

    async def probe_wait(
        self, sim: SimFleet, real_url: str, task_id: uuid.UUID, timeout: float
    ) -> float | None:
        """When the last agent (simulated ones, and the real one) held ``task_id``; None
        past ``timeout``. The real agent's moment is seen by polling its health (its task
        count), so it is an upper bound within one poll."""
        self.real_expected += 1
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(sim.arrivals(task_id)) == len(sim.agents):
                break
            await _sleep(self.reactor, 0.02)
        else:
            return None
        last = max(sim.arrivals(task_id))
        first = True
        while time.time() < deadline:
            polled = time.time()
            if await self.blocking(self.real_holds, real_url, self.real_expected):
                return last if first else max(last, polled)
            first = False
            await _sleep(self.reactor, 0.02)
        return None

    real_expected = 0

    @staticmethod
    def real_holds(real_url: str, count: int) -> bool:
        code, body = http("GET", real_url + "/api/v1/health", timeout=5)
        return code == 200 and int(body.get("tasks", 0)) >= count

    async def many_to_real(self, count: int) -> None:
        scenario = "6-fanout"
        fleet = await self.server("real-many")
        api = Operator(fleet)
        created = await self.blocking(create_tasks, api, count, COMMAND, 86400, False, 8)
        last_create = time.monotonic()

        def wait() -> float | None:
            deadline = last_create + self.args.delivery_timeout
            while time.monotonic() < deadline:
                code, body = http("GET", fleet.agent_urls[0] + "/api/v1/health", timeout=10)
                if code == 200 and body.get("tasks", 0) >= count:
                    return time.monotonic() - last_create
                time.sleep(0.05)
            return None

        waited = await self.blocking(wait)
        self.figure(
            scenario,
            f"{count} tasks reach one real agent after the last create",
            None if waited is None else round(waited, 2),
            "s",
            "< 5 s",
            waited is not None and waited < 5.0,
            create_s=round(created.seconds, 2),
            created=created.created,
            creates_per_s=round(count / created.seconds, 1),
        )
        await self.stop(fleet)

    async def memory(self, agents: int, tasks: int) -> None:
        scenario = "7-server-memory"
        fleet = await self.server("memory")
        sampler = RssSampler(fleet.server.process.pid)  # type: ignore[union-attr]
        sampler.start()
        sim, setup = await self.sim_fleet(fleet, agents)
        api = Operator(fleet)
        idle = sampler.proc.rss_bytes()
        started = time.monotonic()
        # Creating is bounded too: with a slow fan-out it can take far longer than delivery.
        created = await self.blocking(
            create_tasks, api, tasks, COMMAND, 86400, False, 8, self.args.delivery_timeout
        )
        want = (agents + 1) * created.created
        deadline = time.monotonic() + self.args.delivery_timeout
        while time.monotonic() < deadline:
            held = sum(len(a.tasks) for a in sim.agents)
            if held >= agents * created.created:
                break
            await _sleep(self.reactor, 1.0)
        delivered_s = time.monotonic() - started
        await _sleep(self.reactor, 5.0)  # and a reconciliation or so after it
        rows = await self.blocking(
            query, fleet.server.env.get("TASKSCHEDULER_DATABASE", ""), _DELIVERED_SQL
        )
        server = sampler.finish()
        rss = server["rss_mb_max"]
        self.figure(
            scenario,
            f"server RSS, {agents} agents and {created.created} of {tasks} tasks",
            rss,
            "MB",
            "< 250 MB",
            rss < 250 and created.created == tasks,
            idle_rss_mb=round(idle / 2**20, 1),
            create_s=round(created.seconds, 2),
            created=created.created,
            delivered_s=round(delivered_s, 1),
            delivered=rows[0][0] if rows else None,
            wanted=want,
            **setup,
            sim=sim.counters(),
            server=server,
        )
        await sim.stop()
        await self.stop(fleet)

    async def main(self) -> None:
        args = self.args
        try:
            if args.scenario in ("6-fanout", "both"):
                for count in args.agents:
                    await self.fanout(count)
                if args.real_tasks:
                    await self.many_to_real(args.tasks)
            if args.scenario in ("7-server-memory", "both"):
                await self.memory(args.memory_agents, args.tasks)
        finally:
            await self.blocking(stop_daemons, self.daemons)
            if self.pg is not None:
                await self.blocking(self.pg.close, True)
            if args.keep:
                print(f"kept {self.root}", file=sys.stderr)
            else:
                shutil.rmtree(self.root, ignore_errors=True)


_DELIVERED_SQL = "SELECT count(*) FROM task_agents WHERE delivered_at IS NOT NULL"


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ceilings", type=Path, help="unused: these figures have no ceiling")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--scenario", choices=["6-fanout", "7-server-memory", "both"], default="both"
    )
    parser.add_argument("--agents", default=None, help="simulated agents, comma-separated")
    parser.add_argument("--memory-agents", type=int, default=None)
    parser.add_argument("--tasks", type=int, default=None)
    parser.add_argument("--ports", type=int, default=500)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    parser.add_argument("--delivery-timeout", type=float, default=600.0)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--no-real-tasks",
        dest="real_tasks",
        action="store_false",
        help="skip the many tasks to one real agent part of 6-fanout",
    )
    args = parser.parse_args(argv)
    if args.agents is None:
        args.agents = "100" if args.quick else "1000,10000"
    args.agents = [int(a) for a in str(args.agents).split(",") if a]
    if args.memory_agents is None:
        args.memory_agents = 100 if args.quick else 1000
    if args.tasks is None:
        args.tasks = 1000 if args.quick else 10_000
    return args


def main() -> int:
    from twisted.internet import reactor, task

    args = parse_args()
    out: list[dict[str, Any]] = []
    reactor.suggestThreadPoolSize(16)  # type: ignore[attr-defined]

    def run(r: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(Run(r, args, out).main())

    try:
        task.react(run)
    except SystemExit as e:
        code = int(e.code or 0)
    else:
        code = 0
    if args.json_out is not None:
        with args.json_out.open("a", encoding="utf-8") as f:
            for line in out:
                f.write(json.dumps(line) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
