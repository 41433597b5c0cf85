"""What a webhook sends: its JSON body (a Slack-compatible ``text`` and the structured
fields), the HMAC-SHA256 signature over the exact body bytes, and the secret it is
signed with.

The body names the task by id and schedule, never by command (a command may hold a
secret, and the receiver is a chat room). The signature covers the timestamp too::

    X-Taskscheduler-Timestamp: 1764530100
    X-Taskscheduler-Signature: sha256=hex(HMAC-SHA256(secret, b"1764530100." + body))

so a captured request cannot be replayed later with a fresh timestamp. A receiver
recomputes the HMAC over the raw body as received (before parsing it), compares it in
constant time, and refuses timestamps more than a few minutes away from its clock
(:func:`verify` does exactly that; the README shows it as a standalone snippet).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

from taskscheduler.protocol.notify import NotifyEvent
from taskscheduler.schedule import format_instant
from taskscheduler.server.notify.rules import Notification
from taskscheduler.server.store.records import Task
from taskscheduler.signing import KeyFileError, write_private_file

SIGNATURE_HEADER = "X-Taskscheduler-Signature"
TIMESTAMP_HEADER = "X-Taskscheduler-Timestamp"
DELIVERY_HEADER = "X-Taskscheduler-Delivery"
#: How far a receiver following :func:`verify` lets a timestamp be from its clock.
DEFAULT_TOLERANCE = 300
MIN_SECRET_BYTES = 16

_WORDS = {
    NotifyEvent.FAILED: "failed",
    NotifyEvent.TIMED_OUT: "timed out",
    NotifyEvent.LOST: "was lost (its agent died during the run)",
    NotifyEvent.RECOVERED: "recovered (succeeded again)",
}


def schedule_text(task: Task | None) -> str | None:
    if task is None:
        return None
    spec = task.spec
    if spec.cron is not None:
        return f"cron {spec.cron.expression} ({spec.cron.timezone})"
    return str(spec.frequency)


def execution_path(notification: Notification) -> str:
    at = format_instant(notification.scheduled_at)
    return f"/api/v1/tasks/{notification.task_id}/executions/{at}"


def payload(notification: Notification, task: Task | None, base_url: str | None) -> dict[str, Any]:
    """The webhook's JSON body, as a dict."""
    n = notification
    schedule = schedule_text(task)
    path = execution_path(n)
    link = None if base_url is None else base_url.rstrip("/") + path
    text = f"taskscheduler: task {n.task_id}"
    if schedule:
        text += f" ({schedule})"
    text += f" {_WORDS[n.event]} on agent {n.agent_id} at {format_instant(n.scheduled_at)}"
    if n.event is not NotifyEvent.RECOVERED and n.exit_code is not None:
        text += f", exit code {n.exit_code}"
    if link:
        text += f" - {link}"
    return {
        "text": text,
        "event": n.event.value,
        "notification_id": n.notification_id,
        "task_id": str(n.task_id),
        "schedule": schedule,
        "agent_id": str(n.agent_id),
        "scheduled_at": format_instant(n.scheduled_at),
        "status": n.result_status.value,
        "exit_code": n.exit_code,
        "execution": path,
        "execution_url": link,
    }


def body_bytes(notification: Notification, task: Task | None, base_url: str | None) -> bytes:
    return json.dumps(payload(notification, task, base_url), separators=(",", ":")).encode()


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=<hex>`` over ``b"<timestamp>." + body``."""
    mac = hmac.new(secret, str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def signed_headers(
    secret: bytes, timestamp: int, body: bytes, delivery: int
) -> dict[bytes, list[bytes]]:
    return {
        b"Content-Type": [b"application/json"],
        b"User-Agent": [b"taskscheduler-webhook"],
        TIMESTAMP_HEADER.encode(): [str(timestamp).encode("ascii")],
        SIGNATURE_HEADER.encode(): [signature(secret, timestamp, body).encode("ascii")],
        DELIVERY_HEADER.encode(): [str(delivery).encode("ascii")],
    }


def verify(
    secret: bytes,
    body: bytes,
    timestamp: str,
    signature_header: str,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE,
) -> bool:
    """What a receiver checks: the timestamp is recent and the signature is the body's."""
    try:
        sent = int(timestamp)
    except ValueError:
        return False
    if abs(now - sent) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, sent, body), signature_header)


def load_or_create_secret(path: Path, create: bool) -> bytes:
    """The webhook secret in ``path`` (its text, stripped), created (0600, 32 random
    bytes as hex) when ``create`` and the file does not exist yet."""
    if create and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_private_file(path, (secrets.token_hex(32) + "\n").encode("ascii"))
    try:
        text = path.read_bytes().strip()
    except OSError as e:
        raise KeyFileError(f"cannot read the webhook secret {str(path)!r}: {e.strerror}") from None
    if len(text) < MIN_SECRET_BYTES:
        raise KeyFileError(
            f"the webhook secret {str(path)!r} is shorter than {MIN_SECRET_BYTES} bytes"
        )
    if path.stat().st_mode & 0o077:
        raise KeyFileError(f"the webhook secret {str(path)!r} is readable by others; chmod 600 it")
    return text
