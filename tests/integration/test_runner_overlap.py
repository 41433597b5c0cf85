"""Replacing a run, a task's env and working_dir: the process runner with real processes."""

from __future__ import annotations

import signal
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from taskscheduler.agent.containment import CgroupContainment
from taskscheduler.protocol import ResultStatus
from tests.integration.test_runner_processes import (
    DEADLINE,
    cgroups,
    dies_within,
    live_members_of_group,
    make_runner,
    stray_pids,
    wait_until,
)
from tests.integration.test_runner_recovery import LeftRun, new_runner, outcome_of, runs

pytestmark = pytest.mark.integration
reactor: Any = _reactor
__all__ = ["cgroups", "runs", "stray_pids"]  # fixtures, used by name


def key() -> tuple[uuid.UUID, datetime]:
    return (uuid.uuid4(), datetime.now(UTC))


def first_line(path: Path) -> bytes:
    assert wait_until(lambda: b"\n" in path.read_bytes(), DEADLINE)
    return path.read_bytes().split(b"\n")[0]


@pytest_twisted.ensureDeferred
async def test_replace_ends_the_whole_tree_of_a_run_and_reports_it_replaced(
    stray_pids: list[int],
) -> None:
    runner = make_runner(kill_grace=0.5)
    run = key()
    # A grandchild that ignores SIGTERM, under a shell that obeys it.
    d = runner.run("(trap '' TERM; exec sleep 300) & echo $!; sleep 300", 60, key=run)
    d.addTimeout(DEADLINE, reactor)
    [process] = list(runner._runs)
    out = runner.files.path(process.run_id, "out")
    grandchild = int(first_line(out))
    stray_pids.append(grandchild)
    started = time.monotonic()
    assert runner.replace(run)
    outcome = await d
    assert outcome.status is ResultStatus.REPLACED
    assert outcome.signal in (signal.SIGTERM, signal.SIGKILL)
    assert outcome.stdout.data == f"{grandchild}\n".encode(), "its output is kept"
    assert time.monotonic() - started < 5
    assert dies_within(grandchild, 5), "what ignored SIGTERM got SIGKILL after the grace"
    pgid = outcome.pid
    assert pgid is not None
    assert wait_until(lambda: live_members_of_group(pgid) == [], 5)


@pytest_twisted.ensureDeferred
async def test_replace_reaches_what_left_the_group_in_a_cgroup(
    cgroups: CgroupContainment, stray_pids: list[int]
) -> None:
    runner = make_runner(containment=cgroups, kill_grace=0.5)
    run = key()
    d = runner.run("setsid sleep 300 & echo $!; sleep 300", 60, key=run)
    d.addTimeout(DEADLINE, reactor)
    [process] = list(runner._runs)
    escaped = int(first_line(runner.files.path(process.run_id, "out")))
    stray_pids.append(escaped)
    runner.replace(run)
    outcome = await d
    assert outcome.status is ResultStatus.REPLACED
    assert dies_within(escaped, 5)


@pytest_twisted.ensureDeferred
async def test_a_run_goes_to_its_working_dir_and_gets_its_env(tmp_path: Path) -> None:
    folder = tmp_path / "a dir with 'quotes' and $(spaces)"
    folder.mkdir()
    (folder / "input.txt").write_text("from the working dir\n")
    runner = make_runner()
    d = runner.run(
        'pwd; cat input.txt; echo "$GREETING"; echo "$1"',
        10,
        {"GREETING": "hello $HOME"},
        working_dir=str(folder),
    )
    d.addTimeout(DEADLINE, reactor)
    outcome = await d
    assert outcome.status is ResultStatus.SUCCEEDED, outcome.stderr.data
    assert outcome.stdout.data.decode().splitlines() == [
        str(folder),
        "from the working dir",
        "hello $HOME",  # a value reaches the command as it is, never expanded
        "",  # the working dir is no positional parameter of the command
    ]


@pytest_twisted.ensureDeferred
async def test_a_missing_working_dir_fails_the_run_saying_so(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    runner = make_runner()
    d = runner.run(f"touch {tmp_path}/ran", 10, working_dir=str(missing))
    d.addTimeout(DEADLINE, reactor)
    outcome = await d
    assert (outcome.status, outcome.exit_code) == (ResultStatus.FAILED, 126)
    assert outcome.stderr.data == (
        f"taskscheduler: cannot use the working directory {missing}\n".encode()
    )
    assert not (tmp_path / "ran").exists(), "the command never ran"
    # The runner carries on.
    assert (await runner.run("true", 10).addTimeout(DEADLINE, reactor)).exit_code == 0


@pytest_twisted.ensureDeferred
async def test_a_file_as_working_dir_fails_the_run_too(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    outcome = await make_runner().run("true", 10, working_dir=str(a_file))
    assert (outcome.status, outcome.exit_code) == (ResultStatus.FAILED, 126)
    assert b"cannot use the working directory" in outcome.stderr.data


# -- after a restart of the agent ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_re_attached_run_can_be_replaced(runs: Path) -> None:
    left = LeftRun(runs, "echo begun; sleep 300", 60, started_ago=1)
    left.wait_for_output(b"begun\n")
    runner = new_runner(runs)
    [recovered] = runner.recover()
    assert recovered.still_running
    assert runner.replace((left.task_id, left.scheduled_at))
    outcome = await outcome_of(recovered)
    assert outcome.status is ResultStatus.REPLACED
    assert outcome.signal == signal.SIGTERM
    assert outcome.stdout.data == b"begun\n"
    assert outcome.reason is not None and "replaced" in outcome.reason
    left.wait()


@pytest_twisted.ensureDeferred
async def test_a_run_the_agent_was_replacing_when_it_died_is_replaced(runs: Path) -> None:
    left = LeftRun(runs, "sleep 300", 60, started_ago=2)
    left.files.mark_replaced(left.id)  # the agent's last act: SIGTERM for a newer run
    left.process.send_signal(signal.SIGTERM)
    left.wait()
    [recovered] = new_runner(runs).recover()
    outcome = await outcome_of(recovered)
    assert outcome.status is ResultStatus.REPLACED
    assert outcome.reason is not None and "replaced" in outcome.reason


@pytest_twisted.ensureDeferred
async def test_a_run_the_agent_was_replacing_is_ended_once_it_is_back(runs: Path) -> None:
    # The agent sent nothing yet, or the run ignored SIGTERM: it goes on being replaced.
    left = LeftRun(runs, "sleep 300", 60, started_ago=2)
    left.files.mark_replaced(left.id)
    [recovered] = new_runner(runs).recover()
    outcome = await outcome_of(recovered)
    assert outcome.status is ResultStatus.REPLACED
    left.wait()
