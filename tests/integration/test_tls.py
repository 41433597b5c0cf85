"""TLS on a real local port: the verifying client, ``ssl:`` endpoints, mutual TLS.

A tiny Klein app listens on 127.0.0.1 (a port the system picks) through
:func:`taskscheduler.listen.listen_endpoint`; the client from :func:`make_http_client`
must accept only the right certificate, and with mutual TLS the server must accept only
the right client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography.x509.oid import NameOID
from klein import Klein
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IRequest

from taskscheduler.listen import listen_endpoint
from taskscheduler.tls import TLSConfigError, make_http_client
from taskscheduler.web.guards import make_site
from taskscheduler.web.responses import json_response
from tests.tlsfixtures import PKI, Issued, make_pki

reactor: Any = _reactor
TIMEOUT = 10  # seconds; a hung handshake fails the test instead of hanging it


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def peer_common_name(request: IRequest) -> str | None:
    """The subject common name of the certificate the client presented, if any."""
    transport = getattr(getattr(request, "channel", None), "transport", None)
    certificate = getattr(transport, "getPeerCertificate", lambda: None)()
    if certificate is None:
        return None
    names = certificate.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class Hello:
    """Answers who the client is (by its certificate), and counts the requests served."""

    app = Klein()

    def __init__(self) -> None:
        self.served = 0

    @app.route("/hello", methods=["GET"])
    def hello(self, request: IRequest) -> bytes:
        self.served += 1
        return json_response(request, {"client": peer_common_name(request)})


@asynccontextmanager
async def serving(endpoint: IStreamServerEndpoint) -> AsyncIterator[tuple[Hello, int]]:
    hello = Hello()
    port: IListeningPort = await endpoint.listen(make_site(hello.app.resource()))
    try:
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        yield hello, address.port
    finally:
        await maybeDeferred(port.stopListening)


def ssl_description(server: Issued) -> str:
    return (
        "ssl:0:interface=127.0.0.1"
        f":privateKey={quoteStringArgument(str(server.key))}"
        f":certKey={quoteStringArgument(str(server.cert))}"
    )


def tls_endpoint(server: Issued, client_ca: Path | None = None) -> IStreamServerEndpoint:
    return listen_endpoint(reactor, ssl_description(server), str(client_ca) if client_ca else None)


async def get(client: Any, url: str) -> Any:
    response = await client.get(url, timeout=TIMEOUT)
    assert response.code == 200
    return await response.json()


def _reasons(error: BaseException) -> list[BaseException]:
    found = [error]
    for reason in getattr(error, "reasons", []) or []:
        if isinstance(reason, Failure):
            assert reason.value is not None
            found.extend(_reasons(reason.value))
    return found


async def refused(client: Any, url: str) -> list[BaseException]:
    """Assert the request fails, and return the errors underneath."""
    with pytest.raises(Exception) as info:
        await client.get(url, timeout=TIMEOUT)
    return _reasons(info.value)


def is_tls_error(errors: list[BaseException], kind: type[BaseException] = SSL.Error) -> bool:
    return any(isinstance(e, kind) for e in errors)


def new_pool() -> HTTPConnectionPool:
    return HTTPConnectionPool(reactor, persistent=False)


# -- the client verifies the server --------------------------------------------------------


@pytest.mark.integration
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_client_accepts_server_signed_by_its_ca(pki: PKI, host: str) -> None:
    client = make_http_client(reactor, ca_file=pki.ca, pool=new_pool())
    async with serving(tls_endpoint(pki.server)) as (hello, port):
        body = await get(client, f"https://{host}:{port}/hello")
    assert body == {"client": None}
    assert hello.served == 1


@pytest.mark.integration
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("bad", ["self_signed", "expired", "wrong_name", "other_server"])
async def test_client_refuses_bad_server_certificate(pki: PKI, bad: str) -> None:
    client = make_http_client(reactor, ca_file=pki.ca, pool=new_pool())
    async with serving(tls_endpoint(getattr(pki, bad))) as (hello, port):
        errors = await refused(client, f"https://127.0.0.1:{port}/hello")
    # A certificate for another name fails the host name check after the handshake's
    # chain check; every other case fails the chain check inside OpenSSL.
    assert is_tls_error(errors, VerificationError if bad == "wrong_name" else SSL.Error), errors
    assert hello.served == 0


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_the_other_ca_is_trusted_only_when_given(pki: PKI) -> None:
    # The control for the case above: the other CA's server is fine for a client that
    # trusts the other CA, so the refusal really was about the CA.
    client = make_http_client(reactor, ca_file=pki.other_ca, pool=new_pool())
    async with serving(tls_endpoint(pki.other_server)) as (_, port):
        assert await get(client, f"https://127.0.0.1:{port}/hello") == {"client": None}


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_without_ca_file_the_system_trust_store_decides(pki: PKI) -> None:
    client = make_http_client(reactor, pool=new_pool())
    async with serving(tls_endpoint(pki.server)) as (hello, port):
        errors = await refused(client, f"https://127.0.0.1:{port}/hello")
    assert is_tls_error(errors), errors
    assert hello.served == 0


# -- Twisted's ssl: endpoint string ----------------------------------------------------------


@pytest.mark.integration
@pytest_twisted.ensureDeferred
async def test_ssl_endpoint_string_serves_tls(pki: PKI) -> None:
    client = make_http_client(reactor, ca_file=pki.ca, pool=new_pool())
    endpoint = listen_endpoint(reactor, ssl_description(pki.server))
    async with serving(endpoint) as (_, port):
        assert await get(client, f"https://localhost:{port}/hello") == {"client": None}
        # Plain HTTP to a TLS port gets nowhere.
        plain = make_http_client(reactor, pool=new_pool())
        await refused(plain, f"http://127.0.0.1:{port}/hello")


# -- mutual TLS --------------------------------------------------------------------------------


def mutual_endpoints(pki: PKI) -> list[IStreamServerEndpoint]:
    """An ``ssl:`` string with a client CA; the second with more of Twisted's ``ssl:``
    parameters, which mutual TLS keeps (it adds to the settings Twisted built)."""
    return [
        tls_endpoint(pki.server, client_ca=pki.ca),
        listen_endpoint(
            reactor,
            ssl_description(pki.server) + ":backlog=10:sslmethod=TLS_METHOD",
            str(pki.ca),
        ),
    ]


@pytest.mark.integration
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", [0, 1], ids=["ssl_string", "ssl_string_with_sslmethod"])
async def test_mutual_tls_accepts_client_certificate_from_its_ca(pki: PKI, how: int) -> None:
    client = make_http_client(
        reactor,
        ca_file=pki.ca,
        client_cert_file=pki.client.cert,
        client_key_file=pki.client.key,
        pool=new_pool(),
    )
    async with serving(mutual_endpoints(pki)[how]) as (hello, port):
        body = await get(client, f"https://127.0.0.1:{port}/hello")
    assert body == {"client": "agent-1"}
    assert hello.served == 1


@pytest.mark.integration
@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("how", [0, 1], ids=["ssl_string", "ssl_string_with_sslmethod"])
@pytest.mark.parametrize("who", ["no_certificate", "other_client"])
async def test_mutual_tls_refuses_other_clients(pki: PKI, how: int, who: str) -> None:
    if who == "no_certificate":
        client = make_http_client(reactor, ca_file=pki.ca, pool=new_pool())
    else:
        client = make_http_client(
            reactor,
            ca_file=pki.ca,
            client_cert_file=pki.other_client.cert,
            client_key_file=pki.other_client.key,
            pool=new_pool(),
        )
    async with serving(mutual_endpoints(pki)[how]) as (hello, port):
        errors = await refused(client, f"https://127.0.0.1:{port}/hello")
    # The server's TLS alert says why, and the request never reached the app.
    alert = "certificate required" if who == "no_certificate" else "unknown ca"
    assert any(isinstance(e, SSL.Error) and alert in str(e) for e in errors), errors
    assert hello.served == 0


# -- configuration mistakes are clear errors ----------------------------------------------------


@pytest.mark.parametrize(
    "listen", ["tcp:8443:interface=127.0.0.1", "unix:/tmp/ts.sock", "haproxy:tcp:8443"]
)
def test_mutual_tls_needs_an_ssl_endpoint(pki: PKI, listen: str) -> None:
    with pytest.raises(TLSConfigError, match="'ssl:'"):
        listen_endpoint(reactor, listen, str(pki.ca))


def test_mismatched_key_is_refused_without_quoting_it(pki: PKI) -> None:
    with pytest.raises(TLSConfigError, match="does not match") as info:
        make_http_client(reactor, client_cert_file=pki.client.cert, client_key_file=pki.server.key)
    assert "PRIVATE KEY" not in str(info.value)


def test_missing_and_empty_files_are_named(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="cannot read the CA file"):
        make_http_client(reactor, ca_file=tmp_path / "nope.pem")
    empty = tmp_path / "empty.pem"
    empty.write_text("not a certificate\n")
    with pytest.raises(TLSConfigError, match="holds no PEM certificate"):
        make_http_client(reactor, ca_file=empty)
    with pytest.raises(TLSConfigError, match="without a client certificate"):
        make_http_client(reactor, ca_file=pki.ca, client_key_file=pki.client.key)
