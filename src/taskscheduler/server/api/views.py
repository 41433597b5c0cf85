"""How the server's API shows its records in JSON: tasks, executions, outputs, agents,
audit events."""

from __future__ import annotations

from typing import Any

from taskscheduler import protocol
from taskscheduler.protocol import RunResult
from taskscheduler.schedule import format_instant
from taskscheduler.server.store.interface import AgentRecord, AuditEvent, Execution, Task


def agent_json(agent: AgentRecord) -> dict[str, Any]:
    return {
        "agent_id": str(agent.agent_id),
        "url": agent.url,
        "enrolled_at": format_instant(agent.enrolled_at),
        "revoked_at": None if agent.revoked_at is None else format_instant(agent.revoked_at),
        "url_released_at": (
            None if agent.url_released_at is None else format_instant(agent.url_released_at)
        ),
    }


def task_json(task: Task) -> dict[str, Any]:
    body = protocol.task_spec_to_json(task.spec)
    body["created_at"] = format_instant(task.created_at)
    body["deleted_at"] = None if task.deleted_at is None else format_instant(task.deleted_at)
    return body


def latest_output_json(execution: Execution | None) -> dict[str, Any]:
    if execution is None:
        return {"completion_time": None, "scheduled_at": None, "outputs": []}
    return {
        "completion_time": format_instant(execution.completion_time),
        "scheduled_at": format_instant(execution.scheduled_at),
        "expected_agents": execution.expected,
        "outputs": [output_json(result) for result in execution.results],
    }


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
