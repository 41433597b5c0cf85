"""``twistd taskscheduler-agent``'s options: each from the command line or its
environment variable, checked and converted once, here."""

from __future__ import annotations

import os
import pwd
from collections.abc import MutableMapping
from typing import Any

from twisted.python import usage

from taskscheduler.agent.admission import DEFAULT_MAX_RUNNING
from taskscheduler.agent.heartbeat import DEFAULT_HEARTBEAT_INTERVAL
from taskscheduler.agent.servers import parse_server_urls
from taskscheduler.agent.service import DEFAULT_SHUTDOWN_GRACE
from taskscheduler.agent.spool import DEFAULT_SPOOL_MAX_BYTES
from taskscheduler.hardening import take_secret_from_environment
from taskscheduler.logs import (
    DEFAULT_FORMAT,
    DEFAULT_LEVEL,
    log_parameters,
    parse_log_format,
    parse_log_level,
)
from taskscheduler.protocol import InvalidMessage
from taskscheduler.protocol.labels import labels_from_pairs, parse_label_text
from taskscheduler.web.guards import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
)

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
    (
        "heartbeat-interval",
        "TASKSCHEDULER_AGENT_HEARTBEAT_INTERVAL",
        str(DEFAULT_HEARTBEAT_INTERVAL),
    ),
    ("spool-max-bytes", "TASKSCHEDULER_AGENT_SPOOL_MAX_BYTES", str(DEFAULT_SPOOL_MAX_BYTES)),
    ("advertise-url", "TASKSCHEDULER_AGENT_ADVERTISE_URL", None),
    ("join-secret-file", "TASKSCHEDULER_JOIN_SECRET_FILE", None),
    ("server-public-key-file", "TASKSCHEDULER_SERVER_PUBLIC_KEY_FILE", None),
    ("tls-client-ca", "TASKSCHEDULER_AGENT_TLS_CLIENT_CA", None),
    ("server-ca", "TASKSCHEDULER_SERVER_CA", None),
    ("client-cert", "TASKSCHEDULER_AGENT_CLIENT_CERT", None),
    ("client-key", "TASKSCHEDULER_AGENT_CLIENT_KEY", None),
    ("idle-timeout", "TASKSCHEDULER_AGENT_IDLE_TIMEOUT", str(DEFAULT_IDLE_TIMEOUT)),
    ("run-as", "TASKSCHEDULER_AGENT_RUN_AS", None),
    ("cgroup-parent", "TASKSCHEDULER_AGENT_CGROUP_PARENT", "auto"),
    ("starting-deadline", "TASKSCHEDULER_AGENT_STARTING_DEADLINE", "auto"),
    ("max-running", "TASKSCHEDULER_AGENT_MAX_RUNNING", str(DEFAULT_MAX_RUNNING)),
    ("max-connections", "TASKSCHEDULER_AGENT_MAX_CONNECTIONS", str(DEFAULT_MAX_CONNECTIONS)),
    (
        "max-connections-per-client",
        "TASKSCHEDULER_AGENT_MAX_PER_CLIENT",
        str(DEFAULT_MAX_CONNECTIONS_PER_CLIENT),
    ),
    ("header-timeout", "TASKSCHEDULER_AGENT_HEADER_TIMEOUT", str(DEFAULT_HEADER_TIMEOUT)),
    ("body-timeout", "TASKSCHEDULER_AGENT_BODY_TIMEOUT", str(DEFAULT_BODY_TIMEOUT)),
    # Logs (issue 12): the log's format and level.
    ("log-format", "TASKSCHEDULER_AGENT_LOG_FORMAT", DEFAULT_FORMAT),
    ("log-level", "TASKSCHEDULER_AGENT_LOG_LEVEL", DEFAULT_LEVEL),
    # Metrics
    ("metrics-token-file", "TASKSCHEDULER_AGENT_METRICS_TOKEN_FILE", None),
]


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Runs the taskscheduler agent: it runs the tasks its server schedules here and "
        "reports their results. Every option can also be set by the environment variable "
        "named in brackets; the command line wins."
    )
    # Metrics
    optFlags = [
        [
            "metrics-public",
            None,
            "Let anyone who reaches the agent read GET /metrics (by default: anyone on a "
            "loopback listener, else only with the token of --metrics-token-file).",
        ],
    ]
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
            "Base URL of the taskscheduler server, or of its replicas separated by commas "
            "(https://a:8080,https://b:8080): the agent uses one at a time and fails over "
            "to the next within 5 s of trouble [TASKSCHEDULER_SERVER_URL] "
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
            "heartbeat-interval",
            None,
            None,
            "Seconds between heartbeats to the server "
            f"[TASKSCHEDULER_AGENT_HEARTBEAT_INTERVAL] (default: {DEFAULT_HEARTBEAT_INTERVAL:g}).",
        ],
        [
            "spool-max-bytes",
            None,
            None,
            "Most bytes of unreported results kept; past it new results are dropped and "
            f"counted [TASKSCHEDULER_AGENT_SPOOL_MAX_BYTES] (default: {DEFAULT_SPOOL_MAX_BYTES}).",
        ],
        [
            "advertise-url",
            None,
            None,
            "The base URL the server reaches this agent at: its AVAILABLE_SERVERS entry "
            "[TASKSCHEDULER_AGENT_ADVERTISE_URL] (default: the address --listen binds, "
            "127.0.0.1 for every interface).",
        ],
        [
            "join-secret-file",
            None,
            None,
            "File holding the join secret (tsj_...) used once, to enrol "
            "[TASKSCHEDULER_JOIN_SECRET_FILE]; it must be 0600. Or the secret itself in "
            "TASKSCHEDULER_JOIN_SECRET, which the agent then removes from its environment.",
        ],
        [
            "server-public-key-file",
            None,
            None,
            "Pin this server public key (the server's <data-dir>/signing_key.pem.pub) "
            "instead of the one enrolment returns [TASKSCHEDULER_SERVER_PUBLIC_KEY_FILE].",
        ],
        [
            "tls-client-ca",
            None,
            None,
            "With an ssl: --listen, require callers to present a certificate signed by a CA "
            "in this PEM file (mutual TLS) [TASKSCHEDULER_AGENT_TLS_CLIENT_CA].",
        ],
        [
            "server-ca",
            None,
            None,
            "CA certificates (PEM) an https:// --server must chain to "
            "[TASKSCHEDULER_SERVER_CA] (default: the system's trust store).",
        ],
        [
            "client-cert",
            None,
            None,
            "Certificate (PEM) presented to a server that requires mutual TLS "
            "[TASKSCHEDULER_AGENT_CLIENT_CERT].",
        ],
        [
            "client-key",
            None,
            None,
            "Private key of --client-cert, if not in the same file "
            "[TASKSCHEDULER_AGENT_CLIENT_KEY].",
        ],
        [
            "idle-timeout",
            None,
            None,
            "Seconds an idle client connection is kept open "
            f"[TASKSCHEDULER_AGENT_IDLE_TIMEOUT] (default: {DEFAULT_IDLE_TIMEOUT:g}).",
        ],
        [
            "run-as",
            None,
            None,
            "Run every command as this unprivileged user (the agent must start as root); "
            "this makes each start a fork, several times slower "
            "[TASKSCHEDULER_AGENT_RUN_AS] (default: the agent's own user).",
        ],
        [
            "cgroup-parent",
            None,
            None,
            "The cgroup v2 folder under which each run gets a cgroup of its own, so that "
            "nothing a run starts escapes it; 'auto' makes one in the agent's own cgroup, "
            "'none' makes the agent a child subreaper instead "
            "[TASKSCHEDULER_AGENT_CGROUP_PARENT] (default: auto, falling back to subreaper).",
        ],
        [
            "starting-deadline",
            None,
            None,
            "Seconds late (at most one interval) past which an instant is recorded skipped "
            "instead of started, so that an overloaded agent sheds load "
            "[TASKSCHEDULER_AGENT_STARTING_DEADLINE] (default: auto, a quarter of the "
            "task's interval, at most 5 s or a hundredth of the interval if longer).",
        ],
        [
            "max-running",
            None,
            None,
            "Most runs in flight on this agent; instants past it are recorded skipped "
            f"[TASKSCHEDULER_AGENT_MAX_RUNNING] (default: {DEFAULT_MAX_RUNNING}).",
        ],
        [
            "max-connections",
            None,
            None,
            "Most client connections held at once; past it, 503 "
            f"[TASKSCHEDULER_AGENT_MAX_CONNECTIONS] (default: {DEFAULT_MAX_CONNECTIONS}, "
            "lowered to leave 128 of the process's open-file limit to the rest).",
        ],
        [
            "max-connections-per-client",
            None,
            None,
            "Most client connections held at once from one IP address; past it, 503 "
            "[TASKSCHEDULER_AGENT_MAX_PER_CLIENT] "
            f"(default: {DEFAULT_MAX_CONNECTIONS_PER_CLIENT}).",
        ],
        [
            "header-timeout",
            None,
            None,
            "Seconds a client has, from connecting, to send a request's line and headers; "
            f"then 408 [TASKSCHEDULER_AGENT_HEADER_TIMEOUT] (default: {DEFAULT_HEADER_TIMEOUT:g}).",
        ],
        [
            "body-timeout",
            None,
            None,
            "Seconds a client has to send a request's body once its headers are in; then 408 "
            f"[TASKSCHEDULER_AGENT_BODY_TIMEOUT] (default: {DEFAULT_BODY_TIMEOUT:g}).",
        ],
        # Logs (issue 12): the log's format and level.
        *log_parameters("TASKSCHEDULER_AGENT_LOG_FORMAT", "TASKSCHEDULER_AGENT_LOG_LEVEL"),
        # Metrics
        [
            "metrics-token-file",
            None,
            None,
            "File holding the bearer token (or its sha256: hash) that reads GET /metrics "
            "when the agent listens beyond loopback [TASKSCHEDULER_AGENT_METRICS_TOKEN_FILE].",
        ],
    ]

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ = os.environ if environ is None else environ
        self._labels: list[str] = []

    def opt_label(self, text: str) -> None:
        """A label of this agent, KEY=VALUE (repeatable: --label role=web --label dc=eu);
        a task may target agents by label. Keys: 1 to 63 letters, digits, '_', '.', '/',
        '-'; values: up to 63 of those less '/'; at most 20 labels, no key twice
        [TASKSCHEDULER_AGENT_LABELS, comma-separated: role=web,dc=eu] (default: none)."""
        self._labels.append(text)

    def postOptions(self) -> None:
        for name, variable, default in _SETTINGS:
            if self[name] is None:
                self[name] = self._environ.get(variable) or default
        try:
            self["servers"] = parse_server_urls(self["server"])
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
        self["server"] = ",".join(self["servers"])
        self["log-format"] = parse_log_format(self["log-format"])
        self["log-level"] = parse_log_level(self["log-level"])
        self["output-cap"] = _number(self["output-cap"], "output-cap", int, minimum=1)
        self["kill-grace"] = _number(self["kill-grace"], "kill-grace", float, minimum=0)
        self["shutdown-grace"] = _number(self["shutdown-grace"], "shutdown-grace", float, minimum=0)
        self["heartbeat-interval"] = _number(
            self["heartbeat-interval"], "heartbeat-interval", float, minimum=0.1
        )
        self["spool-max-bytes"] = _number(
            self["spool-max-bytes"], "spool-max-bytes", int, minimum=1
        )
        self["idle-timeout"] = _number(self["idle-timeout"], "idle-timeout", float, minimum=1)
        deadline = self["starting-deadline"]
        self["starting-deadline"] = (
            None if deadline == "auto" else _number(deadline, "starting-deadline", float, minimum=0)
        )
        self["max-running"] = _number(self["max-running"], "max-running", int, minimum=1)
        for name in ("max-connections", "max-connections-per-client"):
            self[name] = _number(self[name], name, int, minimum=1)
        for name in ("header-timeout", "body-timeout"):
            self[name] = _number(self[name], name, float, minimum=0.1)
        # Read once, and taken out of the environment at once: see hardening.
        self["join-secret"] = take_secret_from_environment(
            self._environ, "TASKSCHEDULER_JOIN_SECRET"
        )
        # Without --advertise-url, the URL is the bound port's (AgentService); a port
        # that is not TCP has none.
        kind = self["listen"].split(":", 1)[0].strip().lower()
        self["advertise-scheme"] = {"tcp": "http", "ssl": "https"}.get(kind)
        url = self["advertise-url"]
        if url is None and self["advertise-scheme"] is None:
            raise usage.UsageError(
                f"cannot tell the agent's URL from --listen {self['listen']!r}: "
                "give --advertise-url"
            )
        if url is not None:
            url = url.rstrip("/")
            if not url.startswith(("http://", "https://")):
                raise usage.UsageError(
                    f"--advertise-url {url!r} must be a base URL like http://host:8081"
                )
        self["advertise-url"] = url
        self["run-as-ids"] = None if self["run-as"] is None else _user_ids(self["run-as"])
        self["labels"] = _labels(self._labels, self._environ.get("TASKSCHEDULER_AGENT_LABELS"))


def _labels(given: list[str], from_environment: str | None) -> Any:
    """The agent's labels: those of the command line, else the environment's."""
    texts = given or [t.strip() for t in (from_environment or "").split(",") if t.strip()]
    try:
        return labels_from_pairs(parse_label_text(text) for text in texts)
    except InvalidMessage as e:
        source = "--label" if given else "TASKSCHEDULER_AGENT_LABELS"
        raise usage.UsageError(f"{source}: {e}") from None


def _number(text: str, name: str, kind: type[int] | type[float], minimum: float) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise usage.UsageError(f"--{name} must be a number, not {text!r}") from None
    if value < minimum:
        raise usage.UsageError(f"--{name} must be at least {minimum:g}")
    return value


def _user_ids(name: str) -> tuple[int, int, str]:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise usage.UsageError(f"--run-as: no user named {name!r}") from None
    if entry.pw_uid == 0:
        raise usage.UsageError("--run-as must name an unprivileged user, not root")
    return entry.pw_uid, entry.pw_gid, entry.pw_dir
