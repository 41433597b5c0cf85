"""What the scheduler holds of its tasks, kept small: 10,000 waiting tasks must cost
little memory, and reading them must not copy them.

- :class:`SpecsView`: the specs of the task loops, read through (each delivered task and
  each health check reads them: a copy of 10,000 each time made a delivery of 10,000
  tasks quadratic).
- :class:`SharedParts`: tasks alike hold one options object, one frequency and one time
  limit between them (equal values, so nothing a task does changes).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace
from datetime import timedelta
from typing import Protocol, TypeVar

from taskscheduler.protocol import TaskSpec
from taskscheduler.protocol.options import TaskOptions
from taskscheduler.schedule import Frequency

#: Distinct option sets remembered to share (compared one by one: most fleets use a
#: handful), and distinct frequencies or time limits.
SHARED_OPTIONS = 8
SHARED_VALUES = 1000

_V = TypeVar("_V", Frequency, timedelta)


class HasSpec(Protocol):
    @property
    def spec(self) -> TaskSpec: ...


class SpecsView(Mapping[uuid.UUID, TaskSpec]):
    """The specs of ``loops`` (by task), read through: no copy."""

    __slots__ = ("_loops",)

    def __init__(self, loops: Mapping[uuid.UUID, HasSpec]) -> None:
        self._loops = loops

    def __getitem__(self, task_id: uuid.UUID) -> TaskSpec:
        return self._loops[task_id].spec

    def __iter__(self) -> Iterator[uuid.UUID]:
        return iter(self._loops)

    def __len__(self) -> int:
        return len(self._loops)


class SharedParts:
    """The options, frequencies and time limits seen first, for later tasks to share."""

    def __init__(self) -> None:
        self._options: list[TaskOptions] = []
        self._frequencies: dict[Frequency, Frequency] = {}
        self._limits: dict[timedelta, timedelta] = {}

    def share(self, spec: TaskSpec) -> TaskSpec:
        """``spec``, holding the parts equal to an earlier task's where there are."""
        options = next((o for o in self._options if o == spec.options), None)
        if options is None:
            options = spec.options
            if len(self._options) < SHARED_OPTIONS:
                self._options.append(options)
        frequency = spec.frequency
        if frequency is not None:
            frequency = _share(self._frequencies, frequency)
        limit = _share(self._limits, spec.time_limit)
        if options is spec.options and frequency is spec.frequency and limit is spec.time_limit:
            return spec
        return replace(spec, options=options, frequency=frequency, time_limit=limit)


def _share(seen: dict[_V, _V], value: _V) -> _V:
    """The value equal to ``value`` seen first (remembering up to SHARED_VALUES)."""
    first = seen.get(value)
    if first is not None:
        return first
    if len(seen) < SHARED_VALUES:
        seen[value] = value
    return value
