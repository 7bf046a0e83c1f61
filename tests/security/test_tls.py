"""Transport security (issue 10): TLS, mTLS identities mapped to principals, the plaintext
health-only port, the refusal to serve a non-loopback address open, secrets kept out of
configuration errors, and metrics bound to loopback by default.

Certificates are made here with `cryptography`: a CA, a server certificate for 127.0.0.1 and
localhost, client certificates of known and unknown identities, and one from another CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from inventory_svc.config import ConfigError, Settings
from inventory_svc.server import Running, serve
from tests.conftest import Stores, settings_for, store_location, uid
from tests.grpc_helpers import expect_error

POS_IDENTITY = "pos-krk-01.stores.example"  # in the certificate's CN only
READER_IDENTITY = "dashboard.reports.example"  # in the certificate's SAN only
ADMIN = (("x-api-key", "k-tls-admin"),)
Key = ec.EllipticCurvePrivateKey


# ---- certificates ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: str, issuer: x509.Name, key: Key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1)))


def _pem(cert: x509.Certificate, key: Key) -> Pem:
    return Pem(cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def make_ca(cn: str) -> tuple[x509.Certificate, Key]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (_builder(cn, _name(cn), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(ca: tuple[x509.Certificate, Key], cn: str, *, dns: tuple[str, ...] = (),
          ips: tuple[str, ...] = (), server: bool = False) -> Pem:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (_builder(cn, ca_cert.subject, key)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                   ca_key.public_key()), critical=False))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _pem(builder.sign(ca_key, hashes.SHA256()), key)


@dataclass(frozen=True)
class Pki:
    ca: bytes
    ca_file: str
    cert_file: str
    key_file: str
    principals_file: str
    pos: Pem  # CN = POS_IDENTITY, mapped to a pos principal
    reader: Pem  # SAN = READER_IDENTITY, mapped to a reader principal
    stranger: Pem  # our CA, an identity mapped to nothing
    foreign: Pem  # CN = POS_IDENTITY, but signed by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = make_ca("inventory test CA")
    server = issue(ca, "inventory-svc", dns=("localhost",), ips=("127.0.0.1", "::1"),
                   server=True)

    def write(name: str, data: bytes | str) -> str:
        path = root / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(path)

    principals = f"""
[[principal]]
name = "pos-krk-01"
role = "pos"
mtls_identities = ["{POS_IDENTITY}"]
location_prefixes = ["L-"]

