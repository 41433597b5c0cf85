"""Bearer tokens, the operators' token file, loopback detection and redaction.

The security building blocks both daemons share:

- tokens are 256-bit random strings with a readable prefix (``tso_`` operator, ``tsa_``
  agent credential, ``tsj_`` join secret) and are only ever stored as ``sha256:<hex>``;
- :class:`TokenFile` holds the operators' tokens, from a file that is re-read when it
  changes (so a token is revoked by deleting its line, without a restart) or from the
  value of an environment variable;
- :func:`is_loopback_endpoint` tells whether a server endpoint string listens only on this
  machine: the one case where a server may run without operator tokens;
- :func:`redact_dsn` and :func:`token_fingerprint` keep secrets out of logs.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

#: Prefix of an operator's API token.
OPERATOR_PREFIX = "tso_"
#: Prefix of the credential the server issues to an enrolled agent.
AGENT_PREFIX = "tsa_"
#: Prefix of a join secret, which lets a new agent enrol once.
JOIN_PREFIX = "tsj_"
#: Random bytes in every token: 256 bits, so a token cannot be guessed.
TOKEN_BYTES = 32

HASH_SCHEME = "sha256:"
_HASH_RE = re.compile(r"sha256:[0-9a-f]{64}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")
# RFC 6750 b64token: what may follow "Bearer ".
_B64TOKEN_RE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: Longest token accepted from a client; ours are 47 characters.
MAX_TOKEN_LENGTH = 512

_log = Logger(namespace="taskscheduler.auth")


# -- tokens ----------------------------------------------------------------------------


def new_token(prefix: str = OPERATOR_PREFIX) -> str:
    """A fresh random token: ``prefix`` plus 256 random bits, URL-safe base64."""
    return prefix + secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """The stored form of a token: ``sha256:<64 hex digits>``.

    A single fast hash is right here, unlike for passwords: our tokens carry 256 random
    bits, so nobody can enumerate candidates to test against a leaked hash, and a slow
    hash would only make every authenticated request slow.
    """
    return HASH_SCHEME + hashlib.sha256(token.encode("utf-8")).hexdigest()


def verify_token(token: str, token_hash: str) -> bool:
    """Whether ``token`` hashes to ``token_hash``, compared in constant time."""
    return hmac.compare_digest(hash_token(token), token_hash.lower())


def token_fingerprint(token: str) -> str:
    """A short, safe name for a token in logs: the first 12 hex digits of its hash."""
    return hash_token(token)[len(HASH_SCHEME) : len(HASH_SCHEME) + 12]


def is_valid_principal_name(name: str) -> bool:
    """Names in the tokens file: a letter or digit, then up to 127 of ``A-Za-z0-9._@+-``."""
    return _NAME_RE.fullmatch(name) is not None


def parse_bearer(header_value: str | bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header value, or None.

    The scheme is case-insensitive (RFC 7235); anything else (another scheme, no token,
    two tokens, characters outside RFC 6750's token alphabet, an absurd length) is None.
    """
    if header_value is None:
        return None
    if isinstance(header_value, bytes):
        try:
            header_value = header_value.decode("ascii")
        except UnicodeDecodeError:
            return None
    scheme, _, token = header_value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    if _B64TOKEN_RE.fullmatch(token) is None:
        return None
    return token


def bearer_token(request: IRequest) -> str | None:
    """The bearer token a request carries, or None (also when it sends two headers)."""
    values = request.requestHeaders.getRawHeaders(b"authorization")
    if not values or len(values) != 1:
        return None
    return parse_bearer(values[0])


# -- the operators' tokens ---------------------------------------------------------------


class TokenFileError(ValueError):
    """The tokens configuration is invalid; ``str()`` names the place, never a secret."""


