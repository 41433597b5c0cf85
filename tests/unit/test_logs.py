"""The daemons' log observers: ``--log-format``, ``--log-level`` and how twistd gets them."""

from __future__ import annotations

import io
import json
import re
import uuid
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.application.service import Application, IService, Service
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from twisted.python import usage

from taskscheduler.agent.options import Options as AgentOptions
from taskscheduler.agent.taskloop import LabelTime, TaskLoop
from taskscheduler.logs import (
    LoggedDaemon,
    daemon_observer,
    format_observer,
    json_line,
    level_filtered,
)
from taskscheduler.protocol import TaskSpec
from taskscheduler.schedule import format_instant
from taskscheduler.server.options import Options as ServerOptions
from tests.unit.agent_fakes import ANCHOR, spec
from tests.unit.test_agent_overlap import start

RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TASK = uuid.UUID("6f1c2a8e-7a4b-4c1e-9a35-0d2f6a1b9c44")


def lines_of(emit: Any, log_format: str = "json", level: LogLevel = LogLevel.info) -> list[str]:
    """What ``emit(log)`` writes through the observer of ``log_format`` at ``level``."""
    out = io.StringIO()
    emit(
        Logger(
            namespace="tests.logs", observer=level_filtered(format_observer(out, log_format), level)
        )
    )
    return out.getvalue().splitlines()


def test_a_json_line_holds_time_level_namespace_message_and_the_events_fields() -> None:
    [line] = lines_of(
        lambda log: log.info(
            "task {task_id}: agent {agent_id} reported its run of {scheduled_at}: {status}",
            task_id=str(TASK),
            agent_id="a1",
            scheduled_at="2026-11-30T20:00:00Z",
            status="succeeded",
            exit_code=0,
        )
    )
    record = json.loads(line)
    assert RFC3339_UTC.match(record["time"]), record
    assert (record["level"], record["namespace"]) == ("info", "tests.logs")
    assert record["message"] == (
        f"task {TASK}: agent a1 reported its run of 2026-11-30T20:00:00Z: succeeded"
    )
    assert record["task_id"] == str(TASK)
    assert record["scheduled_at"] == "2026-11-30T20:00:00Z"
    assert (record["agent_id"], record["status"], record["exit_code"]) == ("a1", "succeeded", 0)
    assert not [key for key in record if key.startswith("log_")], record


def test_a_json_line_never_holds_a_command_or_an_environment() -> None:
    [line] = lines_of(
        lambda log: log.warn(
            "task {task_id} went wrong",
            task_id=str(TASK),
            command="curl -H 'Authorization: s3cr3t'",
            env={"TOKEN": "s3cr3t"},
            environment={"TOKEN": "s3cr3t"},
        )
    )
    assert "s3cr3t" not in line
    assert json.loads(line)["message"] == f"task {TASK} went wrong"


def test_a_failure_goes_to_a_json_line_with_its_traceback() -> None:
    def emit(log: Logger) -> None:
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            log.failure("task {task_id}: could not start a run", task_id=str(TASK))

    [line] = lines_of(emit)
    record = json.loads(line)
    assert record["level"] == "critical"
    assert record["message"] == f"task {TASK}: could not start a run"
    assert "ZeroDivisionError" in record["traceback"]


