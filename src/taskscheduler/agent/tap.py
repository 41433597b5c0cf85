"""``twistd taskscheduler-agent``: the agent's service.

``makeService`` only builds objects: the agent's parts are made from its data folder
(its identity, tasks and unreported results), read when the service starts
(:class:`taskscheduler.agent.service.AgentService`), which stops the process cleanly if
it cannot.
"""

from __future__ import annotations

import gc
import os
import pwd
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet import reactor as global_reactor
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from taskscheduler.agent.containment import (
    CgroupContainment,
    Containment,
    SubreaperContainment,
    own_cgroup_dir,
)
from taskscheduler.agent.inflight import RunnerLike
from taskscheduler.agent.options import Options
from taskscheduler.agent.service import AgentConfig, AgentService
from taskscheduler.daemon import StartFailure
from taskscheduler.hardening import make_non_dumpable
from taskscheduler.httpclient import DaemonHTTP
from taskscheduler.listen import listen_endpoint
from taskscheduler.logs import LoggedDaemon

#: The whole environment of every run, besides TASKSCHEDULER_TASK_ID and
#: TASKSCHEDULER_SCHEDULED_AT: never the agent's own, which may hold secrets.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def base_environment(home: str | None = None) -> dict[str, str]:
    """The small, explicit environment every run starts from."""
    if home is None:
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = "/"
    return {"PATH": BASE_PATH, "LANG": "C.UTF-8", "HOME": home}


def makeService(options: Options) -> IService:
    reactor: Any = global_reactor

    run_as = options["run-as-ids"]

    data_dir = Path(options["data-dir"])

    def runner_factory() -> RunnerLike:
        from taskscheduler.agent.runner import ProcessRunner

        uid_gid = None if run_as is None else (run_as[0], run_as[1])
        runner = ProcessRunner(
            reactor,
            base_environment(None if run_as is None else run_as[2]),
            data_dir / "runs",
            output_cap=options["output-cap"],
            kill_grace=options["kill-grace"],
            run_as=uid_gid,
            run_in_thread=lambda function: deferToThreadPool(
                reactor, reactor.getThreadPool(), function
            ),
        )
        runner.containment = choose_containment(options["cgroup-parent"], runner)
        return runner

    service = AgentService(
        AgentConfig(
            data_dir=data_dir,
            server_url=options["server"],
            spool_max_bytes=options["spool-max-bytes"],
            shutdown_grace=options["shutdown-grace"],
            heartbeat_interval=options["heartbeat-interval"],
            advertise_url=options["advertise-url"],
            advertise_scheme=options["advertise-scheme"] or "http",
            join_secret=options["join-secret"],
            join_secret_file=_path(options["join-secret-file"]),
            server_public_key_file=_path(options["server-public-key-file"]),
            idle_timeout=options["idle-timeout"],
            starting_deadline=options["starting-deadline"],
            max_running=options["max-running"],
            max_connections=options["max-connections"],
            max_connections_per_client=options["max-connections-per-client"],
            header_timeout=options["header-timeout"],
            body_timeout=options["body-timeout"],
            run_as=options["run-as"],
            labels=options["labels"],
            metrics_public=bool(options["metrics-public"]),
            metrics_token_file=_path(options["metrics-token-file"]),
        ),
        reactor,
        runner_factory,
        None,
        on_fatal=StartFailure(reactor, "taskscheduler agent"),
        run_in_thread=lambda function: deferToThreadPool(
            reactor, reactor.getThreadPool(), function
        ),
        http_factory=lambda: DaemonHTTP(
            reactor, options["server-ca"], options["client-cert"], options["client-key"]
        ),
        endpoint_factory=lambda: listen_endpoint(
            reactor, options["listen"], options["tls-client-ca"]
        ),
        harden_process=make_non_dumpable,
        gc=gc,
    )
    return LoggedDaemon(service, options, reactor)


def choose_containment(setting: str, runner: Any) -> Containment:
    """A cgroup per run where the agent may make one, else the agent as subreaper."""
    log = Logger()
    if setting != "none":
        if setting == "auto":
            own = own_cgroup_dir()
            # One folder per agent (several may share a host), stable across restarts.
            parent = None if own is None else own / f"taskscheduler-runs-{runner.instance}"
        else:
            parent = Path(setting)
        if parent is not None:
            try:
                containment: Containment = CgroupContainment.probe(parent)
            except OSError as e:
                if setting != "auto":
                    raise
                log.info(
                    "runs cannot have cgroups of their own here ({error}); the agent is "
                    "their subreaper instead",
                    error=str(e),
                )
            else:
                log.info("each run gets a cgroup of its own under {parent}", parent=str(parent))
                return containment
    log.info("the agent is the subreaper of its runs (no cgroup per run)")
    return SubreaperContainment(runner.is_run_shell, runner.live_markers)


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


__all__: Sequence[str] = ["Options", "makeService"]
