"""``taskscheduler tasks ...``: list, show, create, edit, pause, resume, run, remove
tasks, and read what their runs printed."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from taskscheduler.cli import ids
from taskscheduler.cli.client import JSON
from taskscheduler.cli.context import Settings, pass_settings
from taskscheduler.cli.executions import print_executions
from taskscheduler.cli.tables import (
    details,
    execution_summary,
    instant,
    short_id,
    shorten,
    table,
    when,
)
from taskscheduler.cli.taskoptions import option_details, option_flags, options_body

COMMAND_WIDTH = 50
# How often `run --wait` asks whether the execution is complete.
POLL_SECONDS = 0.5


@click.group()
def tasks() -> None:
    """Tasks: what runs where and when, and what it printed."""


def _frequency(every: str) -> str:
    """``30 seconds`` or ``every 30 seconds``: the server's grammar, said as in the seed."""
    every = every.strip()
    return every if every.lower().startswith("every ") else f"every {every}"


def _schedule(every: str | None, cron: str | None, timezone: str | None) -> JSON:
    """The schedule fields given: ``frequency``, or ``cron`` with its ``timezone``."""
    if every is not None and cron is not None:
        raise click.UsageError("give --every or --cron, not both")
    if timezone is not None and every is not None:
        raise click.UsageError("--timezone goes with --cron, not with --every")
    body: JSON = {}
    if every is not None:
        body["frequency"] = _frequency(every)
    if cron is not None:
        body["cron"] = cron
    if timezone is not None:
        body["timezone"] = timezone
    return body


def _next_instants(task: JSON, now: datetime) -> str:
    return "\n".join(f"next: {instant(at, now)}" for at in task.get("next_instants") or [])


def _command(words: tuple[str, ...]) -> str:
    # `-- echo hello` and `-- "echo hello"` both mean the shell command `echo hello`.
    return " ".join(words)


# -- reading -----------------------------------------------------------------------------


@tasks.command("ls")
@click.option("--state", type=click.Choice(["active", "paused", "deleted"]), help="Only these.")
@click.option("--command", "command", help="Only tasks whose command contains this text.")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many (newest first).")
@click.option("--no-trunc", is_flag=True, help="Whole ids and commands.")
@pass_settings
def ls(
    settings: Settings,
    state: str | None,
    command: str | None,
    limit: int | None,
    no_trunc: bool,
) -> None:
    """Every task, newest first (all states unless --state says)."""
    found: list[JSON] = []
    cursor = None
    for page in settings.client().iter_task_pages(state, command, limit):
        found.extend(page.get("tasks", []))
        cursor = page.get("next_cursor")
    # With --json: the server's shape, every page's tasks in one list.
    listed = found[:limit] if limit else found
    body = {"tasks": listed, "next_cursor": cursor}
    now = settings.now()
    width = None if no_trunc else COMMAND_WIDTH
    settings.emit(
        body,
        lambda: table(
            ["ID", "STATE", "FREQUENCY", "NEXT", "LAST EXECUTION", "LAST RESULTS", "COMMAND"],
            [
                [
                    short_id(t.get("task_id"), no_trunc),
                    t.get("state"),
                    _schedule_text(t),
                    when(t.get("next_instant"), now),
                    when((t.get("last_execution") or {}).get("scheduled_at"), now),
                    execution_summary(t.get("last_execution")),
                    shorten(str(t.get("command", "")), width),
                ]
                for t in listed
            ],
        ),
    )


def _schedule_text(task: JSON) -> str:
    """``30 seconds`` for a frequency; ``cron 0 9 * * * Europe/Paris`` for a cron task."""
    if task.get("cron"):
        zone = task.get("timezone") or "UTC"
        return f"cron {task['cron']}" + ("" if zone == "UTC" else f" {zone}")
    return str(task.get("frequency") or "").removeprefix("every ")


