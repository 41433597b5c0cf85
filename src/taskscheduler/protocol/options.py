"""How and where a task runs, besides its command and schedule (:class:`TaskOptions`):
the agents it targets, run-on-one, the overlap policy, retries, its environment and working
directory, its webhook (:mod:`.notify`). One parser for what operators send (strict) and
what agents are told (the same fields, flat in the task's JSON)."""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from types import MappingProxyType
from typing import Any, TypeVar

from taskscheduler.protocol.fields import InvalidMessage, parse_int, parse_uuid, utf8_of
from taskscheduler.protocol.notify import NotifyConfig, notify_to_json, parse_notify

#: The option fields, by their JSON names (flat in a task's JSON).
OPTION_FIELDS = (
    "target",
    "run_on",
    "overlap",
    "max_concurrent",
    "retries",
    "retry_delay_seconds",
    "env",
    "working_dir",
    "notify",
)
#: Options an operator may reset to their default by sending ``null`` in a PATCH.
NULLABLE_OPTIONS = frozenset({"target", "working_dir", "notify"})

MAX_TARGET_AGENTS = 100
MAX_LABELS = 20
MAX_CONCURRENT = 100
#: ``max_concurrent`` when ``overlap`` becomes ``allow`` and none is given.
DEFAULT_ALLOW_CONCURRENT = 10
MAX_RETRIES = 10
MAX_RETRY_DELAY_SECONDS = 24 * 3600
DEFAULT_RETRY_DELAY = timedelta(seconds=10)
MAX_ENV_VARIABLES = 64
MAX_ENV_VALUE_BYTES = 4096
MAX_PATH_BYTES = 4096
#: Variables the agent sets itself for every run: a task may not override them.
RESERVED_ENV_PREFIX = "TASKSCHEDULER_"

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
#: Label keys and values, as agents carry them (``--label role=web``) and targets name them.
LABEL_KEY = re.compile(r"[A-Za-z0-9_./-]{1,63}", re.ASCII)
LABEL_VALUE = re.compile(r"[A-Za-z0-9_.-]{0,63}", re.ASCII)

_EMPTY: Mapping[str, str] = MappingProxyType({})
_E = TypeVar("_E", bound=enum.StrEnum)


class RunOn(enum.StrEnum):
    ALL = "all"  # every matching agent runs each instant (the seed's rule)
    ONE = "one"  # exactly one live matching agent runs each instant


class Overlap(enum.StrEnum):
    """What an instant does while an earlier run of the task is still going."""

    SKIP = "skip"  # recorded skipped (the default, and the rule before this option)
    ALLOW = "allow"  # runs alongside, up to max_concurrent runs of the task
    REPLACE = "replace"  # the running one is terminated (recorded replaced); this one runs


def frozen_map(values: Mapping[str, str]) -> Mapping[str, str]:
    """A read-only copy, so that a frozen spec stays frozen."""
    return MappingProxyType(dict(values)) if values else _EMPTY


@dataclass(frozen=True)
class Target:
    """Which agents of the fleet a task runs on; neither given: all of them."""

    agents: frozenset[uuid.UUID] | None = None
    labels: Mapping[str, str] | None = None

    @property
    def everywhere(self) -> bool:
        return self.agents is None and self.labels is None

    def matches(self, agent_id: uuid.UUID | None, labels: Mapping[str, str]) -> bool:
        """Whether the agent ``agent_id`` (None: not enrolled yet) carrying ``labels`` is
        one the task runs on: every given label must match."""
        if self.agents is not None:
            return agent_id is not None and agent_id in self.agents
        if self.labels is not None:
            return all(labels.get(key) == value for key, value in self.labels.items())
        return True


@dataclass(frozen=True)
class TaskOptions:
    target: Target = field(default_factory=Target)
    run_on: RunOn = RunOn.ALL
    overlap: Overlap = Overlap.SKIP
    #: Runs of the task at once on one agent (more than 1 only with ``overlap`` allow).
    max_concurrent: int = 1
    #: How many times a failed or timed-out run is tried again on the same agent.
    retries: int = 0
    retry_delay: timedelta = DEFAULT_RETRY_DELAY
    #: Added to each run's environment (values are never logged nor audited).
    env: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    #: The run's working directory (None: the agent's own).
    working_dir: str | None = None
    #: Its webhook (None: the server-wide default, if any).
    notify: NotifyConfig | None = None


