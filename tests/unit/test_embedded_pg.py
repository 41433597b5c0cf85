"""The embedded PostgreSQL: the pgserver it relies on (private names included) is checked,
so that an upgrade fails loudly."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from taskscheduler.embedded_pg import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    pgserver_incompatibilities,
)

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


# -- pgserver -------------------------------------------------------------------------------


def test_the_installed_pgserver_is_in_the_pinned_range() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    pins = [Requirement(d) for d in project["dependencies"] if d.startswith("pgserver")]
    assert len(pins) == 1 and pins[0].specifier, "pgserver must have a version range"
    assert pins[0].specifier.contains(version("pgserver")), (pins[0], version("pgserver"))
    assert any(spec.operator == "<" for spec in pins[0].specifier), "no upper bound"


def test_pgserver_still_has_every_private_name_embedded_pg_uses(
    embedded_postgres: EmbeddedPostgres,
) -> None:
    missing = pgserver_incompatibilities(embedded_postgres._server)
    assert missing == [], (
        f"pgserver {version('pgserver')} no longer has {missing}, which "
        "taskscheduler.embedded_pg relies on: adapt it, or pin pgserver back in pyproject.toml"
    )


@pytest.mark.parametrize("name", ["_instances", "_lock", "_cleanup"])
def test_a_pgserver_without_one_of_them_is_refused_by_name(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pgserver.postgres_server import PostgresServer

    monkeypatch.delattr(PostgresServer, name)
    assert pgserver_incompatibilities() == [f"PostgresServer.{name}"]
    with pytest.raises(EmbeddedPostgresError, match=f"PostgresServer.{name}") as info:
        EmbeddedPostgres(tmp_path / "postgres").start_blocking()
    assert "pyproject.toml" in str(info.value)
    assert not (tmp_path / "postgres").exists(), "refused before touching anything"
