"""How ``tasks output`` and ``tasks run --wait`` print executions: a header, then each
agent's run (its last attempt, the earlier ones summed up) as ``tail`` shows files."""

from __future__ import annotations

from datetime import datetime

import click

from taskscheduler.cli.client import JSON
from taskscheduler.cli.context import Settings
from taskscheduler.cli.tables import duration, instant, short_id


def print_executions(settings: Settings, executions: list[JSON]) -> None:
    # Agents are named by id in results: their URLs say more to people.
    agents = settings.client().list_agents().get("agents", [])
    urls = {a.get("agent_id"): a.get("url") for a in agents}
    now = settings.now()
    click.echo("\n\n".join(render_execution(e, urls, now) for e in executions))


def render_execution(execution: JSON, urls: dict[object, object], now: datetime) -> str:
    """An execution's header, then each agent's run as ``tail`` shows several files."""
    expected = execution.get("expected_agents")
    outputs = execution.get("outputs", [])
    head = [f"execution {instant(execution.get('scheduled_at'), now)}"]
    if execution.get("trigger"):
        head.append(str(execution["trigger"]))
    if execution.get("revision") is not None:
        head.append(f"revision {execution['revision']}")
    if isinstance(expected, int):
        head.append(f"{len(outputs)} of {expected} agents reported")
    if "complete" in execution:
        head.append("complete" if execution["complete"] else "not complete")
    lines = [", ".join(head)]
    for missing in execution.get("missing_agents") or []:
        lines.append(f"missing: {missing.get('url')} (agent {short_id(missing.get('agent_id'))})")
    for out in outputs:
        lines.append(_render_output(out, urls))
    return "\n".join(lines)


def _render_output(out: JSON, urls: dict[object, object]) -> str:
    agent = out.get("agent_id")
    facts = [str(out.get("status"))]
    if out.get("exit_code") is not None:
        facts.append(f"exit {out['exit_code']}")
    if out.get("signal") is not None:
        facts.append(f"signal {out['signal']}")
    took = duration(out.get("started_at"), out.get("finished_at"))
    if took:
        facts.append(took)
    attempt = out.get("attempt")
    if isinstance(attempt, int) and attempt > 1:
        facts.append(f"attempt {attempt}")
    if out.get("final") is False:
        facts.append("to be retried")
    where = f" {urls[agent]}" if urls.get(agent) else ""
    parts = [f"==> agent {short_id(agent)}{where}: {', '.join(facts)} <=="]
    earlier = [a for a in out.get("attempts") or [] if a.get("attempt") != attempt]
    if earlier:
        parts.append("earlier attempts: " + "; ".join(_attempt_summary(a) for a in earlier))
    if out.get("reason"):
        parts.append(f"reason: {out['reason']}")
    for stream in ("stdout", "stderr"):
        text = out.get(stream)
        if not text:
            continue
        notes = []
        if out.get(f"{stream}_truncated"):
            notes.append(f"truncated, {out.get(f'{stream}_bytes')} bytes in all")
        if out.get(f"{stream}_base64"):
            notes.append("not UTF-8: --json has the exact bytes")
        parts.append(f"--- {stream}" + (f" ({'; '.join(notes)})" if notes else ""))
        parts.append(text.removesuffix("\n"))
    return "\n".join(parts)


def _attempt_summary(attempt: JSON) -> str:
    """``2 failed (exit 1)``: one earlier attempt of an agent's run."""
    said = f"{attempt.get('attempt')} {attempt.get('status')}"
    if attempt.get("exit_code") is not None:
        said += f" (exit {attempt['exit_code']})"
    return said
