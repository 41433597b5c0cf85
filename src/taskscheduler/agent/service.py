"""The agent's parts wired together, brought up from its data folder and shut down in order.

Start-up reads what a previous life of the agent left in ``<data-dir>``: its identity,
its tasks (which resume with no one acting), the results it had not reported yet (sent
again) and the runs it left (re-attached to if still going, else reported as they
ended; see :meth:`taskscheduler.agent.runner.ProcessRunner.recover`). Markers of an
older version of the agent (``running/``) are reported as ``lost``. Shutdown stops
the loops, lets the runs under way finish (terminating them after a grace), spools
their results, then stops.

An agent that has no credential yet enrols first (:mod:`taskscheduler.agent.enrolment`),
while it already listens and runs its stored tasks: results wait in the spool until it
has a credential to report them with, and instructions are refused until it has pinned
its server's key.

One service rather than a tree of them (unlike the server's, :mod:`taskscheduler.server.tap`):
every part is made from what the data folder holds, which ``makeService`` must not read,
and start-up is one synchronous read of that folder before the port. That sequence is
why the module runs past 400 lines: split, it would be read across files.
"""

from __future__ import annotations

import importlib.metadata
import os
import pwd
import random
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IAddress,
    IListeningPort,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskscheduler.agent.admission import DEFAULT_MAX_RUNNING, DEFAULT_STARTING_DEADLINE
from taskscheduler.agent.api import MAX_BODY_BYTES, AgentAPI
from taskscheduler.agent.durable import (
    BatchWriter,
    FolderInUse,
    FolderLock,
    RunInThread,
    run_here,
)
from taskscheduler.agent.enrolment import Enroller
from taskscheduler.agent.heap import GarbageCollector, HeapKeeper
from taskscheduler.agent.heartbeat import DEFAULT_HEARTBEAT_INTERVAL, HeartbeatLoop, Membership
from taskscheduler.agent.identity import (
    CorruptCredential,
    CorruptIdentity,
    load_credential,
    load_or_create_agent_id,
    load_server_key,
    read_private_text,
)
from taskscheduler.agent.inflight import RunnerLike
from taskscheduler.agent.lastruns import LastRuns
from taskscheduler.agent.metrics import AgentMetrics, AgentState
from taskscheduler.agent.outcome import spool_lost_runs
from taskscheduler.agent.reporter import Reporter
from taskscheduler.agent.scheduler import Scheduler
from taskscheduler.agent.server_client import Enrolled, ServerClient
from taskscheduler.agent.servers import parse_server_urls
from taskscheduler.agent.spool import DEFAULT_SPOOL_MAX_BYTES, RunMarkers, Spool
from taskscheduler.agent.taskstore import TaskStore
from taskscheduler.hardening import make_private_folder
from taskscheduler.listen import (
    EndpointSyntaxError,
    advertised_url,
    is_loopback_address,
    is_loopback_url,
)
from taskscheduler.metrics import MetricsToken
from taskscheduler.protocol import TaskSpec
from taskscheduler.protocol.labels import NO_LABELS
from taskscheduler.schedule import format_instant, utc_now_from
from taskscheduler.signing import (
    InstructionVerifier,
    KeyFileError,
    key_fingerprint,
    public_key_text,
    read_public_key,
)
from taskscheduler.tls import TLSConfigError
from taskscheduler.web.guards import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    make_site,
)
from taskscheduler.web.listener import pause_accepting_when_out_of_descriptors

#: Seconds the runs under way may go on at shutdown before they are terminated.
DEFAULT_SHUTDOWN_GRACE = 30.0


@dataclass(frozen=True)
class AgentConfig:
    data_dir: Path
    #: The server's base URL, or its replicas' separated by commas (``--server``).
    server_url: str
    spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    #: The base URL the server reaches this agent at (its AVAILABLE_SERVERS entry);
    #: None: the listening port's, with ``advertise_scheme``.
    advertise_url: str | None = "http://127.0.0.1:8081"
    advertise_scheme: str = "http"
    #: The join secret itself, or the file that holds it; needed only to enrol.
    join_secret: str | None = None
    join_secret_file: Path | None = None
    #: The server's public key, when the operator pins it rather than trusting enrolment.
    server_public_key_file: Path | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    starting_deadline: float | None = DEFAULT_STARTING_DEADLINE
    max_running: int = DEFAULT_MAX_RUNNING
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    #: The user tasks run as (``--run-as``); None: the agent's own.
    run_as: str | None = None
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    #: What the agent says it is (``--label``), sent at enrolment and in each heartbeat.
    labels: Mapping[str, str] = field(default_factory=lambda: NO_LABELS)
    # Metrics: /metrics open to anyone (else on a loopback listener only, or for the
    # token in the file).
    metrics_public: bool = False
    metrics_token_file: Path | None = None


