"""Keeping secrets out of logs: passwords in database DSNs, and our tokens in any text."""

from __future__ import annotations

import re
from urllib.parse import unquote

from taskscheduler.auth import AGENT_PREFIX, JOIN_PREFIX, OPERATOR_PREFIX

REDACTED = "***"

_URI_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>.*)$", re.DOTALL)
_QUERY_PARAM_RE = re.compile(r"([?&])([^=&#]*)=([^&#]*)")
_SECRET_KEYS = frozenset({"password", "sslpassword"})
_KEYWORD_SECRET_RE = re.compile(r"(?i)(?<![\w])((?:ssl)?password)\s*=\s*(?:'(?:[^'\\]|\\.)*'?|\S*)")


def redact_dsn(dsn: str) -> str:
    """A database DSN (or any URL) with its password replaced by ``***``.

    Handles both libpq forms: ``postgresql://user:secret@host/db?sslpassword=x`` and
    ``host=db user=app password='se cret'``, with one host or several (``host=a,b``,
    ``postgresql://user:secret@a:5432,b:5433/db``); libpq decodes a URI's parameter
    names too, so ``pass%77ord=`` is a password. When in doubt it hides more, never less.
    """
    match = _URI_RE.match(dsn)
    if match is None:
        return _KEYWORD_SECRET_RE.sub(lambda m: f"{m.group(1)}={REDACTED}", dsn)
    scheme, rest = match.group("scheme"), match.group("rest")
    # The user information ends at the last '@' before the query: a password may itself
    # contain '@' or '/', and hiding part of the host is better than showing a password.
    head, question, query = rest.partition("?")
    at = head.rfind("@")
    if at >= 0:
        userinfo, host = head[:at], head[at:]
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":" + REDACTED
        head = userinfo + host
    redacted = scheme + head + question + query
    return _QUERY_PARAM_RE.sub(_hide_query_secret, redacted)


def _hide_query_secret(match: re.Match[str]) -> str:
    if unquote(match.group(2)).strip().lower() in _SECRET_KEYS:
        return f"{match.group(1)}{match.group(2)}={REDACTED}"
    return match.group(0)


def redact_tokens(text: str) -> str:
    """``text`` with anything shaped like one of our tokens replaced by ``<prefix>***``."""
    return _TOKEN_IN_TEXT_RE.sub(lambda m: m.group(1) + REDACTED, text)


_TOKEN_IN_TEXT_RE = re.compile(
    "(" + "|".join(re.escape(p) for p in (OPERATOR_PREFIX, AGENT_PREFIX, JOIN_PREFIX)) + ")"
    r"[A-Za-z0-9_\-]{8,}"
)
