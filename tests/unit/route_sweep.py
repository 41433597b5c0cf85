"""Enumerate every route and method of a Klein app, for the access-control sweeps."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

from klein import Klein

#: Routes anyone may call, on either daemon. Everything else must refuse anonymous,
#: wrong and revoked credentials.
PUBLIC = {
    ("GET", "/api/v1/health"),
    ("HEAD", "/api/v1/health"),
    # The server's OpenAPI document: it describes the routes, and holds no secret.
    ("GET", "/api/v1/openapi.json"),
    ("HEAD", "/api/v1/openapi.json"),
    # The dashboard's page and static files: no data in them (the page reads the API with
    # the operator's token).
    ("GET", "/"),
    ("HEAD", "/"),
    ("GET", "/dashboard/<asset>"),
    ("HEAD", "/dashboard/<asset>"),
}
#: What a public route's variable is set to in a sweep, when it names a file, not an id.
EXAMPLES = {"<asset>": "app.js"}


def routes(app: Klein) -> Iterator[tuple[str, str, str]]:
    """(method, rule, endpoint) for every route of ``app``, HEAD and OPTIONS included."""
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods or ()):
            yield method, rule.rule, str(rule.endpoint)


def concrete(rule: str) -> str:
    """The rule with every ``<variable>`` replaced by a fresh UUID (or its example)."""
    return re.sub(r"<[^>]+>", lambda m: EXAMPLES.get(m.group(0), str(uuid.uuid4())), rule)


#: Every method a client might try on a path.
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def fixed_routes(app: Klein) -> dict[str, set[str]]:
    """The methods of each route path without a variable part."""
    fixed: dict[str, set[str]] = {}
    for method, rule, _ in routes(app):
        if "<" not in rule:
            fixed.setdefault(rule, set()).add(method)
    return fixed


def disguises(path: str) -> list[str]:
    """``path`` as a client may spell it so that twisted.web decodes it back to ``path``:
    one ``/`` at a time as ``%2F``, and the first letter of each segment percent-encoded."""
    segments = path.split("/")[1:]
    spelled = []
    for i in range(1, len(segments)):
        spelled.append("/" + "/".join(segments[:i]) + "%2F" + "/".join(segments[i:]))
    for i, segment in enumerate(segments):
        encoded = f"%{ord(segment[0]):02X}" + segment[1:]
        spelled.append("/" + "/".join([*segments[:i], encoded, *segments[i + 1 :]]))
    return spelled
