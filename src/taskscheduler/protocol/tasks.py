"""Server -> agent: the task an agent is told to run (``POST /api/v1/tasks/schedule``)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from taskscheduler.cron import Cron
from taskscheduler.protocol.fields import (
    InvalidMessage,
    default_time_limit,
    parse_command,
    parse_cron_fields,
    parse_frequency_field,
    parse_int,
    parse_time,
    parse_time_limit,
    parse_uuid,
    require,
)
from taskscheduler.protocol.options import TaskOptions, options_from_json, options_to_json
from taskscheduler.schedule import Frequency, Schedule, format_instant, schedule_of

#: Highest revision of a task (PostgreSQL's integer).
MAX_REVISION = 2**31 - 1


@dataclass(frozen=True)
class TaskSpec:
    """A task as an agent runs it: the seed's fields plus the shared anchor and limit.

    Its schedule is ``frequency`` or ``cron``, exactly one (the other None): see
    :attr:`schedule`.
    """

    task_id: uuid.UUID
    command: str
    frequency: Frequency | None
    anchor: datetime  # execution k is due at anchor + k * frequency.interval; cron: after it
    time_limit: timedelta
    #: 1 at creation, one more at each change of the task (``PATCH``): an agent that
    #: has a revision keeps it against an older one, and each result names the revision
    #: it ran, so that one execution never mixes two.
    revision: int = 1
    #: Where and how it runs: targeting, run-on-one, overlap, retries, env, working dir.
    options: TaskOptions = field(default_factory=TaskOptions)
    #: A cron expression in its time zone, instead of ``frequency``.
    cron: Cron | None = None

    def __post_init__(self) -> None:
        if (self.frequency is None) == (self.cron is None):
            raise ValueError("a task has either a frequency or a cron expression")

    @property
    def schedule(self) -> Schedule:
        """The task's instants, whichever kind."""
        return schedule_of(self.frequency, self.cron, self.anchor)

    @property
    def interval(self) -> timedelta:
        """The interval runs are sized by: the frequency's, or the cron expression's
        typical one (the shortest gap between its times)."""
        if self.frequency is not None:
            return self.frequency.interval
        return self.schedule.typical_interval()


def schedule_to_json(spec: TaskSpec) -> dict[str, Any]:
    """``frequency``, or ``cron`` and ``timezone``: only the fields of the task's kind."""
    if spec.cron is not None:
        return {"cron": spec.cron.expression, "timezone": spec.cron.timezone}
    return {"frequency": str(spec.frequency)}


def task_spec_to_json(spec: TaskSpec) -> dict[str, Any]:
    return {
        "task_id": str(spec.task_id),
        "command": spec.command,
        **schedule_to_json(spec),
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
    a newer server may send more. A ``cron`` (with its ``timezone``, UTC if absent) takes
    the place of ``frequency``.
    """
    if not isinstance(body, Mapping):
        raise InvalidMessage("the request body must be a JSON object")
    task_id = parse_uuid(require(body, "task_id"), "task_id")
    command = parse_command(require(body, "command"))
    cron = None
    frequency = None
    if body.get("cron") is not None:
        cron = parse_cron_fields(body["cron"], body.get("timezone"))
    else:
        frequency = parse_frequency_field(require(body, "frequency"))
    anchor = body.get("anchor")
    limit = body.get("time_limit_seconds")
    revision = body.get("revision")
    spec = TaskSpec(
        task_id=task_id,
        command=command,
        frequency=frequency,
        anchor=received_at if anchor is None else parse_time(anchor, "anchor"),
        time_limit=timedelta(0),
        revision=1 if revision is None else parse_int(revision, "revision", 1, MAX_REVISION),
        options=options_from_json(body),
        cron=cron,
    )
    time_limit = default_time_limit(spec.interval) if limit is None else parse_time_limit(limit)
    return replace(spec, time_limit=time_limit)
