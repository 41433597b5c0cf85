"""TLS for both daemons: listening endpoints that require client certificates, and a
verifying client.

Server side. A daemon's ``--listen`` is a Twisted endpoint string, so plain TLS needs
nothing of ours: ``ssl:8443:interface=0.0.0.0:privateKey=key.pem:certKey=cert.pem``
(``extraCertChain=chain.pem`` for intermediates). Twisted's ``ssl:`` parser has no
parameter that asks for or verifies a client certificate, so for mutual TLS a daemon
passes its ``--tls-client-ca`` to :func:`require_client_certificates`, which adds a
trust root for client certificates to the TLS settings Twisted built from the string.

Client side. :func:`make_http_client` builds a treq ``HTTPClient`` whose HTTPS
connections verify the server's certificate and host name against a given CA bundle (or
the system's trust store) and can present a client certificate.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from OpenSSL import crypto
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.error import VerifyError
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IReactorSSL,
    IStreamServerEndpoint,
)
from twisted.internet.protocol import ServerFactory
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

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


@implementer(IReactorSSL)
class _ClientCertificatesRequired:
    """A reactor whose ``listenSSL`` makes the endpoint's own TLS settings (those Twisted
    built from the ``ssl:`` string) require and verify a client certificate."""

    def __init__(self, reactor: IReactorSSL, trust_root: IOpenSSLTrustRoot) -> None:
        self._reactor = reactor
        self._trust_root = trust_root

    def listenSSL(
        self,
        port: int,
        factory: ServerFactory[Any],
        contextFactory: IOpenSSLContextFactory,
        backlog: int = 50,
        interface: str = "",
    ) -> IListeningPort:
        if not isinstance(contextFactory, ssl.CertificateOptions):
            raise TLSConfigError("client certificates need Twisted's own TLS settings")
        # Public settings, read when the first connection builds the context: what
        # trustRoot=... does in CertificateOptions' constructor (requireCertificate is
        # already True, its default).
        contextFactory.trustRoot = self._trust_root
        contextFactory.verify = True
        return self._reactor.listenSSL(port, factory, contextFactory, backlog, interface)

    def connectSSL(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("a listening endpoint only")


def require_client_certificates(
    reactor: IReactorSSL, description: str, client_ca_file: str | Path
) -> IStreamServerEndpoint:
    """The ``ssl:`` endpoint ``description`` (parsed by Twisted, every parameter meaning
    what it means there), which also requires clients to present a certificate signed by
    a CA in ``client_ca_file`` (mutual TLS): a client without one fails the handshake.

    Twisted's ``ssl:`` parser has no parameter for a client CA, so the endpoint is built
    on a reactor that adds it to the TLS settings Twisted made. Any other kind of
    endpoint is refused: a client CA on a plain TCP port would protect nothing.
    """
    trust_root = _trust_root(client_ca_file, "client CA file")
    endpoint = serverFromString(_ClientCertificatesRequired(reactor, trust_root), description)
    if not isinstance(endpoint, SSL4ServerEndpoint):
        kind = description.split(":", 1)[0]
        raise TLSConfigError(
            f"client certificates (mutual TLS) need an 'ssl:' listening endpoint, not {kind!r}"
        )
    return endpoint


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
