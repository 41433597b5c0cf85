"""What the load scenarios share: the real daemons started and stopped, each sampled
(``/proc`` and health) and its log watched over a measured window, and the small helpers
of their figures (percentiles, µs since the epoch). The database and the operator's API
are in ``loadapi.py``. Used by ``bench_agent_load.py`` (scenarios 1 and 2) and by any
scenario script that runs real agents.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.daemons import Daemon, Fleet, http, wait_for

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MICRO = timedelta(microseconds=1)
US = 1_000_000
HEALTH_TIMEOUT = 10.0
#: Twisted's text log: ``<time> [<namespace>#<level>] <message>``.
LOG_LEVEL = re.compile(r"^\S+ \[[^\]#]*#(warn|error|critical)\] (.*)$")


def micros(value: datetime) -> int:
    return (value - EPOCH) // MICRO


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def spread(values: Iterable[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {
        "n": len(ordered),
        "p50": round(percentile(ordered, 50), 4),
        "p99": round(percentile(ordered, 99), 4),
        "max": round(ordered[-1], 4),
    }


def seconds(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}s"


def fraction(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole else None


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


# -- processes -------------------------------------------------------------------------------


def stop_daemons(daemons: Sequence[Daemon], grace: float = 20.0) -> None:
    """SIGTERM every live daemon at once, SIGKILL those still alive after ``grace`` s."""
    live = [d for d in daemons if d.process is not None and d.process.poll() is None]
    for daemon in live:
        assert daemon.process is not None
        with contextlib.suppress(ProcessLookupError):
            daemon.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for daemon in live:
        assert daemon.process is not None
        try:
            daemon.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"  {daemon.name} ignored SIGTERM for {grace:g} s: SIGKILL", file=sys.stderr)
            daemon.process.kill()
            daemon.process.wait()


def listening(daemon: Daemon, port: int) -> Callable[[], bool]:
    """Whether the daemon's log says it listens on ``port`` (not a stranger answering)."""
    return lambda: f"Site starting on {port}" in daemon.log()


def start_fleet(root: Path, agents: int, dsn: str, started: list[Daemon]) -> Fleet:
    """A fleet whose daemons really listen on their own ports (``free_port`` can race).

    Every daemon goes into ``started`` before it starts, so that the caller stops it
    whatever happens next."""
    for attempt in range(3):
        fleet = Fleet(root / f"fleet-{attempt}", agents, dsn)
        # The load measured is the agent's: creation is not rate-limited here.
        fleet.server.env["TASKSCHEDULER_CREATE_RATE"] = "0"
        ports = [fleet.server_port, *fleet.agent_ports]
        if len(set(ports)) != len(ports):
            continue
        daemons = [fleet.server, *fleet.agents]
        started.extend(daemons)
        try:
            fleet.start()
            for daemon, port in zip(daemons, ports, strict=True):
                wait_for(listening(daemon, port), 10, f"{daemon.name} to listen on {port}")
            return fleet
        except AssertionError as e:
            print(f"  fleet attempt {attempt} failed: {e}\n{fleet.logs()}", file=sys.stderr)
            stop_daemons(daemons)
    raise RuntimeError("could not start a fleet on free ports in 3 attempts")


