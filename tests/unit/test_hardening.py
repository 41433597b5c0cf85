"""What keeps the daemons' secrets their own (issue 8, findings 4 and 11): non-dumpable
processes, secrets taken out of the environment, private data folders and secret files,
and the agent's start-up refusing and warning where its secrets would be exposed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent

from taskscheduler.agent import tap
from taskscheduler.agent.service import AgentConfig, AgentService
from taskscheduler.auth import JOIN_PREFIX, new_token
from taskscheduler.hardening import make_private_folder, private_file_problem
from tests.unit.agent_fakes import ANCHOR_SECONDS, SERVER, FakeRunner, FakeServer

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def run_python(code: str, env: dict[str, str]) -> str:
    """Run ``code`` in a fresh interpreter (the flags it sets are process-wide)."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@linux_only
def test_make_non_dumpable_clears_the_dumpable_flag() -> None:
    out = run_python(
        "import ctypes\n"
        "from taskscheduler.hardening import make_non_dumpable\n"
        "def is_dumpable():\n"
        "    return bool(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE\n"
        "print(is_dumpable(), make_non_dumpable(), is_dumpable())\n",
        {},
    )
    assert out.split() == ["True", "True", "False"]


@linux_only
def test_a_secret_taken_from_the_environment_is_gone_from_proc_and_from_children() -> None:
    secret = "tsj_" + uuid.uuid4().hex
    out = run_python(
        "import os, subprocess\n"
        "from taskscheduler.hardening import take_secret_from_environment\n"
        "value = take_secret_from_environment(os.environ, 'TASKSCHEDULER_JOIN_SECRET')\n"
        "print(value)\n"
        "print(open('/proc/self/environ', 'rb').read().replace(b'\\0', b' ').decode())\n"
        "print(subprocess.run(['env'], capture_output=True, text=True).stdout)\n"
        "print('KEEP=' + os.environ['KEEP'])\n",
        {"TASKSCHEDULER_JOIN_SECRET": secret, "KEEP": "kept"},
    )
    first, rest = out.split("\n", 1)
    assert first == secret, "the value is returned once"
    assert secret not in rest, "neither /proc/self/environ nor a child's environment shows it"
    assert "KEEP=kept" in rest, "the rest of the environment is left alone"


def test_the_agent_takes_the_join_secret_out_of_the_environment_it_reads() -> None:
    environ = {"TASKSCHEDULER_JOIN_SECRET": "tsj_abc", "OTHER": "x"}
    options = tap.Options(environ)
    options.parseOptions([])
    assert options["join-secret"] == "tsj_abc"
    assert environ == {"OTHER": "x"}


def test_a_data_folder_is_made_private_and_a_wider_one_narrowed(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh" / "data"
    assert make_private_folder(fresh) is False
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    old = tmp_path / "old"
    old.mkdir()
    old.chmod(0o755)
    assert make_private_folder(old) is True
    assert stat.S_IMODE(old.stat().st_mode) == 0o700
    assert make_private_folder(old) is False


def test_a_secret_file_others_may_read_has_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("x")
    path.chmod(0o600)
    assert private_file_problem(path) is None
    for mode in (0o644, 0o640, 0o604, 0o620):
        path.chmod(mode)
        assert private_file_problem(path) == f"{path} is readable by others; chmod 600 it"


def start_agent(
    tmp_path: Path, *, join_secret_file: Path | None = None, run_as: str | None = None
) -> tuple[AgentService, list[str], list[str]]:
    clock = Clock()
    clock.advance(ANCHOR_SECONDS)
    fatal: list[str] = []
    service = AgentService(
        AgentConfig(
            tmp_path / "data",
            SERVER,
            join_secret=None if join_secret_file else new_token(JOIN_PREFIX),
            join_secret_file=join_secret_file,
            run_as=run_as,
        ),
        clock,
        lambda: FakeRunner(clock),
        StubTreq(FakeServer().app.resource()),
        on_fatal=fatal.append,
    )
    with capturedLogs() as events:
        service.startService()
    warnings = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]
    return service, fatal, warnings


def test_a_join_secret_file_others_may_read_is_refused_as_a_credential_is(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "join.secret"
    secret.write_text(new_token(JOIN_PREFIX) + "\n")
    secret.chmod(0o644)
    service, fatal, _ = start_agent(tmp_path, join_secret_file=secret)
    assert fatal == [f"{secret} is readable by others; chmod 600 it"]
    assert service.api is None
    secret.chmod(0o600)
    service, fatal, _ = start_agent(tmp_path / "again", join_secret_file=secret)
    assert fatal == [] and service.api is not None
    service.stopService()


def test_the_agent_narrows_an_existing_data_folder_to_0700(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    service, fatal, warnings = start_agent(tmp_path)
    assert fatal == []
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert any("was open to other users: made it 0700" in w for w in warnings)
    service.stopService()


def test_the_agent_warns_when_tasks_run_as_its_own_user(tmp_path: Path) -> None:
    service, fatal, warnings = start_agent(tmp_path / "own")
    assert fatal == []
    [warning] = [w for w in warnings if "tasks run as the agent's own user" in w]
    assert "join secret and credential" in warning and "--run-as" in warning
    service.stopService()
    service, fatal, warnings = start_agent(tmp_path / "other", run_as="nobody")
    assert fatal == []
    assert not [w for w in warnings if "own user" in w]
    service.stopService()
