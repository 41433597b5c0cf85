"""A task's webhook (the ``notify`` option): which events are sent, and where.

``{"on": ["failed", "timed_out", "lost", "recovered"], "url": "https://..."}``; ``null``
means the server-wide default (``--notify-url``, ``--notify-on``). The URL is checked
here, once, for every way it comes in (an operator's request, the store, the server's
options): http(s) only, no credentials in it, bounded, and never a link-local address
(cloud metadata services live there: a webhook must not become a way to read them).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from taskscheduler.protocol.fields import InvalidMessage

MAX_URL_LENGTH = 2048


class NotifyEvent(enum.StrEnum):
    """What a webhook says: a run's final status, or that the task works again."""

    FAILED = "failed"
    TIMED_OUT = "timed_out"
    LOST = "lost"
    RECOVERED = "recovered"


ALL_EVENTS = frozenset(NotifyEvent)

#: Host names of cloud metadata services besides their link-local addresses.
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog"})


@dataclass(frozen=True)
class NotifyConfig:
    url: str
    on: frozenset[NotifyEvent] = ALL_EVENTS


def notify_to_json(config: NotifyConfig | None) -> dict[str, Any] | None:
    if config is None:
        return None
    return {"on": sorted(e.value for e in config.on), "url": config.url}


def parse_notify(value: object, name: str = "notify") -> NotifyConfig | None:
    """``null`` (the server's default) or ``{"url": ..., "on": [events]}`` (``on``
    absent: every event)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not {"url"} <= set(value) <= {"url", "on"}:
        raise InvalidMessage(
            f"'{name}' must be null (the server's default) or "
            '{"url": "https://...", "on": ["failed", "timed_out", "lost", "recovered"]}'
        )
    on = parse_events(value.get("on", sorted(ALL_EVENTS)), f"{name}.on")
    return NotifyConfig(url=check_webhook_url(value["url"], f"{name}.url"), on=on)


def parse_events(value: object, name: str) -> frozenset[NotifyEvent]:
    """A non-empty list of distinct events."""
    allowed = ", ".join(f'"{e.value}"' for e in NotifyEvent)
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, str) and v in ALL_EVENTS for v in value)
        or len(set(value)) != len(value)
    ):
        raise InvalidMessage(f"'{name}' must be a non-empty list of distinct {allowed}")
    return frozenset(NotifyEvent(v) for v in value)


def parse_events_text(text: str, name: str) -> frozenset[NotifyEvent]:
    """``failed,recovered`` (a command line's form) as events."""
    return parse_events([part.strip() for part in text.split(",") if part.strip()], name)


def check_webhook_url(value: object, name: str) -> str:
    """``value`` if it is an http(s) URL a webhook may go to (see the module docstring)."""
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_URL_LENGTH:
        raise InvalidMessage(f"'{name}' must be an http(s) URL of at most {MAX_URL_LENGTH} chars")
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise InvalidMessage(f"'{name}' is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise InvalidMessage(f"'{name}' must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidMessage(f"'{name}' must not carry a user name or password")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise InvalidMessage(f"'{name}' must not contain spaces or control characters")
    refused = refused_host(host)
    if refused:
        raise InvalidMessage(f"'{name}': {refused}")
    return value


def refused_host(host: str) -> str | None:
    """Why a webhook may not go to ``host`` (a name or a literal address), or None."""
    if host.lower().rstrip(".") in METADATA_HOSTS:
        return f"{host} is a cloud metadata service: webhooks may not go there"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None  # a name: checked again, resolved, just before each delivery
    return refused_address(address)


def refused_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a webhook may not go to ``address``: link-local (where metadata services
    answer) or unspecified. Loopback and private addresses are allowed: the operator
    chooses the receiver, and in-house relays live there."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_link_local or address.is_unspecified or address.is_multicast:
        return f"{address} is a link-local, unspecified or multicast address"
    return None


def events_text(events: Iterable[NotifyEvent]) -> str:
    return ",".join(sorted(e.value for e in events))