def options_to_json(options: TaskOptions) -> dict[str, Any]:
    """The options as a task's JSON shows them (every field, defaults included)."""
    return {
        "target": target_to_json(options.target),
        "run_on": options.run_on.value,
        "overlap": options.overlap.value,
        "max_concurrent": options.max_concurrent,
        "retries": options.retries,
        "retry_delay_seconds": int(options.retry_delay.total_seconds()),
        "env": dict(options.env),
        "working_dir": options.working_dir,
        "notify": notify_to_json(options.notify),
    }


def target_to_json(target: Target) -> dict[str, Any] | None:
    if target.agents is not None:
        return {"agents": sorted(str(agent) for agent in target.agents)}
    if target.labels is not None:
        return {"labels": dict(sorted(target.labels.items()))}
    return None


def parse_options(body: Mapping[str, Any], base: TaskOptions = TaskOptions()) -> TaskOptions:
    """``base`` with the option fields ``body`` gives (a create: the defaults; a PATCH:
    the task's options). Fields absent (or ``null``, except for :data:`NULLABLE_OPTIONS`,
    where it means the default) leave ``base``'s. InvalidMessage says what is wrong."""
    given = {name: body[name] for name in OPTION_FIELDS if name in body}
    given = {
        name: value
        for name, value in given.items()
        if value is not None or name in NULLABLE_OPTIONS
    }
    new = base
    if "target" in given:
        new = replace(new, target=parse_target(given["target"]))
    if "run_on" in given:
        new = replace(new, run_on=_parse_enum(RunOn, given["run_on"], "run_on"))
    if "overlap" in given:
        overlap = _parse_enum(Overlap, given["overlap"], "overlap")
        if overlap is not new.overlap:
            concurrent = DEFAULT_ALLOW_CONCURRENT if overlap is Overlap.ALLOW else 1
            new = replace(new, overlap=overlap, max_concurrent=concurrent)
    if "max_concurrent" in given:
        if new.overlap is not Overlap.ALLOW:
            raise InvalidMessage(
                '\'max_concurrent\' applies only with "overlap": "allow" '
                "(skip runs one at a time; replace keeps only the newest)"
            )
        concurrent = parse_int(given["max_concurrent"], "max_concurrent", 1, MAX_CONCURRENT)
        new = replace(new, max_concurrent=concurrent)
    if "retries" in given:
        new = replace(new, retries=parse_int(given["retries"], "retries", 0, MAX_RETRIES))
    if "retry_delay_seconds" in given:
        if new.retries == 0:
            raise InvalidMessage("'retry_delay_seconds' applies only with 'retries' above 0")
        delay = parse_int(
            given["retry_delay_seconds"], "retry_delay_seconds", 0, MAX_RETRY_DELAY_SECONDS
        )
        new = replace(new, retry_delay=timedelta(seconds=delay))
    if "env" in given:
        new = replace(new, env=parse_env(given["env"]))
    if "working_dir" in given:
        new = replace(new, working_dir=parse_working_dir(given["working_dir"]))
    if "notify" in given:
        new = replace(new, notify=parse_notify(given["notify"]))
    return new


def options_from_json(body: Mapping[str, Any]) -> TaskOptions:
    """The options of a whole task as :func:`options_to_json` wrote them (the store's
    copy; what the server tells an agent): each field checked, absent ones default.
    Unlike :func:`parse_options`, no rule between fields: the document is whole."""
    delay = body.get("retry_delay_seconds")
    options = TaskOptions(
        target=parse_target(body.get("target")),
        run_on=_parse_enum(RunOn, body.get("run_on", "all"), "run_on"),
        overlap=_parse_enum(Overlap, body.get("overlap", "skip"), "overlap"),
        max_concurrent=parse_int(
            body.get("max_concurrent", 1), "max_concurrent", 1, MAX_CONCURRENT
        ),
        retries=parse_int(body.get("retries", 0), "retries", 0, MAX_RETRIES),
        retry_delay=(
            DEFAULT_RETRY_DELAY
            if delay is None
            else timedelta(
                seconds=parse_int(delay, "retry_delay_seconds", 0, MAX_RETRY_DELAY_SECONDS)
            )
        ),
        env=parse_env(body.get("env") or {}),
        working_dir=parse_working_dir(body.get("working_dir")),
        notify=parse_notify(body.get("notify")),
    )
    return options


