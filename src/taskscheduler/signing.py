"""Signed instructions: how an agent knows a request comes from its server.

The server holds an Ed25519 private key in its data folder (never in the database); an
agent pins the matching public key, received when it enrols (or given by its operator).
Every request the server sends an agent carries::

    Authorization: TS-Ed25519 aud=<agent_id>,ts=<unix seconds>,nonce=<32 hex>,sig=<base64url>

The signature covers the method, the path (with its query), the audience (the agent the
request is meant for), the SHA-256 of the body, the timestamp and the nonce. An agent
refuses a request whose signature is missing or wrong, that is meant for another agent,
whose timestamp is more than ``max_skew`` seconds away from its clock, or whose nonce it
has already seen (nonces are remembered for as long as their timestamp is acceptable, so
a bounded cache suffices).

The nonces live in memory, so an agent also refuses a timestamp from before it started:
an instruction captured before a restart cannot be replayed after it. (The cost: while
the server's clock is behind the agent's, the agent refuses the instructions of its first
seconds, as many seconds as the clocks differ; the server signs them again when it retries.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import secrets
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from twisted.internet.interfaces import IReactorTime

#: The authorization scheme of a signed instruction.
SCHEME = "TS-Ed25519"
#: How far (seconds) a signed timestamp may be from the agent's clock.
DEFAULT_MAX_SKEW = 60.0
#: Most nonces remembered; past it new instructions are refused until old ones expire.
DEFAULT_NONCE_CAPACITY = 100_000
#: Prefix of a public key in its one-line text form.
PUBLIC_KEY_PREFIX = "ed25519:"

_CONTEXT = b"taskscheduler-instruction-v1"
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
_PARAM_RE = re.compile(r"\s*([a-z]+)=([^,\s]*)\s*")


class KeyFileError(ValueError):
    """A key file is missing, unreadable or malformed; ``str()`` never quotes a key."""


class BadSignature(Exception):
    """Why a signed instruction is refused; ``str()`` is safe to show to the caller."""


# -- keys ------------------------------------------------------------------------------------


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    """The server's signing key at ``path`` (PEM, PKCS#8), created 0600 the first time.

    The public key is written beside it (``<path>.pub``) for operators who pin it on
    their agents with ``--server-public-key-file``.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_file(path, pem)
    key = load_signing_key(path)
    public = path.with_name(path.name + ".pub")
    text = public_key_text(key.public_key()) + "\n"
    if not public.exists() or public.read_text(errors="replace") != text:
        write_private_file(public, text.encode("ascii"), mode=0o644)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"cannot read the signing key {str(path)!r}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{str(path)!r} holds no usable PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{str(path)!r} holds a private key that is not Ed25519")
    if os.stat(path).st_mode & 0o077:
        raise KeyFileError(f"the signing key {str(path)!r} is readable by others; chmod 600 it")
    return key


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename) with ``mode``."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def public_key_text(key: Ed25519PublicKey) -> str:
    """A public key on one line: ``ed25519:<base64 of its 32 bytes>``."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> Ed25519PublicKey:
    """A public key from :func:`public_key_text`'s form or a PEM SubjectPublicKeyInfo."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise KeyFileError("not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError("the public key is not Ed25519")
        return key
    if not text.startswith(PUBLIC_KEY_PREFIX):
        raise KeyFileError(f"a public key starts with {PUBLIC_KEY_PREFIX!r}")
    try:
        raw = base64.b64decode(text[len(PUBLIC_KEY_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise KeyFileError("the public key is not 32 bytes of base64") from None


def read_public_key(path: Path) -> Ed25519PublicKey:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"cannot read the public key {str(path)!r}: {e}") from None
    try:
        return parse_public_key(text)
    except KeyFileError as e:
        raise KeyFileError(f"{str(path)!r}: {e}") from None


def key_fingerprint(key: Ed25519PublicKey) -> str:
    """A short name for a public key in logs."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- signing and verifying --------------------------------------------------------------------


def _message(
    method: str, path: str, audience: uuid.UUID, body: bytes, timestamp: int, nonce: str
) -> bytes:
    return b"\n".join(
        [
            _CONTEXT,
            method.upper().encode("ascii"),
            path.encode("utf-8"),
            str(audience).encode("ascii"),
            hashlib.sha256(body).hexdigest().encode("ascii"),
            str(timestamp).encode("ascii"),
            nonce.encode("ascii"),
        ]
    )


class InstructionSigner:
    """Signs the server's requests to agents."""

    def __init__(self, key: Ed25519PrivateKey, clock: IReactorTime) -> None:
        self._key = key
        self._clock = clock

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def authorization(self, method: str, path: str, audience: uuid.UUID, body: bytes) -> str:
        """The ``Authorization`` header value for one request."""
        timestamp = int(self._clock.seconds())
        nonce = secrets.token_hex(16)
        signature = self._key.sign(_message(method, path, audience, body, timestamp, nonce))
        encoded = base64.urlsafe_b64encode(signature).decode("ascii").rstrip("=")
        return f"{SCHEME} aud={audience},ts={timestamp},nonce={nonce},sig={encoded}"


@dataclass(frozen=True)
class _Signed:
    audience: str
    timestamp: int
    nonce: str
    signature: bytes


def _parse_authorization(value: bytes | None) -> _Signed:
    if value is None:
        raise BadSignature("this request needs a signature from the agent's server")
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise BadSignature("malformed signature") from None
    scheme, _, rest = text.strip().partition(" ")
    if scheme != SCHEME:
        raise BadSignature("this request needs a signature from the agent's server")
    params: dict[str, str] = {}
    for part in rest.split(","):
        match = _PARAM_RE.fullmatch(part)
        if match is None or match.group(1) in params:
            raise BadSignature("malformed signature")
        params[match.group(1)] = match.group(2)
    if set(params) != {"aud", "ts", "nonce", "sig"}:
        raise BadSignature("malformed signature")
    if not params["ts"].isascii() or not params["ts"].isdigit() or len(params["ts"]) > 12:
        raise BadSignature("malformed signature")
    if _NONCE_RE.fullmatch(params["nonce"]) is None:
        raise BadSignature("malformed signature")
    sig = params["sig"]
    try:
        signature = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    except (binascii.Error, ValueError):
        raise BadSignature("malformed signature") from None
    return _Signed(params["aud"], int(params["ts"]), params["nonce"], signature)


class NonceCache:
    """Nonces seen recently, each kept until its timestamp is too old to be accepted."""

    def __init__(self, capacity: int = DEFAULT_NONCE_CAPACITY) -> None:
        self._capacity = capacity
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, nonce: str, expires_at: float, now: float) -> bool:
        """Remember ``nonce``; False if it was seen already or the cache is full."""
        # Timestamps arrive nearly in order: expired nonces gather at the front.
        while self._expiry:
            oldest, expiry = next(iter(self._expiry.items()))
            if expiry > now:
                break
            del self._expiry[oldest]
        if nonce in self._expiry:
            return False
        if len(self._expiry) >= self._capacity:
            # Evict the nonce closest to expiry only if it has expired; otherwise refuse,
            # never forget a nonce that could still be replayed.
            expired = [n for n, e in self._expiry.items() if e <= now]
            if not expired:
                return False
            for n in expired:
                del self._expiry[n]
        self._expiry[nonce] = expires_at
        return True


class InstructionVerifier:
    """Checks the signature of requests an agent receives.

    Without a public key (an agent that has not enrolled yet) every request is refused.
    """

    def __init__(
        self,
        agent_id: uuid.UUID,
        clock: IReactorTime,
        public_key: Ed25519PublicKey | None = None,
        *,
        max_skew: float = DEFAULT_MAX_SKEW,
        nonces: NonceCache | None = None,
        started_at: float | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.public_key = public_key
        self._clock = clock
        self._max_skew = max_skew
        #: When this agent started (its clock): an earlier instruction may be a replay
        #: whose nonce the agent's previous life saw and this one cannot know.
        self.started_at = clock.seconds() if started_at is None else started_at
        self._nonces = NonceCache() if nonces is None else nonces

    def trust(self, public_key: Ed25519PublicKey) -> None:
        """Check instructions against ``public_key`` from now on (the server's key, once
        the agent has enrolled)."""
        self.public_key = public_key

    def verify(self, method: str, path: str, authorization: bytes | None, body: bytes) -> None:
        """Return if the request is a fresh instruction from our server for us; else raise
        :class:`BadSignature` saying why."""
        signed = _parse_authorization(authorization)
        if self.public_key is None:
            raise BadSignature("this agent has not enrolled with its server yet")
        if signed.audience != str(self.agent_id):
            raise BadSignature("this instruction is meant for another agent")
        now = self._clock.seconds()
        if abs(now - signed.timestamp) > self._max_skew:
            raise BadSignature("the signature's timestamp is too far from the agent's clock")
        # Strictly: an instruction signed in the second the agent started may have been
        # seen by its previous life; refused, the server signs it again when it retries.
        if signed.timestamp < self.started_at:
            raise BadSignature("the instruction was signed before this agent started")
        message = _message(method, path, self.agent_id, body, signed.timestamp, signed.nonce)
        try:
            self.public_key.verify(signed.signature, message)
        except InvalidSignature:
            raise BadSignature("the signature does not match") from None
        # Only a valid signature may consume a nonce: forged requests cannot fill the cache.
        if not self._nonces.add(signed.nonce, signed.timestamp + self._max_skew, now):
            raise BadSignature("this instruction was already received (replay)")
