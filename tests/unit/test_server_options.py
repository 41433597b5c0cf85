"""The server's security options: where tokens come from, and what it warns about."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from taskscheduler.listen import EndpointSyntaxError, is_loopback_url, listen_endpoint
from taskscheduler.server.options import Options
from taskscheduler.server.tap import plaintext_warnings


def parse(args: list[str], monkeypatch: pytest.MonkeyPatch, **env: str) -> Options:
    for name in [
        "TASKSCHEDULER_TOKENS",
        "TASKSCHEDULER_TOKENS_FILE",
        "TASKSCHEDULER_JOIN_SECRETS",
        "TASKSCHEDULER_JOIN_SECRETS_FILE",
        "AVAILABLE_SERVERS",
        "TASKSCHEDULER_RETENTION_DAYS",
    ]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    options = Options()
    options.parseOptions(args)
    return options


def test_tokens_come_from_a_file_or_the_environment_not_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = parse([], monkeypatch, TASKSCHEDULER_TOKENS="alice sha256:" + "a" * 64)
    assert options["tokens"] == "alice sha256:" + "a" * 64
    assert options["tokens-file"] is None
    options = parse([], monkeypatch, TASKSCHEDULER_TOKENS_FILE="/etc/ts/tokens")
    assert options["tokens-file"] == "/etc/ts/tokens"
    with pytest.raises(usage.UsageError, match="not both"):
        parse(["--tokens-file", "/x"], monkeypatch, TASKSCHEDULER_TOKENS="a sha256:" + "b" * 64)
    with pytest.raises(usage.UsageError, match="not both"):
        parse(
            ["--join-secrets-file", "/x"],
            monkeypatch,
            TASKSCHEDULER_JOIN_SECRETS="a sha256:" + "b" * 64,
        )
    assert parse([], monkeypatch)["insecure"] is False
    assert parse(["--insecure-allow-anonymous-operators"], monkeypatch)["insecure"] is True


def test_history_is_kept_90_days_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse([], monkeypatch)["retention-days"] == 90
    assert parse(["--retention-days", "7"], monkeypatch)["retention-days"] == 7
    assert parse(["--retention-days", "0"], monkeypatch)["retention-days"] == 0
    assert parse([], monkeypatch, TASKSCHEDULER_RETENTION_DAYS="30")["retention-days"] == 30
    assert parse([], monkeypatch, TASKSCHEDULER_RETENTION_DAYS="0")["retention-days"] == 0
    options = parse(["--retention-days", "5"], monkeypatch, TASKSCHEDULER_RETENTION_DAYS="30")
    assert options["retention-days"] == 5  # the command line wins
    for bad in ["-1", "1.5", "ninety", "36501"]:
        with pytest.raises(usage.UsageError, match="retention-days"):
            parse(["--retention-days", bad], monkeypatch)
    with pytest.raises(usage.UsageError, match="retention-days"):
        parse([], monkeypatch, TASKSCHEDULER_RETENTION_DAYS="-3")
    text = str(Options())
    assert "--retention-days" in text and "TASKSCHEDULER_RETENTION_DAYS" in text
    assert "default: 90" in text


def test_every_security_option_is_documented_with_its_variable() -> None:
    text = str(Options())
    for option, variable in [
        ("--tokens-file", "TASKSCHEDULER_TOKENS_FILE"),
        ("--join-secrets-file", "TASKSCHEDULER_JOIN_SECRETS_FILE"),
        ("--signing-key-file", "TASKSCHEDULER_SIGNING_KEY_FILE"),
        ("--tls-client-ca", "TASKSCHEDULER_TLS_CLIENT_CA"),
        ("--agent-ca", "TASKSCHEDULER_AGENT_CA"),
        ("--client-cert", "TASKSCHEDULER_CLIENT_CERT"),
        ("--idle-timeout", "TASKSCHEDULER_IDLE_TIMEOUT"),
        ("--insecure-allow-anonymous-operators", ""),
    ]:
        assert option in text and variable in text


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8081", True),
        ("http://localhost:8081/", True),
        ("https://[::1]:8081", True),
        ("http://10.0.0.5:8081", False),
        ("http://agent1:8081", False),
        ("http://127.0.0.1.example.com", False),
        ("http://[not-an-ip", False),
    ],
)
def test_loopback_urls(url: str, loopback: bool) -> None:
    assert is_loopback_url(url) is loopback


def test_what_would_travel_in_clear_is_warned_about() -> None:
    assert plaintext_warnings("tcp:8080:interface=127.0.0.1", True, ["http://127.0.0.1:8081"]) == []
    assert plaintext_warnings("ssl:8443:privateKey=k", False, ["https://agent1:8081"]) == []
    [listen] = plaintext_warnings("tcp:8080", False, [])
    assert "plain HTTP" in listen
    [agent] = plaintext_warnings("ssl:8443:privateKey=k", False, ["http://agent1:8081"])
    assert "http://agent1:8081" in agent


@pytest.mark.parametrize(
    "listen", ["tcp:abc", "garbage", "", "tcp:8080:bogus=1", "tcp:8080\\", "tcp:"]
)
def test_a_listen_twisted_cannot_parse_is_said_to_be_unparseable(listen: str) -> None:
    from twisted.internet import reactor

    with pytest.raises(EndpointSyntaxError, match="cannot parse --listen") as info:
        listen_endpoint(reactor, listen)
    assert repr(listen) in str(info.value)


def test_a_listen_naming_a_missing_key_file_is_not_called_unparseable(tmp_path: Path) -> None:
    from twisted.internet import reactor

    assert listen_endpoint(reactor, "tcp:8080:interface=127.0.0.1") is not None
    with pytest.raises(OSError, match=r"missing\.pem"):
        listen_endpoint(reactor, f"ssl:8443:privateKey={tmp_path}/missing.pem")


def test_stored_output_is_capped_at_a_mebibyte_per_stream_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TASKSCHEDULER_MAX_OUTPUT_BYTES", raising=False)
    assert parse([], monkeypatch)["max-output-bytes"] == 1024 * 1024
    assert parse(["--max-output-bytes", "4096"], monkeypatch)["max-output-bytes"] == 4096
    options = parse(["--max-output-bytes", "7"], monkeypatch, TASKSCHEDULER_MAX_OUTPUT_BYTES="9")
    assert options["max-output-bytes"] == 7  # the command line wins
    assert parse([], monkeypatch, TASKSCHEDULER_MAX_OUTPUT_BYTES="9")["max-output-bytes"] == 9
    for bad in ["0", "-1", "1.5", "1e6", "lots", "9" * 5000]:
        with pytest.raises(usage.UsageError, match="--max-output-bytes must be a whole number"):
            parse(["--max-output-bytes", bad], monkeypatch)
    text = str(Options())
    assert "--max-output-bytes" in text and "TASKSCHEDULER_MAX_OUTPUT_BYTES" in text


def test_clocks_may_differ_by_a_minute_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TASKSCHEDULER_CLOCK_ALLOWANCE", raising=False)
    assert parse([], monkeypatch)["clock-allowance"] == 60
    assert parse(["--clock-allowance", "7200"], monkeypatch)["clock-allowance"] == 7200
    env = {"TASKSCHEDULER_CLOCK_ALLOWANCE": "5"}
    assert parse([], monkeypatch, **env)["clock-allowance"] == 5
    for bad in ["0", "-1", "soon"]:
        with pytest.raises(usage.UsageError, match="--clock-allowance"):
            parse(["--clock-allowance", bad], monkeypatch)
    text = str(Options())
    assert "--clock-allowance" in text and "TASKSCHEDULER_CLOCK_ALLOWANCE" in text
