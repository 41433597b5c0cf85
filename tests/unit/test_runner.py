"""The process runner against a fake process reactor on a task.Clock: no real processes."""

from __future__ import annotations

import signal
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

from taskscheduler.agent.containment import RUN_ID_VARIABLE
from taskscheduler.agent.outcome import RunOutcome
from taskscheduler.agent.runjournal import RunJournal, RunRecord, run_id
from taskscheduler.agent.runner import ProcessRunner
from taskscheduler.agent.runprocess import SETSID, SUPERVISOR
from taskscheduler.logs import json_line
from taskscheduler.protocol import Output, ResultStatus, Trigger
from taskscheduler.schedule import format_instant
from tests.unit.fakes_process import FakeProcessReactor, GroupKiller

T = TypeVar("T")

ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}


class FakeClocks:
    """A wall clock and a monotonic clock that tests move independently."""

    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.mono = 500.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def make_runner(**kwargs: Any) -> tuple[ProcessRunner, FakeProcessReactor, GroupKiller]:
    reactor = FakeProcessReactor()
    killer = GroupKiller()
    kwargs.setdefault("environment", ENV)
    kwargs.setdefault("runs_dir", Path(tempfile.mkdtemp(prefix="taskscheduler-runner-")) / "runs")
    runner = ProcessRunner(reactor, kill_group=killer, **kwargs)
    return runner, reactor, killer


def env_of(call: Any) -> dict[str, str]:
    """The environment a run got, less the run id every run carries."""
    env = dict(call.env)
    assert env.pop(RUN_ID_VARIABLE)
    return env


def result_of(d: Deferred[T]) -> T:
    """The result of a Deferred that must already have fired successfully."""
    results: list[T] = []
    failures: list[Any] = []
    d.addCallbacks(results.append, failures.append)
    assert not failures, failures[0]
    assert results, "the Deferred has not fired"
    return results[0]


def fired(d: Deferred[Any]) -> bool:
    return bool(d.called)


# -- what is spawned ---------------------------------------------------------------------


def test_spawns_the_supervising_shell_under_setsid_with_an_explicit_environment() -> None:
    runner, reactor, _ = make_runner()
    task_id = uuid.uuid4()
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    runner.run("echo hi | tr a-z A-Z", 10, extra_env={"TASK_ID": "t1"}, key=(task_id, at))

    [call] = reactor.spawned
    assert call.executable == SETSID == "/usr/bin/setsid"
    assert call.args == [SETSID, "/bin/sh", "-c", SUPERVISOR, "sh", "", "echo hi | tr a-z A-Z"]
    # Unique on the host: the agent's instance, then the run (several agents share hosts).
    assert call.env is not None
    assert call.env[RUN_ID_VARIABLE] == f"{runner.instance}.20261130T120000.000000Z_{task_id}"
    assert env_of(call) == {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "TASK_ID": "t1"}
    # Any of these would make Twisted fork instead of posix_spawn, and usePTY merges streams.
    assert (call.path, call.uid, call.gid) == (None, None, None)
    assert not call.usePTY
    # No pipe: stdin is /dev/null, stdout and stderr are files, 9 takes the exit status.
    assert call.childFDs is not None and sorted(call.childFDs) == [0, 1, 2, 9]
    assert all(isinstance(fd, int) for fd in call.childFDs.values())


def test_a_run_as_user_sets_uid_and_gid_and_only_then() -> None:
    runner, reactor, _ = make_runner(run_as=(65534, 65533))
    runner.run("id -u", 10)
    [call] = reactor.spawned
    assert (call.uid, call.gid, call.path) == (65534, 65533, None)
    assert call.args[-1] == "id -u"


def test_an_empty_environment_reaches_the_child_empty_never_the_agents_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AGENT_SECRET", "hunter2")
    runner, reactor, _ = make_runner(environment={})
    runner.run("env", 10)
    assert env_of(reactor.spawned[0]) == {}


def test_extra_env_overrides_the_base_for_one_run_only() -> None:
    base = {"PATH": "/bin", "MODE": "base"}
    runner, reactor, _ = make_runner(environment=base)
    runner.run("true", 10, extra_env={"MODE": "run"})
    runner.run("true", 10)
    assert env_of(reactor.spawned[0]) == {"PATH": "/bin", "MODE": "run"}
    assert env_of(reactor.spawned[1]) == {"PATH": "/bin", "MODE": "base"}
    assert base == {"PATH": "/bin", "MODE": "base"}