def task_details(task: JSON, now: datetime) -> str:
    last = task.get("last_execution") or None
    revision = task.get("revision")
    return details(
        [
            ("task", task.get("task_id")),
            ("state", task.get("state")),
            ("command", task.get("command")),
            ("frequency", task.get("frequency")),
            ("cron", task.get("cron")),
            ("timezone", task.get("timezone")),
            ("time limit", f"{task.get('time_limit_seconds')} seconds"),
            *option_details(task),
            ("anchor", instant(task.get("anchor"), now)),
            ("created", instant(task.get("created_at"), now)),
            ("revision", None if revision is None else str(revision)),
            ("updated", instant(task.get("updated_at"), now)),
            ("paused", instant(task.get("paused_at"), now)),
            ("deleted", instant(task.get("deleted_at"), now)),
            ("next", instant(task.get("next_instant"), now)),
            # The ones after it, so that a cron expression can be checked before it fires.
            *(("", instant(at, now)) for at in (task.get("next_instants") or [])[1:]),
            ("last execution", instant(last.get("scheduled_at"), now) if last else None),
            ("last results", execution_summary(last)),
        ]
    )


@tasks.command("show")
@click.argument("task")
@pass_settings
def show(settings: Settings, task: str) -> None:
    """One task: its schedule, state, next instant, last execution."""
    client = settings.client()
    body = client.get_task(ids.task_id(client, task))
    settings.emit(body, lambda: task_details(body, settings.now()))


# -- changing ----------------------------------------------------------------------------


@tasks.command("create", context_settings={"allow_interspersed_args": False})
@click.option(
    "--every",
    metavar="INTERVAL",
    help='How often: "30 seconds", "5 minutes", "1 hour" ("every ..." also accepted).',
)
@click.option(
    "--cron",
    metavar="EXPRESSION",
    help='Instead of --every: a cron expression, e.g. "0 9 * * MON-FRI", "*/10 * * * * *" '
    "(a leading seconds field), @hourly, @daily.",
)
@click.option(
    "--timezone",
    metavar="ZONE",
    help="The IANA time zone of --cron (default UTC), e.g. Europe/Paris.",
)
@click.option(
    "--time-limit",
    type=click.IntRange(min=1),
    metavar="SECONDS",
    help="How long a run may take (default: the interval, at most a day).",
)
@option_flags(editing=False)
@click.argument("command", nargs=-1, required=True)
@pass_settings
def create(
    settings: Settings,
    every: str | None,
    cron: str | None,
    timezone: str | None,
    time_limit: int | None,
    command: tuple[str, ...],
    **options: Any,
) -> None:
    """Run COMMAND on every agent of the fleet, every INTERVAL (or at the times of a cron
    expression).

    \b
        taskscheduler tasks create --every "30 seconds" -- echo hello
        taskscheduler tasks create --every "1 hour" -- 'cd /srv && ./backup'
        taskscheduler tasks create --cron "0 9 * * MON-FRI" --timezone Europe/Paris -- ./report
        taskscheduler tasks create --every "1 minute" --target-label role=web \\
            --overlap replace --retries 2 --env MODE=fast -- ./sync

    The words after -- are joined with spaces into one shell command. Prints the new
    task's id, then (on stderr, so that scripts still read the id alone) its next instants.
    """
    schedule = _schedule(every, cron, timezone)
    if not schedule.get("frequency") and not schedule.get("cron"):
        raise click.UsageError("give --every INTERVAL or --cron EXPRESSION")
    body = settings.client().create_task(
        _command(command),
        schedule.pop("frequency", None),
        time_limit,
        {**schedule, **options_body(options)},
    )
    settings.emit(body, lambda: str(body.get("command_id")))
    if not settings.as_json and body.get("next_instants"):
        click.echo(_next_instants(body, settings.now()), err=True)


