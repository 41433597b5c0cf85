"""Signed instructions and the keys behind them."""

from __future__ import annotations

import stat
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.task import Clock

from taskscheduler.signing import (
    BadSignature,
    InstructionSigner,
    InstructionVerifier,
    KeyFileError,
    load_or_create_signing_key,
    load_signing_key,
    parse_public_key,
    public_key_text,
    read_public_key,
)

AGENT = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")


def test_the_signing_key_is_made_once_0600_with_its_public_half_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "signing_key.pem"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_signing_key(path)
    assert public_key_text(again.public_key()) == public_key_text(key.public_key())
    public = read_public_key(tmp_path / "signing_key.pem.pub")
    assert public_key_text(public) == public_key_text(key.public_key())


def test_a_signing_key_readable_by_others_or_not_ed25519_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    load_or_create_signing_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_key(path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError) as e:
        load_signing_key(garbage)
    assert "nope" not in str(e.value)


def test_public_keys_parse_from_our_line_or_pem() -> None:
    key = Ed25519PrivateKey.generate().public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    assert public_key_text(parse_public_key(pem)) == public_key_text(key)
    assert public_key_text(parse_public_key(public_key_text(key) + "\n")) == public_key_text(key)
    for bad in ["", "ed25519:", "ed25519:AAAA", "rsa:abc", "-----BEGIN PUBLIC KEY-----\nx"]:
        with pytest.raises(KeyFileError):
            parse_public_key(bad)


@pytest.mark.parametrize(
    ("offset", "accepted"), [(-60, True), (60, True), (-61, False), (61, False)]
)
def test_the_timestamp_may_be_at_most_a_minute_off(offset: int, accepted: bool) -> None:
    key = Ed25519PrivateKey.generate()
    server_clock, agent_clock = Clock(), Clock()
    # An agent that has been up for a while: none of these was signed before it started.
    verifier = InstructionVerifier(AGENT, agent_clock, key.public_key())
    server_clock.advance(1_000_000 + offset)
    agent_clock.advance(1_000_000)
    header = InstructionSigner(key, server_clock).authorization("GET", "/x", AGENT, b"")
    if accepted:
        verifier.verify("GET", "/x", header.encode(), b"")
    else:
        with pytest.raises(BadSignature, match="timestamp"):
            verifier.verify("GET", "/x", header.encode(), b"")


def test_an_instruction_signed_before_the_agent_started_is_refused() -> None:
    """Nonces live in memory: a restarted agent (a new verifier) refuses what its previous
    life may have seen, however fresh, and accepts what is signed after its start."""
    key = Ed25519PrivateKey.generate()
    clock = Clock()
    clock.advance(1_000_000)
    signer = InstructionSigner(key, clock)
    first = InstructionVerifier(AGENT, clock, key.public_key())
    captured = signer.authorization("POST", "/x", AGENT, b"{}").encode()
    first.verify("POST", "/x", captured, b"{}")
    clock.advance(1)
    restarted = InstructionVerifier(AGENT, clock, key.public_key())
    with pytest.raises(BadSignature, match="before this agent started"):
        restarted.verify("POST", "/x", captured, b"{}")
    restarted.verify("POST", "/x", signer.authorization("POST", "/x", AGENT, b"{}").encode(), b"{}")


@pytest.mark.parametrize(
    "header",
    [
        b"TS-Ed25519",
        b"TS-Ed25519 aud=x",
        b"TS-Ed25519 aud=a,aud=b,ts=1,nonce=" + b"0" * 32 + b",sig=AA",
        b"TS-Ed25519 aud=a,ts=-1,nonce=" + b"0" * 32 + b",sig=AA",
        b"TS-Ed25519 aud=a,ts=1,nonce=xyz,sig=AA",
        b"TS-Ed25519 aud=a,ts=1,nonce=" + b"0" * 32 + b",sig=!!",
        b"Bearer tso_abc",
        b"\xff\xfe",
    ],
)
def test_malformed_signatures_are_refused_without_a_crash(header: bytes) -> None:
    clock = Clock()
    verifier = InstructionVerifier(AGENT, clock, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(BadSignature):
        verifier.verify("GET", "/x", header, b"")
