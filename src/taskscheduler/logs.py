"""Both daemons' log: its format (``--log-format text|json``) and level (``--log-level``).

twistd chooses the log observer after ``makeService`` has returned, and once: the factory
named by its own ``--logger``, else the ``ILogObserver`` component of the Application it
made for the plugin, else its text observer writing to ``--logfile``, stdout (``-n``) or
syslog. ``makeService`` cannot change that observer afterwards (a second
``beginLoggingTo`` is refused with a warning) and never sees the Application, but twistd
hands the Application to the service it returned, as ``setServiceParent``'s argument:
:class:`LoggedDaemon` wraps the daemon's service and puts its observer there as the
component. The observer writes where twistd would have (the same ``--logfile`` rotation,
stdout, syslog), in the chosen format, behind a ``FilteringLogObserver`` that drops what
is below the chosen level. ``twistd --logger`` still wins: it is twistd's own choice.

JSON lines are this module's own (Twisted's ``jsonFileLogObserver`` writes every field
of an event, ``log_format`` and ``repr``s included): ``time`` (RFC 3339, UTC), ``level``,
``namespace``, ``message`` (the formatted text), ``traceback`` for a failure, and the
event's own fields (``task_id``, ``scheduled_at``, ``agent_id``, ``status``...), except
:data:`WITHHELD_FIELDS`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.application.service import IService, MultiService
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.logfile import LogFile

FORMATS = ("text", "json")
DEFAULT_FORMAT = "text"
LEVELS = {level.name: level for level in LogLevel.iterconstants()}
DEFAULT_LEVEL = "info"

#: Never written to a JSON line, whatever a log call passes: a task's command and its
#: environment may hold secrets (no log call passes them; this is the second lock).
WITHHELD_FIELDS = frozenset({"command", "env", "environment"})
#: The keys of a JSON line itself, and keys of Twisted's legacy events (log.msg) that
#: repeat them: an event field by one of these names is not copied.
_LINE_KEYS = frozenset({"time", "level", "namespace", "message", "system", "traceback"})
_LEGACY_KEYS = frozenset({"isError", "format", "why", "failure", "printed"})


def log_parameters(format_variable: str, level_variable: str) -> list[list[Any]]:
    """The ``--log-format`` and ``--log-level`` rows of a daemon's ``optParameters``."""
    return [
        [
            "log-format",
            None,
            None,
            "How log lines are written: text, or json (one JSON object per line, for log "
            f"collectors) [{format_variable}] (default: {DEFAULT_FORMAT}).",
        ],
        [
            "log-level",
            None,
            None,
            f"The least important lines logged: {', '.join(LEVELS)}; per-run lines are "
            f"debug [{level_variable}] (default: {DEFAULT_LEVEL}).",
        ],
    ]


def parse_log_format(text: str | None) -> str:
    value = (text or DEFAULT_FORMAT).strip().lower()
    if value not in FORMATS:
        raise usage.UsageError(f"--log-format must be one of {', '.join(FORMATS)}")
    return value


def parse_log_level(text: str | None) -> LogLevel:
    value = (text or DEFAULT_LEVEL).strip().lower()
    if value not in LEVELS:
        raise usage.UsageError(f"--log-level must be one of {', '.join(LEVELS)}")
    return LEVELS[value]


def json_line(event: LogEvent) -> str:
    """``event`` as one line of JSON (see the module's docstring)."""
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": _rfc3339(event.get("log_time")),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    system = event.get("log_system")
    if system not in (None, "-"):
        line["system"] = str(system)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            line["traceback"] = failure.getTraceback()
        except Exception:  # a log line must not fail because of what it describes
            line["traceback"] = repr(failure)
    for key, value in event.items():
        if (
            not isinstance(key, str)
            or key.startswith("log_")
            or key in _LINE_KEYS
            or key in _LEGACY_KEYS
            or key in WITHHELD_FIELDS
        ):
            continue
        line[key] = _json_value(value)
    return json.dumps(line, allow_nan=False) + "\n"


def _rfc3339(timestamp: Any) -> str:
    try:
        when = datetime.fromtimestamp(float(timestamp), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        when = datetime.now(UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_value(value: Any) -> Any:
    """``value`` as it is when JSON can hold it, else as text (UUIDs, datetimes, errors)."""
    if isinstance(value, datetime):
        return value.isoformat()
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return str(value)
    return value


def format_observer(out: IO[Any], log_format: str) -> ILogObserver:
    """An observer writing every event to ``out`` in ``log_format``; text is twistd's own."""
    if log_format == "json":
        return FileLogObserver(out, json_line)
    return textFileLogObserver(out)


def level_filtered(observer: ILogObserver, level: LogLevel) -> ILogObserver:
    """``observer``, given only the events of ``level`` and above."""
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=level)])


def daemon_observer(
    twistd: Mapping[str, Any], log_format: str, level: LogLevel, reactor: Any = None
) -> ILogObserver:
    """The observer twistd would have made from its own options ``twistd`` (``--logfile``,
    ``--nodaemon``, ``--syslog``, ``--prefix``), in ``log_format``, filtered at ``level``.

    Made as twistd makes its own, just before logging starts: the stdout it writes to is
    taken now, before twistd sends ``sys.stdout`` to the log."""
    if twistd.get("syslog"):
        from twisted.python.syslog import SyslogObserver

        # syslog has its own line format.
        emit = SyslogObserver(twistd.get("prefix") or "twisted").emit
        syslog = LegacyLogObserverWrapper(cast(Any, emit))
        return level_filtered(syslog, level)
    logfile = twistd.get("logfile") or ""
    out: IO[Any]
    if logfile == "-" or (not logfile and twistd.get("nodaemon", True)):
        if not twistd.get("nodaemon", True):
            sys.exit("Daemons cannot log to stdout, exiting!")  # as twistd says it
        out = sys.stdout
    else:
        log_file = LogFile.fromFullPath(os.path.abspath(logfile or "twistd.log"))
        _rotate_on_sigusr1(log_file, reactor)
        out = log_file  # type: ignore[assignment]
    return level_filtered(format_observer(out, log_format), level)


def _rotate_on_sigusr1(log_file: LogFile, reactor: Any) -> None:
    """As twistd does for its own log file, unless something else handles SIGUSR1."""
    if reactor is None or signal.getsignal(signal.SIGUSR1):
        return
    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(log_file.rotate))


class LoggedDaemon(MultiService):
    """A daemon's service that, attached to twistd's Application, gives it the log
    observer chosen by ``--log-format`` and ``--log-level`` (see the module's docstring).

    ``options`` are the daemon's parsed options; twistd's own are their ``parent``.
    """

    def __init__(self, service: IService, options: Any, reactor: Any) -> None:
        super().__init__()
        self._options = options
        self._reactor = reactor
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        if isinstance(parent, Componentized):  # the Application: logging starts next
            twistd = getattr(self._options, "parent", None)
            parent.setComponent(
                ILogObserver,
                daemon_observer(
                    twistd if twistd is not None else {},
                    self._options["log-format"],
                    self._options["log-level"],
                    self._reactor,
                ),
            )
        super().setServiceParent(parent)
