"""``taskscheduler tasks notifications TASK``: a task's webhooks, newest first, with
their delivery."""

from __future__ import annotations

import click

from taskscheduler.cli import ids
from taskscheduler.cli.context import Settings, pass_settings
from taskscheduler.cli.tables import short_id, table, when


@click.command("notifications")
@click.argument("task")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True)
@click.option("--before", type=click.IntRange(min=1), help="Older than this notification id.")
@pass_settings
def notifications(settings: Settings, task: str, limit: int, before: int | None) -> None:
    """The task's webhooks: which event, for which run, and whether it was delivered."""
    client = settings.client()
    body = client.notifications(ids.task_id(client, task), limit, before)
    now = settings.now()

    def human() -> str:
        rows = body.get("notifications", [])
        if not rows:
            return "no notification yet"
        return table(
            ["ID", "EVENT", "AGENT", "RUN", "DELIVERY", "ATTEMPTS", "ANSWER", "LAST TRY"],
            [
                [
                    n.get("notification_id"),
                    n.get("event"),
                    short_id(n.get("agent_id")),
                    when(n.get("scheduled_at"), now),
                    n.get("status"),
                    n.get("attempts"),
                    n.get("response_code") or n.get("error"),
                    when(n.get("updated_at"), now),
                ]
                for n in rows
            ],
        )

    settings.emit(body, human)
    if body.get("next_before") and not settings.as_json:
        click.echo(f"older notifications: --before {body['next_before']}", err=True)
