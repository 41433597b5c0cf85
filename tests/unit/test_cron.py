"""Cron expressions in a time zone: the fields (against cronsim, by hypothesis), the
daylight-saving rule in three zones, and what is refused."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from cronsim import CronSim
from hypothesis import given, settings
from hypothesis import strategies as st

from taskscheduler.cron import MAX_CRON_LENGTH, Cron, InvalidCron, parse_cron
from taskscheduler.schedule import CronTimes, Grid, next_instants

PARIS, NEW_YORK, SYDNEY = "Europe/Paris", "America/New_York", "Australia/Sydney"


def walls(cron: Cron, t: datetime, n: int) -> list[str]:
    """The next ``n`` instants after ``t``, on the zone's wall clock with the offset."""
    out = []
    for _ in range(n):
        t = cron.next_after(t)
        out.append(t.astimezone(ZoneInfo(cron.timezone)).strftime("%m-%d %H:%M:%S%z"))
    return out


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


# -- daylight saving -------------------------------------------------------------------------
# 2026: Paris springs forward on 29 March (02:00 -> 03:00) and falls back on 25 October
# (03:00 -> 02:00); New York on 8 March (02:00 -> 03:00) and 1 November (02:00 -> 01:00);
# Sydney falls back on 5 April (03:00 -> 02:00) and springs forward on 4 October.


@pytest.mark.parametrize(
    "zone, before, expected",
    [
        (PARIS, utc(2026, 3, 28, 12), ["03-29 03:00:00+0200", "03-30 02:30:00+0200"]),
        (NEW_YORK, utc(2026, 3, 7, 12), ["03-08 03:00:00-0400", "03-09 02:30:00-0400"]),
        (SYDNEY, utc(2026, 10, 3, 0), ["10-04 03:00:00+1100", "10-05 02:30:00+1100"]),
    ],
)
def test_a_time_that_does_not_exist_runs_once_at_the_end_of_the_gap(
    zone: str, before: datetime, expected: list[str]
) -> None:
    assert walls(parse_cron("30 2 * * *", zone), before, 2) == expected


@pytest.mark.parametrize("zone, before", [(PARIS, utc(2026, 3, 28, 12))])
def test_several_times_in_one_gap_run_once_and_the_gap_end_too(zone: str, before: datetime) -> None:
    # 02:00, 02:15, 02:30, 02:45 and 03:00 all name 03:00 that night: one run.
    assert walls(parse_cron("*/15 2,3 * * *", zone), before, 3) == [
        "03-29 03:00:00+0200",
        "03-29 03:15:00+0200",
        "03-29 03:30:00+0200",
    ]


def test_iterating_names_the_gap_end_once() -> None:
    cron = parse_cron("*/15 2,3 * * *", PARIS)
    assert list(itertools.islice(cron.instants_after(utc(2026, 3, 28, 12)), 3)) == [
        utc(2026, 3, 29, 1),  # 03:00 CEST, for 02:00, 02:15, 02:30, 02:45 and 03:00
        utc(2026, 3, 29, 1, 15),
        utc(2026, 3, 29, 1, 30),
    ]


@pytest.mark.parametrize(
    "zone, before, expected",
    [
        (PARIS, utc(2026, 10, 24, 12), ["10-25 02:30:00+0200", "10-26 02:30:00+0100"]),
        (NEW_YORK, utc(2026, 10, 31, 12), ["11-01 01:30:00-0400", "11-02 01:30:00-0500"]),
        (SYDNEY, utc(2026, 4, 4, 0), ["04-05 02:30:00+1100", "04-06 02:30:00+1000"]),
    ],
)
def test_a_time_that_happens_twice_runs_once_the_first_time(
    zone: str, before: datetime, expected: list[str]
) -> None:
    expression = "30 1 * * *" if zone == NEW_YORK else "30 2 * * *"
    assert walls(parse_cron(expression, zone), before, 2) == expected


def test_every_minute_of_a_repeated_hour_runs_in_its_first_pass_only() -> None:
    cron = parse_cron("*/20 * * * *", NEW_YORK)
    # 05:20 UTC is 01:20 EDT; 01:00 to 01:59 happen again in EST (06:00 to 06:59 UTC).
    assert walls(cron, utc(2026, 11, 1, 5, 10), 4) == [
        "11-01 01:20:00-0400",
        "11-01 01:40:00-0400",
        "11-01 02:00:00-0500",
        "11-01 02:20:00-0500",
    ]


