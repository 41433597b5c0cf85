"""Scenarios 1 and 2 of the suite: agents under load, with the real daemons and the real
runner. Prints figures, asserts nothing (a missed target is a figure).

    .venv/bin/python bench/bench_agent_load.py [--scenario sweep|many-tasks|both]
        [--quick] [--ceilings FILE] [--json-out FILE]                # the suite's contract
        [--rates auto|10,50,...] [--step-window 20] [--max-steps 12]  # sweep (scenario 1)
        [--tasks 10000] [--interval 100] [--window 60]                # many-tasks (2)
        [--compare-tasks 100] [--compare-window 30]
        [--drain 10] [--database DSN] [--keep]

Longer than most modules because it is one standalone script by the suite's contract:
its two scenarios' flows and tables (the shared parts are in ``loadkit.py``,
``loadapi.py``, ``accounting.py``, the targets in ``loadfigures.py``).

It measures whichever ``taskscheduler`` is installed in the venv of the Python running it
(``twistd`` is taken from beside that interpreter), so the same file measures the code
before and after a change: run it with each venv. It starts a real ``twistd -n
taskscheduler-server`` and real ``twistd -n taskscheduler-agent`` processes on free
loopback ports in a temporary folder, secured as in production (operator token, join
secret), on a fresh database: in an embedded PostgreSQL started for the run, or created on
the PostgreSQL server ``--database`` names (and dropped at the end). Tasks are created
through the REST API, then the run waits (up to ``--delivery-timeout``) until every agent
holds them all, says how long creation and delivery took, and measures a window:

- ``sweep`` (``1-throughput``): two agents, each running every task ``every 1 seconds``;
  for each total rate (runs a second over both agents) the step's tasks replace the
  previous step's, and a window of ``--step-window`` s (20) is measured. The command,
  ``bash -c 'echo "$TASKSCHEDULER_TASK_ID $TASKSCHEDULER_SCHEDULED_AT $EPOCHREALTIME"
  >> witness'``, appends to a file in its agent's folder: the ground truth of what ran,
  and when it really started. ``--rates auto``: 10 runs/s, then 1/8, 1/4, 1/2, 3/4, 1,
  1.25, ... of the ceiling ``spawn:bash-echo`` (from ``--ceilings``, else measured here),
  until on-time results/s fall (below the last step's, or below 0.9 of the step's due/s),
  then one more step (at most ``--max-steps``).
- ``many-tasks`` (``2-many-tasks``): one agent, ``--tasks`` tasks (10,000) ``every
  --interval seconds`` (100) running ``:``, i.e. tasks/interval runs a second (100), for
  ``--window`` s (60); then the same with ``--compare-tasks`` (100) every 1 s on a fresh
  agent. After each window and ``--drain`` s, the agent gets SIGTERM and the time until
  it exits is measured (at most ``--term-timeout`` s, then SIGKILL).

Figures (an instant is one ``(task, agent, anchor + k * interval)`` inside the window):

- ``due``: instants of the window, the ceiling every other count is a ratio of.
  ``due/s max``: the most due in any one second (a steady load has max close to mean).
- ``stored``: results the server holds for those instants after the drain, by status;
  ``reasons``: the ``reason`` column of non-successful results if the schema has one,
  else the first line of their stderr. ``by window end``: stored before the window ended.
- ``within 1 s / 5 s``: results stored (``received_at``) within 1 s / 5 s of their
  instant, as a fraction of ``due``; the sweep gives those within 1 s per second.
- ``lateness``: ``started_at - scheduled_at`` of stored results (p50/p99/max), and in
  the sweep also the witness's own start time minus the instant.
- ``witnessed``: (sweep) instants of the window whose command wrote its witness line.
  Every instant is accounted for: witnessed, or recorded ``skipped``, else
  ``unaccounted`` (by what the server holds for it); witnessed twice is ``doubled``. The
  witness's start time minus ``started_at`` cross-checks the latter.

The JSON lines of ``--json-out`` (see ``contract.py``): per sweep step its start lateness
p99 (target < 10 ms up to half the ceiling); the peak of on-time results/s (runs stored
within 1 s of their instant) as a ratio of the ceiling (>= 0.75); the highest rate up to
which every step's p99 was < 10 ms, as a ratio of the ceiling (>= 0.5); the least on-time
results/s past the peak as a fraction of the peak (>= 0.9); unaccounted instants and
doubled runs (0). Many tasks: start lateness p99 (< 5 ms) and agent RSS max (< 80 MB),
and the same for the comparison (no target).
- agent ``fds`` (``/proc/PID/fd``, max of samples), ``RSS`` (max), ``CPU`` (share of one
  core over the window), ``health`` (latency of ``GET /api/v1/health``, a new connection
  each time, sampled every ``--sample-interval`` s; ``failed`` = no answer within 10 s),
  ``running``/``spooled`` (max of what health reported), warnings and errors the daemons
  logged during the window (the commonest message shapes in the table).

Tasks are created at a steady pace over one interval (``--burst``: as fast as possible,
``--create-concurrency`` requests at once). A task's anchor is its creation time, so
tasks created in a burst all fall due in the same slice of every interval, a burst of
runs instead of a steady rate; paced, the 10,000 tasks take the 100 s interval to create.
Each scenario prints a table and one JSON line (starting with ``{``) per scenario or
sweep step. ``--keep`` leaves the temporary folder (daemon logs, agent data, witness
files) for inspection; the daemons and the embedded PostgreSQL are stopped whatever
happens, Ctrl-C included. Validate at small scale on a shared machine: ``--quick``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import loadfigures
from bench.accounting import (
    account,
    account_instants,
    due_instants,
    due_shape,
    read_witness,
    stored_results,
)
from bench.contract import add_arguments, ceiling_value, emit, load_ceilings
from bench.loadapi import (
    Operator,
    Postgres,
    agent_health,
    create_tasks,
    delete_tasks,
    holding,
    live_tasks,
    wait_agents,
)
from bench.loadfigures import rate_plan, saturated
from bench.loadkit import (
    environment,
    fraction,
    measure_window,
    percent,
    seconds,
    sigterm_seconds,
    start_fleet,
    stop_daemons,
)
from tests.integration.daemons import Daemon

#: Each run appends "task instant start-time" to ``witness`` in its agent's folder.
SWEEP_COMMAND = (
    'bash -c \'echo "$TASKSCHEDULER_TASK_ID $TASKSCHEDULER_SCHEDULED_AT $EPOCHREALTIME"'
    " >> witness'"
)
MANY_TASKS_COMMAND = ":"


def many_tasks(
    args: argparse.Namespace,
    pg: Postgres,
    root: Path,
    daemons: list[Daemon],
    count: int,
    interval: int,
    length: float,
) -> dict[str, Any]:
    """One agent, ``count`` tasks every ``interval`` s, measured for ``length`` s."""
    rate = count / interval
    print(
        f"\n== many-tasks: 1 agent, {count:,} tasks every {interval} s running "
        f"'{MANY_TASKS_COMMAND}' ({rate:g} runs/s), window {length:g} s"
    )
    dsn = pg.create_database()
    fleet = start_fleet(root / f"many-tasks-{count}-{interval}", 1, dsn, daemons)
    api = Operator(fleet)
    creation = create_tasks(
        api, count, MANY_TASKS_COMMAND, interval, not args.burst, args.create_concurrency
    )
    print(
        f"  created {creation.created:,} tasks in {creation.seconds:.1f} s "
        f"({creation.created / creation.seconds:,.0f}/s, "
        f"{'burst' if args.burst else f'paced, at most {creation.behind_pace_max:.1f} s behind'}"
        f"; {len(creation.failed)} failed)"
    )
    tasks = live_tasks(dsn)
    delivery, answers = wait_agents(
        fleet,
        f"the agent to hold {len(tasks):,} tasks",
        holding(len(tasks)),
        args.delivery_timeout,
    )
    held = [None if a is None else a.get("tasks") for a in answers]
    print(f"  delivered: the agent holds {held} tasks {delivery:.1f} s after creation ended")
    start, end, window = measure_window(fleet, args, length)
    time.sleep(args.drain)
    instants = due_instants(tasks, start, end)
    due = sum(len(v) for v in instants.values())
    figures = account(stored_results(dsn, [t[0] for t in tasks], start, end), due, start, end)
    term = sigterm_seconds(fleet.agents[0], args.term_timeout)
    record = {
        "scenario": "many-tasks",
        "tasks": len(tasks),
        "interval_s": interval,
        "runs_per_s": rate,
        "window_s": length,
        "drain_s": args.drain,
        "create_s": round(creation.seconds, 1),
        "create_mode": "burst" if args.burst else "paced",
        "create_failed": len(creation.failed),
        "delivery_s": round(delivery, 1),
        "held_by_agent": held[0],
        **due_shape(instants, 1, start, end),
        **figures,
        **window.figures(),
        "agent_sigterm_exit_s": None if term is None else round(term, 2),
        "term_timeout_s": args.term_timeout,
        **environment(),
    }
    stop_daemons([fleet.server, *fleet.agents])
    agent = record["agent-0"]
    health = agent["health_s"]
    late = figures["lateness_s"]
    rows = [
        (
            "instants due in the window",
            f"{due:,} (per second: mean {record['due_per_s_mean']}, max {record['due_per_s_max']})",
        ),
        (
            "results stored (after drain)",
            f"{figures['stored']:,} = "
            f"{percent(figures['stored_ratio'])} of due; {figures['stored_by_window_end']:,} "
            "by the window's end",
        ),
        (
            "by status",
            ", ".join(f"{k} {v:,}" for k, v in sorted(figures["statuses"].items())) or "-",
        ),
        ("reasons", "; ".join(f"{k} ({v:,})" for k, v in figures["reasons"].items()) or "-"),
        (
            "stored within 1 s / 5 s",
            f"{percent(figures['within_1s'])} / {percent(figures['within_5s'])} of due "
            f"(runs, not skips, within 1 s: {percent(figures['ran_within_1s'])})",
        ),
        (
            "start lateness p50/p99/max",
            f"{seconds(late['p50'])} / {seconds(late['p99'])} / "
            f"{seconds(late['max'])} (n={late['n']:,})",
        ),
        ("agent open fds (max)", f"{agent['fds_max']}"),
        ("agent RSS (max)", f"{agent['rss_mb_max']} MB"),
        (
            "agent / server CPU",
            f"{percent(agent['cpu_share'])} / {percent(record['server']['cpu_share'])} of one core",
        ),
        (
            "agent health p50/p99/max",
            f"{seconds(health['p50'])} / {seconds(health['p99'])} / "
            f"{seconds(health['max'])} ({health['n']} answered, {health['failed']} failed)",
        ),
        ("agent running / spooled (max)", f"{agent['running_max']} / {agent['spooled_max']}"),
        (
            "agent SIGTERM to exit",
            f"killed: still alive after {args.term_timeout:g} s"
            if term is None
            else f"{term:.2f} s",
        ),
        (
            "log warnings/errors",
            ", ".join(f"{name} {record[name]['log']}" for name in ("agent-0", "server")),
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    for line in window.top_logs():
        print(f"    {line}")
    print(json.dumps(record, sort_keys=True))
    return record


def scenario_2(args: argparse.Namespace, pg: Postgres, root: Path, daemons: list[Daemon]) -> None:
    """Many waiting tasks, then (``--compare-tasks``) few tasks every second, for comparison."""
    many = many_tasks(args, pg, root, daemons, args.tasks, args.interval, args.window)
    label = f"{args.tasks:,} tasks every {args.interval} s"
    figures = loadfigures.many_tasks_figures(label, many, judged=True)
    if args.compare_tasks:
        few = many_tasks(args, pg, root, daemons, args.compare_tasks, 1, args.compare_window)
        label = f"{args.compare_tasks:,} tasks every 1 s (comparison)"
        figures += loadfigures.many_tasks_figures(label, few, judged=False)
    for figure in figures:
        emit(args.json_out, figure)


def scenario_1(args: argparse.Namespace, pg: Postgres, root: Path, daemons: list[Daemon]) -> None:
    for figure in loadfigures.sweep_figures(sweep(args, pg, root, daemons), args.ceiling):
        emit(args.json_out, figure)


def sweep(
    args: argparse.Namespace, pg: Postgres, root: Path, daemons: list[Daemon]
) -> list[loadfigures.Step]:
    """Scenario 1: steps of rising rate until past saturation (or ``--rates``' steps)."""
    agents = 2
    plan = rate_plan(args.ceiling, args.quick) if args.rates == "auto" else parse_rates(args.rates)
    print(
        f"\n== sweep: {agents} agents, tasks every 1 s running bash (witnessed), total rates "
        f"{'up to past saturation, from ' if args.rates == 'auto' else ''}{plan} runs/s "
        f"(ceiling {args.ceiling} starts/s), {args.step_window:g} s per step"
    )
    dsn = pg.create_database()
    fleet = start_fleet(root / "sweep", agents, dsn, daemons)
    api = Operator(fleet)
    agent_ids = [str((agent_health(fleet, i) or {}).get("agent_id")) for i in range(agents)]
    header = (
        f"  {'runs/s':>6} {'tasks':>5} {'due':>6} {'witnessed':>9} {'stored':>7} "
        f"{'<=1s/s':>7} {'skipped':>7} {'unacc.':>6} {'late p50':>9} {'late p99':>9} "
        f"{'wit p99':>8} {'fds max':>7} {'health p99':>10}  create/deliver"
    )
    lines: list[str] = []
    steps: list[loadfigures.Step] = []
    past_saturation = 0
    for rate in plan[: args.max_steps]:
        tasks_count = max(1, round(rate / agents))  # each task runs on both agents
        old = [t[0] for t in live_tasks(dsn)]
        if old:
            delete_tasks(api, old, args.create_concurrency)
            wait_agents(
                fleet,
                "the agents to drop the last step's tasks",
                lambda a: a.get("tasks") == 0,
                args.delivery_timeout,
            )
        wait_agents(
            fleet,
            "the agents to finish and report the last step's runs",
            lambda a: not a.get("running") and not a.get("spooled"),
            60,
        )
        creation = create_tasks(
            api, tasks_count, SWEEP_COMMAND, 1, not args.burst, args.create_concurrency
        )
        tasks = live_tasks(dsn)
        delivery, answers = wait_agents(
            fleet,
            f"the agents to hold {len(tasks)} tasks",
            holding(len(tasks)),
            args.delivery_timeout,
        )
        start, end, window = measure_window(fleet, args, args.step_window)
        time.sleep(args.drain)
        task_ids = [t[0] for t in tasks]
        # Count only once every run of the window is reported: the step's tasks go (the
        # server still takes results of instants before the deletion), then the agents
        # finish their runs and empty their spools. What is missing after that is lost.
        delete_tasks(api, task_ids, args.create_concurrency)
        reported, _ = wait_agents(
            fleet,
            "the agents to drop the step's tasks and report its runs",
            lambda a: a.get("tasks") == 0 and not a.get("running") and not a.get("spooled"),
            args.report_timeout,
        )
        instants = due_instants(tasks, start, end)
        due = sum(len(v) for v in instants.values()) * agents
        results = stored_results(dsn, task_ids, start, end)
        figures = account(results, due, start, end)
        witnesses = {
            agent_id: read_witness(agent.workdir / "witness", set(task_ids), start, end)
            for agent_id, agent in zip(agent_ids, fleet.agents, strict=True)
        }
        accounted = account_instants(instants, witnesses, results)
        record = {
            "scenario": "sweep",
            "runs_per_s": rate,
            "tasks": len(tasks),
            "agents": agents,
            "agent_ids": agent_ids,
            "window_s": args.step_window,
            "drain_s": args.drain,
            "create_s": round(creation.seconds, 2),
            "create_failed": len(creation.failed),
            "delivery_s": round(delivery, 1),
            "report_wait_s": round(reported, 1),
            "held_by_agents": [None if a is None else a.get("tasks") for a in answers],
            **due_shape(instants, agents, start, end),
            **figures,
            "witnessed": accounted["ran"],
            "witnessed_ratio": fraction(accounted["ran"], due),
            "accounting": accounted,
            **window.figures(),
            **environment(),
        }
        late = figures["lateness_s"]
        fds = max(record[f"agent-{i}"]["fds_max"] or 0 for i in range(agents))
        health = max(
            (record[f"agent-{i}"]["health_s"]["p99"] or 0.0 for i in range(agents)), default=0
        )
        line = (
            f"  {rate:>6} {len(tasks):>5} {due:>6} {percent(record['witnessed_ratio']):>9} "
            f"{percent(figures['stored_ratio']):>7} {figures['ran_on_time_per_s']:>7} "
            f"{accounted['skipped']:>7} {accounted['unaccounted']:>6} "
            f"{seconds(late['p50']):>9} {seconds(late['p99']):>9} "
            f"{seconds(accounted['witness_lateness_s']['p99']):>8} "
            f"{fds:>7} {seconds(health):>10}  {creation.seconds:.1f} s / {delivery:.1f} s"
        )
        lines.append(line)
        print(header)
        print(line)
        if figures["reasons"]:
            print("    reasons: " + "; ".join(f"{k} ({v})" for k, v in figures["reasons"].items()))
        if accounted["unaccounted_by"]:
            print(f"    unaccounted: {accounted['unaccounted_by']}")
        for log_line in window.top_logs():
            print(f"    {log_line}")
        print(json.dumps(record, sort_keys=True))
        steps.append(
            loadfigures.Step(
                rate,
                record["due_per_s_mean"],
                figures["ran_on_time_per_s"],
                late["p50"],
                late["p99"],
                accounted["unaccounted"],
                accounted["doubled"],
                {
                    "due_per_s": record["due_per_s_mean"],
                    "on_time_per_s": figures["ran_on_time_per_s"],
                    "statuses": figures["statuses"],
                    "accounting": accounted,
                    "agent_cpu_share": [record[f"agent-{i}"]["cpu_share"] for i in range(agents)],
                    "server_cpu_share": record["server"]["cpu_share"],
                    "loadavg_1m": record["loadavg_1m"],
                },
            )
        )
        # Past saturation: one more step, then stop (explicit --rates run every step).
        if args.rates == "auto" and (past_saturation or saturated(steps)):
            past_saturation += 1
            if past_saturation > 1:
                break
    stop_daemons([fleet.server, *fleet.agents])
    print(
        "\n  sweep summary (witnessed and stored: ratios to due; <=1s/s: runs, not skips, "
        "whose result was stored within 1 s of their instant, per second; unacc.: instants "
        "neither witnessed nor recorded skipped; late: started_at - instant; wit: the "
        "witness's start time - instant)"
    )
    print(header)
    for line in lines:
        print(line)
    return steps


def parse_rates(text: str) -> list[int]:
    return [int(r) for r in text.split(",") if r.strip()]


#: Scale flags: (full, --quick); a flag given on the command line wins over both.
SCALE: dict[str, tuple[Any, Any]] = {
    "tasks": (10_000, 1_000),
    "interval": (100, 10),
    "window": (60.0, 15.0),
    "compare_tasks": (100, 100),
    "compare_window": (30.0, 10.0),
    "step_window": (20.0, 6.0),
    "max_steps": (12, 4),
    "drain": (10.0, 5.0),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    parser.add_argument("--scenario", choices=["many-tasks", "sweep", "both"], default="both")
    group = parser.add_argument_group("many-tasks (scenario 2)")
    group.add_argument("--tasks", type=int, help="tasks on the one agent (10,000; quick 1,000)")
    group.add_argument("--interval", type=int, help="their interval, in seconds (100; quick 10)")
    group.add_argument("--window", type=float, help="seconds measured (60; quick 15)")
    group.add_argument(
        "--compare-tasks",
        type=int,
        help="then this many tasks every 1 s on a fresh agent, for comparison (100; 0: none)",
    )
    group.add_argument("--compare-window", type=float, help="its window (30; quick 10)")
    group.add_argument(
        "--term-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for the agent to exit on SIGTERM, then SIGKILL",
    )
    group = parser.add_argument_group("sweep (scenario 1)")
    group.add_argument(
        "--rates",
        default="auto",
        help="total runs per second over both agents, one step each; auto: 10, then "
        "fractions of the ceiling until past saturation",
    )
    group.add_argument("--step-window", type=float, help="seconds per step (20; quick 6)")
    group.add_argument("--max-steps", type=int, help="at most this many steps (12; quick 4)")
    group.add_argument(
        "--report-timeout",
        type=float,
        default=120.0,
        help="seconds to wait, after a step, for the agents to report its runs",
    )
    group = parser.add_argument_group("both")
    group.add_argument(
        "--drain",
        type=float,
        help="seconds after a window before its results are counted (10; quick 5)",
    )
    group.add_argument(
        "--burst",
        action="store_true",
        help="create tasks as fast as possible instead of over one interval",
    )
    group.add_argument("--create-concurrency", type=int, default=8)
    group.add_argument(
        "--delivery-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the agents to hold every task (then measured as they are)",
    )
    group.add_argument("--sample-interval", type=float, default=0.5)
    group.add_argument(
        "--database",
        default=None,
        help="DSN of a PostgreSQL server to create (and drop) the databases "
        "on; default: an embedded PostgreSQL in the temporary folder",
    )
    group.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary folder (logs, agent data, witness files)",
    )
    args = parser.parse_args()
    for name, (full, quick) in SCALE.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def spawn_ceiling(args: argparse.Namespace) -> float | None:
    """The bare starts/s of the sweep's command: from ``--ceilings``, else measured here."""
    value = ceiling_value(load_ceilings(args.ceilings), loadfigures.SPAWN_CEILING)
    if value is None and args.scenario in ("sweep", "both"):
        from bench.ceilings import spawn_ceiling as measure  # it imports this module

        value = round(measure(SWEEP_COMMAND, 2.0 if args.quick else 5.0), 1)
        print(f"{loadfigures.SPAWN_CEILING}: {value:,.0f} starts/s (measured here)")
    return value


def main() -> int:
    args = parse_args()
    args.ceiling = spawn_ceiling(args)
    root = Path(tempfile.mkdtemp(prefix="bench-agent-load-"))
    daemons: list[Daemon] = []
    pg: Postgres | None = None
    interrupted = False
    keep = args.keep

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both end up in the clean-up below (even when started from a
    # script that ignores SIGINT in background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, terminated)
    print(f"taskscheduler {environment()['taskscheduler']} from {sys.prefix}; folder {root}")
    try:
        pg = Postgres(args.database, root / "postgres")
        if args.scenario in ("sweep", "both"):
            scenario_1(args, pg, root, daemons)
        if args.scenario in ("many-tasks", "both"):
            scenario_2(args, pg, root, daemons)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the daemons", file=sys.stderr)
        interrupted = True
    except BaseException:
        keep = True  # for the logs
        for daemon in daemons:
            print(f"--- {daemon.name} ({daemon.log_path})\n{daemon.log()[-2000:]}", file=sys.stderr)
        raise
    finally:
        # Cleaning up is bounded (SIGKILL after a grace): let a second Ctrl-C not cut it short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_daemons(daemons)
        if pg is not None:
            pg.close(drop=not keep)
        if keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
