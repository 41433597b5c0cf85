"""The frequency grammar and a task's anchored instants, as properties."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from taskscheduler.schedule import (
    EARLIEST_INSTANT,
    LATEST_INSTANT,
    MAX_INTERVAL_SECONDS,
    Frequency,
    InstantOutOfRange,
    InvalidFrequency,
    execution_index,
    format_instant,
    instant,
    next_execution,
    parse_frequency,
    parse_instant,
)

UNITS = {"second": 1, "minute": 60, "hour": 3600}
SPACE = st.text(alphabet=" \t\n\r", max_size=3)
GAP = st.text(alphabet=" \t", min_size=1, max_size=3)


@st.composite
def valid_frequencies(draw: st.DrawFn) -> tuple[str, int]:
    unit = draw(st.sampled_from(sorted(UNITS)))
    count = draw(st.integers(min_value=1, max_value=MAX_INTERVAL_SECONDS // UNITS[unit]))
    zeros = draw(st.sampled_from(["", "0", "00"]))
    plural = draw(st.sampled_from(["", "s"]))
    words = [draw(st.sampled_from([w, w.upper(), w.capitalize()])) for w in ("every", unit)]
    text = (
        draw(SPACE)
        + words[0]
        + draw(GAP)
        + zeros
        + str(count)
        + draw(GAP)
        + words[1]
        + plural
        + draw(SPACE)
    )
    return text, count * UNITS[unit]


@given(valid_frequencies())
def test_every_valid_frequency_parses_to_its_seconds(case: tuple[str, int]) -> None:
    text, seconds = case
    frequency = parse_frequency(text)
    assert frequency.seconds == seconds
    assert frequency.interval == timedelta(seconds=seconds)


@given(valid_frequencies())
def test_a_frequency_prints_as_something_that_parses_back(case: tuple[str, int]) -> None:
    frequency = parse_frequency(case[0])
    assert parse_frequency(str(frequency)) == frequency
    assert str(frequency).startswith("every ")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("every 30 seconds", 30),
        ("every 1 minute", 60),
        ("EVERY 2 Hours", 7200),
        ("  every   5   minutes  ", 300),
        ("every 1 second", 1),
        (f"every {MAX_INTERVAL_SECONDS} seconds", MAX_INTERVAL_SECONDS),
        (f"every {MAX_INTERVAL_SECONDS // 3600} hours", MAX_INTERVAL_SECONDS),
    ],
)
def test_examples_parse(text: str, seconds: int) -> None:
    assert parse_frequency(text).seconds == seconds


@pytest.mark.parametrize(
    "text",
    [
        "every 0 seconds",
        "every 000 minutes",
        "every -5 seconds",
        "every +5 seconds",
        "every 1.5 minutes",
        "every 1,5 minutes",
        "every 1e3 seconds",
        "every 0x10 seconds",
        "every five seconds",
        "every 5 days",
        "every 5 ms",
        "every 5 secs",
        "every 5 weeks",
        "every seconds",
        "every 5",
        "5 seconds",
        "each 5 seconds",
        "every5seconds",
        "every 5 seconds please",
        "every 5 secondss",
        "every \u0663 seconds",  # ARABIC-INDIC DIGIT THREE is a digit to Python, not to us
        "every \uff15 seconds",  # FULLWIDTH DIGIT FIVE
        f"every {MAX_INTERVAL_SECONDS + 1} seconds",
        f"every {MAX_INTERVAL_SECONDS // 60 + 1} minutes",
        "every 9000 hours",
        "every " + "9" * 100_000 + " seconds",
        "",
        "   ",
    ],
)
def test_anything_else_is_rejected(text: str) -> None:
    with pytest.raises(InvalidFrequency):
        parse_frequency(text)


@given(st.integers(min_value=1, max_value=10**30), st.sampled_from(sorted(UNITS)))
def test_intervals_over_a_year_are_rejected(count: int, unit: str) -> None:
    assume(count * UNITS[unit] > MAX_INTERVAL_SECONDS)
    with pytest.raises(InvalidFrequency, match="year"):
        parse_frequency(f"every {count} {unit}s")


@given(st.integers(min_value=-(10**12), max_value=0), st.sampled_from(sorted(UNITS)))
def test_zero_and_negative_counts_are_rejected(count: int, unit: str) -> None:
    with pytest.raises(InvalidFrequency):
        parse_frequency(f"every {count} {unit}s")


@given(
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)),
    st.sampled_from(sorted(UNITS)),
)
def test_fractional_counts_are_rejected(count: float, unit: str) -> None:
    with pytest.raises(InvalidFrequency):
        parse_frequency(f"every {count} {unit}s")


@given(st.text(alphabet=st.characters(categories=["L"]), min_size=1, max_size=10))
def test_other_units_are_rejected(unit: str) -> None:
    assume(unit.lower().rstrip("s") not in UNITS)
    with pytest.raises(InvalidFrequency):
        parse_frequency(f"every 5 {unit}")


@given(
    st.one_of(
        st.none(),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.binary(),
        st.lists(st.text()),
        st.dictionaries(st.text(), st.text()),
    )
)
def test_non_strings_are_rejected(value: object) -> None:
    with pytest.raises(InvalidFrequency, match="string"):
        parse_frequency(value)


def test_bytes_that_look_right_are_still_not_a_string() -> None:
    with pytest.raises(InvalidFrequency):
        parse_frequency(b"every 5 seconds")


# -- anchored instants ---------------------------------------------------------------

moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
CENTURY = timedelta(days=36525)
intervals = st.integers(min_value=1, max_value=MAX_INTERVAL_SECONDS).map(
    lambda s: timedelta(seconds=s)
)


@given(moments, intervals, moments)
def test_next_execution_is_aligned_strictly_after_now_and_the_first_such(
    anchor: datetime, interval: timedelta, now: datetime
) -> None:
    k, at = next_execution(anchor, interval, now)
    assert k >= 1
    assert at == anchor + k * interval == instant(anchor, interval, k)
    assert at > now
    if k > 1:
        assert instant(anchor, interval, k - 1) <= now, "an earlier instant was skipped"
    else:
        assert anchor + interval > now


@given(moments, intervals, st.integers(min_value=1, max_value=10**6))
def test_an_instant_is_never_its_own_next_execution(
    anchor: datetime, interval: timedelta, k: int
) -> None:
    assume(k * interval < CENTURY)
    at = anchor + k * interval
    assert next_execution(anchor, interval, at) == (k + 1, at + interval)
    assert next_execution(anchor, interval, at - timedelta(microseconds=1)) == (k, at)


@given(moments, intervals, st.integers(min_value=1, max_value=10**6))
def test_execution_index_inverts_instant(anchor: datetime, interval: timedelta, k: int) -> None:
    assume(k * interval < CENTURY)
    at = instant(anchor, interval, k)
    assert execution_index(anchor, interval, at) == k


@given(moments, intervals, st.integers(min_value=1, max_value=10**6), st.integers(1, 999_999))
def test_execution_index_refuses_misaligned_instants(
    anchor: datetime, interval: timedelta, k: int, offset_us: int
) -> None:
    assume(k * interval < CENTURY)
    at = instant(anchor, interval, k)
    assume(timedelta(microseconds=offset_us) < interval)
    assert execution_index(anchor, interval, at + timedelta(microseconds=offset_us)) is None


@given(moments, intervals, st.integers(min_value=0, max_value=1000))
def test_execution_index_refuses_the_anchor_and_before(
    anchor: datetime, interval: timedelta, k: int
) -> None:
    assert execution_index(anchor, interval, anchor - k * interval) is None


def test_instants_are_the_same_in_any_time_zone() -> None:
    anchor = datetime(2026, 11, 27, 7, 30, tzinfo=UTC)
    elsewhere = anchor.astimezone(timezone(timedelta(hours=-5)))
    interval = Frequency(30, "second").interval
    now = datetime(2026, 11, 27, 8, 0, 1, tzinfo=UTC)
    assert next_execution(anchor, interval, now) == next_execution(elsewhere, interval, now)


@given(moments)
def test_instants_print_and_parse_back_exactly(moment: datetime) -> None:
    text = format_instant(moment)
    assert text.endswith("Z") and len(text) == len("2026-11-27T07:30:00.000000Z")
    assert parse_instant(text) == moment


@pytest.mark.parametrize(
    "text", ["2026-11-27T07:30:00", "yesterday", "", "2026-13-01T00:00:00Z", 1234, None]
)
def test_timestamps_without_a_zone_or_garbage_are_rejected(text: object) -> None:
    with pytest.raises(ValueError):
        parse_instant(text)


def test_offsets_are_converted_to_utc() -> None:
    assert parse_instant("2026-11-27T09:30:00+02:00") == datetime(2026, 11, 27, 7, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    "text",
    [
        "9999-12-31T23:59:59-23:59",  # a valid datetime whose UTC is past datetime.max
        "0001-01-01T00:00:00+23:59",  # ... and before datetime.min
        "9999-12-31T23:59:59.999999Z",
        "0001-01-01T00:00:00Z",
        "1969-12-31T23:59:59.999999Z",
        "9000-01-01T00:00:00Z",
        "8999-12-31T23:00:00-01:00",
    ],
)
def test_instants_out_of_range_are_refused_with_a_value_error(text: str) -> None:
    with pytest.raises(InstantOutOfRange, match="out of range"):
        parse_instant(text)


def test_the_ends_of_the_range_are_accepted() -> None:
    assert parse_instant("1970-01-01T00:00:00Z") == EARLIEST_INSTANT
    assert parse_instant("1970-01-01T00:00:00-00:01") == EARLIEST_INSTANT + timedelta(minutes=1)
    last = LATEST_INSTANT - timedelta(microseconds=1)
    assert parse_instant(format_instant(last)) == last
    # Room to compute with: the latest instant plus a year's interval, a week's time
    # limit and a grace does not overflow.
    assert last + timedelta(days=366 + 7, seconds=3600) < datetime.max.replace(tzinfo=UTC)


offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))


@given(st.datetimes(timezones=offsets))
def test_any_timestamp_with_any_offset_parses_or_is_out_of_range(moment: datetime) -> None:
    """From year 1 to 9999 with offsets up to 23:59 either way: never OverflowError."""
    try:
        utc: datetime | None = moment.astimezone(UTC)
    except OverflowError:
        utc = None
    if utc is not None and EARLIEST_INSTANT <= utc < LATEST_INSTANT:
        assert parse_instant(moment.isoformat()) == moment
    else:
        with pytest.raises(InstantOutOfRange):
            parse_instant(moment.isoformat())
