"""Agent labels (``role=web``): what an agent says it is, so that a task may target it.

An agent takes them on its command line (``--label k=v``, repeatable) and sends them at
enrolment and in every heartbeat; the server stores the last ones it heard. A label is
checked by the rules a task's target names them by (:mod:`.options`: ``LABEL_KEY``,
``LABEL_VALUE``, ``MAX_LABELS``), so that any label an agent carries can be targeted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from taskscheduler.protocol import options
from taskscheduler.protocol.fields import InvalidMessage
from taskscheduler.protocol.options import LABEL_KEY, LABEL_VALUE, MAX_LABELS

#: No labels: what an agent that predates them, or has none, carries.
NO_LABELS: Mapping[str, str] = MappingProxyType({})


def check_label(key: str, value: str) -> None:
    """Raise :class:`InvalidMessage` saying what is wrong with ``key=value``, if anything."""
    if not LABEL_KEY.fullmatch(key):
        raise InvalidMessage(
            f"label key {key[:80]!r} must be 1 to 63 letters, digits, '_', '.', '/' or '-'"
        )
    if not LABEL_VALUE.fullmatch(value):
        raise InvalidMessage(
            f"label {key}={value[:80]!r}: the value must be at most 63 letters, digits, "
            "'_', '.' or '-'"
        )


def labels_from_pairs(pairs: Iterable[tuple[str, str]]) -> Mapping[str, str]:
    """Labels from ``(key, value)`` pairs in order: each checked, no key twice, at most
    :data:`MAX_LABELS`."""
    labels: dict[str, str] = {}
    for key, value in pairs:
        check_label(key, value)
        if key in labels:
            raise InvalidMessage(f"label {key!r} is given twice")
        labels[key] = value
        if len(labels) > MAX_LABELS:
            raise InvalidMessage(f"at most {MAX_LABELS} labels")
    return MappingProxyType(labels)


def parse_label_text(text: str) -> tuple[str, str]:
    """``k=v`` (as ``--label`` takes it) -> ``(k, v)``, checked."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidMessage(f"label {text[:80]!r} must be KEY=VALUE, like role=web")
    check_label(key, value)
    return key, value


def parse_labels(value: object, name: str = "labels") -> Mapping[str, str]:
    """An agent's labels as JSON (``{"role": "web"}``); absent (None): it has none."""
    if value is None:
        return NO_LABELS
    return MappingProxyType(options.parse_labels(value, name))


def labels_text(labels: Mapping[str, str]) -> str:
    """``dc=eu,role=web``: labels in one short line, keys sorted (logs, the CLI)."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))
