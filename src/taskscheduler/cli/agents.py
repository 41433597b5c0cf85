"""``taskscheduler agents ...``: the enrolled agents, one agent, revoking one."""

from __future__ import annotations

from datetime import datetime

import click

from taskscheduler.cli import ids
from taskscheduler.cli.client import JSON
from taskscheduler.cli.context import Settings, pass_settings
from taskscheduler.cli.tables import details, instant, short_id, table, when


@click.group()
def agents() -> None:
    """Agents: who runs the tasks, and whether they are alive."""


def state(agent: JSON) -> str:
    """The server's state; from a server that has none, what its record says."""
    if agent.get("state"):
        return str(agent["state"])
    return "revoked" if agent.get("revoked_at") else "enrolled"


def labels(agent: JSON) -> str | None:
    """``dc=eu,role=web``; None (shown as -) when it has none or the server shows none."""
    given = agent.get("labels")
    if not isinstance(given, dict) or not given:
        return None
    return ",".join(f"{k}={given[k]}" for k in sorted(given))


@agents.command("ls")
@click.option("--no-trunc", is_flag=True, help="Whole ids.")
@pass_settings
def ls(settings: Settings, no_trunc: bool) -> None:
    """Every enrolled agent, with its state and last heartbeat."""
    body = settings.client().list_agents()
    now = settings.now()
    settings.emit(
        body,
        lambda: table(
            [
                "ID",
                "STATE",
                "URL",
                "LABELS",
                "LAST SEEN",
                "VERSION",
                "HOST",
                "TASKS",
                "RUNNING",
                "SPOOLED",
            ],
            [
                [
                    short_id(a.get("agent_id"), no_trunc),
                    state(a),
                    a.get("url"),
                    labels(a),
                    when(a.get("last_seen_at"), now),
                    a.get("version"),
                    a.get("hostname"),
                    a.get("tasks"),
                    a.get("running"),
                    a.get("spooled"),
                ]
                for a in body.get("agents", [])
            ],
        ),
    )


def agent_details(agent: JSON, now: datetime) -> str:
    return details(
        [
            ("agent", agent.get("agent_id")),
            ("state", state(agent)),
            ("url", agent.get("url")),
            ("labels", labels(agent)),
            ("enrolled", instant(agent.get("enrolled_at"), now)),
            ("revoked", instant(agent.get("revoked_at"), now)),
            ("url released", instant(agent.get("url_released_at"), now)),
            ("last seen", instant(agent.get("last_seen_at"), now)),
            ("started", instant(agent.get("started_at"), now)),
            ("version", agent.get("version")),
            ("hostname", agent.get("hostname")),
            ("tasks", agent.get("tasks")),
            ("running", agent.get("running")),
            ("spooled", agent.get("spooled")),
            ("dropped results", agent.get("dropped_results")),
        ]
    )


@agents.command("show")
@click.argument("agent")
@pass_settings
def show(settings: Settings, agent: str) -> None:
    """One agent: state, last heartbeat, version, host, counts."""
    client = settings.client()
    body = client.get_agent(ids.agent_id(client, agent))
    settings.emit(body, lambda: agent_details(body, settings.now()))


@agents.command("revoke")
@click.argument("agent")
@pass_settings
def revoke(settings: Settings, agent: str) -> None:
    """Revoke an agent: its credential is refused from now on and it drops its tasks;
    no other agent may enrol at its URL until that is released."""
    client = settings.client()
    body = client.revoke_agent(ids.agent_id(client, agent))
    settings.emit(body, lambda: f"revoked {body.get('agent_id')} at {body.get('url')}")


@agents.command("release-url")
@click.argument("agent")
@pass_settings
def release_url(settings: Settings, agent: str) -> None:
    """Let another agent enrol at a revoked agent's URL."""
    client = settings.client()
    body = client.release_agent_url(ids.agent_id(client, agent))
    settings.emit(body, lambda: f"released {body.get('url')} (was agent {body.get('agent_id')})")
