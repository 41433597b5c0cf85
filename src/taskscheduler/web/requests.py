"""Reading a request, for both daemons' routes: its JSON body, its query parameters, its
path's ids, its raw body and its peer. What is malformed raises an error of the table."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from twisted.web.iweb import IRequest

from taskscheduler import protocol
from taskscheduler.protocol import InvalidMessage
from taskscheduler.schedule import InstantOutOfRange, parse_instant
from taskscheduler.web.errors import (
    BAD_REQUEST,
    INVALID_JSON,
    INVALID_TASK_ID,
    UNSUPPORTED_MEDIA_TYPE,
)


def read_json(request: IRequest) -> Any:
    """The request body as JSON, or ApiError 415 / 400 with a clear message."""
    content_type = request.getHeader(b"Content-Type") or b""
    media_type = content_type.split(b";", 1)[0].strip().lower()
    if media_type != b"application/json":
        raise UNSUPPORTED_MEDIA_TYPE()
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        raise INVALID_JSON("the request body is empty; a JSON object is required")
    try:
        # Decoded here: json.loads would take UTF-16 and UTF-32 bytes too (RFC 8259: JSON
        # exchanged between systems is UTF-8).
        return json.loads(bytes(raw).decode("utf-8"))
    except UnicodeDecodeError:
        raise INVALID_JSON(
            "the request body is not valid UTF-8: send JSON encoded as UTF-8"
        ) from None
    except json.JSONDecodeError as e:
        raise INVALID_JSON(f"the request body is not valid JSON: {e}") from None
    except ValueError:
        # Python refuses to convert an integer of over 4300 digits (a ValueError that is
        # no JSONDecodeError): no field needs one.
        raise INVALID_JSON("the request body holds a number with too many digits") from None
    except RecursionError:
        raise INVALID_JSON("the request body is nested too deeply") from None


def request_body(request: IRequest) -> bytes:
    """The whole request body, leaving the stream where a later reader expects it."""
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    data = content.read()
    content.seek(0)
    return bytes(data)


def peer_address(request: IRequest) -> str:
    """The client's address, for the audit log."""
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return str(host) if host is not None else str(peer)


def path_task_id(value: str) -> uuid.UUID:
    """A task id from a route's path, or 400 ``invalid_task_id``."""
    try:
        return protocol.parse_uuid(value, "task_id")
    except InvalidMessage as e:
        raise INVALID_TASK_ID(str(e)) from None


def query_arg(request: IRequest, name: str) -> str | None:
    """The last value of query parameter ``name``, or None; 400 if it is not UTF-8."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return bytes(values[-1]).decode("utf-8")
    except UnicodeDecodeError:
        raise BAD_REQUEST(f"query parameter '{name}' is not valid UTF-8") from None


def query_int(request: IRequest, name: str, default: int, low: int, high: int) -> int:
    """Query parameter ``name`` as an integer from ``low`` to ``high``, or ``default``."""
    text = query_arg(request, name)
    if text is None:
        return default
    # Its length first: Python refuses to convert more than 4300 digits (a ValueError).
    if (
        not text.isascii()
        or not text.isdigit()
        or len(text) > len(str(high))
        or not low <= int(text) <= high
    ):
        raise BAD_REQUEST(f"query parameter '{name}' must be an integer from {low} to {high}")
    return int(text)


def query_instant(request: IRequest, name: str) -> datetime | None:
    """Query parameter ``name`` as an RFC 3339 instant, or None."""
    text = query_arg(request, name)
    if text is None:
        return None
    try:
        return parse_instant(text)
    except InstantOutOfRange as e:
        raise BAD_REQUEST(f"query parameter '{name}': {e}") from None
    except ValueError:
        raise BAD_REQUEST(
            f"query parameter '{name}' must be an RFC 3339 timestamp with a time zone"
        ) from None
