"""The OpenAPI document's task routes (operators'); their schemas are
:mod:`.task_schemas`'s."""

from __future__ import annotations

from typing import Any

from taskscheduler.server.openapi.operations import (
    OPERATOR,
    answer,
    body,
    operation,
    path_id,
    query,
    ref,
)
from taskscheduler.server.store.records import TaskState

TASK_ID = path_id("task_id", "task")
#: Errors of a route about one task.
ONE_TASK = ("invalid_task_id", "unknown_task")
#: ... that changes it (a deleted task cannot be changed).
CHANGE_TASK = (*ONE_TASK, "task_deleted")


def paths() -> dict[str, Any]:
    """The task and result routes."""

    def task_op(operation_id: str, summary: str, method: str, **kw: Any) -> dict[str, Any]:
        kw.setdefault("parameters", [TASK_ID])
        return operation(operation_id, summary, OPERATOR, tag="tasks", method=method, **kw)

    task_answer = {"200": answer("the task", ref("Task"))}
    return {
        "/api/v1/tasks": {
            "get": task_op(
                "list_tasks",
                "Every task, newest first, a page at a time",
                "get",
                answers={"200": answer("a page of tasks", ref("TaskList"))},
                codes=("invalid_request", "invalid_cursor"),
                parameters=[
                    query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
                        "tasks per page",
                    ),
                    query("cursor", {"type": "string"}, "a page's `next_cursor`"),
                    query(
                        "state",
                        {"type": "string", "enum": [s.value for s in TaskState]},
                        "only tasks in this state (absent: all)",
                    ),
                    query(
                        "command",
                        {"type": "string"},
                        "only tasks whose command holds this text (case-sensitive, literal)",
                    ),
                ],
            )
        },
        "/api/v1/tasks/create": {
            "post": task_op(
                "create_task",
                "Create a task: every agent of the fleet runs it",
                "post",
                answers={
                    "201": answer(
                        "created",
                        ref("TaskCreated"),
                        Location={
                            "description": "the new task's path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    )
                },
                codes=("rate_limited", "unknown_field"),
                parameters=[],
                request=body(ref("NewTask")),
            )
        },
        "/api/v1/tasks/{task_id}": {
            "get": task_op("get_task", "A task", "get", answers=task_answer, codes=ONE_TASK),
            "patch": task_op(
                "update_task",
                "Change a task's command, schedule, time limit or options: a new revision",
                "patch",
                description="Effective from now on every agent: a change of frequency "
                "re-anchors at the change (its first instant is now + interval), a change of "
                "cron expression or zone re-bases there (its first instant is the first after "
                "now); a run "
                "under way finishes as it was; an execution never mixes revisions. A change "
                "that changes nothing makes no revision. Audited as `task.updated`.",
                answers=task_answer,
                codes=(*CHANGE_TASK, "unknown_field", "nothing_to_change"),
                request=body(ref("TaskChange")),
            ),
            "delete": task_op(
                "delete_task",
                "Delete a task: every agent stops it; its history stays",
                "delete",
                answers={"200": answer("deleted", ref("TaskDeleted"))},
                codes=CHANGE_TASK,
            ),
        },
        "/api/v1/tasks/{task_id}/pause": {
            "post": task_op(
                "pause_task",
                "Pause a task: it runs nowhere until resumed (idempotent)",
                "post",
                answers=task_answer,
                codes=CHANGE_TASK,
            )
        },
        "/api/v1/tasks/{task_id}/resume": {
            "post": task_op(
                "resume_task",
                "Resume a task on its grid, with no catch-up of the paused instants",
                "post",
                answers=task_answer,
                codes=CHANGE_TASK,
            )
        },
        "/api/v1/tasks/{task_id}/run": {
            "post": task_op(
                "run_task",
                "Run a task now, once, on every agent of the task (paused ones too); on "
                "one agent, chosen by the server, for a run_on one task",
                "post",
                answers={"202": answer("a manual execution at now", ref("ManualRun"))},
                codes=CHANGE_TASK,
            )
        },
        "/api/v1/tasks/{task_id}/latest_output": {
            "get": task_op(
                "latest_output",
                "The newest complete execution of a task",
                "get",
                answers={"200": answer("its outputs", ref("LatestOutput"))},
                codes=ONE_TASK,
            )
        },
        "/api/v1/tasks/{task_id}/executions": {
            "get": task_op(
                "executions",
                "A task's executions, newest first, complete or not",
                "get",
                answers={"200": answer("a page of executions", ref("ExecutionPage"))},
                codes=(*ONE_TASK, "invalid_request"),
                parameters=[
                    TASK_ID,
                    query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 20},
                        "executions per page",
                    ),
                    query(
                        "before",
                        {"type": "string", "format": "date-time"},
                        "only executions scheduled before this instant (`next_before`)",
                    ),
                ],
            )
        },
        "/api/v1/tasks/{task_id}/executions/{scheduled_at}": {
            "get": task_op(
                "execution",
                "One execution of a task, by its instant",
                "get",
                answers={"200": answer("the execution", ref("TaskExecution"))},
                codes=(*ONE_TASK, "invalid_request", "unknown_execution"),
                parameters=[
                    TASK_ID,
                    {
                        "name": "scheduled_at",
                        "in": "path",
                        "required": True,
                        "description": "the execution's instant, RFC 3339",
                        "schema": {"type": "string", "format": "date-time"},
                    },
                ],
            )
        },
    }
