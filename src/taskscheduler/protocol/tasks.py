"""Server -> agent: the task an agent is told to run (``POST /api/v1/tasks/schedule``)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from taskscheduler.protocol.fields import (
    InvalidMessage,
    default_time_limit,
    parse_command,
    parse_frequency_field,
    parse_int,
    parse_time,
    parse_time_limit,
    parse_uuid,
    require,
)
from taskscheduler.protocol.options import TaskOptions, options_from_json, options_to_json
from taskscheduler.schedule import Frequency, format_instant

#: Highest revision of a task (PostgreSQL's integer).
MAX_REVISION = 2**31 - 1


@dataclass(frozen=True)
class TaskSpec:
    """A task as an agent runs it: the seed's fields plus the shared anchor and limit."""

    task_id: uuid.UUID
    command: str
    frequency: Frequency
    anchor: datetime  # execution k is due at anchor + k * frequency.interval
    time_limit: timedelta
    #: 1 at creation, one more at each change of the task (``PATCH``): an agent that
    #: has a revision keeps it against an older one, and each result names the revision
    #: it ran, so that one execution never mixes two.
    revision: int = 1
    #: Where and how it runs: targeting, run-on-one, overlap, retries, env, working dir.
    options: TaskOptions = field(default_factory=TaskOptions)


def task_spec_to_json(spec: TaskSpec) -> dict[str, Any]:
    return {
        "task_id": str(spec.task_id),
        "command": spec.command,
        "frequency": str(spec.frequency),
        "anchor": format_instant(spec.anchor),
        "time_limit_seconds": int(spec.time_limit.total_seconds()),
        "revision": spec.revision,
        **options_to_json(spec.options),
    }


def parse_task_spec(body: object, received_at: datetime) -> TaskSpec:
    """Parse ``POST /api/v1/tasks/schedule``.

    ``anchor`` and ``time_limit_seconds`` are optional so that the seed's three-field
    request still works: the anchor is then the moment the agent received it. So is
    ``revision`` (1), and each option (its default). Fields it does not know are ignored:
    a newer server may send more.
    """
    if not isinstance(body, Mapping):
        raise InvalidMessage("the request body must be a JSON object")
    task_id = parse_uuid(require(body, "task_id"), "task_id")
    command = parse_command(require(body, "command"))
    frequency = parse_frequency_field(require(body, "frequency"))
    anchor = body.get("anchor")
    limit = body.get("time_limit_seconds")
    revision = body.get("revision")
    return TaskSpec(
        task_id=task_id,
        command=command,
        frequency=frequency,
        anchor=received_at if anchor is None else parse_time(anchor, "anchor"),
        time_limit=default_time_limit(frequency) if limit is None else parse_time_limit(limit),
        revision=1 if revision is None else parse_int(revision, "revision", 1, MAX_REVISION),
        options=options_from_json(body),
    )
