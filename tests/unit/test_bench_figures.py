"""The benchmark's own arithmetic (bench/accounting.py, bench/loadfigures.py): every
instant accounted for, the sweep's stop rule and its figures against the issue's targets."""

from __future__ import annotations

from typing import Any

from bench.accounting import Stored, account_instants
from bench.contract import problems
from bench.loadfigures import Step, rate_plan, saturated, sweep_figures

US = 1_000_000
A, B = "agent-a", "agent-b"


def stored(task: str, agent: str, at: int, status: str, started: int | None = None) -> Stored:
    return Stored(task, agent, at, status, started, at + US // 2, None)


def test_every_instant_is_ran_skipped_or_unaccounted() -> None:
    at = [10 * US, 11 * US, 12 * US]
    instants = {"t": at}
    witnesses = {
        # agent a: the first instant ran (twice!), the second was skipped, the third is lost
        A: {("t", at[0]): [10.002, 10.5]},
        # agent b: the first ran, the second's result says it failed but no witness line
        B: {("t", at[0]): [10.003]},
    }
    results = [
        stored("t", A, at[0], "succeeded", at[0] + 1000),
        stored("t", A, at[1], "skipped"),
        stored("t", B, at[0], "skipped"),  # contradicts its witness line
        stored("t", B, at[1], "failed", at[1] + 1000),
    ]
    out = account_instants(instants, witnesses, results)
    assert out["instants"] == 6
    assert (out["ran"], out["skipped"], out["unaccounted"]) == (2, 1, 3)
    assert out["unaccounted_by"] == {
        "nothing stored, no witness": 2,
        "failed stored, no witness": 1,
    }
    assert out["doubled"] == 1
    assert out["contradictions"] == 1
    # The witness wrote 1 ms after started_at: the shell's start-up.
    assert out["witness_minus_started_at_s"]["max"] == 0.001
    assert out["witness_before_started_at"] == 0
    assert out["witness_lateness_s"]["max"] == 0.003


def test_the_plan_starts_at_10_and_holds_half_the_ceiling() -> None:
    plan = rate_plan(379.0)
    assert plan[0] == 10 and plan == sorted(set(plan))
    assert round(379.0 / 2) in plan
    assert plan[-1] >= 2 * 379
    assert rate_plan(None)[0] == 10


def step(rate: int, on_time: float, p99: float | None = 0.002, lost: int = 0) -> Step:
    return Step(rate, float(rate), on_time, 0.001, p99, lost, 0, {})


def test_saturated_when_on_time_falls_or_falls_behind_the_load() -> None:
    assert not saturated([step(10, 10.0)])
    assert not saturated([step(10, 10.0), step(100, 99.0)])
    assert saturated([step(10, 10.0), step(100, 80.0)])  # behind: 80 of 100 due/s
    assert saturated([step(100, 99.0), step(200, 95.0)])  # fell
    assert saturated([step(100, 99.0), step(200, 99.0), step(300, 98.0)])


def by_name(figures: list[Any]) -> dict[str, Any]:
    return {f.figure: f for f in figures}


def test_sweep_figures_against_the_targets() -> None:
    steps = [
        step(10, 10.0),
        step(50, 50.0),
        step(100, 99.0),
        step(150, 120.0, p99=0.030),
        step(200, 110.0, p99=0.200, lost=3),
    ]
    figures = by_name(sweep_figures(steps, 200.0))
    peak = figures["on-time results/s at peak"]
    assert (peak.value, peak.ratio, peak.met) == (120.0, 0.6, False)
    assert peak.detail["at_rate"] == 150
    precise = figures["highest rate with start lateness p99 < 10 ms"]
    assert (precise.value, precise.ratio, precise.met) == (100, 0.5, True)
    past = figures["on-time results/s past saturation, of the peak"]
    assert past.value == round(110 / 120, 4) and past.met is True
    assert figures["unaccounted instants"].value == 3
    assert figures["unaccounted instants"].met is False
    assert figures["doubled runs"].met is True
    # Steps above half the ceiling are shown, not judged.
    assert figures["start lateness p99 at 100 runs/s"].met is True
    assert figures["start lateness p99 at 150 runs/s"].met is None
    for figure in figures.values():
        assert problems(figure.record()) == []


def test_a_late_step_below_half_the_ceiling_misses_the_precision_target() -> None:
    steps = [step(10, 10.0), step(50, 50.0, p99=0.012), step(100, 100.0)]
    figures = by_name(sweep_figures(steps, 200.0))
    assert figures["highest rate with start lateness p99 < 10 ms"].value == 10
    assert figures["highest rate with start lateness p99 < 10 ms"].met is False
    assert figures["start lateness p99 at 50 runs/s"].met is False
    # Never saturated: past-the-peak is not judged, and says why.
    past = figures["on-time results/s past saturation, of the peak"]
    assert past.value is None and past.met is None and past.detail["note"]


def test_no_ceiling_no_ratio() -> None:
    figures = by_name(sweep_figures([step(10, 10.0)], None))
    peak = figures["on-time results/s at peak"]
    assert peak.ratio is None and peak.met is None
