"""How fast can the agent start commands? Hand-run; prints figures, asserts nothing.

    PYTHONPATH=src python bench/bench_spawn.py [--runs 2000] [--rounds 3] [--concurrency 16]

Each variant starts ``--runs`` processes running ``true`` (at most ``--concurrency`` at a
time) on the real reactor and reports completed starts per second (spawn to processEnded),
and the mean time one ``spawnProcess`` call blocks the reactor:

- ``posix_spawn``: plain ``/bin/sh -c true``; Twisted's fast path, no group of its own.
- ``setsid+posix_spawn``: ``/usr/bin/setsid /bin/sh -c true``, what the runner does.
- ``fork``: plain ``/bin/sh -c true`` with ``path=`` set, which makes Twisted fork.
- ``POSIX_SPAWN_SETSID``: ``/bin/sh -c true`` through a subclass of Twisted's private
  ``Process`` that passes ``setsid=True`` to ``os.posix_spawnp``: the ceiling for a new
  session, shown for comparison only (private API, not used by the runner).
- ``runner, ...``: ``ProcessRunner.run`` end to end, as the agent runs a command: the
  supervising shell, output files, the run record, timers, reading the output, removing
  the files; with the process group only, a cgroup per run (where this process may make
  cgroups), and the runner's process as child subreaper; and with a task's working
  directory (the shell's ``cd``, group only).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, process, task, threads
from twisted.internet.protocol import ProcessProtocol

from taskscheduler.agent.containment import (
    CgroupContainment,
    SubreaperContainment,
    own_cgroup_dir,
)
from taskscheduler.agent.runner import ProcessRunner
from taskscheduler.agent.runprocess import SETSID

ENV = {"PATH": "/usr/bin:/bin"}
CHILD_FDS: dict[int, int | str] = {0: "w", 1: "r", 2: "r"}


class _Done(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.closeStdin()  # type: ignore[union-attr]

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


class _SetsidProcess(process.Process):
    """Twisted's Process, but its posix_spawnp call also asks for a new session."""

    def _trySpawnInsteadOfFork(  # type: ignore[no-untyped-def]
        self, path, uid, gid, executable, args, environment, kwargs
    ):
        fd_state: list[tuple[int, bool]] = []
        for fd in process._listOpenFDs():
            with contextlib.suppress(OSError):
                fd_state.append((fd, bool(fcntl.fcntl(fd, fcntl.F_GETFD, fcntl.FD_CLOEXEC))))
        ignored = [s for s in range(1, signal.NSIG) if signal.getsignal(s) == signal.SIG_IGN]
        self.pid = os.posix_spawnp(
            executable,
            args,
            environment,
            file_actions=process._getFileActions(
                fd_state,
                kwargs["fdmap"],
                doClose=os.POSIX_SPAWN_CLOSE,
                doDup2=os.POSIX_SPAWN_DUP2,
            ),
            setsigdef=ignored,
            setsid=True,
        )
        self.status = -1
        return True


def variants(reactor: Any) -> dict[str, Callable[[], defer.Deferred[Any]]]:
    sh = ["/bin/sh", "-c", "true"]
    # Any directory other than the current one makes Twisted fork.
    elsewhere = "/" if os.path.abspath(".") != "/" else "/tmp"

    def spawning(executable: str, args: list[str], **kw: Any) -> Callable[[], Any]:
        def start() -> defer.Deferred[None]:
            proto = _Done()
            reactor.spawnProcess(proto, executable, args, env=ENV, childFDs=CHILD_FDS, **kw)
            return proto.ended

        return start

    def setsid_flag() -> defer.Deferred[None]:
        proto = _Done()
        _SetsidProcess(reactor, "/bin/sh", sh, ENV, None, proto, None, None, dict(CHILD_FDS))
        return proto.ended

    def through(
        runner: ProcessRunner, working_dir: str | None = None
    ) -> Callable[[], defer.Deferred[Any]]:
        def start() -> defer.Deferred[Any]:
            # As the scheduler does: the run's files go once its result is safe.
            key = (uuid.uuid4(), datetime.now(UTC))
            d = runner.run("true", 60, key=key, working_dir=working_dir)
            return d.addCallback(lambda _: runner.discard(key))

        return start

    def make_runner(containment: Any = None) -> ProcessRunner:
        runner = ProcessRunner(
            reactor,
            ENV,
            Path(tempfile.mkdtemp(prefix="bench-spawn-")),
            containment=containment,
            run_in_thread=lambda f: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f),
        )
        return runner

    found = {
        "posix_spawn": spawning("/bin/sh", sh),
        "setsid+posix_spawn": spawning(SETSID, [SETSID, *sh]),
        "fork": spawning("/bin/sh", sh, path=elsewhere),
        "POSIX_SPAWN_SETSID": setsid_flag,
        "runner, group only": through(make_runner()),
        "runner, working_dir": through(make_runner(), tempfile.gettempdir()),
    }
    own = own_cgroup_dir()
    try:
        assert own is not None
        cgroups = CgroupContainment.probe(own / f"bench-spawn-{os.getpid()}")
    except (AssertionError, OSError) as e:
        print(f"(no cgroup variant: {e})")
    else:
        found["runner, cgroup"] = through(make_runner(cgroups))
    subreaped = make_runner()
    subreaped.containment = SubreaperContainment(subreaped.is_run_shell, subreaped.live_markers)
    found["runner, subreaper"] = through(subreaped)
    return found


async def measure(
    start: Callable[[], defer.Deferred[Any]], runs: int, concurrency: int
) -> tuple[float, float]:
    """(completed starts per second, mean seconds one start call blocks the reactor)."""
    semaphore = defer.DeferredSemaphore(concurrency)
    blocked = 0.0

    def one() -> defer.Deferred[Any]:
        nonlocal blocked
        t = time.perf_counter()
        d = start()
        blocked += time.perf_counter() - t
        return d

    began = time.perf_counter()
    await defer.gatherResults([semaphore.run(one) for _ in range(runs)])
    return runs / (time.perf_counter() - began), blocked / runs


async def main(reactor: Any, argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)

    starts = variants(reactor)
    rates: dict[str, list[float]] = {name: [] for name in starts}
    blocks: dict[str, list[float]] = {name: [] for name in starts}
    for start in starts.values():  # warm up: page cache, dynamic loader
        await measure(start, 100, args.concurrency)
    for _ in range(args.rounds):  # interleaved rounds spread machine noise over variants
        for name, start in starts.items():
            rate, block = await measure(start, args.runs, args.concurrency)
            rates[name].append(rate)
            blocks[name].append(block)

    print(
        f"{args.runs} starts x {args.rounds} rounds, concurrency {args.concurrency}, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {type(reactor).__name__}"
    )
    baseline = statistics.median(rates["posix_spawn"])
    print(f"{'variant':<20} {'starts/s (median)':>18} {'best':>8} {'vs plain':>9} {'blocks':>10}")
    for name in starts:
        median = statistics.median(rates[name])
        print(
            f"{name:<20} {median:>18.0f} {max(rates[name]):>8.0f} "
            f"{median / baseline:>8.2f}x {statistics.median(blocks[name]) * 1e6:>8.0f}us"
        )


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, sys.argv[1:])))