@tasks.command("edit")
@click.argument("task")
@click.option("--every", metavar="INTERVAL", help="A new frequency (re-anchors at the change).")
@click.option(
    "--cron", metavar="EXPRESSION", help="A new cron expression (instead of a frequency)."
)
@click.option(
    "--timezone", metavar="ZONE", help="A new IANA time zone for the task's cron expression."
)
@click.option("--time-limit", type=click.IntRange(min=1), metavar="SECONDS")
@option_flags(editing=True)
@click.argument("command", nargs=-1)
@pass_settings
def edit(
    settings: Settings,
    task: str,
    every: str | None,
    cron: str | None,
    timezone: str | None,
    time_limit: int | None,
    command: tuple[str, ...],
    **options: Any,
) -> None:
    """Change a task's command (after --), schedule, time limit or options, from its
    next instant.

    \b
        taskscheduler tasks edit 3f1e --every "1 minute"
        taskscheduler tasks edit 3f1e --cron "*/15 * * * *" --timezone America/New_York
        taskscheduler tasks edit 3f1e -- echo goodbye
    """
    changes: JSON = options_body(options)
    if command:
        changes["command"] = _command(command)
    if every is not None and cron is not None:
        raise click.UsageError("give --every or --cron, not both")
    changes.update(
        {"frequency": _frequency(every)} if every is not None else {},
        **({} if cron is None else {"cron": cron}),
        **({} if timezone is None else {"timezone": timezone}),
    )
    if time_limit is not None:
        changes["time_limit_seconds"] = time_limit
    if not changes:
        raise click.UsageError(
            "nothing to change: give --every, --cron, --timezone, --time-limit, an option "
            "or -- COMMAND"
        )
    client = settings.client()
    body = client.update_task(ids.task_id(client, task), changes)
    settings.emit(body, lambda: task_details(body, settings.now()))


@tasks.command("pause")
@click.argument("task")
@pass_settings
def pause(settings: Settings, task: str) -> None:
    """Stop running a task everywhere until it is resumed (no catch-up)."""
    client = settings.client()
    body = client.pause_task(ids.task_id(client, task))
    settings.emit(body, lambda: task_details(body, settings.now()))


@tasks.command("resume")
@click.argument("task")
@pass_settings
def resume(settings: Settings, task: str) -> None:
    """Run a paused task again, on the grid it had."""
    client = settings.client()
    body = client.resume_task(ids.task_id(client, task))
    settings.emit(body, lambda: task_details(body, settings.now()))


@tasks.command("run")
@click.argument("task")
@click.option(
    "--wait",
    is_flag=True,
    help="Wait until the execution is complete (every agent reported, or its reporting "
    "deadline passed), then print what each agent printed.",
)
@pass_settings
def run(settings: Settings, task: str, wait: bool) -> None:
    """Run a task now, once, on each of its agents (a paused one too)."""
    client = settings.client()
    task_id = ids.task_id(client, task)
    body = client.run_task(task_id)
    at = str(body.get("scheduled_at"))
    if not wait:
        settings.emit(
            body,
            lambda: (
                f"running {task_id} now, as its manual execution at {at}\n"
                f"its output: taskscheduler tasks output {task_id} --at {at}"
            ),
        )
        return
    if not settings.as_json:
        click.echo(f"running {task_id} now, as its manual execution at {at}", err=True)
    # The server completes every execution by its reporting deadline: this ends.
    execution = client.execution(task_id, at)
    while not execution.get("complete"):
        settings.sleep(POLL_SECONDS)
        execution = client.execution(task_id, at)
    if settings.as_json:
        settings.emit(execution, str)
    else:
        print_executions(settings, [execution])


@tasks.command("rm")
@click.argument("task")
@pass_settings
def rm(settings: Settings, task: str) -> None:
    """Delete a task: every agent stops it; its history stays readable."""
    client = settings.client()
    body = client.delete_task(ids.task_id(client, task))
    settings.emit(body, lambda: f"deleted {body.get('task_id')}")


# -- output ------------------------------------------------------------------------------


@tasks.command("output")
@click.argument("task")
@click.option("--history", is_flag=True, help="Past executions too, newest first.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="How many executions --history shows.",
)
@click.option("--at", "at", metavar="INSTANT", help="The execution scheduled at this instant.")
@pass_settings
def output(settings: Settings, task: str, history: bool, limit: int, at: str | None) -> None:
    """What each agent's run printed, stdout and stderr: the latest complete execution,
    the last few with --history, or one with --at."""
    if history and at:
        raise click.UsageError("--history and --at are exclusive")
    client = settings.client()
    task_id = ids.task_id(client, task)
    if history:
        body = client.executions(task_id, limit)
        executions = body.get("executions", [])
    elif at:
        body = client.execution(task_id, at)
        executions = [body]
    else:
        body = client.latest_output(task_id)
        executions = [body] if body.get("scheduled_at") else []
    if settings.as_json:
        settings.emit(body, str)
    elif not executions:
        click.echo("no complete execution yet" if not history else "no execution yet")
    else:
        print_executions(settings, executions)