def test_a_custom_setsid_path_is_used_as_the_executable() -> None:
    runner, reactor, _ = make_runner(setsid="/bin/setsid")
    runner.run("true", 10)
    assert reactor.spawned[0].executable == "/bin/setsid"
    assert reactor.spawned[0].args[:2] == ["/bin/setsid", "/bin/sh"]


# -- how a run ends ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "sig", "status"),
    [
        (0, None, ResultStatus.SUCCEEDED),
        (1, None, ResultStatus.FAILED),
        (127, None, ResultStatus.FAILED),
        (None, signal.SIGKILL, ResultStatus.FAILED),  # a signal we did not send
        (None, signal.SIGSEGV, ResultStatus.FAILED),
    ],
)
def test_exit_status_decides_the_outcome(code: int | None, sig: int | None, status: str) -> None:
    runner, reactor, _ = make_runner()
    d = runner.run("cmd", 10)
    reactor.last.finish(code, sig)
    outcome = result_of(d)
    assert outcome.status == status
    assert outcome.exit_code == code
    assert outcome.signal == sig


def test_stdout_and_stderr_are_kept_apart_as_exact_bytes() -> None:
    runner, reactor, _ = make_runner()
    d = runner.run("cmd", 10)
    child = reactor.last
    child.write(1, b"out \xff\xfe\x00 one\n")
    child.write(2, b"err\x00\xc3(\n")
    child.write(1, b"out two\n")
    child.finish(0)
    outcome = result_of(d)
    assert outcome.stdout == Output(b"out \xff\xfe\x00 one\nout two\n", 20, False)
    assert outcome.stderr == Output(b"err\x00\xc3(\n", 7, False)


def test_output_past_the_cap_keeps_head_and_tail_and_the_original_size() -> None:
    runner, reactor, _ = make_runner(output_cap=10)
    d = runner.run("cmd", 10)
    child = reactor.last
    for chunk in (b"abc", b"defghij", b"klmnopqrstu", b"vwxyz"):
        child.write(1, chunk)
    child.write(2, b"0123456789")  # exactly the cap: kept whole
    child.finish(0)
    outcome = result_of(d)
    assert outcome.stdout == Output(b"abcdevwxyz", 26, True)
    assert outcome.stderr == Output(b"0123456789", 10, False)


@given(
    cap=st.integers(min_value=0, max_value=40),
    chunks=st.lists(st.binary(min_size=0, max_size=30), max_size=12),
)
def test_capping_keeps_exactly_the_first_and_last_bytes(cap: int, chunks: list[bytes]) -> None:
    runner, reactor, _ = make_runner(output_cap=cap)
    d = runner.run("cmd", 10)
    for chunk in chunks:
        reactor.last.write(1, chunk)
    reactor.last.finish(0)
    whole = b"".join(chunks)
    head, tail = cap // 2, cap - cap // 2
    expected = whole if len(whole) <= cap else whole[:head] + whole[len(whole) - tail :]
    assert result_of(d).stdout == Output(expected, len(whole), len(whole) > cap)


