"""Scenario 5: step an agent's wall clock by an hour, back and forth, on a real daemon.

The agent runs under ``steppable_twistd.py``: its reactor's clock (the wall clock it
schedules and labels runs by) is the system's plus an offset the test writes to a file,
while its monotonic clock runs on undisturbed, as when NTP or an operator steps the
system clock. The server's clock is left alone.

Sequence: back an hour (the labels keep their pace: the agent's clock is now an hour
slow, and its runs still line up with the server's); forward an hour (the lead is spent:
nothing skipped, nothing repeated); forward an hour (skip ahead: no burst of catch-up
runs); back an hour (labels keep their pace, an hour ahead); forward an hour (the lead
spent again); back ten seconds, then the agent is SIGKILLed and restarted while its
labels run ten seconds ahead of its clock (it must not run those ten seconds' instants
again: the server would refuse the second results with 409, and the agent drop them).
After each step, and after the restart, a run follows within a couple of seconds (no
stall), labels only ever increase, none repeats, no result is refused, and the runs
counted never exceed the seconds elapsed (no burst).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskscheduler.schedule import format_instant, parse_instant, utc_now_from
from tests.faults.harness import (
    agent_health,
    assert_sound,
    create_witnessed_task,
    drain,
    report,
    start_fleet,
    wait_agent_up,
    witnessed,
)
from tests.integration.daemons import Daemon, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.faults]

HOUR = 3600.0
STEPPABLE = str(Path(__file__).with_name("steppable_twistd.py"))


class SteppableDaemon(Daemon):
    """A daemon run by ``steppable_twistd.py``, whose wall clock :meth:`step` moves."""

    def __init__(self, daemon: Daemon) -> None:
        super().__init__(daemon.name, daemon.args, daemon.workdir, daemon.env)
        self.offset_file = self.workdir / "clock-offset"
        self.offset = 0.0
        self.offset_file.write_text("0")

    def step(self, seconds: float) -> None:
        self.offset += seconds
        self.offset_file.write_text(repr(self.offset))

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("TASKSCHEDULER_", "AVAILABLE_SERVERS"))
        }
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, STEPPABLE, str(self.offset_file), "-n", "--pidfile=", *self.args],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )


def test_wall_clock_steps_of_an_hour_cause_neither_burst_nor_stall(
    tmp_path: Path, database_dsn: str
) -> None:
    # The agent's clock ends an hour fast, and its results an hour ahead of the server's
    # clock: the server must be told that clocks may differ by that much (by default it
    # would take them only once its own clock got there).
    fleet = start_fleet(
        tmp_path,
        1,
        database_dsn,
        steppable=SteppableDaemon,
        server_env={"TASKSCHEDULER_CLOCK_ALLOWANCE": str(2 * HOUR)},
    )
    agent = fleet.agents[0]
    assert isinstance(agent, SteppableDaemon)
    try:
        task_id = create_witnessed_task(fleet)
        agent_ids = [str((agent_health(fleet, 0) or {})["agent_id"])]
        wait_for(lambda: len(witnessed(fleet, 0)) >= 2, 20, "the first runs")
        started = time.monotonic()
        stalls: list[float] = []
        for step in (-HOUR, +HOUR, +HOUR, -HOUR, +HOUR, -10.0):
            before = len(witnessed(fleet, 0))
            stepped = time.monotonic()
            agent.step(step)
            wait_for(
                lambda n=before: len(witnessed(fleet, 0)) > n + 1,
                10,
                f"runs to go on after a step of {step:+.0f}s",
                interval=0.05,
            )
            stalls.append(time.monotonic() - stepped)
            wait_for(lambda n=before: len(witnessed(fleet, 0)) >= n + 4, 10, "a few more runs")
        # Restarted while its labels run ahead of its clock: the lead is not in memory.
        assert (agent_health(fleet, 0) or {}).get("rejected") == 0
        # Killed 0.15 s into a run (labels are on the server's seconds again).
        code, task = fleet.api("GET", f"/api/v1/tasks/{task_id}")
        assert code == 200, task
        phase = parse_instant(task["anchor"]).timestamp() % 1.0
        now = time.time()
        time.sleep((phase + 0.15 - now) % 1.0)  # the fault's moment, not a wait for an event
        agent.kill(signal.SIGKILL)
        agent.start()
        wait_agent_up(fleet, 0)
        up = time.monotonic()
        last = max(witnessed(fleet, 0))  # a run under way at the kill has ended by now
        wait_for(
            lambda: max(witnessed(fleet, 0)) > last,
            20,
            "runs to go on after the restart",
            interval=0.05,
        )
        stalls.append(time.monotonic() - up)
        after = len(witnessed(fleet, 0))
        wait_for(lambda: len(witnessed(fleet, 0)) >= after + 3, 10, "a few more runs")
        elapsed = time.monotonic() - started
        lines = witnessed(fleet, 0)
        repeated = len(lines) - len(set(lines))
        assert lines == sorted(set(lines)), f"labels only ever increase; {repeated} repeated"
        gaps = [
            (parse_instant(b) - parse_instant(a)).total_seconds()
            for a, b in itertools.pairwise(lines)
        ]
        assert sum(1 for gap in gaps if gap > 60) == 1, f"one skip ahead, no other: {gaps}"
        assert len(lines) <= elapsed + 6, "no burst of catch-up runs"
        # The labels now run an hour ahead of the server's clock (and ten seconds ahead
        # of the agent's).
        cutoff = format_instant(utc_now_from(time.time() + HOUR))
        figures, drained = drain(fleet, task_id, agent_ids, cutoff, timeout=60)
        rejected = (agent_health(fleet, 0) or {}).get("rejected")
        report(
            "5 agent wall clock -1h,+1h,+1h,-1h,+1h,-10s,SIGKILL+restart",
            None,
            figures,
            drained,
            runs=len(lines),
            seconds=f"{elapsed:.0f}",
            first_run_after_step_or_restart="/".join(f"{s:.1f}s" for s in stalls),
            rejected=rejected,
        )
        assert_sound(fleet, figures, cutoff)
        assert rejected == 0, "no result refused (a repeated instant would be, with 409)"
        assert max(stalls) < 4, "a run followed every step (and the restart) within a few seconds"
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
