"""One captured stream of a run (:class:`Output`) and its JSON form.

Output is bytes end to end. On the wire a stream travels as ``stdout`` (UTF-8 text,
invalid bytes replaced, so any JSON client can read it) and, only when that text is
lossy, also as ``stdout_base64`` (the exact bytes). Empty streams are omitted, as the
seed asks.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from taskscheduler.protocol.fields import InvalidMessage, parse_int

#: Largest size a stream may declare (``stdout_bytes``): 2**53 - 1, the largest integer
#: every JSON client reads exactly, and more than a run writing 10 GB/s for the longest
#: time limit (a week: 6e15 bytes) could produce.
MAX_OUTPUT_SIZE = 2**53 - 1


@dataclass(frozen=True)
class Output:
    """One captured stream: what was kept, and how big the original was."""

    data: bytes = b""
    size: int = 0  # bytes the process wrote, before any truncation
    truncated: bool = False  # True when head and tail were kept and the middle dropped

    @classmethod
    def of(cls, data: bytes) -> Output:
        return cls(data, len(data), False)

    def trimmed(self, keep: int) -> Output:
        """At most ``keep`` bytes of it: the first and the last halves, the middle dropped,
        flagged truncated, the original size kept. Cuts fall between UTF-8 characters, so
        that text stays text."""
        if len(self.data) <= keep:
            return self
        data = self.data
        head = keep // 2
        while 0 < head < len(data) and data[head] & 0xC0 == 0x80:
            head -= 1  # not inside a character: before it
        tail = len(data) - (keep - keep // 2)
        while tail < len(data) and data[tail] & 0xC0 == 0x80:
            tail += 1  # after it
        return Output(data[:head] + data[tail:], self.size, True)


def output_to_json(name: str, output: Output, *, for_people: bool = True) -> dict[str, Any]:
    """The JSON form of one stream: omitted entirely when the process wrote nothing.

    Bytes that are not valid UTF-8 travel exactly as ``<name>_base64``. For people (the
    API's answers) the text with replacement characters comes too; between the daemons
    it is left out, so a lossy result is not sent twice over (and stays under the
    server's body limit).
    """
    if output.size == 0 and not output.data:
        return {}
    text = output.data.decode("utf-8", errors="replace")
    lossy = text.encode("utf-8") != output.data
    body: dict[str, Any] = {name: text} if for_people or not lossy else {}
    body[f"{name}_bytes"] = output.size
    if output.truncated:
        body[f"{name}_truncated"] = True
    if lossy:
        body[f"{name}_base64"] = base64.b64encode(output.data).decode("ascii")
    return body


def parse_output(body: Mapping[str, Any], name: str) -> Output:
    encoded = body.get(f"{name}_base64")
    if encoded is not None:
        if not isinstance(encoded, str):
            raise InvalidMessage(f"'{name}_base64' must be a base64 string")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidMessage(f"'{name}_base64' is not valid base64") from None
    else:
        text = body.get(name, "")
        if text is None:
            text = ""
        if not isinstance(text, str):
            raise InvalidMessage(f"'{name}' must be a string")
        data = text.encode("utf-8", errors="replace")
    # The declared size is at least what is carried (more means the middle was dropped:
    # flagged truncated even if the flag is missing) and at most what a run can write.
    size = body.get(f"{name}_bytes", len(data))
    size = parse_int(size, f"{name}_bytes", len(data), MAX_OUTPUT_SIZE)
    truncated = body.get(f"{name}_truncated", False)
    if not isinstance(truncated, bool):
        raise InvalidMessage(f"'{name}_truncated' must be true or false")
    return Output(data, size, truncated or size > len(data))
