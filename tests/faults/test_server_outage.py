"""Scenario 4: the server is away for a minute while the agents run a task every second;
once it is back, every result spooled meanwhile arrives within a minute."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.faults.harness import (
    agent_health,
    assert_sound,
    create_witnessed_task,
    cutoff_now,
    drain,
    report,
    start_fleet,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

#: Seconds the server stays away (``TASKSCHEDULER_FAULT_OUTAGE`` to change it).
OUTAGE = float(os.environ.get("TASKSCHEDULER_FAULT_OUTAGE") or 60)
#: Longest the spooled results may take to arrive once the server is back.
DRAIN_LIMIT = 60.0
#: How long to wait for them: longer than the limit, so that a slow drain is measured
#: and fails the assertion on its figure rather than the wait.
DRAIN_WAIT = 3 * DRAIN_LIMIT


def test_results_spooled_while_the_server_is_away_arrive_within_a_minute(
    tmp_path: Path, database_dsn: str
) -> None:
    fleet = start_fleet(tmp_path, 2, database_dsn)
    try:
        task_id = create_witnessed_task(fleet)
        agent_ids = [str((agent_health(fleet, i) or {})["agent_id"]) for i in range(2)]
        fleet.server.stop()
        away = time.monotonic()
        time.sleep(OUTAGE)  # the outage itself: the agents run on meanwhile
        spooled = [int((agent_health(fleet, i) or {}).get("spooled", -1)) for i in range(2)]
        assert min(spooled) >= OUTAGE * 0.8, f"the agents kept their results: {spooled}"
        fleet.server.start()
        fleet.wait_until_healthy()
        outage = time.monotonic() - away
        # Everything the agents ran until the server answered again must arrive; the
        # drain is timed from that moment.
        cutoff = cutoff_now()
        figures, drained = drain(fleet, task_id, agent_ids, cutoff, timeout=DRAIN_WAIT)
        report(
            f"4 server away {outage:.0f}s",
            None,
            figures,
            drained,
            spooled_at_return="+".join(map(str, spooled)),
        )
        assert_sound(fleet, figures, cutoff)
        assert figures.lost == 0, "the agents never died: no run was lost"
        assert drained < DRAIN_LIMIT, (
            f"the results spooled during the outage took {drained:.1f}s to arrive once the "
            f"server was back; at most {DRAIN_LIMIT:.0f}s is allowed"
        )
    except BaseException:
        print(fleet.logs())
        raise
    finally:
        fleet.stop()
