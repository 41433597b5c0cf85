"""The OpenAPI document's cron fields say what the server takes: exactly one schedule, and
every cron expression and zone the server accepts fits the document."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from taskscheduler.cron import InvalidCron, parse_cron
from taskscheduler.server.openapi import document

COMPONENTS = document()["components"]
SCHEMAS = COMPONENTS["schemas"]
NEW_TASK = Draft202012Validator({**SCHEMAS["NewTask"], "components": COMPONENTS})
CRON = Draft202012Validator(SCHEMAS["NewTask"]["properties"]["cron"]["anyOf"][0])
ZONE = Draft202012Validator(SCHEMAS["NewTask"]["properties"]["timezone"]["anyOf"][0])


@pytest.mark.parametrize(
    "body, valid",
    [
        ({"command": "ls", "frequency": "every 5 seconds"}, True),
        ({"command": "ls", "cron": "*/5 * * * *"}, True),
        ({"command": "ls", "cron": "@daily", "timezone": "Europe/Paris"}, True),
        ({"command": "ls", "cron": "@daily", "frequency": None}, True),
        ({"command": "ls", "frequency": "every 5 seconds", "cron": None, "timezone": None}, True),
        ({"command": "ls"}, False),
        ({"command": "ls", "frequency": "every 5 seconds", "cron": "* * * * *"}, False),
        ({"command": "ls", "frequency": "every 5 seconds", "timezone": "UTC"}, False),
        ({"command": "ls", "frequency": None, "cron": None}, False),
    ],
)
def test_a_new_task_has_exactly_one_schedule(body: dict[str, Any], valid: bool) -> None:
    assert NEW_TASK.is_valid(body) is valid


@given(
    st.text(max_size=40)
    | st.sampled_from(["*/2 * * * * *", " @hourly ", "0 9 * * MON-FRI", "1," * 99 + "1 * * * *"])
)
def test_every_expression_the_server_takes_fits_the_document(text: str) -> None:
    try:
        parse_cron(text)
    except InvalidCron:
        return
    assert CRON.is_valid(text), repr(text)


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "America/Argentina/ComodRivadavia"])
def test_every_zone_the_server_takes_fits_the_document(zone: str) -> None:
    parse_cron("* * * * *", zone)
    assert ZONE.is_valid(zone)
