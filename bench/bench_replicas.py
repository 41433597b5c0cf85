"""Scenario 8 (issue 14): a simulated fleet against two server replicas on one PostgreSQL.

    .venv/bin/python bench/bench_replicas.py [--quick] [--ceilings FILE] [--json-out FILE]
        [--agents 1000] [--fleet-tasks 5] [--interval 10] [--probes 8]
        [--probe-interval 2] [--window 120] [--ports 500] [--create-rate 1]
        [--kill-phase 20] [--keep]

Its own PostgreSQL (the embedded one, ``pgserver``'s binaries) and two ``twistd
taskscheduler-server`` replicas on one database, sharing the operators' tokens file, the
join secrets file and the signing key file. ``--agents`` simulated agents
(:mod:`bench.fleetsim`, in this process) listen first, so that both replicas are given
the fleet as ``AVAILABLE_SERVERS``; agent ``i`` enrols, heartbeats and reports through
replica ``i % 2`` (and moves to the other if it gets no answer). Each agent runs its
tasks' instants synthetically and reports each result like a real agent
(:mod:`bench.simresults`).

Tasks: ``--fleet-tasks`` tasks on every agent, ``every --interval seconds``, created
``interval / fleet-tasks`` apart (so the fleet offers agents x fleet-tasks / interval
results a second, spread over the interval), and ``--probes`` tasks targeted at one
agent each, ``every --probe-interval seconds``. Once every agent holds its tasks, for
``--window`` s: the CPU (cores used) and memory of each replica (RSS) and of PostgreSQL
(its processes together; PSS, so shared buffers count once), sampled from ``/proc``;
and, from a separate process (:mod:`bench.replicaprobe`), p50/p99 of reads
(``latest_output`` and a history page of probe tasks, the task list) and of creates
(``--create-rate``/s, each targeted at one agent) sent to the replicas in turn, and
the freshness of the probe tasks' instants (instant -> shown by ``latest_output``).
From the database: results stored per second over the window against the offered rate,
and when the last result of each fleet-wide execution was stored.

Then replica-b is SIGKILLed and the fleet runs ``--kill-phase`` s more (0: skip): its
agents' clients (the real agent's ``ServerClient``) move to replica-a on the first
request that gets no answer; the figure is the worst instant -> acknowledged of their
results in that phase. Last, every result the
fleet saw acknowledged is looked up in the database (none may be missing).

Before issue 14's leases (``server/leases.py``) are on the branch, each replica delivers
every task to every agent (twice the instructions): the figures say which it was.
No target applies (the issue asks for the figures); ``--ceilings`` is accepted, unused.
``--quick``: 50 agents, a 30 s window. Exits non-zero only if it could not measure.

Over 400 lines because it is one scenario read in the order it runs (daemons, fleet,
tasks, window, kill phase, figures); its instruments are in :mod:`bench.replicaprobe`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twisted.internet import threads
from twisted.internet.defer import Deferred

from bench.contract import Figure, add_arguments, emit
from bench.fleetsim import SimFleet
from bench.loadapi import Operator, Postgres, query
from bench.loadkit import environment, percentile, stop_daemons
from bench.replicaprobe import (
    LagMeter,
    TreeSampler,
    freshness_figures,
    latency_figures,
    profile_top,
    start_py_spy,
)
from taskscheduler.auth import JOIN_PREFIX, OPERATOR_PREFIX, hash_token, new_token
from taskscheduler.signing import load_or_create_signing_key
from tests.integration.daemons import Daemon, free_port, http, wait_for

SCENARIO = "8-replicas"
BENCH = Path(__file__).resolve().parent
#: Every simulated agent connects from 127.0.0.1: lift the per-address limits.
SERVER_ENV = {
    "TASKSCHEDULER_MAX_PER_CLIENT": "30000",
    "TASKSCHEDULER_MAX_CONNECTIONS": "30000",
    "TASKSCHEDULER_CREATE_RATE": "0",
}


class Run:
    def __init__(self, reactor: Any, args: argparse.Namespace) -> None:
        self.reactor = reactor
        self.args = args
        self.root = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
        self.daemons: list[Daemon] = []
        self.pg: Postgres | None = None
        self.figures: list[Figure] = []
        self.urls: dict[str, str] = {}  # replica name -> its URL

    async def blocking(self, fn: Callable[..., Any], *a: Any) -> Any:
        return await threads.deferToThread(fn, *a)

    def figure(self, name: str, value: float | None, unit: str, **detail: Any) -> None:
        value = None if value is not None and not math.isfinite(value) else value
        self.figures.append(Figure(SCENARIO, name, value, unit, detail=detail))
        shown = "-" if value is None else f"{value:g}"
        print(f"  {name:58} {shown:>10} {unit}", flush=True)

    def replicas(self, dsn: str, fleet_urls: list[str]) -> list[Daemon]:
        """Two replicas with the same database, secrets and key; started one after the
        other (each runs the migrations at start: the second finds them done)."""
        secrets = self.root / "secrets"
        secrets.mkdir()
        self.token = new_token(OPERATOR_PREFIX)
        self.join_secret = new_token(JOIN_PREFIX)
        (secrets / "tokens").write_text(f"bench {hash_token(self.token)}\n")
        (secrets / "joins").write_text(f"fleet {hash_token(self.join_secret)}\n")
        load_or_create_signing_key(secrets / "signing_key.pem")
        out = []
        for name in ("replica-a", "replica-b"):
            port = free_port()
            daemon = Daemon(
                name,
                [
                    "taskscheduler-server",
                    "--listen",
                    f"tcp:{port}:interface=127.0.0.1",
                    "--data-dir",
                    str(self.root / name / "data"),
                    "--tokens-file",
                    str(secrets / "tokens"),
                    "--join-secrets-file",
                    str(secrets / "joins"),
                    "--signing-key-file",
                    str(secrets / "signing_key.pem"),
                ],
                self.root / name,
                {
                    **SERVER_ENV,
                    "TASKSCHEDULER_DATABASE": dsn,
                    "AVAILABLE_SERVERS": ",".join(fleet_urls),
                },
            )
            self.urls[name] = url = f"http://127.0.0.1:{port}"
            self.daemons.append(daemon)
            daemon.start()
            # The whole log: the links' first warnings (no agent enrolled yet) may be many.
            line = f"Site starting on {port}"

            def started(d: Daemon = daemon, line: str = line) -> bool:
                return line in d.whole_log()

            def healthy(d: Daemon = daemon, url: str = url) -> bool:
                return _healthy(d, url)

            wait_for(started, 60, f"{name} to listen")
            wait_for(healthy, 60, f"{name} to be healthy")
            out.append(daemon)
        return out

    def stop_now(self) -> None:
        """At reactor shutdown (SIGTERM from the suite, Ctrl-C): the daemons live in
        sessions of their own, so they are stopped here, not by the signal."""
        stop_daemons(self.daemons)
        if self.pg is not None:
            self.pg.close(True)
            self.pg = None

    async def main(self) -> None:
        args = self.args
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stop_now)
        print(f"== {SCENARIO}: {environment()}; folder {self.root}", flush=True)
        leases = importlib.util.find_spec("taskscheduler.server.leases") is not None
        self.pg = await self.blocking(Postgres, None, self.root / "postgres")
        dsn = await self.blocking(self.pg.create_database)
        pg_pid = self.pg.embedded.postmaster_pid if self.pg.embedded else None
        # The agents listen first: the replicas are given their URLs as the fleet.
        sim = SimFleet(
            self.reactor,
            ["http://placeholder"],
            "",
            args.agents,
            ports=args.ports,
            heartbeat_interval=args.heartbeat_interval,
            results=True,
            connections=args.agents,  # one per agent, as a real fleet holds
        )
        urls = sim.listen()
        replicas = await self.blocking(self.replicas, dsn, urls)
        servers = [self.urls[d.name] for d in replicas]
        sim.set_servers(servers, self.join_secret)
        enrol_s = await sim.enrol_all()
        sim.start_heartbeats()
        print(f"  {args.agents} agents enrolled in {enrol_s:.1f} s", flush=True)
        apis = [Operator(SimpleNamespace(server_url=u, operator_token=self.token)) for u in servers]  # type: ignore[arg-type]
        tasks = await self.blocking(self.create_tasks, apis, sim)
        started = time.monotonic()
        want = {t["task_id"]: t["holders"] for t in tasks}
        while time.monotonic() - started < args.delivery_timeout:
            held = sum(1 for a in sim.agents for t in a.tasks if str(t) in want)
            if held >= sum(want.values()):
                break
            await _sleep(self.reactor, 0.5)
        delivered_s = time.monotonic() - started
        held = sum(1 for a in sim.agents for t in a.tasks if str(t) in want)
        print(f"  {held} of {sum(want.values())} task holdings in {delivered_s:.1f} s", flush=True)
        await _sleep(self.reactor, max(args.interval, args.probe_interval))  # runs under way

        config = {
            "servers": servers,
            "token": self.token,
            "probes": [t for t in tasks if t["holders"] == 1],
            "readers": args.readers,
            "read_gap": args.read_gap,
            "create_rate": args.create_rate,
            "create_targets": [str(a.agent_id) for a in sim.agents[: min(100, len(sim.agents))]],
            "pollers": args.pollers,
            "poll_gap": args.poll_gap,
            "window": args.window,
        }
        (self.root / "observer.json").write_text(json.dumps(config))
        samplers = {d.name: TreeSampler(d.process.pid, False) for d in replicas}  # type: ignore[union-attr]
        if pg_pid is not None:
            samplers["postgresql"] = TreeSampler(pg_pid, True)
        # Not a figure of the server's: says whether the simulator kept up.
        samplers["simulator"] = TreeSampler(os.getpid(), False)
        for sampler in samplers.values():
            sampler.start()
        counts0 = sim.counters()
        lag = LagMeter(self.reactor)
        stored0 = await self.blocking(query, dsn, "SELECT count(*) FROM results")
        t0 = datetime.now(UTC)
        profiler = self.profile(replicas[0]) if args.profile else None
        observer = await self.blocking(self.observe)
        t1 = datetime.now(UTC)
        stored1 = await self.blocking(query, dsn, "SELECT count(*) FROM results")
        counts1 = sim.counters()
        lags = lag.finish()
        used = {name: s.finish() for name, s in samplers.items()}
        seconds = (t1 - t0).total_seconds()
        fleet_ids = [t["task_id"] for t in tasks if t["holders"] > 1]
        complete = await self.blocking(self.fleet_executions, dsn, fleet_ids, t0, t1)
        self.report(args, used, observer, seconds, stored1[0][0] - stored0[0][0], complete)
        self.figure(
            "simulator's reactor lag in the window, p99",
            lags["p99_ms"],
            "ms",
            **lags,
            why="the fleet's requests wait this long in the simulator before they are sent",
        )
        if profiler is not None:
            await self.blocking(self.profiled, profiler)
        self.figure(
            "results acknowledged to the fleet in the window",
            counts1["acknowledged"] - counts0["acknowledged"],
            "results",
            leases_on_branch=leases,
            delivery="leases: each agent's tasks from one replica"
            if leases
            else "no leases yet: both replicas deliver every task to every agent",
            enrol_s=round(enrol_s, 1),
            delivered_s=round(delivered_s, 1),
            holdings=held,
            before=counts0,
            after=counts1,
        )
        if args.kill_phase > 0:
            await self.kill_phase(sim, replicas[1])
        await sim.stop()
        # Nothing the servers acknowledged is missing (in flight at the stop: stored, not
        # acknowledged, so the database may hold a few more).
        stored_all = (await self.blocking(query, dsn, "SELECT count(*) FROM results"))[0][0]
        acknowledged = sim.reporter.stats.acknowledged
        self.figure(
            "acknowledged results missing from the database",
            max(0, acknowledged - stored_all),
            "results",
            acknowledged=acknowledged,
            stored=stored_all,
            refused=sum(sim.reporter.stats.refused.values()),
            waiting_at_stop=sim.reporter.waiting(),
        )

    async def kill_phase(self, sim: SimFleet, victim: Daemon) -> None:
        """SIGKILL one replica under the fleet: how long its agents' results then take
        from their instant to their acknowledgement (by the other replica, once they
        have failed over), over ``--kill-phase`` s."""
        url = self.urls[victim.name]
        moved = {a.index for a in sim.agents if a.client.url == url}
        failovers = sim.counters()["failovers"]
        killed = time.time()
        await self.blocking(victim.kill)
        await _sleep(self.reactor, self.args.kill_phase)
        late = sorted(
            acked - instant
            for index, instant, acked in sim.reporter.stats.acks
            if index in moved and instant >= killed - 1.0
        )
        self.figure(
            f"{victim.name} SIGKILLed: its agents' instant -> acknowledged, max",
            round(late[-1], 2) if late else None,
            "s",
            p50_s=round(percentile(late, 50), 3) if late else None,
            p99_s=round(percentile(late, 99), 3) if late else None,
            results=len(late),
            agents=len(moved),
            failovers=sim.counters()["failovers"] - failovers,
            still_on_victim=len([a for a in sim.agents if a.client.url == url]),
            waiting=sim.reporter.waiting(),
            phase_s=self.args.kill_phase,
        )

    def create_tasks(self, apis: list[Operator], sim: SimFleet) -> list[dict[str, Any]]:
        """The fleet-wide tasks (paced over one interval) and the one-agent probe tasks."""
        args = self.args
        out = []
        gap = args.interval / max(1, args.fleet_tasks)
        for i in range(args.fleet_tasks + args.probes):
            fleet_wide = i < args.fleet_tasks
            interval = args.interval if fleet_wide else args.probe_interval
            body: dict[str, Any] = {
                "command": ":",
                "frequency": f"every {interval:g} seconds",
            }
            if not fleet_wide:
                agent = sim.agents[(i * 7919) % len(sim.agents)]
                body["target"] = {"agents": [str(agent.agent_id)]}
            code, answer = apis[i % len(apis)].request("POST", "/api/v1/tasks/create", body)
            if code != 201:
                raise RuntimeError(f"create answered {code} {answer}")
            out.append(
                {
                    "task_id": answer["command_id"],
                    "first": answer["next_instants"][0],
                    "interval": interval,
                    "holders": len(sim.agents) if fleet_wide else 1,
                }
            )
            if fleet_wide and i + 1 < args.fleet_tasks:
                time.sleep(gap)
        return out

    def profile(self, replica: Daemon) -> subprocess.Popen[bytes]:
        assert replica.process is not None
        return start_py_spy(replica.process.pid, self.args.profile, self.root / "profile.txt")

    def profiled(self, profiler: subprocess.Popen[bytes]) -> None:
        profiler.wait(timeout=self.args.profile + 60)
        path = self.root / "profile.txt"
        if not path.exists():
            print("  py-spy wrote no profile", file=sys.stderr)
            return
        top = profile_top(path.read_text())
        print("  replica-a, py-spy, share of samples (leaf | taskscheduler's, on the stack):")
        for (own, share), (frame, whole) in zip(top["own"], top["ours"], strict=False):
            print(f"    {share:6.1%} {own[:60]:60} | {whole:6.1%} {frame[:70]}")
        self.figure("replica-a profiled (py-spy), samples", None, "", **top)

    def observe(self) -> dict[str, Any]:
        out = self.root / "observed.json"
        command = [sys.executable, str(BENCH / "replicaprobe.py"), str(self.root / "observer.json")]
        subprocess.run([*command, str(out)], check=True, timeout=self.args.window + 300)
        return dict(json.loads(out.read_text()))

    @staticmethod
    def fleet_executions(
        dsn: str, task_ids: list[str], t0: datetime, t1: datetime
    ) -> list[tuple[int, float]]:
        """(results, seconds from the instant to the last one stored) of each fleet-wide
        execution whose instant is in the window."""
        if not task_ids:
            return []
        rows = query(
            dsn,
            "SELECT count(*), extract(epoch FROM max(received_at) - scheduled_at)"
            " FROM results WHERE task_id = ANY(%s::uuid[]) AND scheduled_at BETWEEN %s AND %s"
            " GROUP BY task_id, scheduled_at",
            (task_ids, t0, t1),
        )
        return [(int(n), float(s)) for n, s in rows]

    def report(
        self,
        args: argparse.Namespace,
        used: dict[str, dict[str, Any]],
        observed: dict[str, Any],
        seconds: float,
        stored: int,
        complete: list[tuple[int, float]],
    ) -> None:
        for name, figures in used.items():
            self.figure(f"{name} CPU", figures["cpu_cores"], "cores", **figures)
            memory = figures["pss_mb_max"] if name == "postgresql" else figures["rss_mb_max"]
            kind = "PSS, all its processes" if name == "postgresql" else "RSS"
            self.figure(f"{name} memory ({kind}), max", memory, "MB", **figures)
        latencies = latency_figures(observed["samples"])
        for kind in ("latest_output", "history", "task_list", "create"):
            row = latencies.get(kind, {})
            self.figure(
                f"p99 {kind.replace('task_list', 'task list')} under the fleet",
                row.get("p99_ms"),
                "ms",
                **row,
            )
        fresh = freshness_figures(observed["freshness"])
        self.figure(
            "freshness p50, instant -> latest_output",
            fresh["p50_ms"],
            "ms",
            **fresh,
        )
        self.figure(
            "freshness p99, instant -> latest_output",
            fresh["p99_ms"],
            "ms",
            **fresh,
        )
        offered = args.agents * args.fleet_tasks / args.interval + args.probes / args.probe_interval
        self.figure(
            "results stored/s in the window",
            round(stored / seconds, 1),
            "/s",
            offered_per_s=round(offered, 1),
            window_s=round(seconds, 1),
        )
        whole = sorted(s for n, s in complete if n >= args.agents)
        self.figure(
            f"instant -> last of {args.agents} results stored, p99",
            round(1000 * percentile(whole, 99), 1) if whole else None,
            "ms",
            executions=len(complete),
            complete=len(whole),
            p50_ms=round(1000 * percentile(whole, 50), 1) if whole else None,
        )

    async def close(self) -> None:
        await self.blocking(stop_daemons, self.daemons)
        if self.pg is not None:
            await self.blocking(self.pg.close, True)
        if self.args.keep:
            print(f"kept {self.root}", file=sys.stderr)
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def _healthy(daemon: Daemon, url: str) -> bool:
    daemon.assert_running()
    code, _ = http("GET", url + "/api/v1/health", timeout=5)
    return bool(code == 200)


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--agents", type=int)
    parser.add_argument("--fleet-tasks", type=int)
    parser.add_argument("--interval", type=float)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--probe-interval", type=float, default=2.0)
    parser.add_argument("--window", type=float)
    parser.add_argument("--ports", type=int)
    parser.add_argument("--heartbeat-interval", type=float, default=10.0)
    parser.add_argument("--create-rate", type=float, default=1.0)
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--read-gap", type=float, default=0.1)
    parser.add_argument("--pollers", type=int, default=4)
    parser.add_argument("--poll-gap", type=float, default=0.02)
    parser.add_argument("--delivery-timeout", type=float, default=300.0)
    parser.add_argument(
        "--kill-phase", type=float, default=20.0, help="s after SIGKILL of replica-b (0: none)"
    )
    parser.add_argument(
        "--profile", type=float, default=0.0, help="py-spy replica-a for S s of the window"
    )
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    quick = args.quick
    args.agents = args.agents or (50 if quick else 1000)
    args.fleet_tasks = args.fleet_tasks or (3 if quick else 5)
    args.interval = args.interval or (5.0 if quick else 10.0)
    args.window = args.window or (30.0 if quick else 120.0)
    args.ports = args.ports or (25 if quick else 500)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from twisted.internet import reactor, task

    args = parse_args(argv)
    reactor.suggestThreadPoolSize(8)  # type: ignore[attr-defined]
    figures: list[Figure] = []

    async def run(r: Any) -> None:
        bench = Run(r, args)
        try:
            await bench.main()
        finally:
            figures.extend(bench.figures)
            await bench.close()

    code = 0
    try:
        task.react(lambda r: Deferred.fromCoroutine(run(r)))
    except SystemExit as e:
        code = int(e.code or 0)
    for figure in figures:
        emit(args.json_out, figure)
    return code if figures else (code or 1)


if __name__ == "__main__":
    sys.exit(main())
