"""Scenarios 1 and 2's figures, judged against the issue's targets (pure functions).

Scenario 1 (``1-throughput``) is a sweep of steps, each a total rate of runs/s over two
agents; scenario 2 (``2-many-tasks``) is one window of many waiting tasks, compared with
a window of 100 tasks every second. The ceiling of scenario 1 is ``spawn:bash-echo``, the
bare starts/s of its very command.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.contract import Figure, ratio

THROUGHPUT = "1-throughput"
MANY_TASKS = "2-many-tasks"
SPAWN_CEILING = "spawn:bash-echo"
#: The sweep's rates as fractions of the ceiling, after a first step of 10 runs/s.
CEILING_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0)
#: --quick: fewer steps that still pass the ceiling (the stop rule and past-the-peak run).
QUICK_FRACTIONS = (0.5, 1.0, 1.5, 2.0)
#: Without a ceiling: runs/s.
FALLBACK_RATES = (10, 50, 100, 200, 400, 600, 800, 1200, 1600, 2400)
#: A step whose on-time results/s fall below this share of its due/s no longer keeps up.
KEEPING_UP = 0.9
LATENESS_P99_S = 0.010  # scenario 1, up to half the ceiling
MANY_TASKS_P99_S = 0.005
MANY_TASKS_RSS_MB = 80.0


def rate_plan(ceiling: float | None, quick: bool = False) -> list[int]:
    """The sweep's rates, from 10 runs/s up: fractions of the ceiling (half of it among
    them, where the lateness target ends), or fixed rates without one."""
    if not ceiling:
        return list(FALLBACK_RATES)
    fractions = QUICK_FRACTIONS if quick else CEILING_FRACTIONS
    rates = [10, *(max(10, round(ceiling * f)) for f in fractions)]
    return sorted(set(rates))


@dataclass
class Step:
    rate: int  # runs/s asked for, over both agents
    due_per_s: float
    on_time_per_s: float  # runs (not skips) whose result was stored within 1 s
    lateness_p50_s: float | None
    lateness_p99_s: float | None
    unaccounted: int
    doubled: int
    detail: dict[str, Any]


def saturated(steps: list[Step]) -> bool:
    """Whether the last step is past saturation: its on-time results/s fell below the
    previous step's, or below :data:`KEEPING_UP` of what fell due."""
    last = steps[-1]
    if last.on_time_per_s < KEEPING_UP * last.due_per_s:
        return True
    return len(steps) > 1 and last.on_time_per_s < steps[-2].on_time_per_s


def sweep_figures(steps: list[Step], ceiling: float | None) -> list[Figure]:
    """One figure per step (its start lateness p99), then the sweep's: the peak of on-time
    results/s, the highest rate with p99 < 10 ms, on-time past the peak, unaccounted and
    doubled instants."""
    out: list[Figure] = []
    half = None if ceiling is None else round(ceiling / 2)  # a step of the plan
    for step in steps:
        judged = half is not None and step.rate <= half
        p99 = step.lateness_p99_s
        out.append(
            Figure(
                THROUGHPUT,
                f"start lateness p99 at {step.rate} runs/s",
                None if p99 is None else round(p99 * 1000, 2),
                "ms",
                target="< 10 ms (up to half the ceiling)" if judged else None,
                met=(p99 is not None and p99 < LATENESS_P99_S) if judged else None,
                detail={
                    "rate_of_ceiling": ratio(step.rate, ceiling),
                    "lateness_p50_ms": ms(step.lateness_p50_s),
                    **step.detail,
                },
            )
        )
    if not steps:
        return out
    peak = max(range(len(steps)), key=lambda i: steps[i].on_time_per_s)
    best = steps[peak].on_time_per_s
    peak_ratio = ratio(best, ceiling)
    out.append(
        Figure(
            THROUGHPUT,
            "on-time results/s at peak",
            best,
            "/s",
            SPAWN_CEILING,
            peak_ratio,
            ">= 0.75 of ceiling",
            None if peak_ratio is None else peak_ratio >= 0.75,
            {"at_rate": steps[peak].rate, "ceiling_value": ceiling},
        )
    )
    # The highest rate up to which every step (from the first) had p99 < 10 ms.
    precise = None
    for step in steps:
        if step.lateness_p99_s is None or step.lateness_p99_s >= LATENESS_P99_S:
            break
        precise = step.rate
    precise_ratio = ratio(precise, ceiling)
    out.append(
        Figure(
            THROUGHPUT,
            "highest rate with start lateness p99 < 10 ms",
            precise,
            "runs/s",
            SPAWN_CEILING,
            precise_ratio,
            ">= 0.5 of ceiling",
            None if half is None else precise is not None and precise >= half,
            {"rates": [s.rate for s in steps]},
        )
    )
    past = steps[peak + 1 :]
    worst = min((s.on_time_per_s for s in past), default=None)
    kept = None if worst is None or not best else round(worst / best, 4)
    out.append(
        Figure(
            THROUGHPUT,
            "on-time results/s past saturation, of the peak",
            kept,
            "of peak",
            target=">= 0.9 of peak",
            met=None if kept is None else kept >= 0.9,
            detail={
                "past_rates": [s.rate for s in past],
                "past_on_time_per_s": [s.on_time_per_s for s in past],
                "note": None if past else "no step past the peak: saturation not reached",
            },
        )
    )
    for name, attribute in (("unaccounted instants", "unaccounted"), ("doubled runs", "doubled")):
        per_step = {str(s.rate): getattr(s, attribute) for s in steps}
        total = sum(per_step.values())
        out.append(
            Figure(
                THROUGHPUT,
                name,
                total,
                "instants",
                target="0",
                met=total == 0,
                detail={"per_rate": per_step},
            )
        )
    return out


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def many_tasks_figures(label: str, record: dict[str, Any], judged: bool) -> list[Figure]:
    """Start lateness p99 and agent RSS of one many-tasks window (``label`` says its size);
    ``judged``: against the targets (5 ms, 80 MB), else a reference without one."""
    late = record["lateness_s"]
    agent = record["agent-0"]
    detail = {
        "tasks": record["tasks"],
        "interval_s": record["interval_s"],
        "window_s": record["window_s"],
        "lateness_p50_ms": ms(late["p50"]),
        "lateness_max_ms": ms(late["max"]),
        "results": late["n"],
        "due": record["due"],
        "stored_ratio": record["stored_ratio"],
        "statuses": record["statuses"],
        "agent_cpu_share": agent["cpu_share"],
        "held_by_agent": record["held_by_agent"],
    }
    p99 = late["p99"]
    rss = agent["rss_mb_max"]
    return [
        Figure(
            MANY_TASKS,
            f"start lateness p99, {label}",
            ms(p99),
            "ms",
            target="< 5 ms" if judged else None,
            met=(p99 is not None and p99 < MANY_TASKS_P99_S) if judged else None,
            detail=detail,
        ),
        Figure(
            MANY_TASKS,
            f"agent RSS max, {label}",
            rss,
            "MB",
            target="< 80 MB" if judged else None,
            met=(bool(rss) and rss < MANY_TASKS_RSS_MB) if judged else None,
            detail={"tasks": record["tasks"]},
        ),
    ]
