"""Whether an instant may start now: the task's overlap policy, the cap on runs in flight,
and the starting deadline (pure functions, no I/O).

A task's runs already going (``task_runs``, across restarts: adopted runs count) meet its
``overlap`` policy: ``skip`` (the default) refuses the instant, ``allow`` refuses it only
once ``max_concurrent`` runs are going, ``replace`` never refuses it for them (the
scheduler ends them, as the time limit would, and they report ``replaced``).
"""

from __future__ import annotations

from datetime import datetime

from taskscheduler.protocol import TaskSpec
from taskscheduler.protocol.options import Overlap

#: An instant that comes more than this many seconds late (or more than its interval)
#: is recorded ``skipped`` instead of run: an overloaded agent sheds load.
DEFAULT_STARTING_DEADLINE: float | None = None  # automatic: see starting_deadline_for
#: At most this many runs in flight on one agent; instants past it are ``skipped``.
DEFAULT_MAX_RUNNING = 1000


def starting_deadline_for(interval: float, configured: float | None = None) -> float:
    """Seconds late past which an instant of a task run every ``interval`` seconds is
    skipped rather than started (never more than one interval).

    By default a quarter of the interval, at most 5 s or 1% of the interval if that is
    longer: 0.25 s for a task run every second, 5 s for one every minute, 36 s hourly,
    14.4 min daily. Late starts are the symptom of an overloaded agent (its children
    take the CPU its event loop needs): shedding the late ones keeps it able to report
    and to answer, instead of piling runs up.
    """
    if configured is not None:
        return min(configured, interval)
    return min(interval / 4, max(5.0, interval / 100))


def refusal(
    spec: TaskSpec,
    scheduled_at: datetime,
    now: datetime,
    *,
    task_runs: int,
    runs_in_flight: int,
    max_running: int,
    starting_deadline: float | None,
) -> str | None:
    """Why the run of ``scheduled_at`` must not start at ``now`` (on the label timeline),
    or None if it may.

    ``task_runs`` of the task are going (across restarts and replacements of the task)
    and meet its overlap policy (see the module's docstring); an agent with
    ``max_running`` runs in flight skips the instant too, and so does an instant come
    later than its starting deadline. A refused instant replaces nothing.
    """
    overlap = spec.options.overlap
    if overlap is Overlap.SKIP and task_runs > 0:
        return "the previous run was still going"
    if overlap is Overlap.ALLOW and task_runs >= spec.options.max_concurrent:
        return (
            f"{task_runs} runs of the task were already going "
            f"(max_concurrent {spec.options.max_concurrent})"
        )
    if overlap is Overlap.REPLACE:
        runs_in_flight -= task_runs  # they are being ended for this one
    if runs_in_flight >= max_running:
        return (
            f"{runs_in_flight} runs were already going on this agent (--max-running {max_running})"
        )
    late = (now - scheduled_at).total_seconds()
    # A cron task's interval is its typical one: the shortest gap between its times.
    interval = spec.interval.total_seconds() if spec.frequency is None else spec.frequency.seconds
    if late > starting_deadline_for(interval, starting_deadline):
        # Shed load rather than pile it up: a run started this late is no longer the
        # run of its instant, and starting it would make the next ones later still.
        return f"the agent was overloaded: the instant came {late:.1f}s late"
    return None
