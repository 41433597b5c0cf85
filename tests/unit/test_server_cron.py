"""Cron tasks through the server's real Klein resource (StubTreq): create, GET with
``next_instants``, PATCH between frequency and cron, the 400s, and results judged on the
cron instants."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
import pytest_twisted

from taskscheduler.schedule import format_instant, parse_instant, utc_now_from
from tests.unit.test_server_api import AGENT_A, START, Harness, started

# START is 2026-11-18 08:26:40 UTC.


async def create(h: Harness, **fields: Any) -> tuple[int, Any]:
    return await h.request("POST", "/api/v1/tasks/create", {"command": "true", **fields})


@pytest_twisted.ensureDeferred
async def test_a_cron_task_shows_its_expression_zone_and_next_instants() -> None:
    h = await started(Harness())
    code, body = await create(h, cron="  0 */6 * * * ", timezone="Asia/Kolkata")
    assert code == 201, body
    code, task = await h.request("GET", f"/api/v1/tasks/{body['command_id']}")
    assert code == 200
    assert (task["cron"], task["timezone"], task["frequency"]) == (
        "0 */6 * * *",
        "Asia/Kolkata",
        None,
    )
    # 00:00, 06:00, 12:00 and 18:00 in Kolkata (+05:30) are 18:30, 00:30, 06:30, 12:30 UTC.
    assert task["next_instants"] == [
        "2026-11-18T12:30:00.000000Z",
        "2026-11-18T18:30:00.000000Z",
        "2026-11-19T00:30:00.000000Z",
        "2026-11-19T06:30:00.000000Z",
        "2026-11-19T12:30:00.000000Z",
    ]
    assert task["next_instant"] == task["next_instants"][0]
    assert task["time_limit_seconds"] == 6 * 3600, "one typical interval by default"
    [created] = h.created
    assert created.spec.cron.timezone == "Asia/Kolkata"
    code, listed = await h.request("GET", "/api/v1/tasks")
    assert listed["tasks"][0]["next_instants"] == task["next_instants"]
    # Paused: no instants to come.
    code, paused = await h.request("POST", f"/api/v1/tasks/{body['command_id']}/pause")
    assert code == 200 and paused["next_instants"] == [] and paused["next_instant"] is None


@pytest_twisted.ensureDeferred
async def test_a_frequency_task_shows_null_cron_and_its_grid() -> None:
    h = await started(Harness())
    task_id = await h.create(frequency="every 30 seconds")
    _code, task = await h.request("GET", f"/api/v1/tasks/{task_id}")
    assert (task["cron"], task["timezone"]) == (None, None)
    start = utc_now_from(START)
    assert [parse_instant(t) for t in task["next_instants"]] == [
        start + k * (parse_instant(task["next_instants"][0]) - start) for k in range(1, 6)
    ]


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({}, "'frequency' is required (e.g. 'every 5 minutes'), or 'cron' instead"),
        ({"frequency": "every 5 seconds", "cron": "* * * * *"}, "either 'frequency'"),
        ({"frequency": "every 5 seconds", "timezone": "UTC"}, "'timezone' applies to a cron"),
        ({"cron": "@reboot"}, "'@reboot' is not supported"),
        ({"cron": "* * * *"}, "not a valid cron expression"),
        ({"cron": "* * * * *", "timezone": "Europe/Atlantis"}, "not an IANA time zone"),
        ({"cron": 7}, "must be a cron expression"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_create_refuses_a_schedule_that_is_not_exactly_one_with_a_clear_400(
    fields: dict[str, Any], fragment: str
) -> None:
    h = await started(Harness())
    code, body = await create(h, **fields)
    assert code == 400 and fragment in body["error"]["message"], body
    assert h.created == []


@pytest_twisted.ensureDeferred
async def test_patch_switches_between_frequency_and_cron() -> None:
    h = await started(Harness())
    task_id = await h.create(frequency="every 30 seconds")
    path = f"/api/v1/tasks/{task_id}"
    code, body = await h.request("PATCH", path, {"frequency": "every 1 minute", "cron": "@daily"})
    assert code == 400 and "not both" in body["error"]["message"]
    code, body = await h.request("PATCH", path, {"timezone": "Europe/Paris"})
    assert code == 400 and "give 'cron' too" in body["error"]["message"]
    code, body = await h.request("PATCH", path, {"timezone": "Nowhere/Land"})
    assert code == 400 and "not an IANA time zone" in body["error"]["message"]
    code, task = await h.request("PATCH", path, {"cron": "@daily", "timezone": "Europe/Paris"})
    assert code == 200, task
    assert (task["frequency"], task["cron"], task["timezone"], task["revision"]) == (
        None,
        "@daily",
        "Europe/Paris",
        2,
    )
    assert task["next_instants"][0] == "2026-11-18T23:00:00.000000Z"  # midnight in Paris
    code, task = await h.request("PATCH", path, {"frequency": "every 5 minutes"})
    assert code == 200
    assert (task["frequency"], task["cron"], task["timezone"]) == ("every 5 minutes", None, None)


@pytest_twisted.ensureDeferred
async def test_results_on_a_cron_instant_are_taken_and_others_misaligned() -> None:
    h = await started(Harness())
    code, body = await create(h, cron="*/2 * * * * *")
    task_id = body["command_id"]
    code, task = await h.request("GET", f"/api/v1/tasks/{task_id}")
    first = parse_instant(task["next_instants"][0])
    good = dataclasses.replace(h.result(task_id, AGENT_A, 1), scheduled_at=first)
    code, answer = await h.report(good)
    assert code == 200, answer
    off = dataclasses.replace(
        good, scheduled_at=parse_instant(task["next_instants"][1]).replace(microsecond=5)
    )
    code, answer = await h.report(off)
    assert code == 400 and answer["error"]["code"] == "misaligned"
    # A run-now: a manual instant, never one of the cron instants.
    h.clock.advance((first - utc_now_from(START)).total_seconds())
    code, run = await h.request("POST", f"/api/v1/tasks/{task_id}/run")
    assert code == 202
    assert run["scheduled_at"] == format_instant(first.replace(microsecond=1))
    assert uuid.UUID(task_id)