def test_times_come_from_the_wall_clock_and_the_duration_from_the_monotonic_clock() -> None:
    clocks = FakeClocks()
    runner, reactor, _ = make_runner(wall_clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    d = runner.run("cmd", 100)
    clocks.advance(2.5)
    clocks.wall -= 3600  # the wall clock is stepped back an hour during the run
    reactor.last.finish(0)
    outcome = result_of(d)
    assert outcome.started_at == datetime.fromtimestamp(1_800_000_000.0, UTC)
    assert outcome.started_at.tzinfo is UTC
    assert outcome.finished_at == datetime.fromtimestamp(1_800_000_000.0 + 2.5 - 3600, UTC)
    assert outcome.duration == pytest.approx(2.5)


def test_outcome_names_the_pid_and_a_normal_end_leaves_no_timer_behind() -> None:
    runner, reactor, killer = make_runner()
    d = runner.run("cmd", 30)
    pid = reactor.spawned[0].transport.pid
    reactor.last.finish(0)
    assert result_of(d).pid == pid
    assert reactor.getDelayedCalls() == []
    # Whatever is left of the group is killed when the run ends; nothing of it survives.
    assert killer.calls == [(pid, signal.SIGKILL)]


def test_an_empty_group_at_the_end_is_not_an_error() -> None:
    runner, reactor, killer = make_runner()
    d = runner.run("cmd", 30)
    killer.gone.add(reactor.spawned[0].transport.pid or 0)
    reactor.last.finish(3)
    assert result_of(d).status == ResultStatus.FAILED


# -- the time limit ----------------------------------------------------------------------


def test_time_limit_sigterms_the_group_then_sigkills_it_after_the_grace() -> None:
    runner, reactor, killer = make_runner(kill_grace=5.0)
    d = runner.run("sleep 100", 10)
    pid = reactor.spawned[0].transport.pid
    assert pid is not None

    reactor.advance(9.75)  # binary fractions: no float rounding at the boundaries
    assert killer.calls == []
    reactor.advance(0.25)
    assert killer.calls == [(pid, signal.SIGTERM)]

    reactor.advance(4.75)  # the command ignores SIGTERM
    assert killer.calls == [(pid, signal.SIGTERM)]
    reactor.advance(0.25)
    assert killer.calls == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]
    assert not fired(d)

    reactor.last.finish(None, signal.SIGKILL)
    outcome = result_of(d)
    assert outcome.status == ResultStatus.TIMED_OUT
    assert (outcome.exit_code, outcome.signal) == (None, signal.SIGKILL)
    assert reactor.getDelayedCalls() == []


def test_a_command_that_obeys_sigterm_is_not_sigkilled_by_the_grace_timer() -> None:
    runner, reactor, killer = make_runner(kill_grace=5.0)
    d = runner.run("sleep 100", 10)
    pid = reactor.spawned[0].transport.pid
    reactor.advance(10)
    reactor.last.finish(None, signal.SIGTERM)
    outcome = result_of(d)
    assert outcome.status == ResultStatus.TIMED_OUT
    assert outcome.signal == signal.SIGTERM
    reactor.advance(60)
    # Only the end-of-run sweep of the group follows the SIGTERM, and no timer is left.
    assert killer.calls == [(pid, signal.SIGTERM), (pid, signal.SIGKILL)]
    assert reactor.getDelayedCalls() == []


def test_a_command_that_exits_in_time_is_never_signalled_by_the_time_limit() -> None:
    runner, reactor, killer = make_runner()
    d = runner.run("cmd", 10)
    reactor.advance(9)
    reactor.last.exit(0)  # the shell exited; a grandchild still holds the pipes
    reactor.advance(0.5)
    reactor.last.close_pipes()
    reactor.advance(100)
    assert result_of(d).status == ResultStatus.SUCCEEDED
    assert signal.SIGTERM not in [sig for _, sig in killer.calls]


def test_a_kill_before_the_child_has_its_own_group_signals_the_child_itself() -> None:
    # Between spawn and setsid() the group does not exist yet: killpg finds nothing.
    runner, reactor, killer = make_runner()
    runner.run("cmd", 1)
    transport = reactor.last
    killer.gone.add(transport.pid or 0)
    reactor.advance(1)
    assert transport.signals == [signal.SIGTERM]


# -- when the shell ends ------------------------------------------------------------------


def test_when_the_shell_exits_what_is_left_of_the_run_is_killed_at_once() -> None:
    runner, reactor, killer = make_runner()
    d = runner.run("sleep 100 & echo started", 60)
    child = reactor.last
    pid = child.pid
    child.write(1, b"started\n")
    child.exit(0)
    # Output goes to files, not pipes: nothing to wait for, and nothing of the run stays.
    assert killer.calls == [(pid, signal.SIGKILL)]
    outcome = result_of(d)
    assert outcome.status == ResultStatus.SUCCEEDED
    assert outcome.stdout.data == b"started\n"
    assert runner.running == 0
    assert reactor.getDelayedCalls() == []


