"""The wire protocol: round trips through JSON, and every validation error."""

from __future__ import annotations

import base64
import dataclasses
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskscheduler import protocol
from taskscheduler.protocol import (
    CLOCK_ALLOWANCE,
    MAX_ARG_STRLEN,
    MAX_BATCH,
    MAX_COMMAND_BYTES,
    MAX_OUTPUT_SIZE,
    MAX_REASON_LENGTH,
    MAX_TIME_LIMIT_SECONDS,
    InvalidMessage,
    Output,
    ResultStatus,
    RunResult,
    TaskSpec,
    default_time_limit,
    output_to_json,
    parse_output,
    parse_result,
    parse_result_batch,
    parse_task_spec,
    result_to_json,
    task_spec_to_json,
    too_early,
)
from taskscheduler.schedule import MAX_INTERVAL_SECONDS, Frequency, format_instant
from tests.unit.hostile import hostile_values

RECEIVED = datetime(2026, 11, 27, 7, 30, tzinfo=UTC)
TASK = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")
AGENT = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")


def through_json(body: Any) -> Any:
    """What the other side decodes: a real JSON text in between."""
    return json.loads(json.dumps(body))


moments = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def frequencies(draw: st.DrawFn) -> Frequency:
    unit = draw(st.sampled_from(["second", "minute", "hour"]))
    most = MAX_INTERVAL_SECONDS // {"second": 1, "minute": 60, "hour": 3600}[unit]
    return Frequency(draw(st.integers(1, most)), unit)


commands = st.text(min_size=1, max_size=200).filter(lambda c: c.strip() and "\x00" not in c)

task_specs = st.builds(
    TaskSpec,
    task_id=st.uuids(),
    command=commands,
    frequency=frequencies(),
    anchor=moments,
    time_limit=st.integers(1, MAX_TIME_LIMIT_SECONDS).map(lambda s: timedelta(seconds=s)),
)


@st.composite
def outputs(draw: st.DrawFn) -> Output:
    data = draw(st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode)))
    size = len(data) + draw(st.sampled_from([0, 0, 1, 10**6, 2**40]))
    if size == 0:
        return Output()
    return Output(data, size, size > len(data) or draw(st.booleans()))


@st.composite
def results(draw: st.DrawFn) -> RunResult:
    status = draw(st.sampled_from(list(ResultStatus)))
    started = draw(st.none() | moments)
    return RunResult(
        task_id=draw(st.uuids()),
        agent_id=draw(st.uuids()),
        scheduled_at=draw(moments),
        status=status,
        exit_code=draw(st.none() | st.integers(-(2**31), 2**31 - 1)),
        signal=draw(st.none() | st.integers(1, 128)),
        started_at=started,
        finished_at=draw(st.none() | moments),
        stdout=draw(outputs()),
        stderr=draw(outputs()),
        # Any text PostgreSQL can hold: no NUL, no lone surrogate (both refused).
        reason=draw(
            st.none()
            | st.text(
                st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
                max_size=500,
            )
        ),
    )


# -- round trips ---------------------------------------------------------------------


@given(task_specs, moments)
def test_a_task_spec_survives_the_wire(spec: TaskSpec, received: datetime) -> None:
    assert parse_task_spec(through_json(task_spec_to_json(spec)), received) == spec


@given(results())
def test_a_result_survives_the_wire_bytes_and_all(result: RunResult) -> None:
    assert parse_result(through_json(result_to_json(result))) == result


@given(results())
def test_a_result_survives_with_its_task_id_taken_from_the_path(result: RunResult) -> None:
    body = through_json(result_to_json(result))
    del body["task_id"]
    assert parse_result(body, result.task_id) == result


@given(st.lists(results(), min_size=1, max_size=5))
def test_a_batch_survives_the_wire(items: list[RunResult]) -> None:
    body = through_json({"results": [result_to_json(r) for r in items]})
    assert parse_result_batch(body) == items


