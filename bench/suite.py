"""The benchmark suite: the machine's ceilings, then every scenario, one table.

    .venv/bin/python bench/suite.py [--quick] [--only 1,3] [--ceilings FILE]
        [--args N='ARGS' ...] [--out-dir bench-results] [--timeout S]

(``scripts/bench`` makes or updates ``.venv`` and runs this.) First ``ceilings.py``
measures this machine's limits (unless ``--ceilings`` names a file it wrote before); then
each scenario script runs, in order 1..8, as a subprocess of this venv's Python with
``--ceilings``/``--json-out`` (and ``--quick``), printing its own table as it goes:

    1  bench_agent_load.py --scenario sweep       1-throughput
    2  bench_agent_load.py --scenario many-tasks  2-many-tasks
    3  bench_freshness.py                         3-freshness
    4  bench_ingest.py                            4-ingest
    5  bench_query.py                             5-query
    6  bench_create.py                            6-fanout (creation rate)
    6  bench_fleet.py                             6-fanout, 7-server-memory (--scenario X
                                                  when --only selects one of them)
    8  bench_replicas.py                          8-replicas (two server replicas, one
                                                  PostgreSQL, 1,000 simulated agents)

A script that is not there is skipped with a line saying so. ``--args 1='--rates
10,100'`` appends arguments to scenario 1's command (scale overrides); it may be given
once per scenario. Every figure's JSON line (and one line per ceiling, scenario
``0-ceilings``) goes to ``OUT-DIR/<timestamp>.jsonl``, the ceilings' object to
``OUT-DIR/<timestamp>-ceilings.json``; at the end one table: scenario, figure, value,
ceiling, ratio, target, met. A script that runs past ``--timeout`` is stopped (SIGTERM to
its process group, SIGKILL a minute later). The suite exits non-zero if a script failed
to measure (non-zero exit, timeout); a missed target is a figure, not a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.contract import problems

BENCH = Path(__file__).resolve().parent
CEILINGS = "0-ceilings"


@dataclass
class Step:
    scenarios: tuple[str, ...]  # the numbers --only selects it by
    script: str
    args: list[str] = field(default_factory=list)
    #: Arguments that narrow a script of several scenarios to the one selected.
    narrow: dict[str, list[str]] = field(default_factory=dict)

    def label(self) -> str:
        return " ".join([self.script, *self.args])


STEPS = [
    Step(("1",), "bench_agent_load.py", ["--scenario", "sweep"]),
    Step(("2",), "bench_agent_load.py", ["--scenario", "many-tasks"]),
    Step(("3",), "bench_freshness.py"),
    Step(("4",), "bench_ingest.py"),
    Step(("5",), "bench_query.py"),
    Step(("6",), "bench_create.py"),
    Step(
        ("6", "7"),
        "bench_fleet.py",
        narrow={"6": ["--scenario", "6-fanout"], "7": ["--scenario", "7-server-memory"]},
    ),
    Step(("8",), "bench_replicas.py"),
]


@dataclass
class Outcome:
    step: Step
    status: str  # "ok", "missing", "failed (exit N)", "timed out"
    seconds: float = 0.0
    records: list[dict[str, Any]] = field(default_factory=list)


def run(command: list[str], timeout: float) -> tuple[int | None, float]:
    """Run ``command`` in its own session; (exit status or None if timed out, seconds)."""
    began = time.monotonic()
    child = subprocess.Popen(command, start_new_session=True)
    try:
        return child.wait(timeout=timeout), time.monotonic() - began
    except subprocess.TimeoutExpired:
        print(f"  {command[1]} ran past {timeout:g} s: stopping it", file=sys.stderr)
        stop(child)
        return None, time.monotonic() - began
    except BaseException:
        stop(child)  # Ctrl-C: the script cleans up its daemons on SIGTERM
        raise


def stop(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGTERM)
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a script appended, each checked against the contract."""
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            print(f"  {path.name}:{number}: not JSON ({e}): dropped", file=sys.stderr)
            continue
        wrong = problems(record)
        if wrong:
            print(f"  {path.name}:{number}: {'; '.join(wrong)}", file=sys.stderr)
        out.append(record)
    return out


def ceiling_records(ceilings: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "scenario": CEILINGS,
            "figure": name,
            "value": entry.get("value"),
            "unit": entry.get("unit"),
            "ceiling": None,
            "ratio": None,
            "target": None,
            "met": None,
            "detail": {k: v for k, v in entry.items() if k not in ("value", "unit")},
        }
        for name, entry in ceilings.items()
        if name != "machine" and isinstance(entry, dict)
    ]


def cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1 else f"{value:,.1f}"
    return str(value)


