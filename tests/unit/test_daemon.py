"""A daemon that cannot start says why on stderr, stops its reactor and exits 1."""

from __future__ import annotations

import io
from collections.abc import Callable

from twisted.internet.error import ReactorNotRunning

from taskscheduler.daemon import EXIT_START_FAILED, StartFailure


class FakeReactor:
    """``callWhenRunning`` and ``stop``, before or after the reactor runs."""

    def __init__(self, running: bool) -> None:
        self.running = running
        self.waiting: list[Callable[[], None]] = []
        self.stops = 0

    def callWhenRunning(self, function: Callable[[], None]) -> None:
        if self.running:
            function()
        else:
            self.waiting.append(function)

    def run(self) -> None:
        self.running = True
        for function in self.waiting:
            function()

    def stop(self) -> None:
        if not self.running:
            raise ReactorNotRunning()
        self.running = False
        self.stops += 1


class Harness:
    """A StartFailure for the server, with its reactor, stderr, exit handlers and exits."""

    def __init__(self, running: bool) -> None:
        self.reactor = FakeReactor(running)
        self.stderr = io.StringIO()
        self.handlers: list[Callable[[], None]] = []
        self.exits: list[int] = []
        self.failure = StartFailure(
            self.reactor,
            "taskscheduler server",
            stderr=self.stderr,
            exit=self.exits.append,
            register_exit_handler=self.handlers.append,
        )

    def exit_handlers(self) -> None:
        """What the interpreter does once twistd has returned."""
        for handler in reversed(self.handlers):
            handler()


def test_a_failed_start_prints_one_line_stops_the_reactor_and_exits_1() -> None:
    h = Harness(running=True)
    assert len(h.handlers) == 1  # registered when built, before the services start
    h.failure("refusing to listen on 'tcp:8080'\nwithout operator tokens")
    assert h.stderr.getvalue() == (
        "taskscheduler server could not start: refusing to listen on 'tcp:8080' "
        "without operator tokens\n"
    )
    assert h.reactor.stops == 1
    assert h.exits == []  # not while twistd still cleans up
    h.exit_handlers()
    assert h.exits == [EXIT_START_FAILED] == [1]


def test_a_failure_before_the_reactor_runs_stops_it_once_it_does() -> None:
    h = Harness(running=False)
    h.failure("the folder is in use")
    assert h.reactor.stops == 0
    h.reactor.run()
    assert h.reactor.stops == 1 and not h.reactor.running
    h.exit_handlers()
    assert h.exits == [1]


def test_the_first_reason_is_the_one_told() -> None:
    h = Harness(running=True)
    h.failure("first")
    h.failure("second")
    assert h.stderr.getvalue() == "taskscheduler server could not start: first\n"
    assert h.failure.reason == "first"


def test_a_daemon_that_started_exits_as_twistd_says() -> None:
    h = Harness(running=True)
    h.exit_handlers()
    assert h.exits == [] and h.stderr.getvalue() == "" and h.reactor.stops == 0
