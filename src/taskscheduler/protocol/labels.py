"""Agent labels (``role=web``): what an agent says it is, so that a task may target it.

An agent takes them on its command line (``--label k=v``, repeatable) and sends them at
enrolment and in every heartbeat; the server stores the last ones it heard. The rules
are the same wherever a label is read (the agent's options, the server's routes, a
task's target), so they live here, once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from taskscheduler.protocol.fields import InvalidMessage

#: Most labels an agent carries (and a task's target names).
MAX_LABELS = 20
#: A key: 1 to 63 letters, digits, ``_ . / -``; a value: 0 to 63 of those less ``/``.
LABEL_KEY = re.compile(r"[A-Za-z0-9_./-]{1,63}")
LABEL_VALUE = re.compile(r"[A-Za-z0-9_.-]{0,63}")

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
    """A JSON object of labels (``{"role": "web"}``); None means none."""
    if value is None:
        return NO_LABELS
    if not isinstance(value, Mapping):
        raise InvalidMessage(f"'{name}' must be an object of label keys to values")
    if len(value) > MAX_LABELS:
        raise InvalidMessage(f"'{name}' holds at most {MAX_LABELS} labels")
    pairs = []
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise InvalidMessage(f"'{name}': every label key and value must be a string")
        pairs.append((key, item))
    try:
        return labels_from_pairs(pairs)
    except InvalidMessage as e:
        raise InvalidMessage(f"'{name}': {e}") from None


def labels_text(labels: Mapping[str, str]) -> str:
    """``dc=eu,role=web``: labels in one short line, keys sorted (logs, the CLI)."""
    return ",".join(f"{k}={labels[k]}" for k in sorted(labels))