def table(outcomes: list[Outcome], ceilings: list[dict[str, Any]]) -> str:
    rows = [("scenario", "figure", "value", "ceiling", "ratio", "target", "met")]
    for record in [*ceilings, *(r for o in outcomes for r in o.records)]:
        rows.append(
            (
                str(record.get("scenario")),
                str(record.get("figure"))[:52],
                cell(record.get("value"))
                if record.get("value") is None
                else f"{cell(record.get('value'))} {record.get('unit') or ''}".strip(),
                cell(record.get("ceiling")),
                cell(record.get("ratio")),
                cell(record.get("target")),
                cell(record.get("met")),
            )
        )
    for outcome in outcomes:
        if outcome.status != "ok" or not outcome.records:
            what = outcome.status if outcome.status != "ok" else "ok, but no figure"
            rows.append(("/".join(outcome.step.scenarios), outcome.step.label(), what, *"----"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small scale, for validation")
    parser.add_argument("--only", help="scenario numbers to run, e.g. 1,3 (default: all)")
    parser.add_argument("--ceilings", help="a ceilings file to reuse instead of measuring")
    parser.add_argument(
        "--command",
        action="append",
        default=[],
        metavar="LABEL=CMD",
        help="another spawn:LABEL ceiling for ceilings.py",
    )
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar="N=ARGS",
        help="extra arguments for scenario N's script (e.g. 2='--tasks 5000')",
    )
    parser.add_argument("--out-dir", default="bench-results")
    parser.add_argument(
        "--timeout", type=float, help="seconds per script (default 3600, 600 with --quick)"
    )
    args = parser.parse_args()
    args.only = None if args.only is None else {s.strip() for s in args.only.split(",")}
    extra: dict[str, list[str]] = {}
    for item in args.args:
        number, _, text = item.partition("=")
        extra.setdefault(number.strip(), []).extend(shlex.split(text))
    args.extra = extra
    if args.timeout is None:
        args.timeout = 600.0 if args.quick else 3600.0
    return args


def main() -> int:
    args = parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    jsonl = out_dir / f"{stamp}.jsonl"
    quick = ["--quick"] if args.quick else []
    python = sys.executable
    # SIGTERM stops the running script as Ctrl-C does (run() passes it on to its group).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupted)

    if args.ceilings:
        ceilings_path = Path(args.ceilings)
        print(f"== ceilings: reusing {ceilings_path}")
    else:
        ceilings_path = out_dir / f"{stamp}-ceilings.json"
        print("== ceilings: the machine's own limits")
        command = [python, str(BENCH / "ceilings.py"), "--json-out", str(ceilings_path), *quick]
        for item in args.command:
            command += ["--command", item]
        status, _ = run(command, args.timeout)
        if status != 0:
            print(f"ceilings.py could not measure (exit {status}): stopping", file=sys.stderr)
            return 1
    ceilings = json.loads(ceilings_path.read_text())
    cap = ceiling_records(ceilings)
    with open(jsonl, "a") as out:
        for record in cap:
            out.write(json.dumps(record, sort_keys=True) + "\n")

    outcomes: list[Outcome] = []
    for step in STEPS:
        if args.only is not None and not args.only & set(step.scenarios):
            continue
        script = BENCH / step.script
        print(f"\n== scenario {'/'.join(step.scenarios)}: {step.label()}", flush=True)
        if not script.exists():
            print(f"  skipped: {script.relative_to(BENCH.parent)} is not there (yet)")
            outcomes.append(Outcome(step, "missing: skipped"))
            continue
        extra = [a for n in step.scenarios for a in args.extra.get(n, [])]
        chosen = [n for n in step.scenarios if args.only is None or n in args.only]
        if len(chosen) == 1 and chosen[0] in step.narrow:
            extra = step.narrow[chosen[0]] + extra
        part = out_dir / f"{stamp}.{script.stem}.{'-'.join(step.scenarios)}.part"
        command = [python, str(script), *step.args, *quick]
        command += ["--ceilings", str(ceilings_path), "--json-out", str(part), *extra]
        print(f"  $ {shlex.join(command)}", flush=True)
        try:
            status, seconds = run(command, args.timeout)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        records = read_records(part)
        part.unlink(missing_ok=True)
        with open(jsonl, "a") as out:
            for record in records:
                out.write(json.dumps(record, sort_keys=True) + "\n")
        text = "ok" if status == 0 else "timed out" if status is None else f"failed (exit {status})"
        outcomes.append(Outcome(step, text, seconds, records))
        print(f"  ({text}, {seconds:.0f} s, {len(records)} figures)", flush=True)

    machine = ceilings.get("machine", {})
    print(
        f"\n== summary ({'quick, ' if args.quick else ''}{machine.get('cores')} cores, "
        f"{machine.get('cpu')}, Python {machine.get('python')}; figures in {jsonl})"
    )
    print(table(outcomes, cap))
    failed = [o for o in outcomes if o.status not in ("ok", "missing: skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