@given(st.binary(min_size=1, max_size=300))
def test_any_bytes_travel_as_readable_text_and_exact_base64(data: bytes) -> None:
    body = output_to_json("stdout", Output.of(data))
    assert isinstance(body["stdout"], str)
    assert body["stdout_bytes"] == len(data)
    lossless = data.decode("utf-8", errors="replace").encode("utf-8") == data
    assert ("stdout_base64" in body) is not lossless
    assert parse_output(through_json(body), "stdout") == Output.of(data)


def test_nul_bytes_are_valid_text_and_need_no_base64() -> None:
    body = output_to_json("stdout", Output.of(b"a\x00b\n"))
    assert body == {"stdout": "a\x00b\n", "stdout_bytes": 4}
    assert parse_output(through_json(body), "stdout").data == b"a\x00b\n"


def test_invalid_utf8_is_replaced_in_the_text_and_exact_in_base64() -> None:
    body = output_to_json("stderr", Output.of(b"caf\xe9"))
    assert body["stderr"] == "caf\ufffd"
    assert base64.b64decode(body["stderr_base64"]) == b"caf\xe9"


def test_empty_streams_are_omitted_as_the_seed_asks() -> None:
    body = result_to_json(RunResult(TASK, AGENT, RECEIVED, ResultStatus.SUCCEEDED, exit_code=0))
    assert not any(key.startswith(("stdout", "stderr")) for key in body)
    assert body["server_id"] == str(AGENT)


def test_a_reason_travels_only_when_there_is_one() -> None:
    plain = RunResult(TASK, AGENT, RECEIVED, ResultStatus.SKIPPED)
    assert "reason" not in result_to_json(plain)
    why = "the previous run was still going"
    body = through_json(
        result_to_json(RunResult(TASK, AGENT, RECEIVED, ResultStatus.SKIPPED, reason=why))
    )
    assert body["reason"] == why
    assert parse_result(body).reason == why
    assert parse_result({**body, "reason": "x" * MAX_REASON_LENGTH}).reason == "x" * 500


