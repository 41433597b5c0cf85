"""``twistd taskscheduler-agent``: options and service wiring.

``makeService`` only builds objects; the data folder is read when the service starts
(:class:`taskscheduler.agent.service.AgentService`), which stops the process cleanly if
it cannot.
"""

from __future__ import annotations

import contextlib
import os
import pwd
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import treq
from twisted.application.service import IService
from twisted.internet import reactor as global_reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ReactorNotRunning
from twisted.internet.threads import deferToThreadPool
from twisted.python import usage

from taskscheduler.agent.scheduler import RunnerLike
from taskscheduler.agent.service import DEFAULT_SHUTDOWN_GRACE, AgentConfig, AgentService
from taskscheduler.agent.spool import DEFAULT_SPOOL_MAX_BYTES

DEFAULT_OUTPUT_CAP = 1024 * 1024
DEFAULT_KILL_GRACE = 5.0

#: (option, environment variable, default) for every option.
_SETTINGS = [
    ("listen", "TASKSCHEDULER_AGENT_LISTEN", "tcp:8081"),
    ("server", "TASKSCHEDULER_SERVER_URL", "http://127.0.0.1:8080"),
    ("data-dir", "TASKSCHEDULER_AGENT_DATA_DIR", "taskscheduler-agent-data"),
    ("output-cap", "TASKSCHEDULER_AGENT_OUTPUT_CAP", str(DEFAULT_OUTPUT_CAP)),
    ("kill-grace", "TASKSCHEDULER_AGENT_KILL_GRACE", str(DEFAULT_KILL_GRACE)),
    ("shutdown-grace", "TASKSCHEDULER_AGENT_SHUTDOWN_GRACE", str(DEFAULT_SHUTDOWN_GRACE)),
    ("spool-max-bytes", "TASKSCHEDULER_AGENT_SPOOL_MAX_BYTES", str(DEFAULT_SPOOL_MAX_BYTES)),
]

#: The whole environment of every run, besides TASKSCHEDULER_TASK_ID and
#: TASKSCHEDULER_SCHEDULED_AT: never the agent's own, which may hold secrets.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Runs the taskscheduler agent: it runs the tasks its server schedules here and "
        "reports their results. Every option can also be set by the environment variable "
        "named in brackets; the command line wins."
    )
    optParameters = [
        [
            "listen",
            "l",
            None,
            "Where to listen, as a Twisted endpoint string [TASKSCHEDULER_AGENT_LISTEN] "
            "(default: tcp:8081; e.g. tcp:8081:interface=127.0.0.1).",
        ],
        [
            "server",
            "s",
            None,
            "Base URL of the taskscheduler server [TASKSCHEDULER_SERVER_URL] "
            "(default: http://127.0.0.1:8080).",
        ],
        [
            "data-dir",
            "d",
            None,
            "Folder for the agent's identity, tasks and unreported results "
            "[TASKSCHEDULER_AGENT_DATA_DIR] (default: ./taskscheduler-agent-data).",
        ],
        [
            "output-cap",
            None,
            None,
            "Bytes of stdout and of stderr kept per run; past it the middle is dropped "
            f"[TASKSCHEDULER_AGENT_OUTPUT_CAP] (default: {DEFAULT_OUTPUT_CAP}).",
        ],
        [
            "kill-grace",
            None,
            None,
            "Seconds between SIGTERM and SIGKILL when a run reaches its time limit "
            f"[TASKSCHEDULER_AGENT_KILL_GRACE] (default: {DEFAULT_KILL_GRACE:g}).",
        ],
        [
            "shutdown-grace",
            None,
            None,
            "Seconds the runs under way may go on when the agent stops, before they are "
            f"terminated [TASKSCHEDULER_AGENT_SHUTDOWN_GRACE] "
            f"(default: {DEFAULT_SHUTDOWN_GRACE:g}).",
        ],
        [
            "spool-max-bytes",
            None,
            None,
            "Most bytes of unreported results kept; past it new results are dropped and "
            f"counted [TASKSCHEDULER_AGENT_SPOOL_MAX_BYTES] (default: {DEFAULT_SPOOL_MAX_BYTES}).",
        ],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ

    def postOptions(self) -> None:
        for name, variable, default in _SETTINGS:
            if self[name] is None:
                self[name] = self._environ.get(variable) or default
        server = self["server"].rstrip("/")
        if not server.startswith(("http://", "https://")):
            raise usage.UsageError(f"--server {server!r} must be a base URL like http://host:8080")
        self["server"] = server
        self["output-cap"] = _number(self["output-cap"], "output-cap", int, minimum=1)
        self["kill-grace"] = _number(self["kill-grace"], "kill-grace", float, minimum=0)
        self["shutdown-grace"] = _number(self["shutdown-grace"], "shutdown-grace", float, minimum=0)
        self["spool-max-bytes"] = _number(
            self["spool-max-bytes"], "spool-max-bytes", int, minimum=1
        )


def _number(text: str, name: str, kind: type[int] | type[float], minimum: float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise usage.UsageError(f"--{name} must be a number, not {text!r}") from None
    if value < minimum:
        raise usage.UsageError(f"--{name} must be at least {minimum:g}")
    return value


def base_environment() -> dict[str, str]:
    """The small, explicit environment every run starts from."""
    try:
        home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        home = "/"
    return {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": home}


def makeService(options: Options) -> IService:
    reactor: Any = global_reactor

    def runner_factory() -> RunnerLike:
        from taskscheduler.agent.runner import ProcessRunner

        return ProcessRunner(
            reactor,
            base_environment(),
            output_cap=options["output-cap"],
            kill_grace=options["kill-grace"],
        )

    def stop_reactor() -> None:
        # Start-up may fail before the reactor runs (twistd starts services first).
        def stop() -> None:
            with contextlib.suppress(ReactorNotRunning):
                reactor.stop()

        reactor.callWhenRunning(stop)

    return AgentService(
        AgentConfig(
            data_dir=Path(options["data-dir"]),
            server_url=options["server"],
            spool_max_bytes=options["spool-max-bytes"],
            shutdown_grace=options["shutdown-grace"],
        ),
        reactor,
        runner_factory,
        treq,
        endpoint=serverFromString(reactor, options["listen"]),
        on_fatal=stop_reactor,
        run_in_thread=lambda function: deferToThreadPool(
            reactor, reactor.getThreadPool(), function
        ),
    )


__all__: Sequence[str] = ["Options", "makeService"]
