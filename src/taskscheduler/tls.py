"""TLS for both daemons: listening endpoints (optionally mutual TLS) and a verifying client.

Server side. A daemon's ``--listen`` is a Twisted endpoint string, so plain TLS needs
nothing of ours: ``ssl:8443:interface=0.0.0.0:privateKey=key.pem:certKey=cert.pem``
(``extraCertChain=chain.pem`` for intermediates). Twisted's ``ssl:`` parser has no
parameter that asks for or verifies a client certificate (its parameters are port,
privateKey, certKey, sslmethod, interface, backlog, extraCertChain, dhParameters; the
``tls:`` plugin endpoint takes a directory of PEMs for SNI and has none either). So for
mutual TLS a daemon passes its ``--tls-client-ca`` option to :func:`server_endpoint`,
which reads the same ``ssl:`` string and adds a trust root for client certificates; a
client without a certificate signed by that CA fails the handshake.

Client side. :func:`make_http_client` builds a treq ``HTTPClient`` whose HTTPS
connections verify the server's certificate and host name against a given CA bundle (or
the system's trust store) and can present a client certificate.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorSSL,
    IStreamServerEndpoint,
)
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS, IRequest
from zope.interface import implementer

from taskscheduler.auth import EndpointSyntaxError, split_endpoint

if TYPE_CHECKING:
    # Twisted defines the interface only in a private module; used for typing only.
    from twisted.internet._sslverify import IOpenSSLTrustRoot

_PEM_CERT_RE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


class TLSConfigError(ValueError):
    """A TLS file or option is unusable; ``str()`` says which and why."""


# -- reading PEM files ---------------------------------------------------------------------


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read the {what} {str(path)!r}: {e.strerror}") from None


def load_certificates(path: str | Path, what: str = "certificate file") -> list[ssl.Certificate]:
    """Every certificate in a PEM file, in order; at least one."""
    data = _read(path, what)
    try:
        certificates = [ssl.Certificate.loadPEM(pem) for pem in _PEM_CERT_RE.findall(data)]
    except Exception as e:
        raise TLSConfigError(f"the {what} {str(path)!r} holds an invalid certificate: {e}") from e
    if not certificates:
        raise TLSConfigError(f"the {what} {str(path)!r} holds no PEM certificate")
    return certificates


def load_private_certificate(
    cert_file: str | Path, key_file: str | Path | None = None
) -> tuple[ssl.PrivateCertificate, list[ssl.Certificate]]:
    """A certificate with its private key, and any intermediates that follow it.

    ``key_file`` may be omitted when ``cert_file`` holds the key as well. The key's error
    message never quotes the key.
    """
    chain = load_certificates(cert_file)
    key_data = _read(key_file if key_file is not None else cert_file, "private key file")
    try:
        key = ssl.KeyPair.load(key_data, crypto.FILETYPE_PEM)
    except Exception:
        raise TLSConfigError(
            f"no usable PEM private key in {str(key_file or cert_file)!r}"
        ) from None
    try:
        private = ssl.PrivateCertificate.fromCertificateAndKeyPair(chain[0], key)
    except VerifyError:
        raise TLSConfigError(
            f"the private key in {str(key_file or cert_file)!r} does not match the "
            f"certificate in {str(cert_file)!r}"
        ) from None
    return private, chain[1:]


def _trust_root(ca_file: str | Path, what: str) -> IOpenSSLTrustRoot:
    return ssl.trustRootFromCertificates(load_certificates(ca_file, what))


# -- server side -----------------------------------------------------------------------------


def server_options(
    cert_file: str | Path,
    key_file: str | Path | None = None,
    client_ca_file: str | Path | None = None,
    extra_chain_file: str | Path | None = None,
) -> ssl.CertificateOptions:
    """TLS settings for a server; with ``client_ca_file``, clients must present a
    certificate signed by one of its CAs (mutual TLS)."""
    private, chain = load_private_certificate(cert_file, key_file)
    if extra_chain_file is not None:
        chain += load_certificates(extra_chain_file, "certificate chain file")
    # A trustRoot makes the server request and require a client certificate and verify it
    # against these CAs (what verify=True, caCerts=[...], requireCertificate=True does).
    trust_root = None if client_ca_file is None else _trust_root(client_ca_file, "client CA file")
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=[c.original for c in chain] or None,
        trustRoot=trust_root,
    )


def tls_server_endpoint(
    reactor: IReactorSSL,
    port: int,
    cert_file: str | Path,
    key_file: str | Path | None = None,
    client_ca_file: str | Path | None = None,
    interface: str = "",
    backlog: int = 50,
    extra_chain_file: str | Path | None = None,
) -> IStreamServerEndpoint:
    """A TLS listening endpoint; see :func:`server_options` for the certificate files."""
    options = server_options(cert_file, key_file, client_ca_file, extra_chain_file)
    return SSL4ServerEndpoint(reactor, port, options, backlog=backlog, interface=interface)


_SSL_PARAMETERS = ["port", "privateKey", "certKey", "sslmethod", "interface", "backlog"]


def server_endpoint(
    reactor: IReactorSSL, description: str, client_ca_file: str | Path | None = None
) -> IStreamServerEndpoint:
    """The endpoint for a daemon's ``--listen`` description, with optional mutual TLS.

    Without ``client_ca_file`` this is ``serverFromString``. With it, ``description`` must
    be an ``ssl:`` endpoint (a client CA on a plain TCP port would protect nothing), and
    its parameters mean what they mean to Twisted: ``privateKey`` (default
    ``server.pem``), ``certKey`` (default: the ``privateKey`` file), ``interface``,
    ``backlog``, ``extraCertChain``.
    """
    if client_ca_file is None:
        return serverFromString(reactor, description)
    try:
        args, kwargs = split_endpoint(description)
    except EndpointSyntaxError as e:
        raise TLSConfigError(f"invalid endpoint description: {e}") from None
    if args[0].strip().lower() != "ssl":
        raise TLSConfigError(
            f"client certificates (mutual TLS) need an 'ssl:' listening endpoint, not {args[0]!r}"
        )
    params: dict[str, str] = {}
    positional = args[1:]
    if len(positional) > len(_SSL_PARAMETERS):
        raise TLSConfigError("too many positional parameters in the 'ssl:' endpoint")
    for name, value in zip(_SSL_PARAMETERS, positional, strict=False):
        params[name] = value
    for name, value in kwargs.items():
        if name in params:
            raise TLSConfigError(f"'{name}' is given twice in the 'ssl:' endpoint")
        params[name] = value
    unsupported = set(params) - {
        "port",
        "privateKey",
        "certKey",
        "interface",
        "backlog",
        "extraCertChain",
    }
    if unsupported:
        raise TLSConfigError(
            "unsupported parameter(s) with mutual TLS: " + ", ".join(sorted(unsupported))
        )
    if "port" not in params:
        raise TLSConfigError("the 'ssl:' endpoint needs a port")
    try:
        port, backlog = int(params["port"]), int(params.get("backlog", "50"))
    except ValueError:
        raise TLSConfigError("the port and backlog of an 'ssl:' endpoint are integers") from None
    key_file = params.get("privateKey", "server.pem")
    return tls_server_endpoint(
        reactor,
        port,
        cert_file=params.get("certKey", key_file),
        key_file=key_file,
        client_ca_file=client_ca_file,
        interface=params.get("interface", ""),
        backlog=backlog,
        extra_chain_file=params.get("extraCertChain"),
    )


def peer_certificate(request: IRequest) -> x509.Certificate | None:
    """The verified certificate the client presented on this request's connection."""
    transport = getattr(getattr(request, "channel", None), "transport", None)
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    certificate = get()
    if certificate is None:
        return None
    return certificate.to_cryptography()  # type: ignore[no-any-return]


