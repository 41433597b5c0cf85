"""Certificates made at test time with ``cryptography``: a CA and the bad cases around it.

``make_pki(folder)`` writes PEM files and returns their paths:

- ``ca``: the CA the clients and servers trust; ``server`` (for 127.0.0.1 and localhost)
  and ``client`` are signed by it;
- ``other_ca``: an unrelated CA, with ``other_server`` and ``other_client`` signed by it;
- ``self_signed``: a server certificate for 127.0.0.1/localhost that signs itself;
- ``expired``: signed by ``ca`` for the right names, but no longer valid;
- ``wrong_name``: signed by ``ca``, but for ``elsewhere.example`` only.

Each certificate's key is in the matching ``*_key`` path. EC P-256 keys keep this fast.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


@dataclass(frozen=True)
class _Authority:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class PKI:
    ca: Path
    other_ca: Path
    server: Issued
    client: Issued
    other_server: Issued
    other_client: Issued
    self_signed: Issued
    expired: Issued
    wrong_name: Issued


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "taskscheduler tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _write(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Issued:
    cert_path = folder / f"{stem}.crt"
    key_path = folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return Issued(cert_path, key_path)


def make_ca(folder: Path, stem: str, common_name: str) -> tuple[_Authority, Path]:
    key = _key()
    name = _name(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Authority(name, key), _write(folder, stem, cert, key).cert


def issue(
    folder: Path,
    stem: str,
    issuer: _Authority | None,
    common_name: str,
    names: tuple[str, ...] = (),
    *,
    client: bool = False,
    valid_days: tuple[int, int] = (-1, 30),
) -> Issued:
    """A leaf certificate; ``issuer=None`` makes it sign itself."""
    key = _key()
    subject = _name(common_name)
    signer_name, signer_key = (subject, key) if issuer is None else (issuer.name, issuer.key)
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=valid_days[0]))
        .not_valid_after(now + datetime.timedelta(days=valid_days[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(_san(names), critical=False)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    return _write(folder, stem, builder.sign(signer_key, hashes.SHA256()), key)


def make_pki(folder: Path) -> PKI:
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_path = make_ca(folder, "ca", "taskscheduler test CA")
    other, other_path = make_ca(folder, "other-ca", "some other CA")
    return PKI(
        ca=ca_path,
        other_ca=other_path,
        server=issue(folder, "server", ca, "server", LOCAL_NAMES),
        client=issue(folder, "client", ca, "agent-1", client=True),
        other_server=issue(folder, "other-server", other, "server", LOCAL_NAMES),
        other_client=issue(folder, "other-client", other, "intruder", client=True),
        self_signed=issue(folder, "self-signed", None, "server", LOCAL_NAMES),
        expired=issue(folder, "expired", ca, "server", LOCAL_NAMES, valid_days=(-30, -1)),
        wrong_name=issue(folder, "wrong-name", ca, "elsewhere", ("elsewhere.example",)),
    )
