"""``twistd taskscheduler-server``'s options: each from the command line or its
environment variable, checked and converted once, here.

It runs past 400 lines because it is one flat table (``optParameters``, read top to
bottom as the server's configuration reference) and the converters it applies; split,
an option and its check would be read in two files."""

from __future__ import annotations

import os

from twisted.python import usage

from taskscheduler.listen import INSECURE_FLAG
from taskscheduler.logs import log_parameters, parse_log_format, parse_log_level
from taskscheduler.protocol import CLOCK_ALLOWANCE, InvalidMessage
from taskscheduler.protocol.notify import (
    ALL_EVENTS,
    NotifyConfig,
    check_webhook_url,
    parse_events_text,
)
from taskscheduler.server.api.app import DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_REPORT_GRACE
from taskscheduler.server.ratelimit import DEFAULT_CREATE_BURST, DEFAULT_CREATE_RATE
from taskscheduler.server.retention import DEFAULT_MIN_EXECUTIONS, DEFAULT_RETENTION_DAYS
from taskscheduler.web.guards import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
)
from taskscheduler.web.hosts import LOOPBACK_HOSTS, HostPolicy


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
        # Metrics
        [
            "metrics-public",
            None,
            "Let anyone who reaches the server read GET /metrics (by default: anyone on a "
            "loopback listener, else an operator's token).",
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
            "e.g. http://127.0.0.1:8081,http://127.0.0.1:8082. When set, it is the fleet at "
            "start (members added and removed); unset or empty, the fleet stored in the "
            "database stands (POST and DELETE /api/v1/fleet change it at run time).",
        ],
        [
            "heartbeat-interval",
            None,
            None,
            "Seconds between the agents' heartbeats; an agent is online if heard from "
            "within 3 of them [TASKSCHEDULER_HEARTBEAT_INTERVAL] (default: 10).",
        ],
        [
            "claim-grace",
            None,
            None,
            "Seconds after an instant of a run-on-one task during which only the agent "
            "the server chose may run it; past them any agent of the task may (at most "
            "half the task's interval) [TASKSCHEDULER_CLAIM_GRACE] (default: 5).",
        ],
        [
            "lease-ttl",
            None,
            None,
            "Seconds a replica's lease on once-only work (an agent's deliveries, retention, "
            "...) lasts unrenewed: a dead replica's work is taken over after it "
            "[TASKSCHEDULER_LEASE_TTL] (default: 10).",
        ],
        [
            "lease-renew",
            None,
            None,
            "Seconds between renewals of a replica's leases; under half of --lease-ttl "
            "[TASKSCHEDULER_LEASE_RENEW] (default: 2).",
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
            "retention-min-executions",
            None,
            None,
            "Executions of each task never deleted by retention, the newest ones, however "
            "old [RETENTION_MIN_EXECUTIONS] "
            f"(default: {DEFAULT_MIN_EXECUTIONS}).",
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
            "Operators' API tokens, one '<name> sha256:<hash>' line each (taskscheduler "
            "tokens new NAME); re-read when it changes, so deleting a line "
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
        # Logs (issue 12): the log's format and level.
        *log_parameters("TASKSCHEDULER_LOG_FORMAT", "TASKSCHEDULER_LOG_LEVEL"),
        # Notifications (issue 12): the webhook of tasks that name none.
        [
            "notify-url",
            None,
            None,
            "Webhook URL (http or https) notified for every task without a notify option "
            "of its own [TASKSCHEDULER_NOTIFY_URL] (default: none).",
        ],
        [
            "notify-on",
            None,
            None,
            "Comma-separated events sent to --notify-url: failed, timed_out, lost, recovered "
            "[TASKSCHEDULER_NOTIFY_ON] (default: all four).",
        ],
        [
            "notify-secret-file",
            None,
            None,
            "File (0600) holding the secret webhooks are signed with (HMAC-SHA256) "
            "[TASKSCHEDULER_NOTIFY_SECRET_FILE] (default: <data-dir>/notify-secret, "
            "created with a random secret the first time).",
        ],
        [
            "notify-base-url",
            None,
            None,
            "This server's URL as operators reach it, e.g. https://scheduler.example.com, "
            "for the execution links in webhooks [TASKSCHEDULER_NOTIFY_BASE_URL] "
            "(default: webhooks give the link's path only).",
        ],
    ]

    def postOptions(self) -> None:
        self["listen"] = self["listen"] or _env("TASKSCHEDULER_LISTEN", "tcp:8080")
        self["log-format"] = parse_log_format(
            self["log-format"] or _env("TASKSCHEDULER_LOG_FORMAT")
        )
        self["log-level"] = parse_log_level(self["log-level"] or _env("TASKSCHEDULER_LOG_LEVEL"))
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
        self["heartbeat-interval"] = _positive_number(
            self["heartbeat-interval"] or _env("TASKSCHEDULER_HEARTBEAT_INTERVAL", "10"),
            "heartbeat-interval",
        )
        self["claim-grace"] = _positive_number(
            self["claim-grace"] or _env("TASKSCHEDULER_CLAIM_GRACE", "5"), "claim-grace"
        )
        self["lease-ttl"] = _positive_number(
            self["lease-ttl"] or _env("TASKSCHEDULER_LEASE_TTL", "10"), "lease-ttl"
        )
        self["lease-renew"] = _positive_number(
            self["lease-renew"] or _env("TASKSCHEDULER_LEASE_RENEW", "2"), "lease-renew"
        )
        if self["lease-renew"] * 2 >= self["lease-ttl"]:
            raise usage.UsageError("--lease-renew must be under half of --lease-ttl")
        self["report-grace"] = _positive_number(
            self["report-grace"] or _env("TASKSCHEDULER_REPORT_GRACE", "30"), "report-grace"
        )
        self["retention-days"] = parse_retention_days(
            self["retention-days"]
            or _env("TASKSCHEDULER_RETENTION_DAYS", str(DEFAULT_RETENTION_DAYS))
        )
        self["retention-min-executions"] = parse_min_executions(
            self["retention-min-executions"]
            or _env("RETENTION_MIN_EXECUTIONS", str(DEFAULT_MIN_EXECUTIONS))
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
        self._notify_options()

    def _notify_options(self) -> None:
        """Notifications (issue 12): ``notify-default`` is the server-wide webhook."""
        url = self["notify-url"] or _env("TASKSCHEDULER_NOTIFY_URL")
        on = self["notify-on"] or _env("TASKSCHEDULER_NOTIFY_ON")
        self["notify-secret-file"] = self["notify-secret-file"] or _env(
            "TASKSCHEDULER_NOTIFY_SECRET_FILE"
        )
        base = self["notify-base-url"] or _env("TASKSCHEDULER_NOTIFY_BASE_URL")
        try:
            self["notify-default"] = None
            if url:
                events = ALL_EVENTS if not on else parse_events_text(on, "--notify-on")
                self["notify-default"] = NotifyConfig(
                    check_webhook_url(url, "--notify-url"), events
                )
            elif on:
                raise usage.UsageError("--notify-on needs --notify-url")
            self["notify-base-url"] = check_webhook_url(base, "--notify-base-url") if base else None
        except InvalidMessage as e:
            raise usage.UsageError(str(e)) from None


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


def parse_min_executions(text: str | None) -> int:
    """``--retention-min-executions``: a whole number from 0 to 1,000,000."""
    value = (text or "").strip()
    if not value.isascii() or not value.isdigit() or len(value) > 7 or int(value) > 1_000_000:
        raise usage.UsageError(
            "--retention-min-executions must be a whole number from 0 to 1000000"
        )
    return int(value)


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