def test_a_runs_files_stay_until_its_result_is_durable_elsewhere_then_go() -> None:
    runner, reactor, _ = make_runner()
    key = (uuid.uuid4(), datetime(2026, 11, 30, tzinfo=UTC))
    d = runner.run("cmd", 60, key=key)
    reactor.last.write(2, b"oops\n")
    reactor.last.finish(1)
    assert result_of(d).stderr.data == b"oops\n"
    # A crash now must still find the run: its result is not spooled yet.
    assert RunJournal.replayed(runner.files.directory).leftovers() == [run_id(*key)]
    runner.discard(key)
    assert RunJournal.replayed(runner.files.directory).leftovers() == []
    # Its slot is emptied for the next run: no file is made per run.
    slots = sorted(p.name for p in runner.files.directory.glob("slot-*"))
    assert slots == ["slot-0.err", "slot-0.exit", "slot-0.out"]
    outputs = [runner.files.directory / f"slot-0.{kind}" for kind in ("out", "err")]
    assert all(path.stat().st_size == 0 for path in outputs)
    d = runner.run("cmd", 60)
    reactor.last.finish(0)
    assert sorted(p.name for p in runner.files.directory.glob("slot-*")) == slots


# -- running and terminate_all -----------------------------------------------------------


def test_running_counts_runs_in_progress() -> None:
    runner, reactor, _ = make_runner()
    assert runner.running == 0
    runner.run("a", 10)
    runner.run("b", 10)
    assert runner.running == 2
    reactor.spawned[0].transport.finish(0)
    assert runner.running == 1
    reactor.spawned[1].transport.exit(0)
    assert runner.running == 0


def test_terminate_all_sigterms_every_group_sigkills_after_the_grace_and_waits() -> None:
    runner, reactor, killer = make_runner(kill_grace=5.0)
    obedient = runner.run("a", 600)
    stubborn = runner.run("b", 600)
    a, b = (call.transport for call in reactor.spawned)
    a_pid, b_pid = a.pid, b.pid

    stopped = runner.terminate_all()
    assert killer.calls == [(a_pid, signal.SIGTERM), (b_pid, signal.SIGTERM)]
    a.finish(None, signal.SIGTERM)
    assert not fired(stopped)

    reactor.advance(5)
    assert (b_pid, signal.SIGKILL) in killer.calls
    assert not fired(stopped)
    b.finish(None, signal.SIGKILL)
    assert result_of(stopped) is None
    assert runner.running == 0

    for d, sig in ((obedient, signal.SIGTERM), (stubborn, signal.SIGKILL)):
        outcome = result_of(d)
        assert outcome.status == ResultStatus.LOST  # cut short by the agent, not by itself
        assert outcome.signal == sig
    assert reactor.getDelayedCalls() == []


def test_terminate_all_with_nothing_running_fires_at_once() -> None:
    runner, _, _ = make_runner()
    assert result_of(runner.terminate_all()) is None


def test_terminate_all_keeps_a_timed_out_run_timed_out_and_a_finished_shell_finished() -> None:
    runner, reactor, _ = make_runner(kill_grace=5.0)
    late = runner.run("sleep 100", 10)
    done = runner.run("true", 600)
    late_child, done_child = (call.transport for call in reactor.spawned)
    reactor.advance(10)  # `late` reaches its limit and gets SIGTERM
    done_child.exit(0)

    stopped = runner.terminate_all()
    assert result_of(done).status == ResultStatus.SUCCEEDED

    late_child.finish(None, signal.SIGTERM)
    assert result_of(late).status == ResultStatus.TIMED_OUT
    assert result_of(stopped) is None
    assert reactor.getDelayedCalls() == []


# -- failures and logs -------------------------------------------------------------------


def test_a_spawn_failure_is_a_failed_outcome_with_the_reason_in_stderr() -> None:
    runner, reactor, _ = make_runner()
    reactor.spawn_error = OSError(24, "Too many open files")
    outcome: RunOutcome = result_of(runner.run("true", 10))
    assert outcome.status == ResultStatus.FAILED
    assert (outcome.exit_code, outcome.signal, outcome.pid) == (None, None, None)
    assert b"could not start the command" in outcome.stderr.data
    assert b"Too many open files" in outcome.stderr.data
    assert outcome.stdout == Output()
    assert runner.running == 0
    assert reactor.getDelayedCalls() == []
    # The runner still works afterwards.
    d = runner.run("true", 10)
    reactor.last.finish(0)
    assert result_of(d).status == ResultStatus.SUCCEEDED


