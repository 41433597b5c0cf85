"""Bearer tokens and the token files that hold their hashes.

- tokens are 256-bit random strings with a readable prefix (``tso_`` operator, ``tsa_``
  agent credential, ``tsj_`` join secret) and are only ever stored as ``sha256:<hex>``;
- :class:`TokenFile` holds the operators' tokens (or the join secrets), from a file that
  is re-read when it changes (so a token is revoked by deleting its line, without a
  restart) or from the value of an environment variable.

Where a server may listen without tokens is :mod:`taskscheduler.listen`; keeping secrets
out of logs is :mod:`taskscheduler.redact`.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Iterable, Mapping

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
                "(taskscheduler tokens hash)"
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

    def __len__(self) -> int:
        self._maybe_reload()
        return len(self._by_hash)

    def authenticate_token(self, token: str) -> str | None:
        """The principal holding ``token``, or None."""
        self._maybe_reload()
        # A dict lookup on the hash leaks nothing useful through timing: the attacker
        # controls only the preimage, and learning bits of a stored hash does not help
        # forge a 256-bit token.
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
