"""``taskscheduler audit``: the audit log, newest first."""

from __future__ import annotations

import click

from taskscheduler.cli.context import Settings, pass_settings
from taskscheduler.cli.tables import compact_json, shorten, table, when

DETAILS_WIDTH = 60


@click.command()
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--before", type=click.IntRange(min=1), help="Events older than this event id.")
@click.option("--no-trunc", is_flag=True, help="Whole details.")
@pass_settings
def audit(settings: Settings, limit: int, before: int | None, no_trunc: bool) -> None:
    """Who did what, when, from where: newest first."""
    body = settings.client().audit(limit, before)
    now = settings.now()
    width = None if no_trunc else DETAILS_WIDTH

    def human() -> str:
        return table(
            ["ID", "AT", "ACTOR", "ACTION", "TARGET", "PEER", "DETAILS"],
            [
                [
                    e.get("id"),
                    when(e.get("at"), now),
                    e.get("actor"),
                    e.get("action"),
                    e.get("target"),
                    e.get("peer"),
                    shorten(compact_json(e.get("details")), width) if e.get("details") else None,
                ]
                for e in body.get("events", [])
            ],
        )

    settings.emit(body, human)
    if body.get("next_before") and not settings.as_json:
        click.echo(f"older events: --before {body['next_before']}", err=True)