def test_trimming_keeps_head_and_tail_whole_characters_and_the_original_size() -> None:
    text = ("é" * 10 + "middle" + "☃" * 10).encode()
    for keep in range(0, len(text)):
        trimmed = Output(text, 5000, False).trimmed(keep)
        assert len(trimmed.data) <= keep
        assert (trimmed.size, trimmed.truncated) == (5000, True)
        trimmed.data.decode("utf-8")  # never a character cut in two
        assert text.startswith(trimmed.data[: max(0, keep // 2 - 2)])  # at most 2 moved
    assert Output.of(b"short").trimmed(5) == Output.of(b"short")
    assert Output.of(b"abcdef").trimmed(4) == Output(b"abef", 6, True)


def test_a_truncated_stream_says_so_with_its_original_size() -> None:
    body = output_to_json("stdout", Output(b"head...tail", 10_000_000, True))
    assert body["stdout_truncated"] is True
    assert body["stdout_bytes"] == 10_000_000
    # A size larger than the data means truncation, even if the flag is missing.
    assert parse_output({"stdout": "abc", "stdout_bytes": 10}, "stdout").truncated


def test_the_seeds_three_field_task_gets_an_anchor_and_a_limit() -> None:
    spec = parse_task_spec(
        {"task_id": str(TASK), "command": "echo hi", "frequency": "every 30 seconds"}, RECEIVED
    )
    assert spec.anchor == RECEIVED
    assert spec.time_limit == timedelta(seconds=30)
    assert default_time_limit(Frequency(2, "hour")) == timedelta(hours=2)
    assert default_time_limit(Frequency(48, "hour")) == timedelta(days=1)


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({}, ResultStatus.SUCCEEDED),
        ({"exit_code": 0}, ResultStatus.SUCCEEDED),
        ({"exit_code": 2}, ResultStatus.FAILED),
        ({"signal": 9}, ResultStatus.FAILED),
    ],
)
def test_a_result_without_status_infers_it(extra: dict[str, Any], status: ResultStatus) -> None:
    body = {"server_id": str(AGENT), "scheduled_at": format_instant(RECEIVED), "stdout": "hi\n"}
    result = parse_result({**body, **extra}, TASK)
    assert result.status is status
    assert result.stdout == Output.of(b"hi\n")


# -- validation errors ---------------------------------------------------------------

GOOD_SPEC = {
    "task_id": str(TASK),
    "command": "echo hi",
    "frequency": "every 10 seconds",
    "anchor": "2026-11-27T07:30:00Z",
    "time_limit_seconds": 5,
}


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"task_id": None}, "'task_id' is required"),
        ({"task_id": 7}, "'task_id' must be a UUID"),
        ({"task_id": "not-a-uuid"}, "'task_id' is not a valid UUID"),
        ({"command": None}, "'command' is required"),
        ({"command": ""}, "'command' must be a non-empty string"),
        ({"command": "   "}, "'command' must be a non-empty string"),
        ({"command": ["echo"]}, "'command' must be a non-empty string"),
        ({"command": "x" * (MAX_COMMAND_BYTES + 1)}, "longer than"),
        # 32 Ki characters, 128 KiB: more than one argument of execve can hold.
        ({"command": "\U0001f600" * (MAX_ARG_STRLEN // 4)}, f"{MAX_COMMAND_BYTES} bytes"),
        ({"command": "echo \x00"}, "NUL"),
        ({"command": "echo \ud800"}, "lone surrogate"),
        ({"command": "echo \udfff\ud800"}, "lone surrogate"),
        ({"frequency": None}, "'frequency' is required"),
        ({"frequency": "every 0 seconds"}, "at least"),
        ({"frequency": "every 2 days"}, "not of the form"),
        ({"frequency": 10}, "must be a string"),
        ({"frequency": "every 400 days"}, "not of the form"),
        ({"frequency": "every 9000 hours"}, "longer than a year"),
        ({"anchor": "2026-11-27T07:30:00"}, "'anchor' must be an RFC 3339"),
        ({"anchor": "soon"}, "'anchor' must be an RFC 3339"),
        ({"anchor": 1795000000}, "'anchor' must be an RFC 3339"),
        ({"anchor": "2026-11-27T07:30:00Z" + " " * 100}, "'anchor' must be an RFC 3339"),
        ({"anchor": "9999-12-31T23:59:59-23:59"}, "'anchor': timestamp"),
        ({"anchor": "0001-01-01T00:00:00+23:59"}, "out of range"),
        ({"anchor": "9500-01-01T00:00:00Z"}, "out of range"),
        ({"time_limit_seconds": 10**5000}, "'time_limit_seconds' must be an integer"),
        ({"time_limit_seconds": 0}, "'time_limit_seconds' must be an integer"),
        ({"time_limit_seconds": MAX_TIME_LIMIT_SECONDS + 1}, "'time_limit_seconds'"),
        ({"time_limit_seconds": 1.5}, "'time_limit_seconds'"),
        ({"time_limit_seconds": "5"}, "'time_limit_seconds'"),
        ({"time_limit_seconds": True}, "'time_limit_seconds'"),
    ],
)
def test_every_bad_task_spec_is_refused_with_a_clear_message(
    change: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_task_spec({**GOOD_SPEC, **change}, RECEIVED)
    assert words in str(caught.value)


@pytest.mark.parametrize("body", [None, [], "task", 7, [GOOD_SPEC]])
def test_a_task_spec_must_be_an_object(body: object) -> None:
    with pytest.raises(InvalidMessage, match="JSON object"):
        parse_task_spec(body, RECEIVED)


def test_a_missing_field_is_as_bad_as_a_null_one() -> None:
    for name in ("task_id", "command", "frequency"):
        body = dict(GOOD_SPEC)
        del body[name]
        with pytest.raises(InvalidMessage, match=f"'{name}' is required"):
            parse_task_spec(body, RECEIVED)


GOOD_RESULT = result_to_json(
    RunResult(
        TASK,
        AGENT,
        RECEIVED,
        ResultStatus.SUCCEEDED,
        exit_code=0,
        started_at=RECEIVED,
        finished_at=RECEIVED,
        stdout=Output.of(b"hi\n"),
    )
)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"task_id": None}, "'task_id' is required"),
        ({"task_id": "x"}, "'task_id' is not a valid UUID"),
        ({"server_id": None}, "'server_id' is required"),
        ({"server_id": 12}, "'server_id' must be a UUID"),
        ({"scheduled_at": None}, "'scheduled_at' is required"),
        ({"scheduled_at": "2026-11-27 07:30"}, "'scheduled_at' must be an RFC 3339"),
        ({"status": "great"}, "'status' must be one of"),
        ({"exit_code": 2**31}, "'exit_code' must be an integer"),
        ({"exit_code": "0"}, "'exit_code' must be an integer"),
        ({"exit_code": False}, "'exit_code' must be an integer"),
        ({"signal": 0}, "'signal' must be an integer from 1 to 128"),
        ({"signal": 129}, "'signal' must be an integer from 1 to 128"),
        ({"started_at": "then"}, "'started_at' must be an RFC 3339"),
        ({"scheduled_at": "9999-12-31T23:59:59-23:59"}, "'scheduled_at': timestamp"),
        ({"started_at": "0001-01-01T00:00:00+23:59"}, "'started_at': timestamp"),
        ({"finished_at": "9999-12-31T23:59:59Z"}, "'finished_at': timestamp"),
        ({"stdout_bytes": 2**62}, f"'stdout_bytes' must be an integer from 3 to {2**53 - 1}"),
        ({"stdout_bytes": 10**5000}, "'stdout_bytes'"),
        ({"exit_code": -(10**5000)}, "'exit_code'"),
        ({"reason": "why \ud800"}, "'reason' is not valid Unicode text"),
        ({"finished_at": 5}, "'finished_at' must be an RFC 3339"),
        ({"stdout": 5}, "'stdout' must be a string"),
        ({"stdout_base64": 5}, "'stdout_base64' must be a base64 string"),
        ({"stdout_base64": "!!!"}, "'stdout_base64' is not valid base64"),
        ({"stdout_bytes": 1}, "'stdout_bytes' must be an integer from 3"),
        ({"stdout_bytes": -1}, "'stdout_bytes'"),
        ({"stdout_bytes": True}, "'stdout_bytes'"),
        ({"stderr_truncated": "yes"}, "'stderr_truncated' must be true or false"),
        ({"reason": 5}, "'reason' must be a string of at most 500 characters"),
        ({"reason": "x" * 501}, "'reason' must be a string of at most 500 characters"),
        ({"reason": "a\x00b"}, "'reason' must not contain a NUL character"),
    ],
)
def test_every_bad_result_is_refused_with_a_clear_message(
    change: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_result({**GOOD_RESULT, **change})
    assert words in str(caught.value)


def test_a_result_whose_task_id_differs_from_the_path_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="differs from the one in the path"):
        parse_result(GOOD_RESULT, uuid.uuid4())


