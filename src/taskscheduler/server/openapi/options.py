"""The OpenAPI document's task options (targeting, run-on-one, overlap, retries, env,
working dir, webhook), with the limits of :mod:`taskscheduler.protocol.options` that
enforce them."""

from __future__ import annotations

from typing import Any

from taskscheduler.protocol import options as o
from taskscheduler.protocol.notify import MAX_URL_LENGTH, NotifyEvent
from taskscheduler.server.openapi.operations import nullable, ref

_RESERVED = "".join(f"[{c}{c.lower()}]" if c.isalpha() else c for c in o.RESERVED_ENV_PREFIX)

_TARGET = {
    "oneOf": [
        {
            "type": "object",
            "required": ["agents"],
            "additionalProperties": False,
            "properties": {
                "agents": {
                    "type": "array",
                    "items": ref("Uuid"),
                    "minItems": 1,
                    "maxItems": o.MAX_TARGET_AGENTS,
                }
            },
        },
        {
            "type": "object",
            "required": ["labels"],
            "additionalProperties": False,
            "properties": {"labels": ref("TargetLabels")},
        },
    ]
}


def option_fields(operator: bool) -> dict[str, Any]:
    """The option fields: as operators send them (``operator``: each may be null, for
    unchanged or the default) or as a task shows them (every one, defaults included)."""

    def maybe_null(schema: dict[str, Any]) -> dict[str, Any]:
        return nullable(schema) if operator else schema

    return {
        "target": {
            **nullable(_TARGET),
            "description": "the agents it runs on: null (every agent of the fleet), "
            '`{"agents": [ids]}` or `{"labels": {...}}` (every label given must match); only '
            "the members whose agent matches run it (a member with no agent enrolled yet: "
            "only an untargeted task); an id no live agent has is a 400",
        },
        "run_on": {
            **maybe_null({"type": "string", "enum": [r.value for r in o.RunOn]}),
            "description": "`all` (default): every matching agent runs each instant; `one`: "
            "exactly one live matching agent does",
        },
        "overlap": {
            **maybe_null({"type": "string", "enum": [v.value for v in o.Overlap]}),
            "description": "while a run of the task is still going: `skip` (default) the "
            "new instant, `allow` it (up to `max_concurrent`), or `replace` the running one",
        },
        "max_concurrent": {
            **maybe_null({"type": "integer", "minimum": 1, "maximum": o.MAX_CONCURRENT}),
            "description": f"runs of the task at once on one agent; only with overlap "
            f"`allow` (default then {o.DEFAULT_ALLOW_CONCURRENT}; otherwise 1)",
        },
        "retries": {
            **maybe_null({"type": "integer", "minimum": 0, "maximum": o.MAX_RETRIES}),
            "description": "times a failed or timed-out run is tried again on the same "
            "agent, never past the next instant (default 0)",
        },
        "retry_delay_seconds": {
            **maybe_null({"type": "integer", "minimum": 0, "maximum": o.MAX_RETRY_DELAY_SECONDS}),
            "description": "the wait before each retry; only with `retries` above 0 "
            f"(default {int(o.DEFAULT_RETRY_DELAY.total_seconds())})",
        },
        "env": {
            **maybe_null(
                {
                    "type": "object",
                    "maxProperties": o.MAX_ENV_VARIABLES,
                    "propertyNames": {
                        "pattern": f"^(?!{_RESERVED})[A-Za-z_][A-Za-z0-9_]{{0,254}}$"
                    },
                    "additionalProperties": {
                        "type": "string",
                        "maxLength": o.MAX_ENV_VALUE_BYTES,
                        "pattern": "^[^\\u0000]*$",
                    },
                }
            ),
            "description": "variables added to each run's environment (values at most "
            f"{o.MAX_ENV_VALUE_BYTES} bytes of UTF-8; `{o.RESERVED_ENV_PREFIX}*` reserved); "
            "audit records keep the names only",
        },
        "working_dir": {
            **nullable(
                {"type": "string", "maxLength": o.MAX_PATH_BYTES, "pattern": "^/[^\\u0000]*$"}
            ),
            "description": "the run's working directory, an absolute path on the agent "
            "(null: the agent's own); a run whose directory is missing fails, saying so",
        },
        "notify": {
            **nullable(ref("Notify")),
            "description": "its webhook (null: the server's `--notify-url`, if any): a "
            "signed JSON POST when it starts failing on an agent and when it recovers "
            "(see Notifications in the README)",
        },
    }


def schemas() -> dict[str, Any]:
    return {
        "TargetLabels": {
            "type": "object",
            "maxProperties": o.MAX_LABELS,
            "minProperties": 1,
            "propertyNames": {"pattern": "^[A-Za-z0-9_./-]{1,63}$"},
            "additionalProperties": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{0,63}$"},
            "description": "labels `key: value` (an agent's `--label key=value`)",
        },
        "Notify": {
            "type": "object",
            "required": ["url"],
            "additionalProperties": False,
            "properties": {
                "url": {
                    "type": "string",
                    "maxLength": MAX_URL_LENGTH,
                    "pattern": "^[hH][tT][tT][pP][sS]?://",
                    "description": "http(s), no user name or password; link-local "
                    "addresses and metadata hosts are refused",
                },
                "on": {
                    "type": "array",
                    "items": {"type": "string", "enum": sorted(e.value for e in NotifyEvent)},
                    "minItems": 1,
                    "uniqueItems": True,
                    "description": "the events sent (default: all)",
                },
            },
        },
    }
