"""The flags of ``tasks create`` and ``tasks edit`` for a task's options (targeting,
run-on-one, overlap, retries, env, working dir, webhook), and how ``tasks show`` prints
them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from taskscheduler.cli.client import JSON

F = Callable[..., Any]


def _pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    """``NAME=VALUE`` flags as a dict; the server checks the names and values."""
    pairs = {}
    for value in values:
        name, sep, text = value.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{value!r} is not NAME=VALUE", param_hint=flag)
        pairs[name] = text
    return pairs


def option_flags(editing: bool) -> Callable[[F], F]:
    """The option flags, on ``create`` or (``editing``) ``edit``."""

    def decorate(f: F) -> F:
        flags = [
            click.option(
                "--target-label",
                "target_labels",
                multiple=True,
                metavar="KEY=VALUE",
                help="Run only on agents with this label (repeat: all must match).",
            ),
            click.option(
                "--target-agent",
                "target_agents",
                multiple=True,
                metavar="AGENT_ID",
                help="Run only on this agent (repeat for several).",
            ),
            click.option(
                "--run-on",
                type=click.Choice(["all", "one"]),
                help="all: every matching agent runs each instant (default); one: exactly one.",
            ),
            click.option(
                "--overlap",
                type=click.Choice(["skip", "allow", "replace"]),
                help="While a run is still going: skip the new instant (default), allow it, "
                "or replace the running one.",
            ),
            click.option(
                "--max-concurrent",
                type=click.IntRange(min=1),
                help="With --overlap allow: runs at once on one agent (default 10).",
            ),
            click.option(
                "--retries",
                type=click.IntRange(min=0),
                help="Try a failed or timed-out run again, up to this many times.",
            ),
            click.option(
                "--retry-delay",
                type=click.IntRange(min=0),
                metavar="SECONDS",
                help="Wait before each retry (default 10).",
            ),
            click.option(
                "--env",
                "env",
                multiple=True,
                metavar="NAME=VALUE",
                help="Set this variable for each run (repeat for several)"
                + ("; replaces the task's whole environment." if editing else "."),
            ),
            click.option(
                "--working-dir", metavar="PATH", help="Run in this directory on the agent."
            ),
            click.option(
                "--notify-url",
                metavar="URL",
                help="Webhook notified when the task starts failing on an agent and when "
                "it recovers (default: the server's --notify-url)"
                + ("; replaces the task's webhook." if editing else "."),
            ),
            click.option(
                "--notify-on",
                metavar="EVENTS",
                help="With --notify-url: comma-separated events among failed, timed_out, "
                "lost, recovered (default: all).",
            ),
        ]
        if editing:
            flags.append(
                click.option(
                    "--target-all", is_flag=True, help="Run on every agent again (no target)."
                )
            )
            flags.append(
                click.option(
                    "--notify-default",
                    is_flag=True,
                    help="Drop the task's webhook: the server's --notify-url applies again.",
                )
            )
        for flag in reversed(flags):
            f = flag(f)
        return f

    return decorate


def options_body(flags: dict[str, Any]) -> JSON:
    """The option fields the flags give (none given: an empty dict)."""
    body: JSON = {}
    labels, agents = flags.get("target_labels") or (), flags.get("target_agents") or ()
    if labels and agents:
        raise click.UsageError("--target-label and --target-agent are exclusive")
    if flags.get("target_all"):
        if labels or agents:
            raise click.UsageError("--target-all excludes --target-label and --target-agent")
        body["target"] = None
    elif labels:
        body["target"] = {"labels": _pairs(labels, "--target-label")}
    elif agents:
        body["target"] = {"agents": list(agents)}
    for flag, field in (
        ("run_on", "run_on"),
        ("overlap", "overlap"),
        ("max_concurrent", "max_concurrent"),
        ("retries", "retries"),
        ("retry_delay", "retry_delay_seconds"),
        ("working_dir", "working_dir"),
    ):
        if flags.get(flag) is not None:
            body[field] = flags[flag]
    if flags.get("env"):
        body["env"] = _pairs(flags["env"], "--env")
    notify = _notify(flags)
    if notify is not _UNCHANGED:
        body["notify"] = notify
    return body


_UNCHANGED = object()


def _notify(flags: dict[str, Any]) -> object:
    """The ``notify`` field the flags give (:data:`_UNCHANGED`: none); the server checks
    the URL and the events."""
    url, on = flags.get("notify_url"), flags.get("notify_on")
    if flags.get("notify_default"):
        if url or on:
            raise click.UsageError("--notify-default excludes --notify-url and --notify-on")
        return None
    if on and not url:
        raise click.UsageError("--notify-on needs --notify-url")
    if not url:
        return _UNCHANGED
    notify: JSON = {"url": url}
    if on:
        notify["on"] = [event.strip() for event in on.split(",") if event.strip()]
    return notify


def option_details(task: JSON) -> list[tuple[str, object]]:
    """What ``tasks show`` prints of the options: the ones not at their default."""
    target = task.get("target")
    if isinstance(target, dict) and "labels" in target:
        where = "agents labelled " + ", ".join(f"{k}={v}" for k, v in target["labels"].items())
    elif isinstance(target, dict) and "agents" in target:
        where = "agents " + ", ".join(str(a) for a in target["agents"])
    else:
        where = "every agent"
    if task.get("run_on") == "one":
        where = f"one of {where}"
    overlap = task.get("overlap")
    if overlap == "allow":
        overlap = f"allow, up to {task.get('max_concurrent')} at once"
    retries = task.get("retries")
    env = task.get("env") or {}
    return [
        ("runs on", where),
        ("overlap", overlap),
        (
            "retries",
            f"{retries}, {task.get('retry_delay_seconds')} s apart" if retries else None,
        ),
        ("env", ", ".join(sorted(env)) if env else None),  # names: values may be secrets
        ("working dir", task.get("working_dir")),
        ("webhook", _notify_text(task.get("notify"))),
    ]


def _notify_text(notify: object) -> str | None:
    if not isinstance(notify, dict):
        return None  # the server's default, if any
    return f"{notify.get('url')} on {', '.join(notify.get('on') or [])}"