def parse_token_lines(lines: Iterable[str], source: str, what: str = "line") -> dict[str, str]:
    """Parse ``<name> sha256:<hex>`` entries into ``{hash: name}``.

    Blank entries and ``#`` comments are skipped. An invalid entry raises
    :class:`TokenFileError` naming ``source`` and the entry's number, and never repeats
    the entry's content: it may be a token pasted where its hash belongs.
    """
    by_hash: dict[str, str] = {}
    for number, raw in enumerate(lines, start=1):
        text = raw.split("#", 1)[0].strip()
        if not text:
            continue
        where = f"{source} {what} {number}"
        fields = text.split()
        if len(fields) != 2:
            raise TokenFileError(
                f"{where}: expected '<name> sha256:<64 hex digits>' (two fields separated "
                f"by whitespace), found {len(fields)} field(s)"
            )
        name, token_hash = fields[0], fields[1].lower()
        if not is_valid_principal_name(name):
            raise TokenFileError(
                f"{where}: the name must start with a letter or digit and contain only "
                "letters, digits and . _ @ + - (at most 128 characters)"
            )
        if _HASH_RE.fullmatch(token_hash) is None:
            raise TokenFileError(
                f"{where}: the second field is not 'sha256:' followed by 64 hex digits; "
                "store the hash of a token, never the token itself "
                "(python -m taskscheduler.tokens hash)"
            )
        if token_hash in by_hash:
            raise TokenFileError(f"{where}: this hash already appears earlier")
        by_hash[token_hash] = name
    return by_hash


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class TokenFile:
    """Operators' API tokens, stored as hashes, looked up by the hash of what a client sends.

    Built from a file (:meth:`from_path`), it re-reads the file when its (mtime, size,
    inode) changes, checking at most once every ``check_interval`` seconds of ``clock``:
    deleting a line revokes that token within a second, without a restart. If the file
    becomes unreadable or invalid, every token is refused until it is fixed: a typo while
    revoking a token must not keep the revoked token working.

    Built from an environment variable's value (:meth:`from_env_value`), it is fixed.
    """

    log = Logger()

    def __init__(
        self,
        by_hash: Mapping[str, str],
        *,
        path: str | None = None,
        clock: IReactorTime | None = None,
        check_interval: float = 1.0,
        stat_key: tuple[int, int, int] | None = None,
    ) -> None:
        if path is not None and clock is None:
            raise TypeError("a TokenFile read from a path needs a clock to pace its reloads")
        self._by_hash = dict(by_hash)
        self._path = path
        self._clock = clock
        self._check_interval = check_interval
        self._stat_key = stat_key
        self._checked_at = clock.seconds() if clock is not None else 0.0

    @classmethod
    def from_path(cls, path: str, clock: IReactorTime, check_interval: float = 1.0) -> TokenFile:
        """Read the tokens file at ``path``; raises :class:`TokenFileError` if it is invalid."""
        key = _stat_key(path)
        by_hash = _read_token_file(path)
        return cls(by_hash, path=path, clock=clock, check_interval=check_interval, stat_key=key)

    @classmethod
    def from_env_value(cls, value: str, source: str = "TASKSCHEDULER_TOKENS") -> TokenFile:
        """Tokens from an environment variable: entries separated by newlines or commas."""
        return cls(parse_token_lines(re.split(r"[\n,]", value), source, "entry"))

    @property
    def source(self) -> str:
        return self._path if self._path is not None else "environment"

    def names(self) -> set[str]:
        """The principals that currently hold at least one token."""
        self._maybe_reload()
        return set(self._by_hash.values())

    def __len__(self) -> int:
        self._maybe_reload()
        return len(self._by_hash)

    def authenticate(self, header_value: str | bytes | None) -> str | None:
        """The principal an ``Authorization`` header value proves, or None."""
        token = parse_bearer(header_value)
        return None if token is None else self.authenticate_token(token)

    def authenticate_request(self, request: IRequest) -> str | None:
        token = bearer_token(request)
        return None if token is None else self.authenticate_token(token)

    def authenticate_token(self, token: str) -> str | None:
        """The principal holding ``token``, or None."""
        self._maybe_reload()
        # A dict lookup on the hash leaks nothing useful through timing: the attacker
        # controls only the preimage, and learning bits of a stored hash does not help
        # forge a 256-bit token. (Comparing one presented secret with one stored hash,
        # as for an agent's credential, uses verify_token's constant-time comparison.)
        return self._by_hash.get(hash_token(token))

    def _maybe_reload(self) -> None:
        if self._path is None or self._clock is None:
            return
        now = self._clock.seconds()
        if now - self._checked_at < self._check_interval:
            return
        self._checked_at = now
        # Stat before reading: a write that lands while we read changes the key again,
        # so the next check reads the finished file.
        key = _stat_key(self._path)
        if key == self._stat_key:
            return
        self._stat_key = key
        try:
            if key is None:
                raise TokenFileError(f"{self._path}: cannot be read")
            self._by_hash = _read_token_file(self._path)
        except TokenFileError as e:
            self._by_hash = {}
            self.log.error(
                "operator tokens file is invalid; refusing every operator token "
                "until it is fixed: {error}",
                error=str(e),
            )
            return
        self.log.info(
            "reloaded operator tokens from {path}: {count} token(s)",
            path=self._path,
            count=len(self._by_hash),
        )