[[principal]]
name = "dashboard"
role = "reader"
mtls_identities = ["{READER_IDENTITY}"]
"""
    ca_pem = ca[0].public_bytes(serialization.Encoding.PEM)
    return Pki(
        ca=ca_pem, ca_file=write("ca.pem", ca_pem), cert_file=write("server.pem", server.cert),
        key_file=write("server.key", server.key),
        principals_file=write("principals.toml", principals),
        pos=issue(ca, POS_IDENTITY),
        reader=issue(ca, "reporting client", dns=(READER_IDENTITY,)),
        stranger=issue(ca, "stranger.example", dns=("stranger.example",)),
        foreign=issue(make_ca("some other CA"), POS_IDENTITY, dns=(POS_IDENTITY,)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tls_channel(pki: Pki, port: int, client: Pem | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca, private_key=client.key if client else None,
        certificate_chain=client.cert if client else None)
    # a channel of its own: a failed handshake of one test shares no connection with another
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                   options=[("grpc.use_local_subchannel_pool", 1)])


def plain_channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                     options=[("grpc.use_local_subchannel_pool", 1)])


async def world(stub: api_grpc.InventoryServiceStub, metadata: tuple[tuple[str, str], ...] = ADMIN
                ) -> tuple[str, str]:
    loc, sku = uid("L"), uid("SKU")
    await stub.UpsertLocations(api.UpsertLocationsRequest(locations=[store_location(loc)]),
                               metadata=metadata)
    await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=7),
                        metadata=metadata)
    return loc, sku


# ---- servers --------------------------------------------------------------------------------------
@dataclass
class TlsService:
    running: Running
    health_port: int
    metrics_port: int


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_service(stores: Stores, pki: Pki) -> AsyncIterator[TlsService]:
    """TLS on every address (0.0.0.0: allowed because it has both TLS and keys), with a
    plaintext health-only port and metrics."""
    health_port, metrics_port = free_port(), free_port()
    settings = settings_for(stores, host="0.0.0.0", tls_cert=pki.cert_file, tls_key=pki.key_file,
                            api_keys="k-tls-admin:admin,k-tls-reader:reader",
                            health_port=health_port, metrics_port=metrics_port)
    async with serve(settings) as running:
        yield TlsService(running, health_port, metrics_port)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def mtls_service(stores: Stores, pki: Pki) -> AsyncIterator[Running]:
    """Client certificates required; identities from the principals file, and one API key."""
    settings = settings_for(stores, tls_cert=pki.cert_file, tls_key=pki.key_file,
                            tls_client_ca=pki.ca_file, principals_file=pki.principals_file,
                            api_keys="k-tls-admin:admin")
    async with serve(settings) as running:
        yield running


# ---- TLS ------------------------------------------------------------------------------------------
async def test_tls_client_is_served_and_a_plaintext_client_is_not(
        tls_service: TlsService, pki: Pki) -> None:
    port = tls_service.running.port
    async with tls_channel(pki, port) as ch:
        stub = api_grpc.InventoryServiceStub(ch)
        _, sku = await world(stub)  # an API key over TLS
        got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]),
                                         metadata=(("x-api-key", "k-tls-reader"),))
        assert got.items[0].total_on_hand == 7
        # TLS is not a key: a call without one is still refused
        await expect_error(stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku])),
                           grpc.StatusCode.UNAUTHENTICATED)
    async with plain_channel(port) as ch:
        await expect_error(api_grpc.InventoryServiceStub(ch).GetAvailability(
            api.GetAvailabilityRequest(skus=[sku]), metadata=ADMIN, timeout=10),
            grpc.StatusCode.UNAVAILABLE)


async def test_health_port_is_plaintext_and_serves_health_only(
        tls_service: TlsService, pki: Pki) -> None:
    async with plain_channel(tls_service.health_port) as ch:
        got = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                         timeout=10)
        assert got.status == health_pb2.HealthCheckResponse.SERVING
        got = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="inventory.v1.InventoryService"), timeout=10)
        assert got.status == health_pb2.HealthCheckResponse.SERVING
        # nothing else, not even with a valid key
        await expect_error(api_grpc.InventoryServiceStub(ch).ListLocations(
            api.ListLocationsRequest(), metadata=ADMIN, timeout=10),
            grpc.StatusCode.UNIMPLEMENTED)
        await expect_error(rp_grpc.RoutingServiceStub(ch).RouteOrder(
            rp.RouteOrderRequest(), metadata=ADMIN, timeout=10), grpc.StatusCode.UNIMPLEMENTED)


def _listening(port: int) -> list[str]:
    """The local addresses listening on TCP `port`, from /proc/net/tcp and tcp6."""
    out = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state != "0A" or int(hexport, 16) != port:  # 0A: LISTEN
                continue
            # the kernel prints each 32-bit word of the address in host (little-endian) order
            raw = b"".join(bytes.fromhex(addr[i:i + 8])[::-1] for i in range(0, len(addr), 8))
            assert len(raw) == width
            out.append(str(ipaddress.ip_address(raw)))
    return out


async def test_metrics_listen_on_loopback_even_when_grpc_listens_everywhere(
        tls_service: TlsService) -> None:
    assert Settings().metrics_host == "127.0.0.1"
    assert tls_service.running.settings.host == "0.0.0.0"
    grpc_on = _listening(tls_service.running.port)
    assert grpc_on and not any(ipaddress.ip_address(a).is_loopback for a in grpc_on), grpc_on
    assert _listening(tls_service.metrics_port) == ["127.0.0.1"]


# ---- mTLS -----------------------------------------------------------------------------------------
async def test_mtls_refuses_clients_without_a_certificate_of_our_ca(
        mtls_service: Running, pki: Pki) -> None:
    for client in (None, pki.foreign):
        async with tls_channel(pki, mtls_service.port, client) as ch:
            # a key does not stand in for the certificate: the handshake fails first
            await expect_error(api_grpc.InventoryServiceStub(ch).ListLocations(
                api.ListLocationsRequest(), metadata=ADMIN, timeout=10),
                grpc.StatusCode.UNAVAILABLE)


async def test_mtls_identity_gets_the_role_of_its_principal(
        mtls_service: Running, pki: Pki) -> None:
    async with tls_channel(pki, mtls_service.port, pki.stranger) as ch:
        stub = api_grpc.InventoryServiceStub(ch)
        # an identity mapped to nothing may still call with a key (API key over mTLS) ...
        loc, sku = await world(stub)
        # ... and without one it is nobody
        err = await expect_error(stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku])),
                                 grpc.StatusCode.UNAUTHENTICATED)
        assert "certificate" in (err.details() or "")
    line = pb.ReservationLine(sku=sku, location_id=loc, quantity=1)
    async with tls_channel(pki, mtls_service.port, pki.reader) as ch:  # SAN → reader
        stub = api_grpc.InventoryServiceStub(ch)
        got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
        assert got.items[0].total_on_hand == 7
        err = await expect_error(stub.Reserve(api.ReserveRequest(lines=[line])),
                                 grpc.StatusCode.PERMISSION_DENIED)
        assert "reader" in (err.details() or "") and "Reserve" in (err.details() or "")
    async with tls_channel(pki, mtls_service.port, pki.pos) as ch:  # CN → pos
        stub = api_grpc.InventoryServiceStub(ch)
        await stub.Reserve(api.ReserveRequest(lines=[line]))
        await stub.Sell(api.SellRequest(location_id=loc, items=[
            api.SkuQuantity(sku=sku, quantity=1)]))
        await expect_error(stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=99)),
                           grpc.StatusCode.PERMISSION_DENIED)
        got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku]))
        assert (got.items[0].total_on_hand, got.items[0].levels[0].reserved) == (6, 1)


# ---- configuration --------------------------------------------------------------------------------
def test_non_loopback_needs_tls_and_principals(pki: Pki) -> None:
    tls = dict(tls_cert=pki.cert_file, tls_key=pki.key_file)
    for host in ("0.0.0.0", "192.0.2.7", "::", "", "inventory.internal"):
        with pytest.raises(ConfigError, match="TLS"):
            Settings(host=host, api_keys="k:reader").validate()
        with pytest.raises(ConfigError, match="principals"):
            Settings(host=host, **tls).validate()  # type: ignore[arg-type]
        Settings(host=host, api_keys="k:reader", **tls).validate()  # type: ignore[arg-type]
        Settings(host=host, tls_client_ca=pki.ca_file, principals_file=pki.principals_file,
                 **tls).validate()  # type: ignore[arg-type]
        Settings(host=host, allow_insecure=True).validate()
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        Settings(host=host).validate()
    with pytest.raises(ConfigError, match="TLS"):
        Settings.from_env({"INVENTORY_HOST": "0.0.0.0", "INVENTORY_API_KEYS": "k:reader"})
    assert Settings.from_env({"INVENTORY_HOST": "0.0.0.0",
                              "INVENTORY_ALLOW_INSECURE": "true"}).allow_insecure


@pytest.mark.parametrize("env", [
    {"INVENTORY_DATABASE_URL": "postgresql://u:secret@h/db", "INVENTORY_PORT": "x"},
    {"INVENTORY_DATABASE_URL": "mysql://u:secret@h/db"},
    {"INVENTORY_DATABASE_URL": "postgresql+asyncpg://u:secret@h:5432/db"},
    {"INVENTORY_REDIS_URL": "http://:secret@h:6379/0"},
    # not URLs at all: a libpq keyword string, and passwords with unescaped / and @
    {"INVENTORY_DATABASE_URL": "host=h user=u password=secret dbname=db"},
    {"INVENTORY_DATABASE_URL": "mysql://u:my/secret@h/db"},
    {"INVENTORY_DATABASE_URL": "mysql://u:p@secret@h/db"},
], ids=["bad-port", "scheme", "driver-scheme", "redis-scheme", "keywords", "slash", "at"])
def test_config_errors_never_print_a_password(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    text = str(caught.value)
    assert "secret" not in text, text
    assert text.startswith("INVENTORY_"), text  # still names the variable
