"""twistd finds both daemons once taskscheduler is installed (not just importable)."""

from __future__ import annotations

import subprocess

from tests.integration.daemons import TWISTD


def test_twistd_lists_both_plugins() -> None:
    listing = subprocess.run(
        [TWISTD, "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "taskscheduler-server" in listing
    assert "taskscheduler-agent" in listing


def test_each_plugin_documents_its_options_and_environment_variables() -> None:
    for plugin, expected in [
        ("taskscheduler-server", ["--listen", "--database", "--data-dir", "AVAILABLE_SERVERS"]),
        ("taskscheduler-agent", ["--listen", "--server", "--data-dir"]),
    ]:
        text = subprocess.run(
            [TWISTD, plugin, "--help"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        for word in expected:
            assert word in text, (plugin, word)
