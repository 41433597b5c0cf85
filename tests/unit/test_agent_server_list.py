"""The agent's ``--server`` list of replicas: parsed and checked at start, each entry a
plain base URL, none twice; and the instructions of any replica verify (they share the
signing key; nothing in a signature names a server URL)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.web.pages import notFound

from taskscheduler.agent.options import Options
from taskscheduler.agent.servers import ServerChooser, parse_server_urls
from taskscheduler.agent.service import AgentConfig, AgentService
from taskscheduler.signing import InstructionSigner, InstructionVerifier
from tests.unit.agent_fakes import ANCHOR_SECONDS, FakeRunner, fired, provision
from tests.unit.replica_fakes import AGENT_ID, A


def test_a_list_of_servers_is_parsed_in_order() -> None:
    assert parse_server_urls("http://a:8080") == ("http://a:8080",)
    assert parse_server_urls(" https://a:8080/ , http://b:8080,https://c ") == (
        "https://a:8080",
        "http://b:8080",
        "https://c",
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("", "at least one"),
        ("http://a:8080,,http://b:8080", "empty entry"),
        ("http://a:8080,", "empty entry"),
        ("http://a:8080,b:8080", "'b:8080' must be a base URL"),
        ("ftp://a", "must be a base URL"),
        ("http://a:8080,http://A:8080/", "twice"),
        ("http://a,http://a:80", "twice"),
        ("https://a,https://a:443", "twice"),
        ("http://a:99999", "not a valid URL"),
        ("http://:8080", "names no host"),
        ("http://a:8080/?x=1", "plain base URL"),
        ("http://user:pw@a:8080", "plain base URL"),
    ],
)
def test_a_bad_list_is_a_usage_error_that_says_what_is_wrong(value: str, words: str) -> None:
    options = Options(environ={})
    with pytest.raises(usage.UsageError, match="--server") as raised:
        options.parseOptions(["--server", value])
    assert words in str(raised.value)


def test_the_list_comes_from_the_environment_too() -> None:
    options = Options(environ={"TASKSCHEDULER_SERVER_URL": "http://a:8080/,http://b:8080"})
    options.parseOptions([])
    assert options["servers"] == ("http://a:8080", "http://b:8080")
    with pytest.raises(usage.UsageError, match="twice"):
        Options(environ={"TASKSCHEDULER_SERVER_URL": "http://a,http://a"}).parseOptions([])


def test_a_chooser_of_one_never_fails_over() -> None:
    chooser = ServerChooser([A])
    chooser.failed(A, "connection refused")
    assert chooser.current == A and chooser.failovers == 0


def test_instructions_from_any_replica_verify() -> None:
    # The replicas share the signing key: nothing in a signature names the server's URL.
    key = Ed25519PrivateKey.generate()
    clock = Clock()
    clock.advance(ANCHOR_SECONDS)
    verifier = InstructionVerifier(AGENT_ID, clock, key.public_key(), started_at=0)
    body = b'{"task_id": "x"}'
    for replica in (InstructionSigner(key, clock), InstructionSigner(key, clock)):
        header = replica.authorization("POST", "/api/v1/tasks/schedule", AGENT_ID, body)
        verifier.verify("POST", "/api/v1/tasks/schedule", header.encode(), body)


def test_each_replica_reached_in_clear_off_this_machine_is_warned_about(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    provision(data_dir)
    clock = Clock()
    clock.advance(ANCHOR_SECONDS)
    urls = "http://127.0.0.1:8080,http://b.example:8080,https://c.example:8443,http://d.example"
    runner = FakeRunner(clock)
    service = AgentService(AgentConfig(data_dir, urls), clock, lambda: runner, StubTreq(notFound()))
    with capturedLogs() as events:
        service.startService()
        fired(service.stopService())
    clear = [formatEvent(e) for e in events if "plain HTTP" in formatEvent(e)]
    assert len(clear) == 2 and "b.example" in clear[0] and "d.example" in clear[1]
