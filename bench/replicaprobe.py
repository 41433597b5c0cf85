"""The users' side of scenario 8 (``bench/bench_replicas.py``), in a process of its own
so that the simulated fleet's reactor does not stretch its timings: operators reading
and creating through the REST API while the fleet runs, and the freshness of results.

:func:`observe` runs, for ``window`` seconds, with the operator's token over kept-alive
connections, each request sent to the replicas in turn:

- ``readers`` threads, each sending a read every ``read_gap`` s, the kinds in turn:
  ``latest_output`` of a probe task, a history page (``/executions?limit=20``) of one,
  and the task list (``/api/v1/tasks?limit=100``);
- one creator, ``create_rate`` creates a second (tasks ``every 24 hours`` targeted at
  one simulated agent each: a create is measured, not a fan-out to the fleet);
- ``pollers`` threads, each taking the probe tasks in turn: from the task's next
  instant, ``latest_output`` every ``poll_gap`` s until it shows that instant; the
  freshness is the moment that answer arrived minus the instant.

It writes what it saw as JSON to ``out``; :func:`latency_figures` and
:func:`freshness_figures` (pure, unit-tested) make the figures of it.
:class:`TreeSampler` (the daemons' CPU and memory), :class:`LagMeter` (the simulator's
own lateness) and :func:`start_py_spy` are the bench's other instruments.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
from twisted.internet.task import LoopingCall

from bench.loadapi import Operator
from bench.loadkit import percentile

READ_KINDS = ("latest_output", "history", "task_list")
GIVE_UP = 30.0


def parse_instant(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def latency_figures(samples: Iterable[Sequence[Any]]) -> dict[str, dict[str, Any]]:
    """``samples``: (kind, replica, seconds, status) -> per kind: n, p50/p99/max in ms
    over the answered ones, errors (no answer or a status >= 400), and p99 per replica."""
    by_kind: dict[str, list[tuple[str, float, int]]] = {}
    for kind, replica, seconds, status in samples:
        by_kind.setdefault(kind, []).append((replica, seconds, status))
    out: dict[str, dict[str, Any]] = {}
    for kind, rows in sorted(by_kind.items()):
        good = sorted(s for _, s, status in rows if 0 < status < 400)
        figures: dict[str, Any] = {"n": len(rows), "errors": len(rows) - len(good)}
        figures.update(_ms_spread(good))
        figures["p99_by_replica"] = {
            replica: _ms_spread(sorted(s for r, s, st in rows if r == replica and 0 < st < 400))[
                "p99_ms"
            ]
            for replica in sorted({r for r, _, _ in rows})
        }
        out[kind] = figures
    return out


def _ms_spread(ordered: Sequence[float]) -> dict[str, float | None]:
    if not ordered:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "p50_ms": round(1000 * percentile(ordered, 50), 2),
        "p99_ms": round(1000 * percentile(ordered, 99), 2),
        "max_ms": round(1000 * ordered[-1], 2),
    }


def freshness_figures(seen: Iterable[float | None]) -> dict[str, Any]:
    """``seen``: seconds from each probed instant to the answer showing it (None: never
    shown within the give-up time) -> n, never, p50/p99/max in ms."""
    values = list(seen)
    shown = sorted(v for v in values if v is not None)
    return {"n": len(values), "never": len(values) - len(shown), **_ms_spread(shown)}


def profile_top(raw: str, n: int = 15) -> dict[str, Any]:
    """py-spy's ``--format raw`` (``frame;frame;... count`` per line, leaf last) ->
    the ``n`` functions with the largest share of samples: ``own`` (the leaf), and
    ``ours`` (taskscheduler's functions anywhere on the stack, once per sample)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in {f for f in frames if "taskscheduler/" in f}:
            total[frame] = total.get(frame, 0) + count

    def top(counts: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(counts.items(), key=lambda item: -item[1])[:n]
        return [(frame, round(count / samples, 4)) for frame, count in ranked]

    return {"own": top(own), "ours": top(total), "samples": samples}


def next_instant(first: datetime, interval: float, after: datetime) -> datetime:
    """The first instant of ``first + k * interval`` (k >= 0) strictly after ``after``."""
    if after < first:
        return first
    k = int((after - first).total_seconds() // interval) + 1
    return first + timedelta(seconds=k * interval)


class TreeSampler(threading.Thread):
    """CPU and memory of a process and (``tree``) its children, every ``interval`` s."""

    def __init__(self, pid: int, tree: bool, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.tree = tree
        self.interval = interval
        self.stopping = threading.Event()
        self.rss: list[int] = []
        self.pss: list[int] = []
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds when first seen
        self.last: dict[int, float] = {}
        self.t0 = time.monotonic()
        self._sample(first=True)

    def processes(self) -> list[psutil.Process]:
        try:
            return [self.root, *(self.root.children(recursive=True) if self.tree else [])]
        except psutil.Error:
            return []

    def _sample(self, first: bool = False) -> None:
        rss = pss = 0
        for process in self.processes():
            try:
                times = process.cpu_times()
                memory = process.memory_full_info() if self.tree else process.memory_info()
            except psutil.Error:
                continue
            seconds = times.user + times.system
            # A process born during the window counts from zero.
            self.cpu.setdefault(process.pid, seconds if first else 0.0)
            self.last[process.pid] = seconds
            rss += memory.rss
            pss += getattr(memory, "pss", memory.rss)
        self.rss.append(rss)
        self.pss.append(pss)

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self._sample()

    def finish(self) -> dict[str, Any]:
        self.stopping.set()
        self.join(10)
        self._sample()
        elapsed = time.monotonic() - self.t0
        used = sum(self.last[pid] - self.cpu[pid] for pid in self.last)
        return {
            "cpu_cores": round(used / elapsed, 3) if elapsed else None,
            "rss_mb_max": round(max(self.rss, default=0) / 2**20, 1),
            "pss_mb_max": round(max(self.pss, default=0) / 2**20, 1),
            "processes": len(self.last),
        }


class LagMeter:
    """How late the simulator's reactor runs a timer due every ``interval`` s: while it
    is late, the simulated agents' requests wait in it too."""

    def __init__(self, reactor: Any, interval: float = 0.05) -> None:
        self.lags: list[float] = []
        self.interval = interval
        self.loop = LoopingCall(self._tick)
        self.loop.clock = reactor
        self.reactor = reactor
        self.due = reactor.seconds()
        self.loop.start(interval, now=True)

    def _tick(self) -> None:
        now = self.reactor.seconds()
        self.lags.append(max(0.0, now - self.due))
        self.due = now + self.interval

    def finish(self) -> dict[str, Any]:
        self.loop.stop()
        ordered = sorted(self.lags)
        if not ordered:
            return {"p50_ms": None, "p99_ms": None, "max_ms": None}
        return {
            "p50_ms": round(1000 * percentile(ordered, 50), 1),
            "p99_ms": round(1000 * percentile(ordered, 99), 1),
            "max_ms": round(1000 * ordered[-1], 1),
        }


def start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy (of this venv) on ``pid`` for ``seconds``, raw stacks to ``out``; it does
    not pause the process, and samples 50 times a second."""
    spy = str(Path(sys.executable).with_name("py-spy"))
    command = [spy, "record", "--pid", str(pid), "--nonblocking", "--rate", "50"]
    command += ["--duration", str(int(seconds)), "--format", "raw", "--output", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Observer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.apis = [
            Operator(SimpleNamespace(server_url=url, operator_token=config["token"]))  # type: ignore[arg-type]
            for url in config["servers"]
        ]
        self.lock = threading.Lock()
        self.samples: list[tuple[str, str, float, int]] = []
        self.freshness: list[float | None] = []
        self.stopping = threading.Event()
        self.turn = 0

    def timed(self, kind: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        with self.lock:
            self.turn += 1
            index = self.turn % len(self.apis)
        api = self.apis[index]
        sent = time.monotonic()
        try:
            status, answer = api.request(method, path, body)
        except Exception:
            status, answer = 0, None
        took = time.monotonic() - sent
        with self.lock:
            self.samples.append((kind, "ab"[index] if index < 2 else str(index), took, status))
        return status, answer

    def reader(self, offset: int) -> None:
        probes = self.config["probes"]
        i = offset
        while not self.stopping.is_set():
            kind = READ_KINDS[i % len(READ_KINDS)]
            task = probes[(i // len(READ_KINDS)) % len(probes)]["task_id"]
            path = {
                "latest_output": f"/api/v1/tasks/{task}/latest_output",
                "history": f"/api/v1/tasks/{task}/executions?limit=20",
                "task_list": "/api/v1/tasks?limit=100",
            }[kind]
            self.timed(kind, "GET", path)
            i += 1
            self.stopping.wait(self.config["read_gap"])

    def creator(self) -> None:
        rate = self.config["create_rate"]
        if rate <= 0:
            return
        targets = self.config["create_targets"]
        started = time.monotonic()
        for i in range(10**9):
            due = started + i / rate
            if self.stopping.wait(max(0.0, due - time.monotonic())):
                return
            body = {
                "command": ":",
                "frequency": "every 24 hours",
                "target": {"agents": [targets[i % len(targets)]]},
            }
            self.timed("create", "POST", "/api/v1/tasks/create", body)

    def poller(self, offset: int) -> None:
        probes = self.config["probes"][offset :: self.config["pollers"]]
        gap = self.config["poll_gap"]
        i = 0
        while probes and not self.stopping.is_set():
            probe = probes[i % len(probes)]
            i += 1
            first = parse_instant(probe["first"])
            # The next instant at least 50 ms away: the poll starts at it.
            at = next_instant(first, probe["interval"], datetime.now(UTC) + timedelta(seconds=0.05))
            if self.stopping.wait(max(0.0, (at - datetime.now(UTC)).total_seconds())):
                return
            path = f"/api/v1/tasks/{probe['task_id']}/latest_output"
            while not self.stopping.is_set():
                status, body = self.timed("poll", "GET", path)
                now = datetime.now(UTC)
                shown = body.get("scheduled_at") if status == 200 and body else None
                if shown is not None and parse_instant(shown) >= at:
                    with self.lock:
                        self.freshness.append((now - at).total_seconds())
                    break
                if (now - at).total_seconds() > GIVE_UP:
                    with self.lock:
                        self.freshness.append(None)
                    break
                self.stopping.wait(gap)

    def run(self) -> dict[str, Any]:
        threads = [
            threading.Thread(target=self.reader, args=(i,)) for i in range(self.config["readers"])
        ]
        threads.append(threading.Thread(target=self.creator))
        threads += [
            threading.Thread(target=self.poller, args=(i,)) for i in range(self.config["pollers"])
        ]
        for thread in threads:
            thread.daemon = True
            thread.start()
        self.stopping.wait(self.config["window"])
        self.stopping.set()
        for thread in threads:
            thread.join(timeout=70)
        with self.lock:
            return {"samples": list(self.samples), "freshness": list(self.freshness)}


def observe(config: dict[str, Any], out: str) -> None:
    """Run the observer with ``config`` (JSON-able) and write what it saw to ``out``."""
    Path(out).write_text(json.dumps(Observer(config).run()))


if __name__ == "__main__":
    # python bench/replicaprobe.py CONFIG.json OUT.json
    observe(json.loads(Path(sys.argv[1]).read_text()), sys.argv[2])