def test_logs_never_contain_the_environment() -> None:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        runner, reactor, _ = make_runner(environment={"DB_PASSWORD": "s3cr3t-base"})
        timed_out = runner.run("sleep 9", 1, extra_env={"TOKEN": "s3cr3t-extra"})
        reactor.advance(1)
        reactor.last.finish(None, signal.SIGTERM)
        straggler = runner.run("sleep 9 &", 10, extra_env={"TOKEN": "s3cr3t-extra"})
        reactor.last.exit(0)
        reactor.advance(1)
        reactor.advance(0)
        reactor.spawn_error = OSError(2, "No such file")
        runner.run("true", 10, extra_env={"TOKEN": "s3cr3t-extra"})
        runner.terminate_all()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert result_of(timed_out).status == ResultStatus.TIMED_OUT
    assert result_of(straggler).status == ResultStatus.SUCCEEDED
    assert events, "the runner logged nothing"
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert "s3cr3t" not in text


def test_run_lines_name_the_task_and_instant_never_the_command_or_the_pid() -> None:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    task_id, at = uuid.uuid4(), datetime(2026, 11, 30, 20, 0, tzinfo=UTC)
    later = datetime(2026, 11, 30, 20, 1, tzinfo=UTC)
    try:
        runner, reactor, _ = make_runner()
        timed_out = runner.run("echo s3cr3t-cmd; sleep 9", 1, key=(task_id, at))
        pid = reactor.last.pid
        reactor.advance(1)
        reactor.last.finish(None, signal.SIGTERM)
        reactor.spawn_error = OSError(2, "No such file")
        runner.run("echo s3cr3t-cmd", 10, key=(task_id, later))
    finally:
        globalLogPublisher.removeObserver(observer)
    assert result_of(timed_out).status == ResultStatus.TIMED_OUT
    said = [(e["log_level"].name, formatEvent(e)) for e in events]
    first, second = format_instant(at), format_instant(later)
    for level, line in [
        ("debug", f"task {task_id}: its run of {first} started (attempt 1, schedule)"),
        ("info", f"task {task_id}: its run of {first} reached its time limit of 1s"),
        ("debug", f"task {task_id}: its run of {first} ended: timed_out"),
        ("critical", f"task {task_id}: could not start its run of {second}"),
    ]:
        assert [s for s in said if s[0] == level and s[1].startswith(line)], (line, said)
    for event in events:
        text = formatEvent(event) + repr(event) + json_line(event)
        assert "s3cr3t" not in text, text  # never the command
        assert f"pid {pid}" not in formatEvent(event)
        if "its run of" in formatEvent(event):
            assert event["task_id"] == str(task_id), event
            assert event["scheduled_at"] in (first, second), event


# -- what a restarted agent learns of a run ----------------------------------------------


def test_the_journal_keeps_a_runs_revision_and_trigger_for_a_restarted_agent() -> None:
    runner, reactor, _ = make_runner()
    manual = (uuid.uuid4(), datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC))
    scheduled = (uuid.uuid4(), datetime(2026, 11, 30, 12, tzinfo=UTC))
    runner.run("cmd", 60, key=manual, revision=5, trigger=Trigger.MANUAL)
    runner.run("cmd", 60, key=scheduled, revision=2)
    records = RunJournal.replayed(runner.files.directory).records
    assert (records[run_id(*manual)].revision, records[run_id(*manual)].trigger) == (
        5,
        Trigger.MANUAL,
    )
    assert (records[run_id(*scheduled)].revision, records[run_id(*scheduled)].trigger) == (
        2,
        Trigger.SCHEDULE,
    )
    # The host restarted meanwhile: the runs are lost, and their results say what ran.
    again = ProcessRunner(
        reactor,
        ENV,
        runner.files.directory,
        kill_group=GroupKiller(),
    )
    again.boot_id = "another boot"
    recovered = {(r.task_id, r.scheduled_at): r for r in again.recover()}
    assert (recovered[manual].revision, recovered[manual].trigger) == (5, Trigger.MANUAL)
    assert (recovered[scheduled].revision, recovered[scheduled].trigger) == (2, Trigger.SCHEDULE)
    assert result_of(recovered[manual].outcome).status is ResultStatus.LOST


def test_a_journal_line_of_an_older_agent_has_no_revision_and_is_scheduled() -> None:
    line = {
        "task_id": str(uuid.uuid4()),
        "scheduled_at": "2026-11-30T12:00:00.000000Z",
        "started_at": "2026-11-30T12:00:00.001000Z",
        "time_limit": 60,
        "pid": 4000,
        "boot_id": "b",
        "cgroup": None,
    }
    record = RunRecord.from_dict(line)
    assert (record.revision, record.trigger) == (None, Trigger.SCHEDULE)
