"""Tokens, the operators' tokens file, redaction and the tokens CLI."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from taskscheduler import tokens
from taskscheduler.auth import (
    AGENT_PREFIX,
    OPERATOR_PREFIX,
    TokenFile,
    TokenFileError,
    bearer_token,
    hash_token,
    new_token,
    parse_bearer,
)
from taskscheduler.redact import redact_dsn, redact_tokens

SRC = Path(__file__).resolve().parents[2] / "src"


# -- tokens ------------------------------------------------------------------------------


def test_new_tokens_are_prefixed_random_and_url_safe() -> None:
    made = {new_token() for _ in range(200)}
    assert len(made) == 200
    for token in made:
        assert token.startswith(OPERATOR_PREFIX)
        # 32 random bytes are 43 URL-safe base64 characters.
        assert len(token) == len(OPERATOR_PREFIX) + 43
        assert parse_bearer(f"Bearer {token}") == token
    assert new_token(AGENT_PREFIX).startswith("tsa_")


def test_hash_is_sha256_hex_and_differs_for_every_token() -> None:
    token = new_token()
    stored = hash_token(token)
    assert stored.startswith("sha256:") and len(stored) == 7 + 64
    assert token not in stored
    assert hash_token(token) == stored
    assert hash_token(token + "x") != stored
    assert hash_token(new_token()) != stored
    # A known vector, so the stored format cannot drift unnoticed.
    assert hash_token("abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer tso_abc-DEF_123", "tso_abc-DEF_123"),
        ("bearer tso_abc", "tso_abc"),
        ("BEARER   tso_abc  ", "tso_abc"),
        (b"Bearer tso_abc", "tso_abc"),
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("tso_abc", None),
        ("Bearer two tokens", None),
        ("Bearer tso_\u00e9", None),
        (b"Bearer tso_\xff", None),
        ("Bearer " + "a" * 513, None),
    ],
)
def test_parse_bearer(header: str | bytes | None, expected: str | None) -> None:
    assert parse_bearer(header) == expected


def test_bearer_token_from_a_request() -> None:
    request = Request(DummyChannel())
    assert bearer_token(request) is None
    request.requestHeaders.setRawHeaders(b"Authorization", [b"Bearer tso_x"])
    assert bearer_token(request) == "tso_x"
    # Two Authorization headers are ambiguous: refuse rather than pick one.
    request.requestHeaders.setRawHeaders(b"Authorization", [b"Bearer tso_x", b"Bearer tso_y"])
    assert bearer_token(request) is None


# -- the tokens file ---------------------------------------------------------------------


def token_line(name: str, token: str) -> str:
    return f"{name} {hash_token(token)}\n"


def write(path: Path, text: str) -> None:
    # Write a new file and rename it over the old one, as editors and config tools do.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_token_file_authenticates_by_hash(tmp_path: Path) -> None:
    alice, bob = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(
        "# operators\n\n"
        + token_line("alice", alice)
        + "   "
        + token_line("bob", bob).rstrip("\n")
        + "   # CI\n"
    )
    tokens = TokenFile.from_path(str(path), Clock())
    assert tokens.authenticate_token(alice) == "alice"
    assert tokens.authenticate_token(bob) == "bob"
    assert tokens.authenticate_token(new_token()) is None
    assert tokens.authenticate_token(hash_token(alice)) is None
    assert len(tokens) == 2


def test_one_name_may_hold_two_tokens_while_rotating(tmp_path: Path) -> None:
    old, new = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(token_line("ci", old) + token_line("ci", new))
    tokens = TokenFile.from_path(str(path), Clock())
    assert tokens.authenticate_token(old) == tokens.authenticate_token(new) == "ci"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("alice", "found 1 field"),
        ("alice sha256:{hex} extra", "found 3 field"),
        ("-alice sha256:{hex}", "the name must start"),
        ("al/ice sha256:{hex}", "the name must start"),
        ("alice {token}", "never the token itself"),
        ("alice md5:{hex}", "not 'sha256:'"),
        ("alice sha256:{short}", "not 'sha256:'"),
        ("alice sha256:{hex}\nbob sha256:{hex}", "already appears"),
    ],
)
def test_bad_lines_name_the_line_without_echoing_it(
    tmp_path: Path, line: str, message: str
) -> None:
    token = new_token()
    hex_digits = hash_token(token)[7:]
    text = line.format(hex=hex_digits, token=token, short=hex_digits[:40])
    path = tmp_path / "tokens"
    path.write_text("# header\n\n" + text + "\n")
    with pytest.raises(TokenFileError) as info:
        TokenFile.from_path(str(path), Clock())
    error = str(info.value)
    assert message in error
    assert f"{path} line {3 + text.count(chr(10))}" in error
    assert token not in error and hex_digits not in error


def test_unreadable_token_file_is_a_startup_error(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot be read"):
        TokenFile.from_path(str(tmp_path / "missing"), Clock())
    binary = tmp_path / "binary"
    binary.write_bytes(b"alice \xff\n")
    with pytest.raises(TokenFileError, match="not valid UTF-8"):
        TokenFile.from_path(str(binary), Clock())


def test_revoked_token_stops_working_within_a_second(tmp_path: Path) -> None:
    alice, bob = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(token_line("alice", alice) + token_line("bob", bob))
    clock = Clock()
    tokens = TokenFile.from_path(str(path), clock)
    assert tokens.authenticate_token(bob) == "bob"

    write(path, token_line("alice", alice))
    # The file is checked at most once a second: until then the old set holds.
    clock.advance(0.5)
    assert tokens.authenticate_token(bob) == "bob"
    clock.advance(0.5)
    assert tokens.authenticate_token(bob) is None
    assert tokens.authenticate_token(alice) == "alice"

    carol = new_token()
    write(path, token_line("alice", alice) + token_line("carol", carol))
    clock.advance(1)
    assert tokens.authenticate_token(carol) == "carol"


def test_change_in_place_with_same_size_is_noticed(tmp_path: Path) -> None:
    # Same length, same inode: the modification time tells the change apart.
    first, second = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(token_line("ci", first))
    clock = Clock()
    tokens = TokenFile.from_path(str(path), clock)
    stat = path.stat()
    path.write_text(token_line("ci", second))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    clock.advance(1)
    assert tokens.authenticate_token(first) is None
    assert tokens.authenticate_token(second) == "ci"


def test_unchanged_file_is_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alice = new_token()
    path = tmp_path / "tokens"
    path.write_text(token_line("alice", alice))
    clock = Clock()
    tokens = TokenFile.from_path(str(path), clock)
    opened: list[str] = []
    real_open = open

    def counting_open(file: str, *args: object, **kwargs: object) -> object:
        opened.append(file)
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", counting_open)
    for _ in range(5):
        clock.advance(1)
        assert tokens.authenticate_token(alice) == "alice"
    assert opened == []


def test_broken_or_deleted_file_refuses_every_token_until_fixed(tmp_path: Path) -> None:
    alice = new_token()
    path = tmp_path / "tokens"
    path.write_text(token_line("alice", alice))
    clock = Clock()
    tokens = TokenFile.from_path(str(path), clock)

    # A typo while revoking someone must not leave the old tokens working.
    write(path, token_line("alice", alice) + "bob oops\n")
    clock.advance(1)
    assert tokens.authenticate_token(alice) is None
    clock.advance(1)
    assert tokens.authenticate_token(alice) is None

    write(path, token_line("alice", alice))
    clock.advance(1)
    assert tokens.authenticate_token(alice) == "alice"

    path.unlink()
    clock.advance(1)
    assert tokens.authenticate_token(alice) is None
    assert len(tokens) == 0


def test_reload_errors_are_logged_without_secrets(tmp_path: Path) -> None:
    alice = new_token()
    path = tmp_path / "tokens"
    path.write_text(token_line("alice", alice))
    clock = Clock()
    tokens = TokenFile.from_path(str(path), clock)
    write(path, f"alice {alice}\n")  # the token pasted where its hash belongs
    clock.advance(1)
    with capturedLogs() as events:
        assert tokens.authenticate_token(alice) is None
    text = "\n".join(formatEvent(event) for event in events)
    assert "line 1" in text and "refusing every operator token" in text
    assert alice not in text and alice[4:] not in text


def test_tokens_from_an_environment_variable() -> None:
    alice, bob, carol = new_token(), new_token(), new_token()
    value = (
        token_line("alice", alice).strip()
        + ","
        + token_line("bob", bob).strip()
        + "\n# a comment\n"
        + token_line("carol", carol)
    )
    tokens = TokenFile.from_env_value(value)
    assert tokens.authenticate_token(alice) == "alice"
    assert tokens.authenticate_token(bob) == "bob"
    assert tokens.authenticate_token(carol) == "carol"
    assert len(tokens) == 3
    assert len(TokenFile.from_env_value("")) == 0

    with pytest.raises(TokenFileError) as info:
        TokenFile.from_env_value(f"alice {hash_token(alice)},bob {bob}", "TS_TOKENS")
    assert str(info.value).startswith("TS_TOKENS entry 2:")
    assert bob not in str(info.value)


# -- redaction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "postgresql://app:s3cret@db.internal:5432/tasks",
            "postgresql://app:***@db.internal:5432/tasks",
        ),
        ("postgres://app:p@ss/w:rd@db/tasks", "postgres://app:***@db/tasks"),
        ("postgresql://app@db/tasks", "postgresql://app@db/tasks"),
        ("postgresql://db/tasks", "postgresql://db/tasks"),
        (
            "postgresql://db/tasks?user=app&password=s3cret&sslmode=require",
            "postgresql://db/tasks?user=app&password=***&sslmode=require",
        ),
        (
            "postgresql://db/tasks?sslpassword=s3cret",
            "postgresql://db/tasks?sslpassword=***",
        ),
        (
            "host=db user=app password=s3cret dbname=tasks",
            "host=db user=app password=*** dbname=tasks",
        ),
        ("host=db password = s3cret", "host=db password=***"),
        ("host=db password='s3 cr\\'et' dbname=tasks", "host=db password=*** dbname=tasks"),
        ("host=db PASSWORD=s3cret", "host=db PASSWORD=***"),
        ("host=db sslpassword=s3cret", "host=db sslpassword=***"),
        ("host=db user=password", "host=db user=password"),
        ("host=/tmp/pg dbname=tasks", "host=/tmp/pg dbname=tasks"),
        # Several hosts (a primary and its standbys), in both forms.
        (
            "postgresql://app:s3cret@db1:5432,db2:5433/tasks?target_session_attrs=read-write",
            "postgresql://app:***@db1:5432,db2:5433/tasks?target_session_attrs=read-write",
        ),
        (
            "postgresql://db1,db2/tasks?target_session_attrs=read-write&password=s3cret",
            "postgresql://db1,db2/tasks?target_session_attrs=read-write&password=***",
        ),
        (
            "host=db1,db2 port=5432,5433 password=s3cret target_session_attrs=read-write",
            "host=db1,db2 port=5432,5433 password=*** target_session_attrs=read-write",
        ),
        # libpq decodes a URI's parameter names: this is a password.
        ("postgresql://db/tasks?pass%77ord=s3cret", "postgresql://db/tasks?pass%77ord=***"),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact_dsn(dsn) == expected
    assert "s3" not in redact_dsn(dsn)


def test_redact_tokens_in_free_text() -> None:
    operator, agent = new_token(), new_token(AGENT_PREFIX)
    text = f"refused Bearer {operator} and {agent}; tso_ alone is fine"
    redacted = redact_tokens(text)
    assert operator not in redacted and agent not in redacted
    assert redacted == "refused Bearer tso_*** and tsa_***; tso_ alone is fine"


# -- the tokens CLI ---------------------------------------------------------------------------


def run_cli(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = tokens.main(list(argv), io.StringIO(stdin), out, err)
    return code, out.getvalue(), err.getvalue()


def test_cli_new_prints_the_token_once_and_the_line_for_the_file(tmp_path: Path) -> None:
    code, out, err = run_cli("new", "alice")
    assert code == 0
    token = out.strip()
    assert out == token + "\n" and token.startswith(OPERATOR_PREFIX)
    assert token not in err
    line = err.strip().splitlines()[-1]
    assert line == f"alice {hash_token(token)}"

    # The printed line is exactly what the tokens file takes.
    path = tmp_path / "tokens"
    path.write_text(line + "\n")
    assert TokenFile.from_path(str(path), Clock()).authenticate_token(token) == "alice"


def test_cli_new_agent_kind() -> None:
    code, out, _ = run_cli("new", "agent-7", "--kind", "agent")
    assert code == 0 and out.startswith(AGENT_PREFIX)


def test_cli_hash_from_argument_or_stdin() -> None:
    token = new_token()
    assert run_cli("hash", token) == (0, hash_token(token) + "\n", "")
    assert run_cli("hash", "--name", "bob", stdin=token + "\n") == (
        0,
        f"bob {hash_token(token)}\n",
        "",
    )
    assert run_cli("hash", "-", stdin="\n")[0] == 2


def test_cli_rejects_a_name_the_file_would_reject() -> None:
    code, out, err = run_cli("new", "bad name!")
    assert code == 2 and out == "" and "name" in err


def test_cli_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "taskscheduler.tokens", "new", "ops"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        timeout=60,
        check=True,
    )
    token = result.stdout.strip()
    assert f"ops {hash_token(token)}" in result.stderr
