"""Start-up as services: children start one after another and stop in reverse, a failure
stops the daemon, and a listening port is bound first but accepts only when told."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.application.service import Service
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from taskscheduler.listen import listen_endpoint
from taskscheduler.services import ListeningPort, StartInOrder, Step

reactor: Any = _reactor


class Child(Service):
    """A child whose start and stop finish when the test says so."""

    def __init__(self, name: str, events: list[str]) -> None:
        self.setName(name)
        self.events = events
        self.starting: Deferred[None] = Deferred()
        self.stopping: Deferred[None] = Deferred()

    def startService(self) -> Deferred[None]:  # type: ignore[override]
        super().startService()
        self.events.append(f"start {self.name}")
        return self.starting

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        super().stopService()
        self.events.append(f"stop {self.name}")
        return self.stopping


def tree_of(*names: str) -> tuple[StartInOrder, list[Child], list[str], list[str]]:
    events: list[str] = []
    fatal: list[str] = []
    tree = StartInOrder("test daemon", fatal.append, (ValueError,))
    children = [Child(name, events) for name in names]
    for child in children:
        child.setServiceParent(tree)
    return tree, children, events, fatal


def test_each_child_starts_once_the_one_before_has_started() -> None:
    tree, (a, b, c), events, fatal = tree_of("a", "b", "c")
    tree.startService()
    assert events == ["start a"]
    a.starting.callback(None)
    assert events == ["start a", "start b"]
    b.starting.callback(None)
    assert events == ["start a", "start b", "start c"]
    c.starting.callback(None)
    assert fatal == []


def test_children_stop_in_reverse_each_once_the_one_after_has_stopped() -> None:
    tree, (a, b, c), events, _ = tree_of("a", "b", "c")
    tree.startService()
    for child in (a, b, c):
        child.starting.callback(None)
    del events[:]
    stopped = tree.stopService()
    assert events == ["stop c"]
    c.stopping.callback(None)
    assert events == ["stop c", "stop b"]
    b.stopping.callback(None)
    a.stopping.callback(None)
    assert events == ["stop c", "stop b", "stop a"]
    assert stopped.called


def test_a_child_that_fails_to_start_stops_the_daemon_and_nothing_after_it_starts() -> None:
    tree, (a, b, _), events, fatal = tree_of("a", "b", "c")
    tree.startService()
    a.starting.callback(None)
    b.starting.errback(ValueError("the port is taken"))
    assert fatal == ["the port is taken"]
    assert "start c" not in events
    # on_fatal stops the process, which stops the tree: only what started is stopped.
    tree.stopService()
    assert events[-1] == "stop b"
    b.stopping.callback(None)
    assert events[-2:] == ["stop b", "stop a"]


def test_an_unexpected_failure_names_its_type() -> None:
    tree, (a,), _, fatal = tree_of("a")
    tree.startService()
    a.starting.errback(KeyError("oops"))
    assert fatal == ["KeyError: 'oops' (see the log)"]


def test_stopping_while_starting_is_not_a_failure() -> None:
    tree, (a, _), events, fatal = tree_of("a", "b")
    tree.startService()
    tree.stopService()
    a.stopping.callback(None)
    assert fatal == []
    assert events == ["start a", "stop a"], "b never starts"


def test_a_step_runs_its_start_and_its_stop() -> None:
    events: list[str] = []
    step = Step("step", lambda: events.append("start"), lambda: events.append("stop"))
    step.startService()
    step.stopService()
    assert events == ["start", "stop"]


@pytest.fixture
def loopback_port() -> Iterator[ListeningPort]:
    endpoint = listen_endpoint(reactor, "tcp:0:interface=127.0.0.1")
    port = ListeningPort(endpoint, Factory.forProtocol(Protocol), Clock())
    yield port
    port.stopService()


def test_a_port_is_bound_at_once_but_accepts_only_when_told(
    loopback_port: ListeningPort,
) -> None:
    loopback_port.privilegedStartService()
    port = loopback_port.port
    assert port is not None, "bound"
    assert port not in reactor.getReaders(), "bound, but no connection is accepted yet"
    loopback_port.accept()
    assert port in reactor.getReaders()
    loopback_port.stopService()
    assert port not in reactor.getReaders()


def test_a_port_the_check_refuses_fails_its_start(loopback_port: ListeningPort) -> None:
    def refuse(port: Any) -> None:
        raise ValueError(f"not on {port.getHost().host}")

    loopback_port._check = refuse
    failures: list[Any] = []
    loopback_port.startService().addErrback(failures.append)
    [failure] = failures
    assert failure.getErrorMessage() == "not on 127.0.0.1"


def test_a_port_that_cannot_be_bound_fails_its_start(loopback_port: ListeningPort) -> None:
    loopback_port.privilegedStartService()
    assert loopback_port.port is not None
    taken = loopback_port.port.getHost().port
    other = ListeningPort(
        listen_endpoint(reactor, f"tcp:{taken}:interface=127.0.0.1"),
        Factory.forProtocol(Protocol),
        Clock(),
    )
    failures: list[Any] = []
    other.privilegedStartService()  # does not raise: the start says it
    other.startService().addErrback(failures.append)
    [failure] = failures
    assert failure.check(CannotListenError)