def test_values_json_cannot_hold_are_written_as_text() -> None:
    [line] = lines_of(
        lambda log: log.info("x", task=TASK, ratio=float("nan"), error=OSError(2, "gone"))
    )
    record = json.loads(line)
    assert record["task"] == str(TASK)
    assert record["ratio"] == "nan"
    assert "gone" in record["error"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_level_drops_what_is_below_it(log_format: str) -> None:
    def emit(log: Logger) -> None:
        log.debug("a debug line")
        log.info("an info line")
        log.warn("a warning")

    assert len(lines_of(emit, log_format)) == 2
    assert len(lines_of(emit, log_format, LogLevel.debug)) == 3
    assert len(lines_of(emit, log_format, LogLevel.warn)) == 1
    assert "a debug line" in "\n".join(lines_of(emit, log_format, LogLevel.debug))


def test_text_is_twistds_own_format() -> None:
    [line] = lines_of(lambda log: log.info("hello {who}", who="operator"), "text")
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[tests\.logs#info\] hello operator$", line
    ), line


@pytest.mark.parametrize("options_class", [ServerOptions, AgentOptions])
def test_both_daemons_take_the_format_and_level(options_class: type[usage.Options]) -> None:
    options = options_class()
    options.parseOptions([])
    assert (options["log-format"], options["log-level"]) == ("text", LogLevel.info)
    options = options_class()
    options.parseOptions(["--log-format", "json", "--log-level", "debug"])
    assert (options["log-format"], options["log-level"]) == ("json", LogLevel.debug)
    for level in ["warn", "error", "critical"]:
        options = options_class()
        options.parseOptions(["--log-level", level])
        assert options["log-level"] == LogLevel.levelWithName(level)
    for bad in [["--log-format", "xml"], ["--log-level", "verbose"]]:
        with pytest.raises(usage.UsageError):
            options_class().parseOptions(bad)


def test_the_environment_sets_them_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKSCHEDULER_LOG_FORMAT", "json")
    monkeypatch.setenv("TASKSCHEDULER_LOG_LEVEL", "warn")
    server = ServerOptions()
    server.parseOptions([])
    assert (server["log-format"], server["log-level"]) == ("json", LogLevel.warn)
    agent = AgentOptions(
        {"TASKSCHEDULER_AGENT_LOG_FORMAT": "json", "TASKSCHEDULER_AGENT_LOG_LEVEL": "debug"}
    )
    agent.parseOptions([])
    assert (agent["log-format"], agent["log-level"]) == ("json", LogLevel.debug)


def test_the_observer_writes_to_twistds_logfile(tmp_path: Path) -> None:
    path = tmp_path / "daemon.log"
    observer = daemon_observer({"logfile": str(path), "nodaemon": True}, "json", LogLevel.info)
    log = Logger(namespace="tests.logs", observer=observer)
    log.debug("hidden")
    log.info("task {task_id} created", task_id=str(TASK))
    [line] = path.read_text().splitlines()
    assert json.loads(line)["task_id"] == str(TASK)


def test_twistd_gets_the_observer_as_its_applications_component(tmp_path: Path) -> None:
    """What twistd does with a plugin's service: attach it to an Application it made,
    then take the Application's ILogObserver component, if any, as its log observer."""
    options = ServerOptions()
    options.parseOptions(["--log-format", "json", "--log-level", "warn"])
    path = tmp_path / "twistd.log"
    options.parent = {"logfile": str(path), "nodaemon": True}  # twistd's own options
    inner = Service()
    daemon = LoggedDaemon(inner, options, reactor=None)
    application = Application("taskscheduler-server")
    daemon.setServiceParent(application)
    observer = application.getComponent(ILogObserver, None)
    assert observer is not None
    assert list(IService(application)) == [daemon] and list(daemon) == [inner]
    log = Logger(namespace="tests.logs", observer=observer)
    log.info("quiet at warn")
    log.warn("said at warn")
    [line] = path.read_text().splitlines()
    assert json.loads(line)["message"] == "said at warn"


class _FailingOwner:
    """A scheduler whose every run fails to start."""

    def check_clock(self) -> float:
        return 0.0

    def fired(self, task_id: uuid.UUID, scheduled_at: datetime) -> None:
        pass

    def fire(self, spec: TaskSpec, scheduled_at: datetime) -> None:
        raise OSError(24, "Too many open files")

    def record_skip(
        self, spec: TaskSpec, scheduled_at: datetime, reason: str, quiet: bool = False
    ) -> None:
        pass


def test_a_run_that_cannot_start_is_named_by_its_task_and_instant() -> None:
    events: list[LogEvent] = []
    clock = Clock()
    clock.advance(ANCHOR.timestamp())
    task = spec(command="echo s3cr3t", task_id=TASK)
    loop = TaskLoop(task, _FailingOwner(), LabelTime(clock))
    loop.log = Logger(observer=cast(ILogObserver, events.append))
    loop.start()
    clock.advance(10)
    loop.stop()
    [event] = events
    assert formatEvent(event) == f"task {TASK}: could not start its run of {event['scheduled_at']}"
    assert event["scheduled_at"] == format_instant(ANCHOR + timedelta(seconds=10))
    assert "s3cr3t" not in json_line(event)


def test_a_run_the_runner_could_not_start_is_named_by_its_task_and_instant(
    tmp_path: Path,
) -> None:
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        agent = start(tmp_path, 5)
        agent.runner.fail_to_start = True
        agent.service.scheduler.schedule(spec("echo s3cr3t", task_id=TASK))  # type: ignore[union-attr]
        agent.advance_to(12)
    finally:
        globalLogPublisher.removeObserver(observer)
    [failed] = [e for e in events if "could not be started" in formatEvent(e)]
    instant = format_instant(ANCHOR + timedelta(seconds=10))
    assert formatEvent(failed) == f"task {TASK}: its run of {instant} could not be started"
    assert "s3cr3t" not in "".join(json_line(e) for e in events)
