"""``twistd taskscheduler-server``: options and service wiring.

``makeService`` only builds objects. Start-up I/O (the tokens and keys, the embedded
PostgreSQL, schema migrations, the fleet list) happens in :class:`ServerService`, which
opens the HTTP port only once the database is ready. If it cannot start (the database
never answers, it would listen beyond loopback without operator tokens, it cannot
listen...), it says why on stderr and in the log, stops what it started, and the process
exits with status 1 (:class:`taskscheduler.daemon.StartFailure`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from psycopg2.extensions import parse_dsn
from twisted.application.service import IService, MultiService
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python import usage

from taskscheduler.auth import (
    INSECURE_FLAG,
    EndpointSyntaxError,
    TokenFile,
    TokenFileError,
    UnprotectedListener,
    check_listen_policy,
    is_loopback_endpoint,
    is_loopback_url,
    redact_dsn,
    split_endpoint,
)
from taskscheduler.daemon import StartFailure
from taskscheduler.embedded_pg import EmbeddedPostgres, EmbeddedPostgresError
from taskscheduler.embedded_pg_supervisor import PostgresSupervisor
from taskscheduler.hardening import make_non_dumpable, make_private_folder, private_file_problem
from taskscheduler.httpclient import DaemonHTTP
from taskscheduler.protocol import CLOCK_ALLOWANCE
from taskscheduler.server.access import ServerAccess
from taskscheduler.server.api import DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_REPORT_GRACE, ServerAPI
from taskscheduler.server.dispatch import Dispatcher
from taskscheduler.server.ratelimit import DEFAULT_CREATE_BURST, DEFAULT_CREATE_RATE, RateLimiter
from taskscheduler.server.retention import DEFAULT_RETENTION_DAYS, HistoryPruner
from taskscheduler.server.store.interface import StoreUnavailable
from taskscheduler.server.store.postgres import PostgresStore
from taskscheduler.signing import (
    InstructionSigner,
    KeyFileError,
    key_fingerprint,
    load_or_create_signing_key,
    load_signing_key,
    public_key_text,
)
from taskscheduler.tls import TLSConfigError, server_endpoint
from taskscheduler.web import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
    LOOPBACK_HOSTS,
    HostPolicy,
    make_site,
    pause_accepting_when_out_of_descriptors,
)


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value else default


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Runs the taskscheduler API server. Every option can also be set by the "
        "environment variable named in brackets; the command line wins."
    )
    optFlags = [
        [
            INSECURE_FLAG.removeprefix("--"),
            None,
            "Let a server listening beyond loopback run without operator tokens: anyone "
            "who reaches it can run commands on every agent. For isolated test networks only.",
        ],
    ]
    optParameters = [
        [
            "listen",
            "l",
            None,
            "Where to listen, as a Twisted endpoint string [TASKSCHEDULER_LISTEN] "
            "(default: tcp:8080; e.g. tcp:8080:interface=127.0.0.1).",
        ],
        [
            "database",
            "d",
            None,
            "PostgreSQL DSN, e.g. postgresql://user@host/db [TASKSCHEDULER_DATABASE]. "
            "Without one, an embedded PostgreSQL is kept in <data-dir>/postgres. Keep the "
            "password off the command line, where ps shows it: put it in libpq's passfile "
            "(PGPASSFILE or ~/.pgpass), or the whole DSN in --database-file.",
        ],
        [
            "database-file",
            None,
            None,
            "File (0600) holding the PostgreSQL DSN, instead of --database "
            "[TASKSCHEDULER_DATABASE_FILE].",
        ],
        [
            "data-dir",
            None,
            None,
            "Folder for the server's own data [TASKSCHEDULER_DATA_DIR] "
            "(default: ./taskscheduler-data).",
        ],
        [
            "available-servers",
            None,
            None,
            "Comma-separated agent base URLs every task runs on [AVAILABLE_SERVERS], "
            "e.g. http://127.0.0.1:8081,http://127.0.0.1:8082.",
        ],
        [
            "report-grace",
            None,
            None,
            "Seconds after a run's time limit to wait for missing agents before an "
            "execution counts as complete without them [TASKSCHEDULER_REPORT_GRACE] "
            f"(default: {int(DEFAULT_REPORT_GRACE.total_seconds())}).",
        ],
        [
            "retention-days",
            None,
            None,
            "Days of execution history (executions and their results) to keep; older "
            "history is deleted a little at a time every few minutes; 0 keeps everything "
            f"[TASKSCHEDULER_RETENTION_DAYS] (default: {DEFAULT_RETENTION_DAYS}).",
        ],
        [
            "database-wait",
            None,
            None,
            "Seconds to keep trying to reach the database at start-up "
            "[TASKSCHEDULER_DATABASE_WAIT] (default: 60).",
        ],
        [
            "create-rate",
            None,
            None,
            "Tasks each operator token may create a second on average; past it 429 with "
            "Retry-After; 0: no limit [TASKSCHEDULER_CREATE_RATE] "
            f"(default: {DEFAULT_CREATE_RATE:g}).",
        ],
        [
            "create-burst",
            None,
            None,
            "Tasks each operator token may create at once [TASKSCHEDULER_CREATE_BURST] "
            f"(default: {DEFAULT_CREATE_BURST}).",
        ],
        [
            "max-body-bytes",
            None,
            None,
            "Largest request body accepted [TASKSCHEDULER_MAX_BODY_BYTES] "
            f"(default: {DEFAULT_MAX_BODY_BYTES}).",
        ],
        [
            "max-output-bytes",
            None,
            None,
            "Most bytes of each output stream of a result stored; past it the head and "
            "tail are kept and the stream is flagged truncated [TASKSCHEDULER_MAX_OUTPUT_BYTES] "
            f"(default: {DEFAULT_MAX_OUTPUT_BYTES}, the agents' default --output-cap).",
        ],
        [
            "clock-allowance",
            None,
            None,
            "Seconds by which agents' clocks may run ahead of the server's: a result dated "
            "later than now plus its task's time limit plus this is refused until the "
            "server's clock gets there [TASKSCHEDULER_CLOCK_ALLOWANCE] (default: "
            f"{CLOCK_ALLOWANCE.total_seconds():g}).",
        ],
        [
            "tokens-file",
            None,
            None,
            "Operators' API tokens, one '<name> sha256:<hash>' line each (python -m "
            "taskscheduler.tokens new NAME); re-read when it changes, so deleting a line "
            "revokes a token [TASKSCHEDULER_TOKENS_FILE]. Or put the lines, separated by "
            "commas, in TASKSCHEDULER_TOKENS.",
        ],
        [
            "join-secrets-file",
            None,
            None,
            "Hashes of the join secrets agents enrol with, same format "
            "[TASKSCHEDULER_JOIN_SECRETS_FILE]; or the lines in TASKSCHEDULER_JOIN_SECRETS.",
        ],
        [
            "signing-key-file",
            None,
            None,
            "Ed25519 key (PEM) that signs instructions to agents [TASKSCHEDULER_SIGNING_KEY_FILE] "
            "(default: <data-dir>/signing_key.pem, created 0600 on first start).",
        ],
        [
            "tls-client-ca",
            None,
            None,
            "With an ssl: --listen, require clients to present a certificate signed by a CA "
            "in this PEM file (mutual TLS) [TASKSCHEDULER_TLS_CLIENT_CA].",
        ],
        [
            "agent-ca",
            None,
            None,
            "CA certificates (PEM) that agents' https:// certificates must chain to "
            "[TASKSCHEDULER_AGENT_CA] (default: the system's trust store).",
        ],
        [
            "client-cert",
            None,
            None,
            "Certificate (PEM) the server presents to agents that require mutual TLS "
            "[TASKSCHEDULER_CLIENT_CERT].",
        ],
        [
            "client-key",
            None,
            None,
            "Private key of --client-cert, if not in the same file [TASKSCHEDULER_CLIENT_KEY].",
        ],
        [
            "idle-timeout",
            None,
            None,
            "Seconds an idle client connection is kept open [TASKSCHEDULER_IDLE_TIMEOUT] "
            f"(default: {DEFAULT_IDLE_TIMEOUT:g}).",
        ],
        [
            "accept-hosts",
            None,
            None,
            "Comma-separated host names (any port) the server answers to in the Host "
            "header, or * for any; others get 403, against DNS rebinding "
            "[TASKSCHEDULER_ACCEPT_HOSTS] (default: any with operator tokens; without "
            "them, " + ", ".join(LOOPBACK_HOSTS) + ").",
        ],
        [
            "max-connections",
            None,
            None,
            "Most client connections held at once; past it, 503 "
            f"[TASKSCHEDULER_MAX_CONNECTIONS] (default: {DEFAULT_MAX_CONNECTIONS}, lowered "
            "to leave 128 of the process's open-file limit to the rest).",
        ],
        [
            "max-connections-per-client",
            None,
            None,
            "Most client connections held at once from one IP address; past it, 503 "
            "[TASKSCHEDULER_MAX_PER_CLIENT] "
            f"(default: {DEFAULT_MAX_CONNECTIONS_PER_CLIENT}).",
        ],
        [
            "header-timeout",
            None,
            None,
            "Seconds a client has, from connecting, to send a request's line and headers; "
            f"then 408 [TASKSCHEDULER_HEADER_TIMEOUT] (default: {DEFAULT_HEADER_TIMEOUT:g}).",
        ],
        [
            "body-timeout",
            None,
            None,
            "Seconds a client has to send a request's body once its headers are in; then 408 "
            f"[TASKSCHEDULER_BODY_TIMEOUT] (default: {DEFAULT_BODY_TIMEOUT:g}).",
        ],
    ]

    def postOptions(self) -> None:
        self["listen"] = self["listen"] or _env("TASKSCHEDULER_LISTEN", "tcp:8080")
        # Said at start (see database_warnings): only a DSN typed here is in `ps`.
        self["database-on-command-line"] = bool(self["database"])
        self["database"] = self["database"] or _env("TASKSCHEDULER_DATABASE")
        self["database-file"] = self["database-file"] or _env("TASKSCHEDULER_DATABASE_FILE")
        if self["database"] and self["database-file"]:
            raise usage.UsageError(
                "give the database as --database (or TASKSCHEDULER_DATABASE) or "
                "--database-file, not both"
            )
        self["data-dir"] = self["data-dir"] or _env("TASKSCHEDULER_DATA_DIR", "taskscheduler-data")
        servers = self["available-servers"] or _env("AVAILABLE_SERVERS", "")
        self["agents"] = parse_agent_urls(servers or "")
        self["report-grace"] = _positive_number(
            self["report-grace"] or _env("TASKSCHEDULER_REPORT_GRACE", "30"), "report-grace"
        )
        self["retention-days"] = parse_retention_days(
            self["retention-days"]
            or _env("TASKSCHEDULER_RETENTION_DAYS", str(DEFAULT_RETENTION_DAYS))
        )
        self["database-wait"] = _positive_number(
            self["database-wait"] or _env("TASKSCHEDULER_DATABASE_WAIT", "60"), "database-wait"
        )
        self["max-body-bytes"] = int(
            _positive_number(
                self["max-body-bytes"]
                or _env("TASKSCHEDULER_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES)),
                "max-body-bytes",
            )
        )
        self["create-rate"] = _non_negative_number(
            self["create-rate"] or _env("TASKSCHEDULER_CREATE_RATE", str(DEFAULT_CREATE_RATE)),
            "create-rate",
        )
        self["create-burst"] = int(
            _positive_number(
                self["create-burst"]
                or _env("TASKSCHEDULER_CREATE_BURST", str(DEFAULT_CREATE_BURST)),
                "create-burst",
            )
        )
        self["clock-allowance"] = _positive_number(
            self["clock-allowance"]
            or _env("TASKSCHEDULER_CLOCK_ALLOWANCE", f"{CLOCK_ALLOWANCE.total_seconds():g}"),
            "clock-allowance",
        )
        self["max-output-bytes"] = _byte_count(
            self["max-output-bytes"]
            or _env("TASKSCHEDULER_MAX_OUTPUT_BYTES", str(DEFAULT_MAX_OUTPUT_BYTES)),
            "max-output-bytes",
        )
        for name, variable in [
            ("tokens-file", "TASKSCHEDULER_TOKENS_FILE"),
            ("join-secrets-file", "TASKSCHEDULER_JOIN_SECRETS_FILE"),
            ("signing-key-file", "TASKSCHEDULER_SIGNING_KEY_FILE"),
            ("tls-client-ca", "TASKSCHEDULER_TLS_CLIENT_CA"),
            ("agent-ca", "TASKSCHEDULER_AGENT_CA"),
            ("client-cert", "TASKSCHEDULER_CLIENT_CERT"),
            ("client-key", "TASKSCHEDULER_CLIENT_KEY"),
        ]:
            self[name] = self[name] or _env(variable)
        self["tokens"] = _env("TASKSCHEDULER_TOKENS")
        self["join-secrets"] = _env("TASKSCHEDULER_JOIN_SECRETS")
        if self["tokens-file"] and self["tokens"]:
            raise usage.UsageError("give --tokens-file or TASKSCHEDULER_TOKENS, not both")
        if self["join-secrets-file"] and self["join-secrets"]:
            raise usage.UsageError(
                "give --join-secrets-file or TASKSCHEDULER_JOIN_SECRETS, not both"
            )
        self["idle-timeout"] = _positive_number(
            self["idle-timeout"] or _env("TASKSCHEDULER_IDLE_TIMEOUT", str(DEFAULT_IDLE_TIMEOUT)),
            "idle-timeout",
        )
        self["insecure"] = bool(self[INSECURE_FLAG.removeprefix("--")])
        accept_hosts = self["accept-hosts"] or _env("TASKSCHEDULER_ACCEPT_HOSTS")
        try:
            self["host-policy"] = None if not accept_hosts else HostPolicy.parse(accept_hosts)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        for name, variable, default in [
            ("max-connections", "TASKSCHEDULER_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS),
            (
                "max-connections-per-client",
                "TASKSCHEDULER_MAX_PER_CLIENT",
                DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            ),
        ]:
            self[name] = _count(self[name] or _env(variable, str(default)), name)
        for name, variable, seconds in [
            ("header-timeout", "TASKSCHEDULER_HEADER_TIMEOUT", DEFAULT_HEADER_TIMEOUT),
            ("body-timeout", "TASKSCHEDULER_BODY_TIMEOUT", DEFAULT_BODY_TIMEOUT),
        ]:
            self[name] = _positive_number(self[name] or _env(variable, str(seconds)), name)


def plaintext_warnings(listen: str, agent_urls: Sequence[str]) -> list[str]:
    """What would travel in clear over the network with this set-up."""
    warnings = []
    kind = listen.split(":", 1)[0].strip().lower()
    if kind not in ("ssl", "tls") and not is_loopback_endpoint(listen):
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


def database_warnings(dsn: str, on_command_line: bool) -> list[str]:
    """What is unsafe in how the database DSN was given."""
    if not on_command_line:
        return []
    try:
        given = parse_dsn(dsn)
    except Exception:
        # Unparseable: the connection will say so; the password may be in it all the same.
        given = {"password": "?"}
    if "password" not in given:
        return []
    return [
        "the database password is on the command line (--database), where `ps` shows it "
        "to every local user: use --database-file, TASKSCHEDULER_DATABASE or libpq's "
        "passfile (PGPASSFILE or ~/.pgpass) instead"
    ]


def read_database_file(path: Path) -> str:
    """The DSN in ``--database-file``, a file only its owner may read."""
    try:
        problem = private_file_problem(path)
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise usage.UsageError(f"cannot read --database-file {str(path)!r}: {e}") from None
    if problem is not None:
        raise usage.UsageError(problem)
    if not text:
        raise usage.UsageError(f"--database-file {str(path)!r} is empty")
    return text


def parse_agent_urls(text: str) -> list[str]:
    """``AVAILABLE_SERVERS``: comma-separated http(s) base URLs, duplicates removed."""
    urls: list[str] = []
    for item in text.split(","):
        url = item.strip().rstrip("/")
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise usage.UsageError(
                f"AVAILABLE_SERVERS entry {url!r} must be a base URL like http://host:8081"
            )
        if url not in urls:
            urls.append(url)
    return urls


def parse_retention_days(text: str | None) -> int:
    """``--retention-days``: a whole number of days, 0 meaning keep everything."""
    try:
        days = int((text or "").strip())
    except ValueError:
        raise usage.UsageError("--retention-days must be a whole number of days") from None
    if days < 0:
        raise usage.UsageError("--retention-days must be 0 (keep everything) or more")
    if days > 36_500:
        raise usage.UsageError("--retention-days must be at most 36500 (or 0 to keep everything)")
    return days


def listen_endpoint(
    reactor: Any, listen: str, client_ca_file: str | None = None
) -> IStreamServerEndpoint:
    """The endpoint ``--listen`` describes; :class:`EndpointSyntaxError` if Twisted cannot
    parse it (its parsers fail with ValueError, TypeError, IndexError... and a message
    that does not name the option)."""
    try:
        split_endpoint(listen)  # our own reading of it (loopback or not) must work too
        return server_endpoint(reactor, listen, client_ca_file)
    except (TLSConfigError, OSError):
        raise  # the description parsed; a file it names is the problem
    except (ValueError, TypeError, LookupError, RuntimeError) as e:
        raise EndpointSyntaxError(
            f"cannot parse --listen {listen!r} as a Twisted endpoint description "
            f"({e or type(e).__name__}); e.g. tcp:8080:interface=127.0.0.1"
        ) from None


def _non_negative_number(text: str | None, name: str) -> float:
    try:
        value = float(text or "")
    except ValueError:
        raise usage.UsageError(f"--{name} must be a number") from None
    if not value >= 0 or value == float("inf"):
        raise usage.UsageError(f"--{name} must be 0 or more")
    return value


def _count(text: str | None, name: str) -> int:
    try:
        value = int(text or "")
    except ValueError:
        raise usage.UsageError(f"--{name} must be a whole number") from None
    if value < 1:
        raise usage.UsageError(f"--{name} must be at least 1")
    return value


def host_policy_for(chosen: HostPolicy | None, has_tokens: bool) -> HostPolicy:
    """``--accept-hosts`` if given; else any host when operator tokens guard the API
    (every request that changes anything then carries a credential no web page has),
    and the loopback names when they do not (the playground, the default compose file),
    so that a page reaching the server through DNS rebinding is refused."""
    if chosen is not None:
        return chosen
    return HostPolicy() if has_tokens else HostPolicy(LOOPBACK_HOSTS)


def _byte_count(text: str | None, name: str) -> int:
    text = (text or "").strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18 or int(text) < 1:
        raise usage.UsageError(f"--{name} must be a whole number of bytes, 1 or more")
    return int(text)


def _positive_number(text: str | None, name: str) -> float:
    try:
        value = float(text or "")
    except ValueError:
        raise usage.UsageError(f"--{name} must be a number of seconds") from None
    if value <= 0:
        raise usage.UsageError(f"--{name} must be positive")
    return value


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


class ServerService(MultiService):
    """Brings the database up, then the dispatcher and the HTTP port; tears down in reverse.

    ``on_fatal`` is called with a one-line reason if start-up fails: it must stop the
    process (:class:`taskscheduler.daemon.StartFailure`).
    """

    log = Logger()

    def __init__(self, options: Options, reactor: Any, on_fatal: Callable[[str], None]) -> None:
        super().__init__()
        self._options = options
        self._reactor = reactor
        self._on_fatal = on_fatal
        self._stopping = False
        self._embedded: EmbeddedPostgres | None = None
        self._store: PostgresStore | None = None
        self._http: DaemonHTTP | None = None
        self._port: IListeningPort | None = None
        self._started: Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._started = Deferred.fromCoroutine(self._start())
        self._started.addErrback(self._failed_to_start)

    def _failed_to_start(self, failure: Any) -> None:
        if failure.check(CancelledError) and self._stopping:
            return  # stopped (SIGTERM, Ctrl-C) while starting: not a failure
        if failure.check(*OPERATOR_ERRORS):
            reason = failure.getErrorMessage()
            self.log.error("taskscheduler server could not start: {error}", error=reason)
        else:
            reason = f"{failure.type.__name__}: {failure.getErrorMessage()} (see the log)"
            self.log.failure("taskscheduler server could not start", failure)
        # Stops the process, which stops this service and whatever it started.
        self._on_fatal(reason)

    def _load_secrets(self) -> tuple[TokenFile | None, TokenFile | None, InstructionSigner]:
        options = self._options
        tokens: TokenFile | None = None
        if options["tokens-file"]:
            tokens = TokenFile.from_path(options["tokens-file"], self._reactor)
        elif options["tokens"]:
            tokens = TokenFile.from_env_value(options["tokens"])
        warning = check_listen_policy(options["listen"], tokens, options["insecure"])
        if warning is not None:
            self.log.warn("{warning}", warning=warning)
        joins: TokenFile | None = None
        if options["join-secrets-file"]:
            joins = TokenFile.from_path(options["join-secrets-file"], self._reactor)
        elif options["join-secrets"]:
            joins = TokenFile.from_env_value(options["join-secrets"], "TASKSCHEDULER_JOIN_SECRETS")
        if joins is None or len(joins) == 0:
            self.log.warn("no join secrets are configured: no new agent can enrol")
        if options["signing-key-file"]:
            key = load_signing_key(Path(options["signing-key-file"]))
        else:
            key = load_or_create_signing_key(Path(options["data-dir"]) / "signing_key.pem")
        self.log.info(
            "signing instructions to agents with key {fingerprint}",
            fingerprint=key_fingerprint(key.public_key()),
        )
        return tokens, joins, InstructionSigner(key, self._reactor)

    async def _start(self) -> None:
        options = self._options
        # First, so that a --listen Twisted cannot parse is said to be that, and bad TLS
        # files stop the server before it starts a database.
        endpoint = listen_endpoint(self._reactor, options["listen"], options["tls-client-ca"])
        if not make_non_dumpable():
            self.log.warn(
                "this system cannot make the server non-dumpable: processes of its user may "
                "read its memory and environment"
            )
        if make_private_folder(Path(options["data-dir"])):
            self.log.warn("{path} was open to other users: made it 0700", path=options["data-dir"])
        tokens, joins, signer = self._load_secrets()
        self._http = DaemonHTTP(
            self._reactor, options["agent-ca"], options["client-cert"], options["client-key"]
        )
        dsn = options["database"]
        for warning in database_warnings(dsn or "", options["database-on-command-line"]):
            self.log.warn("{warning}", warning=warning)
        if options["database-file"]:
            dsn = read_database_file(Path(options["database-file"]))
        if not dsn:
            self._embedded = EmbeddedPostgres(
                os.path.join(options["data-dir"], "postgres"), self._reactor
            )
            dsn = await self._embedded.start()
            self.log.info("embedded PostgreSQL is up in {path}", path=self._embedded.data_dir)
            PostgresSupervisor(self._embedded, self._reactor).setServiceParent(self)
        else:
            self.log.info("using the database {dsn}", dsn=redact_dsn(dsn))
        store = PostgresStore(dsn, reactor=self._reactor)
        self._store = store
        await self._connect(store, options["database-wait"])
        await store.set_fleet(options["agents"])
        if not options["agents"]:
            self.log.warn("AVAILABLE_SERVERS is empty: tasks will be stored but run nowhere")
        dispatcher = Dispatcher(store, self._http, self._reactor, options["agents"], signer=signer)
        access = ServerAccess(
            store,
            self._reactor,
            tokens,
            joins,
            # Only ever on loopback: check_listen_policy refused the rest, unless the
            # operator passed the insecure flag on purpose.
            open_operator_routes=tokens is None,
        )
        api = ServerAPI(
            store,
            self._reactor,
            access,
            on_task_created=dispatcher.task_created,
            report_grace=timedelta(seconds=options["report-grace"]),
            server_public_key=public_key_text(signer.public_key),
            on_agent_enrolled=lambda agent: dispatcher.agent_enrolled(agent.url),
            on_task_deleted=dispatcher.task_deleted,
            create_limiter=RateLimiter(
                self._reactor, options["create-rate"], options["create-burst"]
            ),
            max_output_bytes=options["max-output-bytes"],
            clock_allowance=timedelta(seconds=options["clock-allowance"]),
        )
        dispatcher.setServiceParent(self)
        if options["retention-days"]:
            HistoryPruner(
                store, self._reactor, timedelta(days=options["retention-days"])
            ).setServiceParent(self)
            self.log.info(
                "keeping {days} days of execution history", days=options["retention-days"]
            )
        else:
            self.log.info("keeping execution history forever (--retention-days 0)")
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
        # Listened to here rather than by a StreamServerEndpointService, which only logs
        # a port it cannot open and leaves a server running that nobody can reach.
        self._port = await endpoint.listen(site)
        pause_accepting_when_out_of_descriptors(self._port, self._reactor)
        defaulted = options["host-policy"] is None and hosts.hosts is not None
        if defaulted and not is_loopback_endpoint(options["listen"]):
            self.log.warn(
                "without operator tokens this server answers only to {hosts} in the "
                "Host header: agents and clients that reach it by another name are "
                "refused (403); list its names in --accept-hosts",
                hosts=hosts.describe(),
            )
        self.log.info(
            "answering to {hosts}; at most {total} connections, {per} per client address",
            hosts=hosts.describe(),
            total=site.max_connections,
            per=site.max_per_client,
        )
        for warning in plaintext_warnings(options["listen"], options["agents"]):
            self.log.warn("{warning}", warning=warning)
        self.log.info(
            "taskscheduler server listening on {listen} ({where}) with {count} agents",
            listen=options["listen"],
            where="loopback only" if is_loopback_endpoint(options["listen"]) else "network",
            count=len(options["agents"]),
        )

    async def _connect(self, store: PostgresStore, wait: float) -> None:
        deadline = self._reactor.seconds() + wait
        delay = 0.5
        while True:
            try:
                await store.start()
                return
            except StoreUnavailable as e:
                if self._reactor.seconds() + delay > deadline:
                    raise StoreUnavailable(
                        f"the database did not answer within {wait:g} s (--database-wait): {e}"
                    ) from e
                self.log.warn("database not reachable yet ({error}); retrying", error=str(e))
                await deferLater(self._reactor, delay, lambda: None)
                delay = min(delay * 2, 5.0)

    async def _stop(self) -> None:
        self._stopping = True
        if self._started is not None and not self._started.called:
            self._started.cancel()
        if self._port is not None:
            stopped = self._port.stopListening()
            if stopped is not None:
                await stopped
        await super().stopService()
        if self._http is not None:
            await self._http.close()
        if self._store is not None:
            await self._store.stop()
        if self._embedded is not None:
            await self._embedded.stop()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def makeService(options: Options) -> IService:
    return ServerService(
        options, global_reactor, StartFailure(global_reactor, "taskscheduler server")
    )


__all__: Sequence[str] = ["Options", "makeService"]
