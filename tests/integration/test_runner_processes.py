"""The process runner with real processes on the real reactor."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater

from taskscheduler.agent.containment import CgroupContainment, own_cgroup_dir
from taskscheduler.agent.outcome import RunOutcome
from taskscheduler.agent.runner import ProcessRunner
from taskscheduler.protocol import ResultStatus

pytestmark = pytest.mark.integration

reactor: Any = _reactor
ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
#: Longest any run in this module may take before the test fails instead of hanging.
DEADLINE = 20.0


def disk_bytes(path: Path) -> int:
    """Bytes of disk ``path`` holds (its holes hold none)."""
    with contextlib.suppress(FileNotFoundError):
        return path.stat().st_blocks * 512
    return 0


def make_runner(**kwargs: Any) -> ProcessRunner:
    kwargs.setdefault("environment", ENV)
    kwargs.setdefault("runs_dir", Path(tempfile.mkdtemp(prefix="taskscheduler-runs-")))
    return ProcessRunner(reactor, **kwargs)


@pytest.fixture
def cgroups() -> Iterator[CgroupContainment]:
    """A cgroup v2 parent of its own for the test's runs, removed afterwards."""
    own = own_cgroup_dir()
    assert own is not None, "these tests need cgroup v2 (as the agent's default does)"
    containment = CgroupContainment.probe(own / f"taskscheduler-test-{uuid.uuid4().hex[:8]}")
    yield containment
    for group in containment.parent.iterdir():
        if group.is_dir():
            CgroupContainment.kill(group)
            assert wait_until(lambda group=group: "populated 0" in _events(group), 5)
    for group in containment.parent.iterdir():
        if group.is_dir():
            group.rmdir()
    containment.parent.rmdir()


async def outcome_of(runner: ProcessRunner, command: str, time_limit: float = 10) -> RunOutcome:
    d = runner.run(command, time_limit)
    d.addTimeout(DEADLINE, reactor)
    return await d


def _state(pid: int) -> str | None:
    """The /proc state letter of ``pid``, or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    # A zombie is dead: it only waits for its parent (here possibly a non-reaping init).
    return _state(pid) not in (None, "Z", "X")


def dies_within(pid: int, seconds: float) -> bool:
    """Whether ``pid`` terminates within ``seconds``: waits on a pidfd, not in a sleep loop.

    SIGKILL is delivered asynchronously, so a process killed just before a run ended may
    take a moment to be gone.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(seconds * 1000)) or not alive(pid)
    finally:
        os.close(fd)


def _events(group: Path) -> str:
    try:
        return (group / "cgroup.events").read_text()
    except FileNotFoundError:
        return "populated 0"


async def eventually(condition: Any, seconds: float) -> bool:
    """Whether ``condition()`` becomes true within ``seconds``, the reactor running
    meanwhile (for what the runner does on its own timers)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await deferLater(reactor, 0.05)
    return True


def wait_until(condition: Any, seconds: float) -> bool:
    """Whether ``condition()`` becomes true within ``seconds`` (polled; for file state)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def live_members_of_group(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(entry))
    return members