def _parse_enum(kind: type[_E], value: object, name: str) -> _E:
    if isinstance(value, str) and value in kind.__members__.values():
        return kind(value)
    allowed = ", ".join(f'"{member.value}"' for member in kind)
    raise InvalidMessage(f"'{name}' must be one of {allowed}")


def parse_target(value: object) -> Target:
    """``null`` (every agent), ``{"agents": [ids]}`` or ``{"labels": {key: value}}``."""
    if value is None:
        return Target()
    if not isinstance(value, Mapping) or len(value) != 1 or not {"agents", "labels"} >= set(value):
        raise InvalidMessage(
            "'target' must be null (every agent), {\"agents\": [agent ids]} or "
            '{"labels": {"key": "value"}}'
        )
    if "agents" in value:
        agents = value["agents"]
        if not isinstance(agents, list) or not 1 <= len(agents) <= MAX_TARGET_AGENTS:
            raise InvalidMessage(
                f"'target.agents' must be a list of 1 to {MAX_TARGET_AGENTS} agent ids"
            )
        return Target(agents=frozenset(parse_uuid(agent, "target.agents") for agent in agents))
    return Target(labels=frozen_map(parse_labels(value["labels"], "target.labels", empty=False)))


def parse_labels(value: object, name: str, empty: bool = True) -> dict[str, str]:
    """Labels ``{key: value}``: keys ``[A-Za-z0-9_./-]{1,63}``, values
    ``[A-Za-z0-9_.-]{0,63}``, at most :data:`MAX_LABELS`."""
    if not isinstance(value, Mapping) or len(value) > MAX_LABELS or (not empty and not value):
        least = 0 if empty else 1
        raise InvalidMessage(f"'{name}' must be an object of {least} to {MAX_LABELS} labels")
    labels = {}
    for key, text in value.items():
        if not isinstance(key, str) or LABEL_KEY.fullmatch(key) is None:
            raise InvalidMessage(
                f"'{name}': label key {str(key)[:70]!r} must be 1 to 63 of A-Z a-z 0-9 _ . / -"
            )
        if not isinstance(text, str) or LABEL_VALUE.fullmatch(text) is None:
            raise InvalidMessage(
                f"'{name}': the value of label {key!r} must be 0 to 63 of A-Z a-z 0-9 _ . -"
            )
        labels[key] = text
    return labels


def parse_env(value: object) -> Mapping[str, str]:
    """``{"NAME": "value"}``; messages name the variable, never its value."""
    if not isinstance(value, Mapping) or len(value) > MAX_ENV_VARIABLES:
        raise InvalidMessage(f"'env' must be an object of at most {MAX_ENV_VARIABLES} variables")
    env = {}
    for name, text in value.items():
        if not isinstance(name, str) or _ENV_NAME.fullmatch(name) is None or len(name) > 255:
            raise InvalidMessage(
                f"'env': {str(name)[:70]!r} is not a variable name (a letter or _, then "
                "letters, digits or _)"
            )
        if name.upper().startswith(RESERVED_ENV_PREFIX):
            raise InvalidMessage(
                f"'env': {name} is reserved: the agent sets the {RESERVED_ENV_PREFIX}* "
                "variables of each run itself"
            )
        if not isinstance(text, str):
            raise InvalidMessage(f"'env': the value of {name} must be a string")
        if "\x00" in text or len(utf8_of(text, f"env.{name}")) > MAX_ENV_VALUE_BYTES:
            raise InvalidMessage(
                f"'env': the value of {name} must be at most {MAX_ENV_VALUE_BYTES} bytes "
                "of UTF-8, without NUL"
            )
        env[name] = text
    return frozen_map(env)


def parse_working_dir(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise InvalidMessage("'working_dir' must be an absolute path (starting with /) or null")
    if "\x00" in value or len(utf8_of(value, "working_dir")) > MAX_PATH_BYTES:
        raise InvalidMessage(
            f"'working_dir' must be at most {MAX_PATH_BYTES} bytes of UTF-8, without NUL"
        )
    return value


def env_names(options: TaskOptions) -> list[str]:
    """What audit records and logs say of a task's environment: its names only."""
    return sorted(options.env)
