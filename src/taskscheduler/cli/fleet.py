"""``taskscheduler fleet ...``: which agent URLs get the tasks, changed at run time."""

from __future__ import annotations

import click

from taskscheduler.cli.client import JSON
from taskscheduler.cli.context import Settings, pass_settings
from taskscheduler.cli.tables import short_id, table, when


@click.group()
def fleet() -> None:
    """The fleet: the agent URLs every task is given to."""


def _member_line(verb: str, member: JSON) -> str:
    agent = member.get("agent_id")
    who = f"agent {agent}" if agent else "no agent enrolled there yet"
    return f"{verb} {member.get('url')} ({who}, {member.get('state')})"


@fleet.command("ls")
@click.option("--no-trunc", is_flag=True, help="Whole agent ids.")
@pass_settings
def ls(settings: Settings, no_trunc: bool) -> None:
    """Every member URL, with the state of the agent enrolled there."""
    body = settings.client().fleet()
    now = settings.now()
    settings.emit(
        body,
        lambda: table(
            ["URL", "STATE", "AGENT", "ADDED"],
            [
                [
                    m.get("url"),
                    m.get("state"),
                    short_id(m.get("agent_id"), no_trunc) if m.get("agent_id") else None,
                    when(m.get("added_at"), now),
                ]
                for m in body.get("members", [])
            ],
        ),
    )


@fleet.command("add")
@click.argument("url")
@pass_settings
def add(settings: Settings, url: str) -> None:
    """Add an agent URL: it gets every active task."""
    body, added = settings.client().add_to_fleet(url)
    settings.emit(body, lambda: _member_line("added" if added else "already in the fleet:", body))


@fleet.command("rm")
@click.argument("url")
@pass_settings
def rm(settings: Settings, url: str) -> None:
    """Remove an agent URL: its agent is told to drop every task."""
    body = settings.client().remove_from_fleet(url)
    settings.emit(body, lambda: _member_line("removed", body))