@pytest.fixture
def stray_pids() -> Iterator[list[int]]:
    """Pids a test expects to be dead; any survivor is killed so it cannot leak."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# -- basics ------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_exit_codes_and_signals() -> None:
    runner = make_runner()
    ok = await outcome_of(runner, "true")
    failed = await outcome_of(runner, "exit 3")
    killed = await outcome_of(runner, "kill -KILL $$")
    assert (ok.status, ok.exit_code, ok.signal) == (ResultStatus.SUCCEEDED, 0, None)
    assert (failed.status, failed.exit_code, failed.signal) == (ResultStatus.FAILED, 3, None)
    assert (killed.status, killed.exit_code, killed.signal) == (
        ResultStatus.FAILED,
        None,
        signal.SIGKILL,
    )
    assert ok.duration >= 0 and ok.finished_at >= ok.started_at
    assert runner.running == 0


@pytest_twisted.ensureDeferred
async def test_stdout_and_stderr_are_kept_apart() -> None:
    outcome = await outcome_of(make_runner(), "echo hello world; echo oops >&2; echo bye")
    assert outcome.stdout.data == b"hello world\nbye\n"
    assert outcome.stderr.data == b"oops\n"
    assert (outcome.stdout.size, outcome.stdout.truncated) == (16, False)


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_and_nul_bytes_are_kept_exactly() -> None:
    outcome = await outcome_of(
        make_runner(), r"printf 'a\377\376\000b\303(\n'; printf '\000\000\351' >&2"
    )
    assert outcome.stdout.data == b"a\xff\xfe\x00b\xc3(\n"
    assert outcome.stderr.data == b"\x00\x00\xe9"


@pytest_twisted.ensureDeferred
async def test_the_shell_leads_its_own_session_and_keeps_the_spawned_pid() -> None:
    # setsid must call setsid() in place, not fork: the shell is the process we spawned.
    outcome = await outcome_of(make_runner(), "echo $$; cut -d' ' -f5,6 /proc/$$/stat")
    pid, ids = outcome.stdout.data.decode().splitlines()
    assert int(pid) == outcome.pid
    assert ids == f"{pid} {pid}"  # process group and session
    assert outcome.pid != os.getpgrp()


@pytest_twisted.ensureDeferred
async def test_the_child_environment_is_exactly_what_was_given() -> None:
    runner = make_runner(environment={"PATH": "/usr/bin:/bin", "A": "1"})
    os.environ["RUNNER_TEST_LEAK"] = "must not reach the child"
    try:
        d = runner.run("cat /proc/$$/environ", 10, extra_env={"B": "two words", "A": "override"})
        d.addTimeout(DEADLINE, reactor)
        outcome = await d
    finally:
        del os.environ["RUNNER_TEST_LEAK"]
    received = sorted(outcome.stdout.data.split(b"\0")[:-1])
    # Plus the run's id, which marks every process of the run.
    assert received[:3] == [b"A=override", b"B=two words", b"PATH=/usr/bin:/bin"]
    assert received[3].startswith(b"TASKSCHEDULER_RUN_ID=") and len(received) == 4


@pytest_twisted.ensureDeferred
async def test_an_empty_environment_reaches_the_shell_empty() -> None:
    # dash then searches its built-in default path, but exports no PATH to commands; it
    # does export PWD, as POSIX shells do.
    outcome = await outcome_of(
        make_runner(environment={}), "cat /proc/$$/environ; echo; /usr/bin/env"
    )
    environ, exported = outcome.stdout.data.split(b"\n", 1)
    # Nothing but the run's id, which marks every process of the run.
    [only] = environ.split(b"\0")[:-1]
    assert only.startswith(b"TASKSCHEDULER_RUN_ID=")
    assert b"PATH=" not in exported
    assert outcome.status == ResultStatus.SUCCEEDED


@pytest_twisted.ensureDeferred
async def test_ten_mebibytes_of_output_are_capped_keeping_head_and_tail() -> None:
    size = 10 * 1024 * 1024
    cap = 1024 * 1024
    outcome = await outcome_of(
        make_runner(output_cap=cap), f"seq 1 2000000 | head -c {size}; echo small >&2"
    )
    written = b"".join(b"%d\n" % i for i in range(1, 2_000_001))[:size]
    assert outcome.status == ResultStatus.SUCCEEDED
    assert (outcome.stdout.size, outcome.stdout.truncated) == (size, True)
    assert len(outcome.stdout.data) == cap
    assert outcome.stdout.data == written[: cap // 2] + written[-(cap // 2) :]
    assert outcome.stderr.data == b"small\n"


@pytest_twisted.ensureDeferred
async def test_a_spawn_failure_is_a_failed_outcome() -> None:
    runner = make_runner(setsid="/nonexistent/setsid")
    outcome = await outcome_of(runner, "true")
    assert outcome.status == ResultStatus.FAILED
    assert b"could not start the command" in outcome.stderr.data
    assert runner.running == 0


# -- time limit, stragglers and shutdown -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_time_limit_kills_the_whole_group_even_what_ignores_sigterm(
    stray_pids: list[int],
) -> None:
    runner = make_runner(kill_grace=0.5)
    # A grandchild that ignores SIGTERM, under a shell that ignores it too.
    command = "trap '' TERM; (exec sleep 300) & echo $!; sleep 300; echo not reached"
    started = time.monotonic()
    d = runner.run(command, 0.5)
    d.addTimeout(DEADLINE, reactor)
    outcome = await d
    elapsed = time.monotonic() - started
    grandchild = int(outcome.stdout.data.split()[0])
    stray_pids.append(grandchild)

    assert outcome.status == ResultStatus.TIMED_OUT
    assert outcome.signal == signal.SIGKILL  # SIGTERM was ignored; SIGKILL after the grace
    assert outcome.stdout.data == f"{grandchild}\n".encode()
    assert 1.0 <= elapsed < 5
    assert dies_within(grandchild, 5)
    assert outcome.pid is not None
    # SIGKILL lands asynchronously: a killed member may take a moment to be gone.
    pgid = outcome.pid
    assert wait_until(lambda: live_members_of_group(pgid) == [], 5), live_members_of_group(pgid)


@pytest_twisted.ensureDeferred
async def test_a_command_obeying_sigterm_ends_at_its_limit(stray_pids: list[int]) -> None:
    runner = make_runner(kill_grace=30)
    started = time.monotonic()
    outcome = await outcome_of(runner, "sleep 300 & echo $!; wait", time_limit=0.5)
    stray_pids.append(int(outcome.stdout.data))
    assert outcome.status == ResultStatus.TIMED_OUT
    assert outcome.signal == signal.SIGTERM
    assert time.monotonic() - started < 5  # long before the 30 s SIGKILL grace
    assert dies_within(int(outcome.stdout.data), 5)


@pytest_twisted.ensureDeferred
async def test_a_grandchild_holding_stdout_cannot_hold_the_run(stray_pids: list[int]) -> None:
    runner = make_runner()
    started = time.monotonic()
    outcome = await outcome_of(runner, "sleep 300 & echo $!; exit 4", time_limit=60)
    elapsed = time.monotonic() - started
    grandchild = int(outcome.stdout.data)
    stray_pids.append(grandchild)
    assert (outcome.status, outcome.exit_code) == (ResultStatus.FAILED, 4)  # the shell's
    assert elapsed < 5
    assert dies_within(grandchild, 5)


@pytest_twisted.ensureDeferred
async def test_a_background_daemon_does_not_outlive_its_run(stray_pids: list[int]) -> None:
    # It closed its output, so the run ends at once; it dies with the run anyway.
    runner = make_runner()
    started = time.monotonic()
    outcome = await outcome_of(runner, "sleep 300 >/dev/null 2>&1 & echo $!")
    daemon = int(outcome.stdout.data)
    stray_pids.append(daemon)
    assert outcome.status == ResultStatus.SUCCEEDED
    assert time.monotonic() - started < 5
    assert dies_within(daemon, 5)


@pytest_twisted.ensureDeferred
async def test_a_process_that_leaves_the_group_cannot_hold_the_run(
    stray_pids: list[int],
) -> None:
    # With the process group alone it escapes the kill, but it cannot hold the run: the
    # output is a file, not a pipe the run would wait on.
    runner = make_runner()
    started = time.monotonic()
    outcome = await outcome_of(runner, "setsid sleep 300 & echo $!")
    stray_pids.append(int(outcome.stdout.data))
    assert outcome.status == ResultStatus.SUCCEEDED
    assert time.monotonic() - started < 5


#: Three ways out of a run's process group and session, each leaving its pid in a file.
ESCAPES = (
    "setsid sleep 301 & echo $! >> escaped; "
    "setsid -f sh -c 'echo $$ >> escaped; exec sleep 302'; "
    "python3 -c 'import os, time; os.setpgid(0, 0); print(os.getpid(), flush=True); "
    "time.sleep(303)' >> escaped & "
    "while [ $(wc -l < escaped) -lt 3 ]; do sleep 0.05; done"
)


def _escaped(folder: Path) -> list[int]:
    return [int(line) for line in (folder / "escaped").read_text().split()]


@pytest_twisted.ensureDeferred
async def test_nothing_that_leaves_the_group_or_session_outlives_its_run_in_a_cgroup(
    cgroups: CgroupContainment, tmp_path: Path, stray_pids: list[int]
) -> None:
    runner = make_runner(containment=cgroups)
    outcome = await outcome_of(runner, f"cd {tmp_path}; {ESCAPES}")
    escaped = _escaped(tmp_path)
    stray_pids.extend(escaped)
    assert outcome.status == ResultStatus.SUCCEEDED, outcome
    assert len(escaped) == 3
    assert all(dies_within(pid, 5) for pid in escaped), [_state(p) for p in escaped]
    # Its cgroup is gone with it, shortly (its killed processes take a moment to die).
    assert await eventually(lambda: not any(p.is_dir() for p in cgroups.parent.iterdir()), 5)


@pytest_twisted.ensureDeferred
async def test_the_time_limit_reaches_what_left_the_group_in_a_cgroup(
    cgroups: CgroupContainment, tmp_path: Path, stray_pids: list[int]
) -> None:
    runner = make_runner(containment=cgroups, kill_grace=0.5)
    started = time.monotonic()
    outcome = await outcome_of(runner, f"cd {tmp_path}; {ESCAPES}; sleep 300", time_limit=2)
    escaped = _escaped(tmp_path)
    stray_pids.extend(escaped)
    assert outcome.status == ResultStatus.TIMED_OUT
    assert time.monotonic() - started < 6
    assert all(dies_within(pid, 5) for pid in escaped), [_state(p) for p in escaped]


@pytest_twisted.ensureDeferred
async def test_two_hundred_mebibytes_of_output_hold_about_the_cap_on_disk_and_in_memory(
    tmp_path: Path,
) -> None:
    # Written at about 50 MiB/s, so that the run lasts several trims.
    cap = 1024 * 1024
    runner = make_runner(output_cap=cap, runs_dir=tmp_path)
    d = runner.run(
        "i=0; while [ $i -lt 200 ]; do head -c 1048576 /dev/zero; sleep 0.02; i=$((i+1)); done",
        60,
    )
    d.addTimeout(DEADLINE, reactor)
    most_on_disk = 0
    while not d.called:
        for path in tmp_path.glob("*.out"):
            most_on_disk = max(most_on_disk, disk_bytes(path))
        await deferLater(reactor, 0.05)
    outcome = await d
    assert outcome.status == ResultStatus.SUCCEEDED
    assert (outcome.stdout.size, outcome.stdout.truncated) == (200 * 1024 * 1024, True)
    assert outcome.stdout.data == b"\0" * cap
    # Without trimming the file would hold all 200 MiB; with it, the cap plus what is
    # written between two trims.
    assert most_on_disk < 48 * 1024 * 1024, most_on_disk


@pytest_twisted.ensureDeferred
async def test_terminate_all_ends_every_run(stray_pids: list[int]) -> None:
    runner = make_runner(kill_grace=0.5)
    runs = [
        runner.run("echo $$; sleep 300", 600),
        runner.run("trap '' TERM; echo $$; sleep 300 & wait; wait", 600),
    ]
    for d in runs:
        d.addTimeout(DEADLINE, reactor)
    assert runner.running == 2
    stopped = runner.terminate_all()
    stopped.addTimeout(DEADLINE, reactor)
    await stopped
    assert runner.running == 0
    for d in runs:
        outcome = await d
        assert outcome.status == ResultStatus.LOST
        assert outcome.pid is not None
        assert wait_until(lambda pgid=outcome.pid: live_members_of_group(pgid) == [], 5)
