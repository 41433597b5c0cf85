"""Enumerate every route and method of a Klein app, for the access-control sweeps."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

from klein import Klein

#: Routes anyone may call, on either daemon. Everything else must refuse anonymous,
#: wrong and revoked credentials.
PUBLIC = {("GET", "/api/v1/health"), ("HEAD", "/api/v1/health")}


def routes(app: Klein) -> Iterator[tuple[str, str, str]]:
    """(method, rule, endpoint) for every route of ``app``, HEAD and OPTIONS included."""
    for rule in app.url_map.iter_rules():
        for method in sorted(rule.methods or ()):
            yield method, rule.rule, str(rule.endpoint)


def concrete(rule: str) -> str:
    """The rule with every ``<variable>`` replaced by a fresh UUID."""
    return re.sub(r"<[^>]+>", lambda _: str(uuid.uuid4()), rule)
