"""The messages the server and the agents exchange, validated in one place.

Both daemons import this package; neither imports the other. Every ``parse_*`` function
takes already-decoded JSON and raises :class:`InvalidMessage` with a message a person
understands; every ``*_to_json`` function returns a JSON-ready dict.

This module is the package's public surface: both daemons use the protocol as one
vocabulary (``protocol.parse_result``, ``protocol.FINAL_RESULT_ERRORS``), so they import
it from here. Each name is defined in one submodule:

- :mod:`.fields`: the fields messages are made of (ids, instants, bounded integers, the
  command, its frequency and time limit) and :class:`InvalidMessage`;
- :mod:`.output`: one captured stream (:class:`Output`) and its JSON form;
- :mod:`.tasks`: server -> agent, the task to run (:class:`TaskSpec`);
- :mod:`.results`: agent -> server, a run's result (:class:`RunResult`), a batch of them,
  and the server's answers to them.
"""

from taskscheduler.protocol.fields import (
    MAX_ARG_STRLEN,
    MAX_COMMAND_BYTES,
    MAX_TIME_LIMIT_SECONDS,
    InvalidMessage,
    UnknownFields,
    default_time_limit,
    parse_command,
    parse_cron_fields,
    parse_frequency_field,
    parse_time_limit,
    parse_timezone_field,
    parse_uuid,
    refuse_unknown,
    utf8_of,
)
from taskscheduler.protocol.output import MAX_OUTPUT_SIZE, Output, output_to_json, parse_output
from taskscheduler.protocol.results import (
    ACKNOWLEDGED_STATUSES,
    CLOCK_ALLOWANCE,
    FINAL_BATCH_STATUSES,
    FINAL_RESULT_ERRORS,
    MAX_BATCH,
    MAX_REASON_LENGTH,
    RETRY_LATER_BATCH_STATUSES,
    RETRY_LATER_RESULT_ERRORS,
    ResultStatus,
    RunResult,
    Trigger,
    parse_reason,
    parse_result,
    parse_result_batch,
    parse_trigger,
    result_to_json,
    too_early,
)
from taskscheduler.protocol.tasks import (
    MAX_REVISION,
    TaskSpec,
    parse_task_spec,
    schedule_to_json,
    task_spec_to_json,
)

__all__ = [
    "ACKNOWLEDGED_STATUSES",
    "CLOCK_ALLOWANCE",
    "FINAL_BATCH_STATUSES",
    "FINAL_RESULT_ERRORS",
    "MAX_ARG_STRLEN",
    "MAX_BATCH",
    "MAX_COMMAND_BYTES",
    "MAX_OUTPUT_SIZE",
    "MAX_REASON_LENGTH",
    "MAX_REVISION",
    "MAX_TIME_LIMIT_SECONDS",
    "RETRY_LATER_BATCH_STATUSES",
    "RETRY_LATER_RESULT_ERRORS",
    "InvalidMessage",
    "Output",
    "ResultStatus",
    "RunResult",
    "TaskSpec",
    "Trigger",
    "UnknownFields",
    "default_time_limit",
    "output_to_json",
    "parse_command",
    "parse_cron_fields",
    "parse_frequency_field",
    "parse_output",
    "parse_reason",
    "parse_result",
    "parse_result_batch",
    "parse_task_spec",
    "parse_time_limit",
    "parse_timezone_field",
    "parse_trigger",
    "parse_uuid",
    "refuse_unknown",
    "result_to_json",
    "schedule_to_json",
    "task_spec_to_json",
    "too_early",
    "utf8_of",
]