class NotEnrolled(Exception):
    """No credential in the data folder, and no join secret to enrol with."""


class AgentService(Service):
    """``twistd taskscheduler-agent`` as one service."""

    log = Logger()

    def __init__(
        self,
        config: AgentConfig,
        clock: IReactorTime,
        runner_factory: Callable[[], RunnerLike],
        http: Any,  # a DaemonHTTP, a treq.testing.StubTreq in tests, or None with http_factory
        endpoint: IStreamServerEndpoint | None = None,
        on_fatal: Callable[[str], None] = lambda reason: None,
        jitter: Callable[[], float] = random.random,
        run_in_thread: RunInThread | None = None,
        *,
        http_factory: Callable[[], Any] | None = None,
        endpoint_factory: Callable[[], IStreamServerEndpoint] | None = None,
        harden_process: Callable[[], bool] | None = None,
        gc: GarbageCollector | None = None,
    ) -> None:
        """``run_in_thread`` runs the fsyncs of the spool and the task files, and reads the
        spool; None does it all on the reactor thread.

        ``http_factory`` and ``endpoint_factory`` build the client and the listening
        endpoint at start-up (they read certificate files), when ``http`` and
        ``endpoint`` are not given.

        ``harden_process`` is called first thing at start-up (the daemon passes
        :func:`taskscheduler.hardening.make_non_dumpable`; False: it could not).

        ``gc`` is the garbage collector whose heap is frozen once the tasks settle
        (:mod:`.heap`; the daemon passes :mod:`gc`); None leaves it be.
        """
        self.config = config
        self._run_in_thread = run_in_thread
        self._clock = clock
        self._runner_factory = runner_factory
        self._http = http
        self._http_factory = http_factory
        self._endpoint = endpoint
        self._endpoint_factory = endpoint_factory
        self._enroller: Enroller | None = None
        self._on_fatal = on_fatal
        self._harden_process = harden_process
        self._gc = gc
        self._jitter = jitter
        self._port: IListeningPort | None = None
        self._lock = FolderLock(config.data_dir)
        self._specs: list[TaskSpec] = []
        self._listening: Deferred[Any] | None = None
        self._verifier: InstructionVerifier | None = None
        #: (agent id, join secret, pinned key) of an agent that enrols once it listens.
        self._enrol: tuple[uuid.UUID, str, Ed25519PublicKey | None] | None = None
        # Built at start-up, from what is on disk.
        self.api: AgentAPI | None = None
        self.scheduler: Scheduler | None = None
        self.reporter: Reporter | None = None
        self.spool: Spool | None = None
        self.heartbeat: HeartbeatLoop | None = None
        #: This agent's metrics (a registry of its own: several agents share a test process).
        self.metrics = AgentMetrics()

    def startService(self) -> None:
        super().startService()
        try:
            self._start()
        except Exception:
            self._fatal(Failure())

    def _fatal(self, failure: Failure) -> None:
        self._listening = None
        if failure.check(
            FolderInUse,
            CorruptIdentity,
            CorruptCredential,
            CannotListenError,
            NotEnrolled,
            KeyFileError,
            TLSConfigError,
            EndpointSyntaxError,
            OSError,
        ):
            # Operator errors: the message says it all, a traceback would bury it.
            self.log.error(
                "taskscheduler agent could not start: {error}", error=failure.getErrorMessage()
            )
        else:
            self.log.failure("taskscheduler agent could not start", failure)
        self._on_fatal(failure.getErrorMessage())

    def _start(self) -> None:
        data_dir = self.config.data_dir
        if self._harden_process is not None and not self._harden_process():
            self.log.warn(
                "this system cannot make the agent non-dumpable: processes of its user may "
                "read its memory and environment"
            )
        if make_private_folder(data_dir):
            self.log.warn("{path} was open to other users: made it 0700", path=str(data_dir))
        self._lock.acquire()
        agent_id = load_or_create_agent_id(data_dir)
        credential = load_credential(data_dir)
        pinned = self._pinned_key()
        server_key = load_server_key(data_dir)
        if pinned is not None:
            if server_key is not None and public_key_text(server_key) != public_key_text(pinned):
                self.log.warn(
                    "the server key given by --server-public-key-file replaces the one "
                    "pinned at enrolment"
                )
            server_key = pinned
        join_secret = None
        if credential is None or server_key is None:
            join_secret = self._join_secret()
            if join_secret is None:
                raise NotEnrolled(
                    f"{data_dir} holds no credential yet and no join secret is given: pass "
                    "--join-secret-file or set TASKSCHEDULER_JOIN_SECRET to enrol"
                )
        if self.config.run_as is None:
            self.log.warn(
                "tasks run as the agent's own user ({user}), so they can read its "
                "{secrets} in {path}: run the agent as root with --run-as USER, a user of "
                "their own (see the README's Secure deployment)",
                user=_user_name(),
                secrets="credential" if join_secret is None else "join secret and credential",
                path=str(data_dir),
            )
        server_urls = parse_server_urls(self.config.server_url)
        for url in server_urls:
            if url.startswith("http://") and not is_loopback_url(url):
                self.log.warn(
                    "the server {url} is reached over plain HTTP: the agent's credential and "
                    "results travel in clear; use https://",
                    url=url,
                )
        if self._http is None and self._http_factory is not None:
            self._http = self._http_factory()
        if self._endpoint is None and self._endpoint_factory is not None:
            self._endpoint = self._endpoint_factory()
        writer = (
            None if self._run_in_thread is None else BatchWriter(self._clock, self._run_in_thread)
        )
        spool = Spool(
            data_dir / "spool", self.config.spool_max_bytes, writer, self._run_in_thread or run_here
        )
        spool.load()
        spool_lost_runs(RunMarkers(data_dir / "running"), spool, agent_id)
        task_store = TaskStore(
            data_dir / "tasks",
            None if self._run_in_thread is None else BatchWriter(self._clock, self._run_in_thread),
        )
        specs = task_store.load()
        # The spool's writer: a run's instant is on disk before its result can leave.
        last_runs = LastRuns(data_dir / "lastrun", writer)
        last_runs.load({spec.task_id for spec in specs})

        client = ServerClient(
            self._http,
            self._clock,
            server_urls,
            credential=credential if server_key is not None else None,
        )
        reporter = Reporter(spool, client, self._clock, jitter=self._jitter, metrics=self.metrics)
        spool.on_ready = reporter.wake
        runner = self._runner_factory()
        scheduler = Scheduler(
            self._clock,
            runner,
            spool,
            agent_id,
            starting_deadline=self.config.starting_deadline,
            max_running=self.config.max_running,
            last_runs=last_runs,
            claim_client=client,
            metrics=self.metrics,
            heap=None if self._gc is None else HeapKeeper(self._clock, self._gc),
        )
        # Runs a previous life of the agent left: before any new run starts, so that a
        # task is never started while its run from before the restart is still going.
        recover = getattr(runner, "recover", None)

        def spooled(task_id: uuid.UUID, at: datetime, attempt: int = 1) -> bool:
            return (task_id, at, attempt) in spool

        for run in recover(spooled) if recover else []:
            scheduler.adopt(
                run.task_id,
                run.scheduled_at,
                run.started_at,
                run.outcome,
                run.revision,
                run.trigger,
                run.attempt,
            )

        def counters() -> dict[str, Any]:
            return {
                "spooled": len(spool),
                "spooled_bytes": spool.bytes,
                "dropped": spool.dropped,
                "rejected": reporter.rejected,
                # The replica of --server the agent talks to now, and its switches.
                "server": client.url,
                "server_failovers": client.servers.failovers,
            }

        def state() -> AgentState:
            return AgentState(
                spooled=len(spool),
                spooled_bytes=spool.bytes,
                dropped=spool.dropped,
                reported=reporter.acknowledged,
                rejected=reporter.rejected,
                in_flight=scheduler.running,
                tasks=len(scheduler.tasks),
                server=client.url,
                server_failovers=client.servers.failovers,
            )

        self.metrics.watch(agent_id, _version(), state)
        token_file = self.config.metrics_token_file
        verifier = InstructionVerifier(agent_id, self._clock, server_key)
        membership = Membership(data_dir / "membership")
        self.api = AgentAPI(
            agent_id,
            scheduler,
            task_store,
            self._clock,
            counters,
            verifier,
            membership,
            labels=self.config.labels,
            metrics=self.metrics,
            metrics_token=None if token_file is None else MetricsToken.from_file(token_file),
        )
        started_at = format_instant(utc_now_from(self._clock.seconds()))

        def heartbeat() -> dict[str, Any]:
            return {
                "agent_id": str(agent_id),
                "version": _version(),
                "hostname": socket.gethostname(),
                "started_at": started_at,
                "tasks": len(scheduler.tasks),
                "running": scheduler.running,
                "spooled": len(spool),
                "dropped_results": spool.dropped,
                # Every time: a restart with other labels changes which tasks it runs.
                "labels": dict(self.config.labels),
            }

        self.heartbeat = HeartbeatLoop(
            client, self._clock, membership, heartbeat, self.config.heartbeat_interval
        )
        self.scheduler, self.reporter, self.spool = scheduler, reporter, spool
        self._specs = specs
        self._verifier = verifier
        if join_secret is not None:
            self._enrol = (agent_id, join_secret, pinned)
        if self.config.metrics_public:
            self.api.open_metrics()
        if self._endpoint is None:
            self._run()
            return
        # Listen before running anything: an agent that cannot serve stops at once,
        # having started no run.
        # Any Host: every route but health needs an instruction signed by the server.
        site = make_site(
            self.api.resource(),
            MAX_BODY_BYTES,
            idle_timeout=self.config.idle_timeout,
            max_connections=self.config.max_connections,
            max_connections_per_client=self.config.max_connections_per_client,
            header_timeout=self.config.header_timeout,
            body_timeout=self.config.body_timeout,
        )
        self._listening = self._endpoint.listen(site)
        self._listening.addCallbacks(self._listened, self._fatal)

    def _listened(self, port: IListeningPort) -> None:
        self._listening = None
        self._port = port
        pause_accepting_when_out_of_descriptors(port, self._clock)
        address = port.getHost()
        self.log.info("taskscheduler agent listening on {address}", address=str(address))
        if is_loopback_address(address) and self.api is not None:
            self.api.open_metrics()  # only this machine can reach it
        self._run(address)

    def _run(self, address: IAddress | None = None) -> None:
        """Resume the stored tasks and report what is spooled (or enrol first, telling
        the server the URL of ``address``, the bound port, unless configured)."""
        assert self.scheduler is not None and self.reporter is not None
        assert self.spool is not None
        if self._enrol is not None:
            url = self.config.advertise_url
            if url is None and address is not None:
                url = advertised_url(self.config.advertise_scheme, address)
            if url is None:
                # Options allow this only for tcp: and ssl:, which bind IP addresses.
                message = f"cannot tell the agent's URL from {address}: give --advertise-url"
                self._fatal(Failure(ValueError(message)))
                return
            agent_id, join_secret, pinned = self._enrol
            self._enroller = Enroller(
                self.reporter.client,
                self._clock,
                self.config.data_dir,
                agent_id,
                url,
                join_secret,
                self._enrolled,
                pinned_key=pinned,
                jitter=self._jitter,
                labels=self.config.labels,
            )
        for spec in self._specs:
            self.scheduler.schedule(spec)
        if self._enroller is not None:
            self._enroller.start()
        else:
            self.reporter.start()
            if self.heartbeat is not None:
                self.heartbeat.start()
        self.log.info(
            "taskscheduler agent {agent_id} resumed {tasks} tasks; {spooled} results to report",
            agent_id=str(self.scheduler.agent_id),
            tasks=len(self._specs),
            spooled=len(self.spool),
        )
        self._specs = []

    def _pinned_key(self) -> Ed25519PublicKey | None:
        path = self.config.server_public_key_file
        if path is None:
            return None
        return read_public_key(path)

    def _join_secret(self) -> str | None:
        if self.config.join_secret:
            return self.config.join_secret.strip()
        path = self.config.join_secret_file
        if path is None:
            return None
        return read_private_text(path) or None

    def _enrolled(self, enrolled: Enrolled) -> None:
        assert self._verifier is not None and self.reporter is not None
        self._verifier.trust(enrolled.server_key)
        self._enroller = None
        self.log.info(
            "instructions are now checked against server key {key}",
            key=key_fingerprint(enrolled.server_key),
        )
        self.reporter.start()
        if self.heartbeat is not None:
            self.heartbeat.start()

    async def _stop(self) -> None:
        if self._enroller is not None:
            self._enroller.stop()
        if self._listening is not None:
            self._listening.cancel()
        if self._port is not None:
            port, self._port = self._port, None
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        if self.scheduler is not None:
            self.scheduler.stop()
            await self.scheduler.drain(self.config.shutdown_grace)
        if self.reporter is not None:
            self.reporter.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop()
        close = getattr(self._http, "close", None)
        if close is not None and self._http_factory is not None:
            await close()
        self._lock.release()
        super().stopService()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def _version() -> str:
    try:
        return importlib.metadata.version("taskscheduler")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _user_name() -> str:
    uid = os.getuid()
    try:
        return f"{pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:
        return f"uid {uid}"
