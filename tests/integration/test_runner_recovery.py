"""Runs a crashed agent left behind, found again by a new runner: real processes and files.

Each test lays out what a runner leaves in its runs folder while a run goes on (output
files, the exit-status file, the record) around a real process started the way the
runner starts it (the supervising shell, descriptor 9 for the status, the run id in the
environment), as if the agent had been SIGKILLed; then a fresh runner recovers it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from taskscheduler.agent.containment import RUN_ID_VARIABLE, processes_of_run
from taskscheduler.agent.outcome import REATTACHED
from taskscheduler.agent.runfiles import RunFiles
from taskscheduler.agent.runjournal import RunRecord, boot_id, run_id
from taskscheduler.agent.runner import ProcessRunner, instance_of
from taskscheduler.agent.runprocess import SETSID, SHELL, SUPERVISOR
from taskscheduler.protocol import ResultStatus, Trigger
from tests.integration.test_runner_processes import dies_within

pytestmark = pytest.mark.integration

reactor: Any = _reactor
DEADLINE = 20.0


class LeftRun:
    """A run as a crashed agent leaves it: a live process, its files, its record."""

    #: Every run's marker, so that the ``runs`` fixture can kill whatever is left.
    markers: ClassVar[list[str]] = []

    def __init__(
        self,
        runs: Path,
        command: str,
        time_limit: float,
        started_ago: float,
        key: tuple[uuid.UUID, datetime] | None = None,
        revision: int | None = None,
        trigger: Trigger = Trigger.SCHEDULE,
    ) -> None:
        self.task_id, self.scheduled_at = key or (
            uuid.uuid4(),
            datetime.now(UTC) - timedelta(seconds=started_ago),
        )
        self.id = run_id(self.task_id, self.scheduled_at)
        # The files as the crashed agent had them, through a RunFiles of its own.
        self.files = RunFiles(runs)
        self.files.create()
        out, err, status = self.files.begin(self.id)

        def descriptor_9() -> None:
            os.dup2(status, 9)

        self.process = subprocess.Popen(
            [SETSID, SHELL, "-c", SUPERVISOR, "sh", "", command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env={"PATH": "/usr/bin:/bin", RUN_ID_VARIABLE: self.marker(runs)},
            preexec_fn=descriptor_9,
            close_fds=False,  # else descriptor 9 would be closed after preexec_fn
        )
        for fd in (out, err, status):
            os.close(fd)
        self.record = RunRecord(
            task_id=self.task_id,
            scheduled_at=self.scheduled_at,
            started_at=self.scheduled_at,
            time_limit=time_limit,
            pid=self.process.pid,
            boot_id=boot_id(),
            cgroup=None,
            revision=revision,
            trigger=trigger,
        )
        self.files.started(self.id, self.record)

    def marker(self, runs: Path) -> str:
        marker = f"{instance_of(runs)}.{self.id}"
        LeftRun.markers.append(marker)
        return marker

    def wait_for_output(self, text: bytes) -> None:
        """Until the run has written ``text`` to its stdout (it has got that far)."""
        path = self.files.path(self.id, "out")
        deadline = time.monotonic() + DEADLINE
        while text not in path.read_bytes():
            assert time.monotonic() < deadline, f"the run never wrote {text!r}"
            time.sleep(0.01)

    def wait(self) -> int:
        return self.process.wait(DEADLINE)


@pytest.fixture
def runs(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "runs"
    yield folder
    # Nothing a test started may survive it, whatever it asserted.
    for marker in LeftRun.markers:
        for pid in processes_of_run(marker):
            os.kill(pid, signal.SIGKILL)
    LeftRun.markers.clear()


def new_runner(runs: Path) -> ProcessRunner:
    return ProcessRunner(reactor, {"PATH": "/usr/bin:/bin"}, runs, kill_grace=0.5)


async def outcome_of(recovered: Any) -> Any:
    recovered.outcome.addTimeout(DEADLINE, reactor)
    return await recovered.outcome


@pytest_twisted.ensureDeferred
async def test_a_re_attached_run_keeps_the_revision_and_trigger_it_was_started_with(
    runs: Path,
) -> None:
    left = LeftRun(
        runs, "echo begun; sleep 0.5", 30, started_ago=0.2, revision=6, trigger=Trigger.MANUAL
    )
    [recovered] = new_runner(runs).recover()
    assert recovered.still_running
    assert (recovered.revision, recovered.trigger) == (6, Trigger.MANUAL)
    assert (await outcome_of(recovered)).status is ResultStatus.SUCCEEDED
    left.wait()


@pytest_twisted.ensureDeferred
async def test_a_run_still_going_is_re_attached_and_reported_as_it_really_ends(runs: Path) -> None:
    left = LeftRun(runs, "echo begun; sleep 1; echo finished; exit 3", 30, started_ago=1)
    [recovered] = new_runner(runs).recover()
    assert recovered.still_running
    assert (recovered.task_id, recovered.scheduled_at) == (left.task_id, left.scheduled_at)
    outcome = await outcome_of(recovered)
    assert (outcome.status, outcome.exit_code) == (ResultStatus.FAILED, 3)
    assert outcome.stdout.data == b"begun\nfinished\n"
    assert outcome.reason == REATTACHED
    assert outcome.started_at == left.scheduled_at
    left.wait()


@pytest_twisted.ensureDeferred
async def test_a_run_that_ended_while_the_agent_was_down_is_reported_with_its_status(
    runs: Path,
) -> None:
    left = LeftRun(runs, "echo all done; echo warn >&2; exit 0", 30, started_ago=5)
    assert left.wait() == 0
    runner = new_runner(runs)
    [recovered] = runner.recover()
    assert not recovered.still_running
    outcome = await outcome_of(recovered)
    assert (outcome.status, outcome.exit_code) == (ResultStatus.SUCCEEDED, 0)
    assert (outcome.stdout.data, outcome.stderr.data) == (b"all done\n", b"warn\n")
    assert outcome.reason is not None and outcome.reason.startswith(REATTACHED)
    # Its files go once the result is safe elsewhere: its slot is empty, the journal
    # forgets it, and a later restart finds nothing.
    runner.discard((left.task_id, left.scheduled_at))
    assert all(path.stat().st_size == 0 for path in runs.glob("slot-*.out"))
    assert new_runner(runs).recover() == []


@pytest_twisted.ensureDeferred
async def test_a_run_past_its_time_limit_is_ended_the_moment_the_agent_is_back(
    runs: Path,
) -> None:
    # It started 10 s ago with a 3 s limit, and left its group on purpose meanwhile.
    left = LeftRun(runs, "setsid sleep 300 & echo $!; sleep 300", 3, started_ago=10)
    left.wait_for_output(b"\n")  # its escapee is out
    started = time.monotonic()
    [recovered] = new_runner(runs).recover()
    outcome = await outcome_of(recovered)
    assert time.monotonic() - started < 3
    assert outcome.status == ResultStatus.TIMED_OUT
    assert outcome.reason is not None and "time limit" in outcome.reason
    escaped = int(outcome.stdout.data)
    assert dies_within(escaped, 5), "the process that left the group died too"
    left.wait()


@pytest_twisted.ensureDeferred
async def test_a_re_attached_run_is_still_held_to_its_time_limit(runs: Path) -> None:
    left = LeftRun(runs, "sleep 300", 2, started_ago=1)
    started = time.monotonic()
    [recovered] = new_runner(runs).recover()
    assert recovered.still_running
    outcome = await outcome_of(recovered)
    assert outcome.status == ResultStatus.TIMED_OUT
    assert 0.5 < time.monotonic() - started < 4  # about the second left of its limit
    left.wait()


@pytest_twisted.ensureDeferred
async def test_a_run_killed_by_a_signal_while_the_agent_was_down_is_a_failure_not_lost(
    runs: Path,
) -> None:
    left = LeftRun(runs, "echo working; sleep 300", 30, started_ago=1)
    left.wait_for_output(b"working\n")
    os.killpg(left.process.pid, signal.SIGKILL)
    left.wait()
    [recovered] = new_runner(runs).recover()
    outcome = await outcome_of(recovered)
    assert outcome.status == ResultStatus.FAILED
    assert outcome.stdout.data == b"working\n"
    assert outcome.reason is not None and "signal" in outcome.reason


@pytest_twisted.ensureDeferred
async def test_a_run_of_another_boot_is_lost_and_a_run_without_record_is_killed(
    runs: Path,
) -> None:
    rebooted = LeftRun(runs, "sleep 300", 30, started_ago=1)
    rebooted.files.started(rebooted.id, replace(rebooted.record, boot_id="another-boot"))
    unrecorded = LeftRun(runs, "sleep 300", 30, started_ago=1)
    unrecorded.files.remove(unrecorded.id)  # as if it died between spawn and journal line
    recovered = {r.task_id: r for r in new_runner(runs).recover()}

    lost = await outcome_of(recovered[rebooted.task_id])
    assert lost.status == ResultStatus.LOST
    assert lost.reason == "the host restarted during the run"
    unknown = await outcome_of(recovered[unrecorded.task_id])
    assert unknown.status == ResultStatus.LOST
    # Not left unsupervised: found by its run id and killed.
    assert dies_within(unrecorded.process.pid, 5)
    rebooted.process.kill()
    rebooted.wait()


def test_a_run_whose_result_was_already_spooled_is_only_cleaned_up(runs: Path) -> None:
    left = LeftRun(runs, "true", 30, started_ago=1)
    left.wait()
    assert new_runner(runs).recover(lambda task_id, at, attempt: task_id == left.task_id) == []
    assert new_runner(runs).recover() == []


@pytest_twisted.ensureDeferred
async def test_a_run_the_agent_was_ending_at_its_limit_when_it_died_is_timed_out(
    runs: Path,
) -> None:
    left = LeftRun(runs, "sleep 300", 1, started_ago=2)
    left.files.mark_limit_reached(left.id)  # the agent's last act: SIGTERM at the limit
    left.process.send_signal(signal.SIGTERM)
    left.wait()
    [recovered] = new_runner(runs).recover()
    outcome = await outcome_of(recovered)
    assert (outcome.status, outcome.exit_code) == (ResultStatus.TIMED_OUT, None)
    assert outcome.reason is not None and "time limit" in outcome.reason


@pytest_twisted.ensureDeferred
async def test_what_a_run_left_is_told_from_another_agents_run_of_the_same_instant(
    tmp_path: Path, runs: Path
) -> None:
    # Two agents on one host run the same task at the same instant.
    mine = LeftRun(runs, "sleep 300", 30, started_ago=1)
    mine.files.remove(mine.id)  # its journal line never written: found by its id
    theirs = LeftRun(
        tmp_path / "other-agent" / "runs", "sleep 300", 30, 1, key=(mine.task_id, mine.scheduled_at)
    )
    [recovered] = new_runner(runs).recover()
    await outcome_of(recovered)
    assert dies_within(mine.process.pid, 5)
    assert theirs.process.poll() is None, "the other agent's run was killed"
    theirs.process.kill()
    theirs.wait()


@pytest_twisted.ensureDeferred
async def test_a_reused_slot_never_lends_a_run_the_status_of_the_one_before(runs: Path) -> None:
    runner = new_runner(runs)
    key = (uuid.uuid4(), datetime.now(UTC))
    done = runner.run("true", 30, key=key)  # slot 0 ends holding the status 000
    done.addTimeout(DEADLINE, reactor)
    assert (await done).exit_code == 0
    runner.discard(key)
    runner.files.create()  # as a restarted agent finds it: slot 0 free again
    left = LeftRun(runs, "sleep 300", 30, started_ago=1)
    assert left.files.path(left.id, "exit").name == "slot-0.exit"
    left.process.kill()  # ended by a signal: its shell writes no status
    left.wait()
    [recovered] = new_runner(runs).recover()
    outcome = await outcome_of(recovered)
    assert (outcome.status, outcome.exit_code) == (ResultStatus.FAILED, None)