@pytest.mark.parametrize("zone, second_pass", [(PARIS, utc(2026, 10, 25, 1, 10))])
def test_from_inside_the_second_pass_the_next_instant_is_after_the_repeat(
    zone: str, second_pass: datetime
) -> None:
    # 01:10 UTC is 02:10 CET, the second 02:10 of the night: 02:10 to 02:59 already ran.
    assert parse_cron("* * * * * *", zone).next_after(second_pass) == utc(2026, 10, 25, 2)
    assert parse_cron("*/30 * * * *", zone).next_after(second_pass) == utc(2026, 10, 25, 2)


def test_from_inside_the_second_pass_no_wall_time_of_the_repeat_is_walked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    walked: list[datetime] = []
    walls_of = Cron._walls

    def counting(self: Cron, after: datetime) -> Iterator[datetime]:
        for wall in walls_of(self, after):
            walked.append(wall)
            yield wall

    monkeypatch.setattr(Cron, "_walls", counting)
    every_second = parse_cron("* * * * * *", PARIS)
    assert every_second.next_after(utc(2026, 10, 25, 1, 10)) == utc(2026, 10, 25, 2)
    assert walked == [datetime(2026, 10, 25, 3)], "not the 3,000 seconds ran in the first pass"


def test_instants_are_whole_microseconds_in_utc_and_strictly_after() -> None:
    cron = parse_cron("*/2 * * * * *")
    t = utc(2026, 11, 30, 12, 0, 1) + timedelta(microseconds=123)
    assert cron.next_after(t) == utc(2026, 11, 30, 12, 0, 2)
    assert cron.next_after(utc(2026, 11, 30, 12, 0, 2)) == utc(2026, 11, 30, 12, 0, 4)
    assert cron.next_after(t).tzinfo is UTC


# -- the grammar -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "macro, fields",
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@HOURLY", "0 * * * *"),
    ],
)
def test_macros_are_their_fields(macro: str, fields: str) -> None:
    t = utc(2026, 2, 3, 4, 5)
    assert next_instants(CronTimes(parse_cron(macro), t), t, 3) == next_instants(
        CronTimes(parse_cron(fields), t), t, 3
    )


def test_names_ranges_steps_and_lists() -> None:
    cron = parse_cron("0 9-17/4 * JAN,mar MON-FRI", PARIS)
    assert walls(cron, utc(2026, 1, 30, 0), 4) == [
        "01-30 09:00:00+0100",
        "01-30 13:00:00+0100",
        "01-30 17:00:00+0100",
        "03-02 09:00:00+0100",
    ]


def test_the_expression_is_kept_in_a_canonical_spelling() -> None:
    assert parse_cron("  */5   *  * * * ").expression == "*/5 * * * *"
    assert parse_cron(" @Daily ", SYDNEY) == Cron("@daily", SYDNEY)
    assert parse_cron("* * * * *").timezone == "UTC"


@pytest.mark.parametrize(
    "expression, zone, fragment",
    [
        ("@reboot", None, "'@reboot' is not supported"),
        ("@every 5m", None, "is not one of"),
        ("* * *", None, "not a valid cron expression"),
        ("* * * * * * *", None, "not a valid cron expression"),
        ("61 * * * *", None, "not a valid cron expression"),
        ("0 0 30 2 *", None, "not a valid cron expression"),
        ("", None, "must be a cron expression"),
        (5, None, "must be a cron expression"),
        ("1," * MAX_CRON_LENGTH + "1 * * * *", None, "longer than"),
        ("* * * * *", "Mars/Olympus_Mons", "not an IANA time zone"),
        ("* * * * *", "../../etc/passwd", "not an IANA time zone"),
        ("* * * * *", "", "must be an IANA"),
        ("* * * * *", 3, "must be an IANA"),
        ("* * * * *", {}, "must be an IANA"),
        ("* * * * *", ["UTC"], "must be an IANA"),
        ({}, None, "must be a cron expression"),
    ],
)
def test_what_is_refused_says_why(expression: object, zone: object, fragment: str) -> None:
    with pytest.raises(InvalidCron, match=fragment):
        parse_cron(expression, zone)


