"""The README's Command line section names every verb the command has, and no other."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click

from taskscheduler.cli.main import cli
from tests.unit.cli_stub import StubApi, answer, run, task

README = Path(__file__).resolve().parents[2] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def verbs_of_the_command() -> set[str]:
    found = set()
    for name, command in cli.commands.items():
        if isinstance(command, click.Group):
            found |= {f"{name} {verb}" for verb in command.commands}
        else:
            found.add(name)
    return found


def test_the_readme_table_lists_every_verb() -> None:
    documented = set()
    for line in section("Command line").splitlines():
        if not line.startswith("| `"):
            continue
        first_cell = line.split(" | ")[0]
        for usage in re.findall(r"`([^`]+)`", first_cell):
            words = usage.split()
            group = words[0]
            if group in ("tasks", "agents", "fleet", "tokens"):
                documented.add(f"{group} {words[1]}")
            else:
                documented.add(group)
    assert documented == verbs_of_the_command()


def test_the_quick_start_session_works_as_written() -> None:
    """Each line of the quick start's CLI session, against a stub of the API: it runs, and
    create prints what the README shows."""
    quick_start = section("Quick start")
    start = quick_start.index(".venv/bin/taskscheduler ")
    session = quick_start[start : quick_start.index("```", start)].splitlines()
    task_id = session[1].removeprefix("# ")
    api = StubApi()
    api.tasks = [task(task_id)]
    api.route("POST", "/api/v1/tasks/create", lambda r: answer({"command_id": task_id}, 201))
    api.route(
        "GET",
        f"/api/v1/tasks/{task_id}/latest_output",
        {"completion_time": None, "scheduled_at": None, "outputs": []},
    )
    commands = [line.split("  #")[0] for line in session if not line.startswith("#")]
    assert len(commands) >= 3
    for line in commands:
        result = run(api, *shlex.split(line)[1:])
        assert result.exit_code == 0, (line, result.output)
    created = json.loads(api.requests[0].content)
    assert created == {"command": "echo hello world", "frequency": "every 30 seconds"}
    assert run(api, *shlex.split(commands[0])[1:]).stdout == task_id + "\n"
