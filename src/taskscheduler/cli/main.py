"""The ``taskscheduler`` group: global options, the shared settings, the verbs' groups.

``--url`` / ``TASKSCHEDULER_URL``, ``--token`` / ``TASKSCHEDULER_TOKEN`` come before
the verb, ``--json`` before or after it; the verbs live in
``tasks.py``, ``agents.py``, ``fleet.py``, ``audit.py`` and ``tokens.py``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import click

from taskscheduler.cli import agents, audit, fleet, notifications, tasks, tokens
from taskscheduler.cli.context import Overrides, Settings

DEFAULT_URL = "http://127.0.0.1:8080"


def _check_url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{value!r} is not an http:// or https:// URL")
    return value


def _check_token(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    # Whitespace is never part of a token: `docker-compose exec` without -T adds a CR.
    token = (value or "").strip()
    if not token:
        return None
    if not (token.isascii() and token.isprintable()):
        raise click.BadParameter("a token is printable ASCII (tso_...)")
    return token


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="TASKSCHEDULER_URL",
    default=DEFAULT_URL,
    show_default=True,
    callback=_check_url,
    help="The server's base URL (env TASKSCHEDULER_URL).",
)
@click.option(
    "--token",
    envvar="TASKSCHEDULER_TOKEN",
    callback=_check_token,
    help="An operator token (env TASKSCHEDULER_TOKEN); a loopback server without tokens "
    "needs none.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON, for scripts.")
@click.option(
    "--ca-file",
    envvar="TASKSCHEDULER_CA_FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="The CA that signed an https:// server's certificate (default: the system's).",
)
@click.option(
    "--timeout",
    envvar="TASKSCHEDULER_TIMEOUT",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the server.",
)
@click.version_option(package_name="taskscheduler", prog_name="taskscheduler")
@click.pass_context
def cli(
    ctx: click.Context,
    url: str,
    token: str | None,
    as_json: bool,
    ca_file: str | None,
    timeout: float,
) -> None:
    """Operate a taskscheduler server: tasks, agents, the fleet, the audit log, tokens.

    Exit status: 0 ok, 1 another error, 2 usage, 3 server unreachable, 4 credential
    refused, 5 unknown id, 6 ambiguous id prefix. Wherever an id is expected, a unique
    prefix of it will do.
    """
    overrides = ctx.obj if isinstance(ctx.obj, Overrides) else Overrides()
    ctx.obj = Settings(url, token, as_json, ca_file, timeout, overrides)


def _json_after_the_verb(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(Settings).as_json = True  # type: ignore[union-attr]


def _accept_json(command: click.Command) -> None:
    """``taskscheduler tasks ls --json`` as well as ``taskscheduler --json tasks ls``."""
    command.params.append(
        click.Option(
            ["--json"],
            is_flag=True,
            expose_value=False,
            callback=_json_after_the_verb,
            help="Print the server's JSON, for scripts.",
        )
    )


tasks.tasks.add_command(notifications.notifications)
for group in (tasks.tasks, agents.agents, fleet.fleet):
    for verb in group.commands.values():
        _accept_json(verb)
    cli.add_command(group)
_accept_json(audit.audit)
cli.add_command(audit.audit)
cli.add_command(tokens.tokens)
