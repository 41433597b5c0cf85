"""How the server's API shows its records in JSON: tasks, executions, outputs, agents,
audit events."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from taskscheduler import protocol
from taskscheduler.protocol import ResultStatus, RunResult
from taskscheduler.schedule import format_instant
from taskscheduler.server.store.records import (
    AgentRecord,
    AuditEvent,
    Execution,
    ExecutionSummary,
    Task,
)
from taskscheduler.server.store.rules import next_instant, upcoming_instants


def agent_json(agent: AgentRecord) -> dict[str, Any]:
    return {
        "agent_id": str(agent.agent_id),
        "url": agent.url,
        "enrolled_at": format_instant(agent.enrolled_at),
        "revoked_at": None if agent.revoked_at is None else format_instant(agent.revoked_at),
        "url_released_at": (
            None if agent.url_released_at is None else format_instant(agent.url_released_at)
        ),
        "labels": dict(agent.labels),
    }


def _instant(value: datetime | None) -> str | None:
    return None if value is None else format_instant(value)


def task_json(
    task: Task,
    now: datetime,
    last: ExecutionSummary | None = None,
    last_complete: bool = False,
) -> dict[str, Any]:
    """A task as operators see it: its spec, state, next instant and last execution
    (``last_complete``: whether that one is complete, :func:`rules.is_complete`)."""
    body = protocol.task_spec_to_json(task.spec)
    # Every schedule field, the other kind's null: a frequency, or a cron in its zone.
    for name in ("frequency", "cron", "timezone"):
        body.setdefault(name, None)
    body["created_at"] = format_instant(task.created_at)
    body["deleted_at"] = _instant(task.deleted_at)
    body["state"] = task.state.value
    body["paused_at"] = _instant(task.paused_at)
    body["updated_at"] = format_instant(task.updated_at or task.created_at)
    body["next_instant"] = _instant(next_instant(task, now))
    body["next_instants"] = [format_instant(at) for at in upcoming_instants(task, now)]
    body["last_execution"] = None if last is None else last_execution_json(last, last_complete)
    return body


def last_execution_json(last: ExecutionSummary, complete: bool) -> dict[str, Any]:
    counts = Counter(last.statuses)
    return {
        "scheduled_at": format_instant(last.scheduled_at),
        "trigger": last.trigger.value,
        "revision": last.revision,
        "expected_agents": last.expected,
        "reported": last.reported,
        **{status.value: counts[status] for status in ResultStatus},
        "complete": complete,
        # Each agent's last attempt (the dashboard's coloured cells), by agent id.
        "agents": [
            {"agent_id": str(agent_id), "status": status.value}
            for agent_id, status in zip(last.agent_ids, last.statuses, strict=False)
        ],
    }


def execution_json(execution: Execution, complete: bool) -> dict[str, Any]:
    """One execution, as history lists it and ``/executions/{scheduled_at}`` shows it."""
    return {
        "scheduled_at": format_instant(execution.scheduled_at),
        "trigger": execution.trigger.value,
        "revision": execution.revision,
        "complete": complete,
        "expected_agents": execution.expected,
        "completion_time": format_instant(execution.completion_time),
        "outputs": outputs_json(execution),
    }


def latest_output_json(execution: Execution | None) -> dict[str, Any]:
    if execution is None:
        return {"completion_time": None, "scheduled_at": None, "outputs": []}
    return {
        "completion_time": format_instant(execution.completion_time),
        "scheduled_at": format_instant(execution.scheduled_at),
        "trigger": execution.trigger.value,
        "revision": execution.revision,
        "expected_agents": execution.expected,
        "outputs": outputs_json(execution),
    }


def outputs_json(execution: Execution) -> list[dict[str, Any]]:
    """Each agent's result (its last attempt), with the list of its attempts."""
    outputs = []
    for result in execution.results:
        body = output_json(result)
        attempts = execution.attempts_of(result.agent_id) or (result,)
        body["attempts"] = [attempt_json(a) for a in attempts]
        outputs.append(body)
    return outputs


def attempt_json(result: RunResult) -> dict[str, Any]:
    """One attempt of an agent's run, as the ``attempts`` of its output list it."""
    body: dict[str, Any] = {"attempt": result.attempt, "status": result.status.value}
    if result.reason is not None:
        body["reason"] = result.reason
    body["exit_code"] = result.exit_code
    if result.signal is not None:
        body["signal"] = result.signal
    body["started_at"] = _instant(result.started_at)
    body["finished_at"] = _instant(result.finished_at)
    body.update(protocol.output_to_json("stdout", result.stdout))
    body.update(protocol.output_to_json("stderr", result.stderr))
    return body


def output_json(result: RunResult) -> dict[str, Any]:
    body: dict[str, Any] = {"agent_id": str(result.agent_id), "status": result.status.value}
    if result.reason is not None:
        body["reason"] = result.reason
    body.update(protocol.output_to_json("stdout", result.stdout))
    body.update(protocol.output_to_json("stderr", result.stderr))
    body["exit_code"] = result.exit_code
    if result.signal is not None:
        body["signal"] = result.signal
    body["started_at"] = None if result.started_at is None else format_instant(result.started_at)
    body["finished_at"] = None if result.finished_at is None else format_instant(result.finished_at)
    body["revision"] = result.revision
    body["trigger"] = result.trigger.value
    body["attempt"] = result.attempt
    # False while the agent will retry it: the execution does not count it yet.
    body["final"] = result.final
    return body


def audit_event_json(event: AuditEvent) -> dict[str, Any]:
    return {
        "id": event.event_id,
        "at": format_instant(event.at),
        "actor": event.actor,
        "action": event.action,
        "target": event.target,
        "peer": event.peer,
        "details": event.details,
    }
