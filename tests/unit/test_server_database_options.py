"""Where the server's database DSN comes from, and what it warns about (issue 8, finding 10)."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python import usage

from taskscheduler.server.database import database_warnings, read_database_file
from taskscheduler.server.options import Options


def parse(args: list[str], monkeypatch: pytest.MonkeyPatch, **env: str) -> Options:
    for name in ("TASKSCHEDULER_DATABASE", "TASKSCHEDULER_DATABASE_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    options = Options()
    options.parseOptions(args)
    return options


def test_the_dsn_comes_from_the_command_line_the_environment_or_a_file_not_two(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = parse(["--database", "postgresql://u:pw@h/db"], monkeypatch)
    assert options["database"] == "postgresql://u:pw@h/db"
    assert options["database-on-command-line"] is True
    options = parse([], monkeypatch, TASKSCHEDULER_DATABASE="postgresql://u:pw@h/db")
    assert options["database-on-command-line"] is False
    options = parse([], monkeypatch, TASKSCHEDULER_DATABASE_FILE="/etc/ts/database")
    assert (options["database"], options["database-file"]) == (None, "/etc/ts/database")
    with pytest.raises(usage.UsageError, match="not both"):
        parse(["--database-file", "/x"], monkeypatch, TASKSCHEDULER_DATABASE="host=h")
    with pytest.raises(usage.UsageError, match="not both"):
        parse(["--database-file", "/x", "--database", "host=h"], monkeypatch)


@pytest.mark.parametrize(
    ("dsn", "warned"),
    [
        ("postgresql://app:secret@db/ts", True),
        ("host=db user=app password='se cret' dbname=ts", True),
        ("postgresql://app@db/ts?password=secret", True),
        ("postgresql://app@db/ts", False),
        ("host=db user=app dbname=ts", False),
    ],
)
def test_a_password_on_the_command_line_is_warned_about(dsn: str, warned: bool) -> None:
    [*warnings] = database_warnings(dsn, on_command_line=True)
    assert bool(warnings) is warned
    assert all("secret" not in w and "--database-file" in w for w in warnings)
    assert database_warnings(dsn, on_command_line=False) == []


def test_the_database_file_must_be_private_and_not_empty(tmp_path: Path) -> None:
    path = tmp_path / "database"
    path.write_text("postgresql://app@db/ts\n")
    path.chmod(0o600)
    assert read_database_file(path) == "postgresql://app@db/ts"
    path.chmod(0o644)
    with pytest.raises(usage.UsageError, match=r"is readable by others; chmod 600 it"):
        read_database_file(path)
    path.chmod(0o600)
    path.write_text("\n")
    with pytest.raises(usage.UsageError, match="is empty"):
        read_database_file(path)
    with pytest.raises(usage.UsageError, match="cannot read"):
        read_database_file(tmp_path / "missing")