def peer_common_name(request: IRequest) -> str | None:
    """The subject common name of the client's certificate, if it presented one."""
    certificate = peer_certificate(request)
    if certificate is None:
        return None
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


# -- client side -----------------------------------------------------------------------------


@implementer(IPolicyForHTTPS)
class VerifyingPolicy:
    """HTTPS policy: verify the server against ``trust_root`` (None: the system's trust
    store) and its host name, and present ``client_certificate`` when given.

    twisted.web's ``BrowserLikePolicyForHTTPS`` verifies too, but cannot present a client
    certificate.
    """

    def __init__(
        self,
        trust_root: IOpenSSLTrustRoot | None = None,
        client_certificate: ssl.PrivateCertificate | None = None,
        client_chain: list[ssl.Certificate] | None = None,
    ) -> None:
        self._trust_root = trust_root
        self._client_certificate = client_certificate
        self._extra = {"extraCertChain": [c.original for c in client_chain]} if client_chain else {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust_root,
            clientCertificate=self._client_certificate,
            extraCertificateOptions=self._extra or None,
        )


def client_policy(
    ca_file: str | Path | None = None,
    client_cert_file: str | Path | None = None,
    client_key_file: str | Path | None = None,
) -> VerifyingPolicy:
    """The HTTPS policy :func:`make_http_client` uses, from PEM files."""
    trust_root = None if ca_file is None else _trust_root(ca_file, "CA file")
    if client_cert_file is None:
        if client_key_file is not None:
            raise TLSConfigError("a client key was given without a client certificate")
        return VerifyingPolicy(trust_root)
    private, chain = load_private_certificate(client_cert_file, client_key_file)
    return VerifyingPolicy(trust_root, private, chain)


def make_http_client(
    reactor: IReactorSSL,
    ca_file: str | Path | None = None,
    client_cert_file: str | Path | None = None,
    client_key_file: str | Path | None = None,
    *,
    pool: HTTPConnectionPool | None = None,
    connect_timeout: float | None = 10.0,
) -> HTTPClient:
    """A treq client whose HTTPS connections verify the server.

    The server's certificate must chain to a CA in ``ca_file`` (without it, to the
    system's trust store) and name the host of the URL (a DNS name or an IP address in its
    subjectAltName). With ``client_cert_file`` (and ``client_key_file`` unless the key is
    in the same file) the client presents that certificate for mutual TLS. Plain
    ``http://`` URLs still work: whether to allow them is the caller's decision.
    """
    policy = client_policy(ca_file, client_cert_file, client_key_file)
    agent = Agent(reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=pool)
    return HTTPClient(agent)