@dataclass
class ProcStat:
    """What ``/proc`` says of one process; zeros once it is gone."""

    pid: int

    def fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return 0

    def rss_bytes(self) -> int:
        try:
            with open(f"/proc/{self.pid}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process itself (not of its reaped children)."""
        try:
            with open(f"/proc/{self.pid}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return 0.0


class Sampler(threading.Thread):
    """Samples one daemon every ``interval`` s: fds, RSS, health latency and counters."""

    def __init__(self, name: str, pid: int, health_url: str | None, interval: float) -> None:
        super().__init__(name=f"sampler-{name}", daemon=True)
        self.proc = ProcStat(pid)
        self.health_url = health_url
        self.interval = interval
        self.stopping = threading.Event()
        self.fds: list[int] = []
        self.rss: list[int] = []
        self.health: list[float] = []
        self.health_failed = 0
        self.counters: dict[str, int] = collections.defaultdict(int)
        self._cpu0 = self.proc.cpu_seconds()
        self._t0 = time.monotonic()
        self.cpu_share: float | None = None

    def run(self) -> None:
        while not self.stopping.is_set():
            began = time.monotonic()
            self.fds.append(self.proc.fds())
            self.rss.append(self.proc.rss_bytes())
            if self.health_url is not None:
                self._probe_health()
            self.stopping.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def _probe_health(self) -> None:
        assert self.health_url is not None
        sent = time.monotonic()
        try:
            code, body = http("GET", self.health_url, timeout=HEALTH_TIMEOUT)
        except Exception:
            self.health_failed += 1
            return
        if code != 200 or not isinstance(body, dict):
            self.health_failed += 1
            return
        self.health.append(time.monotonic() - sent)
        for name in ("running", "spooled"):
            if isinstance(body.get(name), int):
                self.counters[name] = max(self.counters[name], body[name])

    def finish(self) -> None:
        self.stopping.set()
        self.join(timeout=HEALTH_TIMEOUT + 5)
        elapsed = time.monotonic() - self._t0
        self.cpu_share = (self.proc.cpu_seconds() - self._cpu0) / elapsed if elapsed else None

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fds_max": max(self.fds, default=None),
            "rss_mb_max": round(max(self.rss, default=0) / 2**20, 1),
            "cpu_share": None if self.cpu_share is None else round(self.cpu_share, 3),
        }
        if self.health_url is not None:
            out["health_s"] = {**spread(self.health), "failed": self.health_failed}
            out["running_max"] = self.counters.get("running")
            out["spooled_max"] = self.counters.get("spooled")
        return out


class LogWindow:
    """Warnings and errors a daemon logs from now until :meth:`close`."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.offset = self._size()
        self.levels: collections.Counter[str] = collections.Counter()
        self.shapes: collections.Counter[str] = collections.Counter()

    def _size(self) -> int:
        try:
            return self.daemon.log_path.stat().st_size
        except OSError:
            return 0

    def close(self) -> None:
        with open(self.daemon.log_path, "rb") as log:
            log.seek(self.offset)
            text = log.read(self._size() - self.offset).decode("utf-8", "replace")
        for line in text.splitlines():
            match = LOG_LEVEL.match(line)
            if match:
                self.levels[match.group(1)] += 1
                # One shape per message: ids, instants and numbers blanked.
                shape = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<id>", match.group(2))
                self.shapes[re.sub(r"\d+(\.\d+)?", "N", shape)[:110]] += 1

    def figures(self) -> dict[str, int]:
        return dict(self.levels)

    def top(self, n: int = 3) -> list[str]:
        return [f"{count} x {shape}" for shape, count in self.shapes.most_common(n)]


def sigterm_seconds(daemon: Daemon, timeout: float) -> float | None:
    """Seconds from SIGTERM until the daemon exits; None if it had to be SIGKILLed."""
    assert daemon.process is not None
    sent = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    try:
        daemon.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        daemon.process.kill()
        daemon.process.wait()
        return None
    return time.monotonic() - sent


# -- scenarios -------------------------------------------------------------------------------


@dataclass
class Window:
    """Samplers and log watchers over one measurement window."""

    fleet: Fleet
    interval: float
    samplers: list[Sampler] = field(default_factory=list)
    logs: list[LogWindow] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i, daemon in enumerate(self.fleet.agents):
            assert daemon.process is not None
            url = f"{self.fleet.agent_urls[i]}/api/v1/health"
            self.samplers.append(Sampler(daemon.name, daemon.process.pid, url, self.interval))
        server = self.fleet.server
        assert server.process is not None
        self.samplers.append(Sampler("server", server.process.pid, None, self.interval))
        self.logs = [LogWindow(d) for d in [*self.fleet.agents, self.fleet.server]]
        for sampler in self.samplers:
            sampler.start()

    def close(self) -> None:
        for sampler in self.samplers:
            sampler.finish()
        for log in self.logs:
            log.close()

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for sampler, log in zip(self.samplers, self.logs, strict=True):
            out[sampler.name.removeprefix("sampler-")] = {
                **sampler.figures(),
                "log": log.figures(),
            }
        return out

    def top_logs(self) -> list[str]:
        return [f"{log.daemon.name}: {line}" for log in self.logs for line in log.top()]


def measure_window(
    fleet: Fleet, args: argparse.Namespace, length: float
) -> tuple[int, int, Window]:
    """Sample the fleet for ``length`` s from now; the window's bounds in µs."""
    start = micros(datetime.now(UTC))
    window = Window(fleet, args.sample_interval)
    try:
        time.sleep(length)
    finally:
        window.close()
    return start, start + int(length * US), window


def environment() -> dict[str, Any]:
    try:
        version = metadata.version("taskscheduler")
    except metadata.PackageNotFoundError:
        version = None
    return {
        "taskscheduler": version,
        "venv": sys.prefix,
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def run_in_folder(
    scenario: str, prefix: str, keep: bool, measure: Callable[[Path, list[Daemon]], dict[str, Any]]
) -> dict[str, Any] | None:
    """``measure(folder, daemons)`` in a new temporary folder, SIGTERM taken as Ctrl-C; on
    a failure the daemons' last log lines and the error on stderr, and None. The folder
    is removed unless ``keep``; the daemons ``measure`` started are its to stop."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    daemons: list[Daemon] = []

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    print(f"== {scenario}: taskscheduler {environment()['taskscheduler']}; folder {root}")
    try:
        return measure(root, daemons)
    except BaseException as e:
        for daemon in daemons:
            print(f"--- {daemon.name}\n{daemon.log()[-2000:]}", file=sys.stderr)
        print(f"could not measure: {e!r}", file=sys.stderr)
        return None
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