@pytest.mark.parametrize("body", [None, [], "result", 3])
def test_a_result_must_be_an_object(body: object) -> None:
    with pytest.raises(InvalidMessage, match="must be a JSON object"):
        parse_result(body)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ([], '{"results": [...]}'),
        ({}, '{"results": [...]}'),
        ({"results": {}}, '{"results": [...]}'),
        ({"results": []}, "must not be empty"),
        ({"results": [GOOD_RESULT] * (MAX_BATCH + 1)}, f"at most {MAX_BATCH}"),
        ({"results": [GOOD_RESULT, {**GOOD_RESULT, "status": "x"}]}, "results[1]: 'status'"),
        ({"results": [GOOD_RESULT, 5]}, "results[1]: a result must be a JSON object"),
    ],
)
def test_every_bad_batch_is_refused_naming_the_bad_item(body: object, words: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_result_batch(body)
    assert words in str(caught.value)


def test_between_daemons_lossy_output_travels_once_as_exact_bytes() -> None:
    run = RunResult(
        task_id=uuid.uuid4(),
        agent_id=AGENT,
        scheduled_at=RECEIVED,
        status=ResultStatus.SUCCEEDED,
        stdout=Output.of(b"\xff" * 1000),
        stderr=Output.of(b"plain\n"),
    )
    body = result_to_json(run)
    assert "stdout" not in body and len(body["stdout_base64"]) < 1400
    assert body["stderr"] == "plain\n" and "stderr_base64" not in body
    assert parse_result(through_json(body)) == run


def test_a_command_is_bounded_in_utf8_bytes_not_characters() -> None:
    body = {**GOOD_SPEC, "command": "é" * (MAX_COMMAND_BYTES // 2)}
    assert parse_task_spec(body, RECEIVED).command == body["command"]
    with pytest.raises(InvalidMessage, match="bytes in UTF-8"):
        parse_task_spec({**body, "command": body["command"] + "é"}, RECEIVED)
    assert MAX_COMMAND_BYTES < MAX_ARG_STRLEN  # the NUL that ends the argument fits


def test_a_declared_size_is_bounded_by_what_a_run_can_write() -> None:
    assert parse_output({"stdout": "abc", "stdout_bytes": MAX_OUTPUT_SIZE}, "stdout").size == (
        MAX_OUTPUT_SIZE
    )
    # a week (the longest time limit) at 10 GB/s
    assert MAX_OUTPUT_SIZE > MAX_TIME_LIMIT_SECONDS * 10**10


# -- results dated ahead of the receiver's clock --------------------------------------

LIMIT = timedelta(seconds=30)


def dated(
    scheduled_at: datetime, started: float | None = 0, finished: float | None = 1
) -> RunResult:
    return RunResult(
        TASK,
        AGENT,
        scheduled_at,
        ResultStatus.SUCCEEDED,
        exit_code=0,
        started_at=None if started is None else scheduled_at + timedelta(seconds=started),
        finished_at=None if finished is None else scheduled_at + timedelta(seconds=finished),
    )


def test_results_up_to_now_and_within_the_allowances_are_not_too_early() -> None:
    now = RECEIVED
    assert too_early(dated(now - timedelta(hours=1)), now, LIMIT) is None
    assert too_early(dated(now, 0, 59), now, LIMIT) is None  # clocks differ a little
    # An agent whose clock stepped back labels its runs ahead of it, by up to a limit.
    ahead = now + LIMIT + CLOCK_ALLOWANCE
    assert too_early(dated(ahead, 0, 0), now, LIMIT) is None
    stepped_back = dataclasses.replace(
        dated(ahead), started_at=now - timedelta(seconds=1), finished_at=now
    )
    assert too_early(stepped_back, now, LIMIT) is None


def test_results_dated_past_the_allowances_are_too_early_saying_why() -> None:
    now = RECEIVED
    late = now + LIMIT + CLOCK_ALLOWANCE + timedelta(microseconds=1)
    why = too_early(dated(late, None, None), now, LIMIT)
    assert why is not None and why.startswith("'scheduled_at' is 90 s ahead")
    assert "time limit (30 s) and 60 s of clock difference" in why
    # 2028, as the penetration test stored
    assert too_early(dated(datetime(2028, 1, 1, tzinfo=UTC)), now, LIMIT) is not None
    # Every instant of the result is bounded alike.
    why = too_early(dated(now, 0, 91), now, LIMIT)
    assert why is not None and why.startswith("'finished_at' is 91 s ahead")
    why = too_early(dated(now - timedelta(seconds=10), 101, None), now, LIMIT)
    assert why is not None and why.startswith("'started_at' is 91 s ahead")


# -- hostile values: refused with InvalidMessage, never another exception ----------------


@given(
    st.dictionaries(
        st.sampled_from([*sorted(GOOD_SPEC), "extra"]), hostile_values, min_size=1, max_size=3
    )
)
def test_hostile_task_specs_are_refused_only_with_invalid_message(change: dict[str, Any]) -> None:
    try:
        spec = parse_task_spec({**GOOD_SPEC, **change}, RECEIVED)
    except InvalidMessage:
        return
    spec.command.encode("utf-8")  # what was accepted can be stored and run
    assert len(spec.command.encode("utf-8")) <= MAX_COMMAND_BYTES
    assert datetime(1970, 1, 1, tzinfo=UTC) <= spec.anchor < datetime(9000, 1, 1, tzinfo=UTC)


RESULT_FIELDS = [
    *sorted(GOOD_RESULT),
    "stdout_base64",
    "stdout_bytes",
    "stdout_truncated",
    "stderr",
    "stderr_bytes",
    "reason",
    "signal",
]


@given(st.dictionaries(st.sampled_from(RESULT_FIELDS), hostile_values, min_size=1, max_size=3))
def test_hostile_results_are_refused_only_with_invalid_message(change: dict[str, Any]) -> None:
    try:
        result = parse_result({**GOOD_RESULT, **change})
    except InvalidMessage:
        return
    if result.reason is not None:
        result.reason.encode("utf-8")
    for stream in (result.stdout, result.stderr):
        assert len(stream.data) <= stream.size <= MAX_OUTPUT_SIZE
        assert stream.truncated or stream.size == len(stream.data)
    low, high = datetime(1970, 1, 1, tzinfo=UTC), datetime(9000, 1, 1, tzinfo=UTC)
    for moment in (result.scheduled_at, result.started_at, result.finished_at):
        assert moment is None or low <= moment < high


def test_a_result_names_its_revision_and_trigger_and_an_older_agents_means_schedule() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    manual = protocol.RunResult(
        task_id=uuid.uuid4(),
        agent_id=uuid.uuid4(),
        scheduled_at=now,
        status=protocol.ResultStatus.SUCCEEDED,
        exit_code=0,
        revision=3,
        trigger=protocol.Trigger.MANUAL,
    )
    body = protocol.result_to_json(manual)
    assert (body["revision"], body["trigger"]) == (3, "manual")
    assert protocol.parse_result(body) == manual
    del body["revision"], body["trigger"]
    older = protocol.parse_result(body)
    assert (older.revision, older.trigger) == (None, protocol.Trigger.SCHEDULE)
    with pytest.raises(protocol.InvalidMessage, match="'trigger' must be one of"):
        protocol.parse_result({**body, "trigger": "cron"})
    with pytest.raises(protocol.InvalidMessage, match="'revision' must be an integer"):
        protocol.parse_result({**body, "revision": 0})


def test_a_task_spec_carries_its_revision_and_ignores_fields_a_newer_server_adds() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    body = {"task_id": str(uuid.uuid4()), "command": "true", "frequency": "every 5 seconds"}
    assert protocol.parse_task_spec(body, now).revision == 1
    spec = protocol.parse_task_spec({**body, "revision": 7, "labels": {"role": "web"}}, now)
    assert spec.revision == 7
    assert protocol.task_spec_to_json(spec)["revision"] == 7


def test_unknown_fields_are_named_with_the_known_ones() -> None:
    with pytest.raises(protocol.UnknownFields) as refused:
        protocol.refuse_unknown(
            {"command": "true", "timeout": 5, "every": 1}, ["command", "frequency"]
        )
    assert str(refused.value) == 'unknown fields "every", "timeout" (known: command, frequency)'
    protocol.refuse_unknown({"command": "true"}, ["command", "frequency"])
