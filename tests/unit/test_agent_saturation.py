"""Past saturation every instant is accounted for: run once, or recorded ``skipped``
with its reason, never lost and never both. An agent with more due than it can start
(runs that outlast their interval, a cap on runs in flight, a reactor that stalls) is
driven on a Clock, and every instant of every task is checked at the end."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from taskscheduler.protocol import ResultStatus
from tests.unit.agent_fakes import ANCHOR, ANCHOR_SECONDS, Agent, FakeServer, spec


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_past_saturation_every_instant_is_run_once_or_recorded_skipped(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    clock_start = 5.0
    clock = Clock()
    clock.advance(ANCHOR_SECONDS + clock_start)
    agent = Agent(tmp_path / "data", clock, FakeServer())
    scheduler = agent.service.scheduler
    assert scheduler is not None
    scheduler.max_running = 4
    tasks = [spec(every="every 1 seconds") for _ in range(8)]
    for task in tasks:
        scheduler.schedule(task)
    end = 60.0
    while clock.seconds() < ANCHOR_SECONDS + end:
        # A reactor now on time, now held for up to 3.5 s (late wake-ups, passed-over
        # instants, starting deadlines missed); runs lasting up to 2.5 s (overlaps, the cap).
        agent.settle(rng.choice([0.1, 0.25, 0.5, 1.0, 2.0, 3.5]))
        for run in agent.runner.runs:
            if not run.done and rng.random() < 0.3:
                agent.runner.finish(run)
    scheduler.stop()
    for run in agent.runner.runs:
        if not run.done:
            agent.runner.finish(run)
    agent.settle(60)

    stopped = clock.seconds()
    run: dict[tuple[object, datetime], int] = {}
    for fake in agent.runner.runs:
        assert fake.key is not None
        run[fake.key] = run.get(fake.key, 0) + 1
    assert all(count == 1 for count in run.values()), "an instant run twice"
    skipped = {
        (r.task_id, r.scheduled_at)
        for r in agent.server.stored.values()
        if r.status is ResultStatus.SKIPPED
    }
    assert skipped, "the load must saturate the agent, or this test proves nothing"
    assert len(run) > len(tasks), "and runs must start all the same"
    assert not skipped & set(run), "an instant both run and skipped"
    stored_runs = {
        (r.task_id, r.scheduled_at)
        for r in agent.server.stored.values()
        if r.status is not ResultStatus.SKIPPED
    }
    assert stored_runs == set(run), "every run's result reached the server"
    for task in tasks:
        # Every instant from the first after scheduling to the last before the stop.
        due = [
            ANCHOR + timedelta(seconds=k)
            for k in range(int(clock_start) + 1, int(stopped - ANCHOR_SECONDS) + 1)
            if k <= end
        ]
        accounted = {at for (task_id, at) in set(run) | skipped if task_id == task.task_id}
        missing = [at for at in due if at not in accounted]
        assert missing == [], f"task {task.task_id}: unaccounted {missing[:5]}"