def _read_token_file(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise TokenFileError(f"{path}: is not valid UTF-8 text") from None
    except OSError as e:
        raise TokenFileError(f"{path}: cannot be read ({e.strerror})") from None
    return parse_token_lines(text.splitlines(), path)


# -- where a server listens ----------------------------------------------------------------

# Positional parameters of Twisted's server endpoint parsers (twisted.internet.endpoints),
# in order, and the interface each listens on when none is given.
_ENDPOINT_PARAMETERS: dict[str, tuple[list[str], str]] = {
    "tcp": (["port", "interface", "backlog"], ""),
    "ssl": (["port", "privateKey", "certKey", "sslmethod", "interface", "backlog"], ""),
    "tcp6": (["port", "backlog", "interface"], "::"),
    "tls": (["path", "port", "backlog", "interface"], "::"),
}


class EndpointSyntaxError(ValueError):
    """An endpoint description that Twisted would not parse the same way we do."""


def split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """Split a Twisted endpoint description into positional and keyword arguments.

    Follows ``twisted.internet.endpoints``: ``:`` separates arguments, the first ``=`` of
    an argument separates a keyword from its value, and a backslash escapes the next
    character (so ``interface=\\:\\:1`` is ``::1``).
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    current: list[str] = []
    key: str | None = None
    chars = iter(description)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise EndpointSyntaxError("the description ends with a lone backslash")
            current.append(escaped)
        elif char == ":":
            if key is None:
                args.append("".join(current))
            else:
                kwargs[key] = "".join(current)
            current, key = [], None
        elif char == "=" and key is None:
            key = "".join(current)
            current = []
        else:
            current.append(char)
    if key is None:
        args.append("".join(current))
    else:
        kwargs[key] = "".join(current)
    return args, kwargs


def is_loopback_interface(interface: str) -> bool:
    """Whether binding to ``interface`` accepts connections from this machine only."""
    name = interface.strip()
    if name.lower() in ("localhost", "localhost."):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False  # a host name could resolve to anything; assume the worst
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_loopback_url(url: str) -> bool:
    """Whether an http(s) URL names this machine (localhost or a loopback address)."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and is_loopback_interface(host)


def is_loopback_endpoint(description: str) -> bool:
    """Whether a server endpoint description listens on loopback (or a UNIX socket) only.

    ``tcp:8080:interface=127.0.0.1``, ``tcp6:8080:interface=\\:\\:1`` and ``unix:/run/ts``
    are loopback; ``tcp:8080`` (every interface), ``0.0.0.0``, host names other than
    localhost, and endpoint types we do not know (``systemd:``, plugins) are not. A
    description we cannot parse is not loopback either: the answer decides whether a
    server may run without tokens, so every doubt resolves to "no".
    """
    try:
        args, kwargs = split_endpoint(description)
    except EndpointSyntaxError:
        return False
    kind = args[0].strip().lower()
    if kind == "unix":
        return bool(kwargs.get("address") or (len(args) > 1 and args[1]))
    if kind == "haproxy":
        # haproxy:<endpoint> listens where the wrapped endpoint does.
        rest = description.split(":", 1)[1] if ":" in description else ""
        return bool(rest) and is_loopback_endpoint(rest)
    if kind not in _ENDPOINT_PARAMETERS:
        return False
    names, default_interface = _ENDPOINT_PARAMETERS[kind]
    positional = args[1:]
    if len(positional) > len(names):
        return False
    given = dict(zip(names, positional, strict=False))
    if "interface" in given and "interface" in kwargs:
        return False  # Twisted rejects this; so do we
    interface = kwargs.get("interface", given.get("interface", default_interface))
    return is_loopback_interface(interface)


class UnprotectedListener(ValueError):
    """A server would accept operator requests from the network without any token."""


#: The name daemons give the flag that lets a non-loopback server run without tokens.
INSECURE_FLAG = "--insecure-allow-anonymous-operators"


def check_listen_policy(
    listen: str, tokens: TokenFile | None, allow_anonymous: bool = False
) -> str | None:
    """Decide whether a server may start, listening on ``listen`` with ``tokens``.

    - operator tokens configured (at least one): fine, returns None;
    - no tokens, loopback only (the local playground): allowed, returns a warning to log;
    - no tokens beyond loopback: raises :class:`UnprotectedListener`, unless
      ``allow_anonymous`` (the daemon's :data:`INSECURE_FLAG`) says otherwise, in which
      case it returns a loud warning to log.

    A description that cannot be parsed raises :class:`EndpointSyntaxError` saying so,
    whatever the tokens: it is not a question of tokens.
    """
    try:
        args, _ = split_endpoint(listen)
    except EndpointSyntaxError as e:
        raise EndpointSyntaxError(f"cannot parse --listen {listen!r}: {e}") from None
    if not args[0].strip():
        raise EndpointSyntaxError(
            f"cannot parse --listen {listen!r}: it does not start with an endpoint type "
            "(tcp:, ssl:, unix:...)"
        )
    if tokens is not None and len(tokens) > 0:
        return None
    if is_loopback_endpoint(listen):
        return (
            "no operator tokens are configured: the API accepts every local caller. "
            "This is the loopback playground; configure tokens before listening elsewhere."
        )
    if not allow_anonymous:
        raise UnprotectedListener(
            f"refusing to listen on {listen!r} without operator tokens: anyone who can reach "
            "it could run commands on every agent. Configure a tokens file or variable, "
            f"listen on loopback (tcp:PORT:interface=127.0.0.1), or pass {INSECURE_FLAG}."
        )
    return (
        f"INSECURE: {INSECURE_FLAG} is set and no operator tokens are configured; anyone "
        f"who can reach {listen!r} can run commands on every agent"
    )


# -- keeping secrets out of logs -------------------------------------------------------------

REDACTED = "***"

_URI_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>.*)$", re.DOTALL)
_QUERY_SECRET_RE = re.compile(r"(?i)([?&](?:ssl)?password=)[^&#]*")
_KEYWORD_SECRET_RE = re.compile(r"(?i)(?<![\w])((?:ssl)?password)\s*=\s*(?:'(?:[^'\\]|\\.)*'?|\S*)")


def redact_dsn(dsn: str) -> str:
    """A database DSN (or any URL) with its password replaced by ``***``.

    Handles both libpq forms: ``postgresql://user:secret@host/db?sslpassword=x`` and
    ``host=db user=app password='se cret'``. When in doubt it hides more, never less.
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
    return _QUERY_SECRET_RE.sub(lambda m: m.group(1) + REDACTED, redacted)


def redact_tokens(text: str) -> str:
    """``text`` with anything shaped like one of our tokens replaced by ``<prefix>***``."""
    return _TOKEN_IN_TEXT_RE.sub(lambda m: m.group(1) + REDACTED, text)


_TOKEN_IN_TEXT_RE = re.compile(
    "(" + "|".join(re.escape(p) for p in (OPERATOR_PREFIX, AGENT_PREFIX, JOIN_PREFIX)) + ")"
    r"[A-Za-z0-9_\-]{8,}"
)
