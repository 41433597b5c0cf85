"""``--retention-min-executions``: the option, and the pruner keeping each task's newest N."""

from __future__ import annotations

from datetime import timedelta

import pytest
import pytest_twisted
from twisted.internet.task import Clock
from twisted.python import usage

from taskscheduler.schedule import utc_now_from
from taskscheduler.server.retention import HistoryPruner
from taskscheduler.server.store.memory import MemoryStore
from tests.unit.test_server_options import parse
from tests.unit.test_store_contract import A_ID, A_URL, make_spec, result


def test_the_newest_100_are_kept_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETENTION_MIN_EXECUTIONS", raising=False)
    assert parse([], monkeypatch)["retention-min-executions"] == 100
    assert parse([], monkeypatch, RETENTION_MIN_EXECUTIONS="7")["retention-min-executions"] == 7
    given = parse(["--retention-min-executions", "0"], monkeypatch, RETENTION_MIN_EXECUTIONS="7")
    assert given["retention-min-executions"] == 0
    for bad in ("-1", "x", "1.5", "1000001"):
        with pytest.raises(usage.UsageError, match="retention-min-executions"):
            parse(["--retention-min-executions", bad], monkeypatch)


@pytest_twisted.ensureDeferred
async def test_the_pruner_keeps_each_tasks_newest_executions_however_old() -> None:
    store = MemoryStore()
    await store.set_fleet([A_URL])
    task = await store.create_task(make_spec(), utc_now_from(0))
    spec = task.spec
    await store.record_results(
        [result(task.task_id, A_ID, k) for k in range(1, 6)], utc_now_from(0)
    )
    clock = Clock()
    clock.advance(spec.anchor.timestamp() + 400 * 86400)  # all of it long past retention
    pruner = HistoryPruner(store, clock, timedelta(days=1), keep=2)
    assert await pruner.prune() == 3
    kept = await store.list_executions(task.task_id, 10)
    assert len(kept) == 2 and kept[0].scheduled_at > kept[1].scheduled_at
