"""Ids as people type them: a whole UUID, or a unique prefix of one (as ``docker`` takes).

A prefix is resolved against a listing (every task, every agent): none matching is an
unknown id (exit 5), several an ambiguous one (exit 6, listing them).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import click

from taskscheduler.cli.client import JSON, Ambiguous, Client, NotFound
from taskscheduler.cli.tables import cell, shorten

_WHOLE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_PREFIX = re.compile(r"[0-9a-f-]+")
# How many candidates an ambiguity lists.
SHOWN = 20


def is_whole(text: str) -> bool:
    return _WHOLE.fullmatch(text.lower()) is not None


def pick(
    kind: str,
    text: str,
    items: Iterable[JSON],
    key: str,
    describe: Callable[[JSON], str],
) -> str:
    """The one id among ``items[key]`` that starts with ``text``."""
    prefix = text.lower()
    if not prefix:
        raise click.BadParameter(f"give the {kind}'s id, or a prefix of it")
    matches: dict[str, JSON] = {}
    if _PREFIX.fullmatch(prefix):
        for item in items:
            value = str(item.get(key, ""))
            if value.lower().startswith(prefix):
                matches[value] = item
    if not matches:
        raise NotFound(f"no {kind} has an id starting with {cell(text)!r}")
    if len(matches) > 1:
        lines = [f"  {describe(item)}" for item in list(matches.values())[:SHOWN]]
        if len(matches) > SHOWN:
            lines.append(f"  ... and {len(matches) - SHOWN} more")
        raise Ambiguous(
            f"{len(matches)} {kind}s have an id starting with {cell(text)!r}; give more of it:\n"
            + "\n".join(lines)
        )
    return next(iter(matches))


def task_id(client: Client, text: str) -> str:
    """The task ``text`` names: a whole id as given (the server judges it), else by prefix."""
    if is_whole(text):
        return text

    def every_task() -> Iterable[JSON]:
        # Only a plausible prefix is worth listing every task for.
        if not _PREFIX.fullmatch(text.lower()):
            return
        for page in client.iter_task_pages():
            yield from page.get("tasks", [])

    return pick(
        "task",
        text,
        every_task(),
        "task_id",
        lambda t: (
            f"{t.get('task_id')}  {t.get('state', '-')}  {shorten(cell(t.get('command')), 60)}"
        ),
    )


def agent_id(client: Client, text: str) -> str:
    if is_whole(text):
        return text
    agents = client.list_agents().get("agents", []) if _PREFIX.fullmatch(text.lower()) else []
    return pick(
        "agent",
        text,
        agents,
        "agent_id",
        lambda a: f"{a.get('agent_id')}  {a.get('state', '-')}  {cell(a.get('url'))}",
    )
