"""Start lateness (from a run's instant to its process start) per agent, as the agents page
of the dashboard shows it: percentiles over the first attempts of the fleet's newest
scheduled executions (:meth:`Store.recent_start_lateness`). Pure: no I/O."""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

#: The newest scheduled executions, fleet-wide, whose results the percentiles are over:
#: enough for a p99 on a busy fleet, a few milliseconds of index walk.
LATENESS_EXECUTIONS = 1000


@dataclass(frozen=True)
class Lateness:
    """An agent's start lateness in seconds over ``samples`` runs."""

    samples: int
    p50: float
    p99: float

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "p50_seconds": round(self.p50, 6),
            "p99_seconds": round(self.p99, 6),
        }


def percentile(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 1) of a non-empty sorted sequence:
    a value that was measured, never an interpolation between two."""
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def lateness_by_agent(samples: Iterable[tuple[uuid.UUID, float]]) -> dict[uuid.UUID, Lateness]:
    """Each agent's p50 and p99 start lateness; an agent without samples is absent."""
    by_agent: dict[uuid.UUID, list[float]] = {}
    for agent_id, seconds in samples:
        by_agent.setdefault(agent_id, []).append(seconds)
    found = {}
    for agent_id, values in by_agent.items():
        values.sort()
        found[agent_id] = Lateness(len(values), percentile(values, 0.5), percentile(values, 0.99))
    return found