def test_the_typical_interval_is_the_shortest_gap_whatever_the_zone() -> None:
    assert parse_cron("*/2 * * * * *").typical_interval() == timedelta(seconds=2)
    assert parse_cron("*/10 0-5 * * *", PARIS).typical_interval() == timedelta(minutes=10)
    assert parse_cron("30 2 * * *", PARIS).typical_interval() == timedelta(days=1)
    assert parse_cron("0 0 1,2 * *").typical_interval() == timedelta(days=1)


def test_a_cron_schedule_begins_after_its_anchor() -> None:
    anchor = utc(2026, 11, 30, 12, 0, 30)
    times = CronTimes(parse_cron("* * * * *"), anchor)
    assert times.next_after(utc(2026, 1, 1)) == utc(2026, 11, 30, 12, 1)
    assert not times.is_instant(utc(2026, 11, 30, 12, 0))  # before the anchor
    assert times.is_instant(utc(2026, 11, 30, 12, 1))
    assert not times.is_instant(utc(2026, 11, 30, 12, 1, 0, 1))
    grid = Grid(anchor, timedelta(seconds=10))
    assert grid.next_after(anchor) == anchor + timedelta(seconds=10)
    assert grid.typical_interval() == timedelta(seconds=10)


# -- against the library, by hypothesis ------------------------------------------------------


def _field(draw: st.DrawFn, low: int, high: int, names: list[str] | None = None) -> str:
    def value() -> str:
        n = draw(st.integers(low, high))
        if names and draw(st.booleans()):
            return names[n - low]
        return str(n)

    kind = draw(st.sampled_from(["*", "n", "range", "step", "list", "range-step"]))
    if kind == "*":
        return "*"
    if kind == "n":
        return value()
    if kind == "step":
        return f"*/{draw(st.integers(1, high - low + 1))}"
    if kind == "list":
        return ",".join(str(draw(st.integers(low, high))) for _ in range(draw(st.integers(2, 4))))
    a = draw(st.integers(low, high))
    b = draw(st.integers(a, high))
    if kind == "range":
        return f"{a}-{b}"
    return f"{a}-{b}/{draw(st.integers(1, high - low + 1))}"


MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]


@st.composite
def expressions(draw: st.DrawFn) -> str:
    fields = [
        _field(draw, 0, 59),
        _field(draw, 0, 23),
        # Days 1-28 and every month: never a date that does not exist (refused).
        _field(draw, 1, 28),
        _field(draw, 1, 12, MONTHS),
        _field(draw, 0, 6, DAYS),
    ]
    if draw(st.booleans()):
        fields.insert(0, _field(draw, 0, 59))  # the optional seconds field
    return " ".join(fields)


INSTANTS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@settings(max_examples=300, deadline=None)
@given(expressions(), INSTANTS)
def test_in_utc_the_instants_are_the_librarys(expression: str, t: datetime) -> None:
    cron = parse_cron(expression)
    ours = next_instants(CronTimes(cron, datetime(1999, 1, 1, tzinfo=UTC)), t, 3)
    library = CronSim(expression, t.replace(tzinfo=None))
    assert ours == [next(library).replace(tzinfo=UTC) for _ in range(3)]


@settings(max_examples=300, deadline=None)
@given(expressions(), INSTANTS, st.sampled_from([PARIS, NEW_YORK, SYDNEY, "Asia/Kolkata"]))
def test_in_any_zone_instants_increase_and_are_the_library_times_or_a_gap_end(
    expression: str, t: datetime, zone: str
) -> None:
    cron = parse_cron(expression, zone)
    tz = ZoneInfo(zone)
    previous = t
    for at in next_instants(CronTimes(cron, datetime(1999, 1, 1, tzinfo=UTC)), t, 4):
        assert at > previous and at.tzinfo is UTC and cron.is_instant(at)
        assert not cron.is_instant(at - timedelta(microseconds=1))
        local = at.astimezone(tz)
        assert local.fold == 0, "a repeated wall time runs in its first pass only"
        wall = local.replace(tzinfo=None)
        matches = next(CronSim(expression, wall - timedelta(seconds=1))) == wall
        # The end of a gap: the clock jumped forward at this very instant.
        offset_before = (at - timedelta(microseconds=1)).astimezone(tz).utcoffset()
        just_after_gap = offset_before is not None and offset_before < local.utcoffset()  # type: ignore[operator]
        assert matches or just_after_gap, f"{local} is neither a match nor the end of a gap"
        previous = at
