"""``twistd taskscheduler-server``: the server's service tree.

``makeService`` builds every object and reads what configures the server (its
``--listen`` endpoint and TLS files, the operators' tokens, the join secrets, the signing
key), after making the process non-dumpable: a mistake there stops the server before it
listens. The tree then starts in order
(:class:`taskscheduler.services.StartInOrder`), and stops in reverse:

1. the listening port: bound, refused if it is reachable beyond loopback without
   operator tokens, and not yet accepting connections;
2. the database: the embedded PostgreSQL when no DSN is given, then the store connected
   (waiting for the database up to ``--database-wait``), migrated, and told the fleet;
3. this replica's lease keeper (:mod:`taskscheduler.server.leases`), the HTTP client's
   pool, the dispatcher (links to the agents whose leases it holds), the webhooks'
   sender, the change bus (what other replicas change, :mod:`taskscheduler.server.changes`),
   and the jobs run by the one replica holding their lease (``job:retention``,
   ``job:incomplete``; ``job:leaves`` is the dispatcher's);
4. the port accepting connections.

If a step fails, the server says why on stderr and in the log, stops what it started,
and exits with status 1 (:class:`taskscheduler.daemon.StartFailure`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet import reactor as global_reactor
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.logger import Logger
from twisted.python import usage

from taskscheduler.auth import TokenFile, TokenFileError
from taskscheduler.daemon import StartFailure
from taskscheduler.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from taskscheduler.embedded_pg_supervisor import PostgresSupervisor
from taskscheduler.hardening import make_non_dumpable, make_private_folder
from taskscheduler.httpclient import DaemonHTTP
from taskscheduler.listen import (
    EndpointSyntaxError,
    UnprotectedListener,
    check_listen_policy,
    is_loopback_address,
    is_loopback_url,
    listen_endpoint,
)
from taskscheduler.logs import LoggedDaemon
from taskscheduler.redact import redact_dsn
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api.app import ServerAPI
from taskscheduler.server.cache_sync import CacheSync
from taskscheduler.server.changes import ChangeBus, postgres_connect
from taskscheduler.server.database import DatabaseConnection, database_warnings, read_database_file
from taskscheduler.server.dispatch import Dispatcher
from taskscheduler.server.leases import LeasedService, LeaseKeeper
from taskscheduler.server.metrics import IncompleteWatch, PoolState, ServerMetrics
from taskscheduler.server.notify.notifier import DEFAULT_TIMEOUT, Notifier, host_resolver
from taskscheduler.server.notify.payload import load_or_create_secret
from taskscheduler.server.options import Options
from taskscheduler.server.ratelimit import RateLimiter
from taskscheduler.server.replica import new_replica_id
from taskscheduler.server.retention import HistoryPruner
from taskscheduler.server.store.interface import Store
from taskscheduler.server.store.leases import Claimant
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.server.store.records import StoreUnavailable
from taskscheduler.services import ListeningPort, StartInOrder, Step
from taskscheduler.signing import (
    InstructionSigner,
    KeyFileError,
    key_fingerprint,
    load_or_create_signing_key,
    load_signing_key,
    public_key_text,
)
from taskscheduler.tls import TLSConfigError
from taskscheduler.web.guards import make_site
from taskscheduler.web.hosts import LOOPBACK_HOSTS, HostPolicy

log = Logger(namespace="taskscheduler.server.tap")

#: Start-up failures an operator fixes from the message alone (which never holds a
#: secret): logged without a traceback.
OPERATOR_ERRORS = (
    UnprotectedListener,
    EndpointSyntaxError,
    TokenFileError,
    KeyFileError,
    TLSConfigError,
    usage.UsageError,
    CannotListenError,
    StoreUnavailable,
    EmbeddedPostgresError,
)


def makeService(options: Options) -> IService:
    reactor: Any = global_reactor
    on_fatal = StartFailure(reactor, "taskscheduler server")
    try:
        return LoggedDaemon(server_service(options, reactor, on_fatal), options, reactor)
    except Exception as e:
        # Said once the service starts: twistd opens its log after makeService.
        error = e
    tree = StartInOrder("taskscheduler server", on_fatal, OPERATOR_ERRORS)
    Step("configuration", start=lambda: _raise(error)).setServiceParent(tree)
    return LoggedDaemon(tree, options, reactor)


def _raise(error: Exception) -> None:
    raise error


def server_service(
    options: Options,
    reactor: Any,
    on_fatal: Callable[[str], None],
    harden_process: Callable[[], bool] = make_non_dumpable,
) -> StartInOrder:
    """The server's whole service tree, built from ``options`` (see the module's docstring).

    ``harden_process`` is called before any secret is read (False: the system cannot
    make the process non-dumpable; twistd's fork keeps the flag).
    """
    # First, so that a --listen Twisted cannot parse is said to be that, and bad TLS
    # files stop the server before anything else.
    endpoint = listen_endpoint(reactor, options["listen"], options["tls-client-ca"])
    harden(harden_process)
    data_dir = Path(options["data-dir"])
    if make_private_folder(data_dir):
        log.warn("{path} was open to other users: made it 0700", path=str(data_dir))
    tokens, joins, signer = load_secrets(options, reactor)
    http = DaemonHTTP(reactor, options["agent-ca"], options["client-cert"], options["client-key"])
    dsn = database_dsn(options)
    embedded = None if dsn else EmbeddedPostgres(data_dir / "postgres", reactor)
    store = PostgresStore(dsn or "", reactor=reactor)
    if dsn:
        log.info("using the database {dsn}", dsn=redact_dsn(dsn))
    agents = options["agents"]
    if not agents:
        log.info(
            "AVAILABLE_SERVERS is not set: the fleet stored in the database stands "
            "(change it with POST and DELETE /api/v1/fleet)"
        )
    # This replica's name: it holds leases and signs the changes it announces.
    replica = new_replica_id()
    # Work done once among the replicas is done by its lease's holder (server/leases.py).
    keeper = LeaseKeeper(
        store.leases,
        reactor,
        replica,
        ttl=options["lease-ttl"],
        renew_every=options["lease-renew"],
    )
    dispatcher = Dispatcher(store, http, reactor, agents, signer=signer, keeper=keeper)
    metrics = ServerMetrics()
    store.db.observer = metrics.queries

    def pool_state() -> PoolState | None:
        state = store.db.pool_state()
        return None if state is None else PoolState(*state)

    metrics.watch_pool(pool_state)
    notifier, notify_http = make_notifier(options, store, reactor, keeper)
    access = ServerAccess(
        store,
        reactor,
        tokens,
        joins,
        # Only ever on loopback: check_listen_policy refuses the rest, unless the
        # operator passed the insecure flag on purpose.
        open_operator_routes=tokens is None,
    )
    # Changes made here reach the other replicas' caches, and theirs ours.
    bus = ChangeBus(
        lambda: dsn or embedded_dsn(embedded), reactor, replica, postgres_connect(reactor)
    )
    sync = CacheSync(bus, store, dispatcher, notifier, access, metrics)
    api = ServerAPI(
        store,
        reactor,
        access,
        on_task_created=sync.task_created,
        report_grace=timedelta(seconds=options["report-grace"]),
        server_public_key=public_key_text(signer.public_key),
        on_agent_enrolled=sync.agent_enrolled,
        on_task_deleted=sync.task_deleted,
        on_task_changed=sync.task_changed,
        create_limiter=RateLimiter(reactor, options["create-rate"], options["create-burst"]),
        max_output_bytes=options["max-output-bytes"],
        clock_allowance=timedelta(seconds=options["clock-allowance"]),
        on_fleet_changed=sync.fleet_changed,
        on_agent_relabelled=sync.agent_relabelled,
        on_agent_revoked=sync.agent_revoked,
        heartbeat_interval=options["heartbeat-interval"],
        claim_grace=timedelta(seconds=options["claim-grace"]),
        metrics=metrics,
        on_results_stored=notifier.results_stored,
    )
    hosts = host_policy_for(options["host-policy"], tokens is not None and len(tokens) > 0)
    site = make_site(
        api.resource(),
        options["max-body-bytes"],
        idle_timeout=options["idle-timeout"],
        max_connections=options["max-connections"],
        max_connections_per_client=options["max-connections-per-client"],
        header_timeout=options["header-timeout"],
        body_timeout=options["body-timeout"],
        host_policy=hosts,
    )

    if options["metrics-public"]:
        api.open_metrics()

    def check(port: IListeningPort) -> None:
        address = port.getHost()
        warning = check_listen_policy(address, options["listen"], tokens, options["insecure"])
        if warning is not None:
            log.warn("{warning}", warning=warning)
        loopback = is_loopback_address(address)
        if loopback:
            api.open_metrics()  # only this machine can reach it
        if options["host-policy"] is None and hosts.hosts is not None and not loopback:
            log.warn(
                "without operator tokens this server answers only to {hosts} in the "
                "Host header: agents and clients that reach it by another name are "
                "refused (403); list its names in --accept-hosts",
                hosts=hosts.describe(),
            )
        log.info(
            "answering to {hosts}; at most {total} connections, {per} per client address",
            hosts=hosts.describe(),
            total=site.max_connections,
            per=site.max_per_client,
        )
        for warning in plaintext_warnings(options["listen"], loopback, agents):
            log.warn("{warning}", warning=warning)

    port = ListeningPort(endpoint, site, reactor, check)

    def accept() -> None:
        port.accept()
        assert port.port is not None
        log.info(
            "taskscheduler server listening on {listen} ({where}) with {count} agents",
            listen=options["listen"],
            where="loopback only" if is_loopback_address(port.port.getHost()) else "network",
            count=len(dispatcher.members),
        )

    tree = StartInOrder("taskscheduler server", on_fatal, OPERATOR_ERRORS)
    port.setServiceParent(tree)
    DatabaseConnection(store, reactor, options["database-wait"], agents, embedded).setServiceParent(
        tree
    )
    if embedded is not None:
        PostgresSupervisor(embedded, reactor).setServiceParent(tree)
    keeper.setServiceParent(tree)
    Step("http client", stop=http.close).setServiceParent(tree)
    dispatcher.setServiceParent(tree)
    Step("webhook http client", stop=notify_http.close).setServiceParent(tree)
    notifier.setServiceParent(tree)
    bus.setServiceParent(tree)
    if options["retention-days"]:
        retention = timedelta(days=options["retention-days"])
        keep = options["retention-min-executions"]
        pruner = HistoryPruner(store, reactor, retention, keep=keep)
        LeasedService(keeper, "job:retention", pruner).setServiceParent(tree)
        log.info("keeping {days} days of execution history", days=options["retention-days"])
    else:
        log.info("keeping execution history forever (--retention-days 0)")
    # The executions left incomplete, for GET /metrics: counted once a minute, by one
    # replica (the others show none: sum or max over the replicas).
    watch = IncompleteWatch(store, reactor, metrics, timedelta(seconds=options["report-grace"]))
    LeasedService(keeper, "job:incomplete", watch).setServiceParent(tree)
    Step("accepting", start=accept, stop=port.stop_listening).setServiceParent(tree)
    return tree


def embedded_dsn(embedded: EmbeddedPostgres | None) -> str:
    """The embedded PostgreSQL's DSN, once it runs."""
    assert embedded is not None and embedded.dsn is not None
    return embedded.dsn


def make_notifier(
    options: Options, store: Store, reactor: Any, keeper: LeaseKeeper
) -> tuple[Notifier, DaemonHTTP]:
    """The webhooks' sender, with its own HTTP client: it trusts the system's CAs (not
    --agent-ca) and presents no client certificate. Without --notify-secret-file the
    secret is <data-dir>/notify-secret, made the first time. Among replicas, each
    pending webhook is claimed by one, for a lease's ttl plus an attempt's timeout."""
    given = options["notify-secret-file"]
    path = Path(given) if given else Path(options["data-dir"]) / "notify-secret"
    secret = load_or_create_secret(path, create=not given)
    log.info("signing webhooks with the secret in {path}", path=str(path))
    http = DaemonHTTP(reactor, max_per_host=4)
    notifier = Notifier(
        store,
        http,
        reactor,
        secret,
        options["notify-default"],
        base_url=options["notify-base-url"],
        resolve=host_resolver(reactor),
        claimant=Claimant(keeper.replica_id, keeper.ttl + DEFAULT_TIMEOUT),
        renew_every=keeper.renew_every,
    )
    return notifier, http


def harden(harden_process: Callable[[], bool]) -> None:
    if not harden_process():
        log.warn(
            "this system cannot make the server non-dumpable: processes of its user may "
            "read its memory and environment"
        )


def load_secrets(
    options: Options, clock: IReactorTime
) -> tuple[TokenFile | None, TokenFile | None, InstructionSigner]:
    """The operators' tokens, the join secrets and the instruction signer."""
    tokens: TokenFile | None = None
    if options["tokens-file"]:
        tokens = TokenFile.from_path(options["tokens-file"], clock)
    elif options["tokens"]:
        tokens = TokenFile.from_env_value(options["tokens"])
    joins: TokenFile | None = None
    if options["join-secrets-file"]:
        joins = TokenFile.from_path(options["join-secrets-file"], clock)
    elif options["join-secrets"]:
        joins = TokenFile.from_env_value(options["join-secrets"], "TASKSCHEDULER_JOIN_SECRETS")
    if joins is None or len(joins) == 0:
        log.warn("no join secrets are configured: no new agent can enrol")
    if options["signing-key-file"]:
        key = load_signing_key(Path(options["signing-key-file"]))
    else:
        key = load_or_create_signing_key(Path(options["data-dir"]) / "signing_key.pem")
    log.info(
        "signing instructions to agents with key {fingerprint}",
        fingerprint=key_fingerprint(key.public_key()),
    )
    return tokens, joins, InstructionSigner(key, clock)


def database_dsn(options: Options) -> str | None:
    """The DSN given (on the command line, in the environment or in ``--database-file``),
    or None for the embedded PostgreSQL; warns about how it was given."""
    dsn = options["database"]
    for warning in database_warnings(dsn or "", options["database-on-command-line"]):
        log.warn("{warning}", warning=warning)
    if options["database-file"]:
        dsn = read_database_file(Path(options["database-file"]))
    return dsn or None


def host_policy_for(chosen: HostPolicy | None, has_tokens: bool) -> HostPolicy:
    """``--accept-hosts`` if given; else any host when operator tokens guard the API
    (every request that changes anything then carries a credential no web page has),
    and the loopback names when they do not (the playground, the default compose file),
    so that a page reaching the server through DNS rebinding is refused."""
    if chosen is not None:
        return chosen
    return HostPolicy() if has_tokens else HostPolicy(LOOPBACK_HOSTS)


def plaintext_warnings(listen: str, loopback: bool, agent_urls: Sequence[str]) -> list[str]:
    """What would travel in clear over the network with this set-up (``loopback``: the
    port is bound to a loopback address)."""
    warnings = []
    kind = listen.split(":", 1)[0].strip().lower()
    if kind not in ("ssl", "tls") and not loopback:
        warnings.append(
            f"the API is served over plain HTTP on {listen!r}: operator tokens and agent "
            "credentials travel in clear; listen with an ssl: endpoint"
        )
    for url in agent_urls:
        if url.startswith("http://") and not is_loopback_url(url):
            warnings.append(
                f"instructions to the agent at {url} travel in clear (signed, so they cannot "
                "be forged or replayed, but anyone on the path can read them); use https://"
            )
    return warnings


__all__: Sequence[str] = ["Options", "makeService"]
