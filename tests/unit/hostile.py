"""Hypothesis strategies for the values a hostile or broken client sends: huge integers,
lone surrogates, timestamps at the ends of the calendar with extreme offsets."""

from __future__ import annotations

import json
from datetime import timedelta, timezone

from hypothesis import strategies as st

huge_ints = st.one_of(
    st.integers(),
    st.integers(min_value=2**53 - 2, max_value=2**64),
    st.integers(min_value=-(2**64), max_value=-(2**31)),
    st.integers(1000, 6000).map(lambda n: 10**n),
    st.integers(1000, 6000).map(lambda n: -(10**n) + 1),
)
surrogates = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1)
hostile_text = st.one_of(
    st.text(),
    st.builds(lambda a, s, b: a + s + b, st.text(max_size=5), surrogates, st.text(max_size=5)),
)
offsets = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))
extreme_instants = st.one_of(
    st.datetimes(timezones=offsets).map(lambda moment: moment.isoformat()),
    st.sampled_from(
        [
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+23:59",
            "9999-12-31T23:59:59.999999Z",
            "0001-01-01T00:00:00Z",
            "2028-01-01T00:00:00Z",
        ]
    ),
)
#: Decoded JSON values, for the parsers.
hostile_values = st.one_of(
    huge_ints,
    hostile_text,
    extreme_instants,
    st.floats(),
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
#: JSON texts, for the HTTP API: numbers too long for Python to convert (over 4300
#: digits) cannot be made with json.dumps, and surrogates travel as \\ud800 escapes.
#: Digits in a number: Python converts at most 4300 (hypothesis favours small ones).
digits = st.one_of(st.integers(1, 6000), st.sampled_from([19, 20, 4300, 4301, 5000]))
raw_json_values = st.one_of(
    digits.map(lambda n: "9" * n),
    digits.map(lambda n: "-" + "9" * n),
    st.sampled_from(["1e400", "-1e400", "NaN", "-Infinity", "0.5", "true", "null", "[]", "{}"]),
    hostile_values.filter(lambda v: not (isinstance(v, int) and abs(v) > 10**4000)).map(json.dumps),
)


def has_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)
