"""Who may call what, for which channel, at which location (docs/SECURITY.md), over real gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import routing_service_pb2 as rp
from inventory_svc.config import ConfigError, Settings
from inventory_svc.server import Running
from tests.conftest import Stores, store_location, uid
from tests.grpc_helpers import expect_error
from tests.security.kit import Client, Entry, service_with

READS = {"ListLocations", "GetAvailability", "FindNearby", "GetReservation", "ListMovements",
         "RouteOrder"}
SHOP = READS | {"Reserve", "ExtendReservation", "ReleaseReservation", "CommitReservation",
                "ReturnItems", "RouteAndReserve"}
ERP = READS | {"UpsertLocations", "SetStock", "AdjustStock", "ImportStock", "TransferStock",
               "SetSafetyStock", "ReturnItems", "ReleaseReservation"}
# The contract as docs/SECURITY.md states it, written out here rather than read from the code.
ALLOWED = {"reader": READS, "shop": SHOP, "pos": SHOP | {"Sell"}, "erp": ERP, "admin": None}
STORE = "S1-" + uid("ST")  # the pos principal's store
OTHER = "S2-" + uid("ST")
WAREHOUSE = uid("WH")
KEYS = {role: f"key-{role}-{uid('k')}" for role in ALLOWED}


def _entries() -> list[Entry]:
    return [
        Entry("reader-1", "reader", KEYS["reader"]),
        Entry("shop-1", "shop", KEYS["shop"]),
        Entry("shop-2", "shop", "key-shop-two"),
        Entry("app-1", "shop", "key-app-only", channels=["APP"]),
        Entry("pos-1", "pos", KEYS["pos"], locations=[STORE]),
        Entry("erp-1", "erp", KEYS["erp"]),
        Entry("admin-1", "admin", KEYS["admin"]),
    ]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def svc(stores: Stores, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Running]:
    async with service_with(stores, tmp_path_factory.mktemp("principals"), _entries()) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def ch(svc: Running) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
        yield channel


def _methods() -> list[tuple[str, str, Any, bool]]:
    out = []
    for module, service in ((api, "InventoryService"), (rp, "RoutingService")):
        desc = module.DESCRIPTOR.services_by_name[service]
        for m in desc.methods:
            request_type = getattr(module, m.input_type.name)
            out.append((f"/{desc.full_name}/{m.name}", m.name, request_type, m.client_streaming))
    return out


async def _code(ch: grpc.aio.Channel, path: str, request_type: Any, streaming: bool,
                key: str) -> grpc.StatusCode:
    """The status of a call with an empty request (nothing it could change)."""
    meta = (("x-api-key", key),) if key else ()
    try:
        if streaming:
            async def one() -> AsyncIterator[Any]:
                yield request_type()
            await ch.stream_unary(path, request_serializer=request_type.SerializeToString,
                                  response_deserializer=None)(one(), metadata=meta)
        else:
            await ch.unary_unary(path, request_serializer=request_type.SerializeToString,
                                 response_deserializer=None)(request_type(), metadata=meta)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("role", sorted(ALLOWED))
async def test_each_role_calls_exactly_its_methods(ch: grpc.aio.Channel, role: str) -> None:
    allowed = ALLOWED[role]
    for path, name, request_type, streaming in _methods():
        code = await _code(ch, path, request_type, streaming, KEYS[role])
        if allowed is None or name in allowed:
            assert code not in (grpc.StatusCode.PERMISSION_DENIED,
                                grpc.StatusCode.UNAUTHENTICATED), f"{role} denied {name}"
            assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (role, name)
        else:
            assert code == grpc.StatusCode.PERMISSION_DENIED, f"{role} may call {name}: {code}"


async def test_no_key_or_an_unknown_key_is_unauthenticated_for_every_method(
        ch: grpc.aio.Channel) -> None:
    for path, name, request_type, streaming in _methods():
        for key in ("", "not-a-key", KEYS["shop"] + "x"):
            code = await _code(ch, path, request_type, streaming, key)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, key, code)


async def _world(ch: grpc.aio.Channel, safety: int = 0) -> str:
    """STORE, OTHER and WAREHOUSE with 10 units (safety stock `safety`) of a new SKU."""
    erp = Client(ch, KEYS["erp"])
    await erp.call(erp.inv.UpsertLocations, api.UpsertLocationsRequest(locations=[
        store_location(STORE, default_safety_stock=safety),
        store_location(OTHER, default_safety_stock=safety),
        store_location(WAREHOUSE, type=pb.LOCATION_TYPE_WAREHOUSE, default_safety_stock=safety)]))
    sku = uid("SKU")
    for loc in (STORE, OTHER, WAREHOUSE):
        await erp.call(erp.inv.SetStock, api.SetStockRequest(sku=sku, location_id=loc, on_hand=10))
    return sku


def _reserve(sku: str, loc: str, qty: int = 1, **kw: Any) -> api.ReserveRequest:
    return api.ReserveRequest(lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=qty)],
                              **kw)


async def _available(ch: grpc.aio.Channel, sku: str, loc: str) -> tuple[int, int]:
    """(on_hand, reserved) at loc."""
    erp = Client(ch, KEYS["erp"])
    got = await erp.call(erp.inv.GetAvailability, api.GetAvailabilityRequest(
        skus=[sku], location_ids=[loc]))
    level = got.items[0].levels[0]
    return level.on_hand, level.reserved


async def test_the_channel_comes_from_the_principal(ch: grpc.aio.Channel) -> None:
    sku = await _world(ch)
    shop, app = Client(ch, KEYS["shop"]), Client(ch, "key-app-only")
    got = await shop.call(shop.inv.Reserve, _reserve(sku, STORE))
    assert got.reservation.channel == pb.CHANNEL_WEB  # a shop's first channel
    got = await app.call(app.inv.Reserve, _reserve(sku, STORE))
    assert got.reservation.channel == pb.CHANNEL_APP  # one channel: it need not send it
    await expect_error(app.call(app.inv.Reserve, _reserve(sku, STORE, channel=pb.CHANNEL_WEB)),
                       grpc.StatusCode.PERMISSION_DENIED)
    # a shop naming POS would take the safety stock that remote channels may not
    err = await expect_error(shop.call(shop.inv.Reserve, _reserve(
        sku, STORE, channel=pb.CHANNEL_POS)), grpc.StatusCode.PERMISSION_DENIED)
    assert "POS" in (err.details() or "")
    await expect_error(shop.call(shop.routing.RouteOrder, rp.RouteOrderRequest(order=rp.RoutingOrder(
        lines=[rp.OrderLine(sku=sku, quantity=1)], dest_lat=52.0, dest_lon=21.0,
        channel=pb.CHANNEL_POS))), grpc.StatusCode.PERMISSION_DENIED)
    pos = Client(ch, KEYS["pos"])
    await expect_error(pos.call(pos.inv.Reserve, _reserve(sku, STORE, channel=pb.CHANNEL_WEB)),
                       grpc.StatusCode.PERMISSION_DENIED)
    assert await _available(ch, sku, STORE) == (10, 2), "refused calls changed stock"


async def test_pos_sells_into_the_safety_stock_only_at_its_own_store(ch: grpc.aio.Channel) -> None:
    sku = await _world(ch, safety=8)  # 10 on hand, 2 for remote channels
    pos, shop = Client(ch, KEYS["pos"]), Client(ch, KEYS["shop"])
    await expect_error(shop.call(shop.inv.Reserve, _reserve(sku, STORE, 3)),
                       grpc.StatusCode.FAILED_PRECONDITION)
    sold = await pos.call(pos.inv.Sell, api.SellRequest(location_id=STORE, items=[
        api.SkuQuantity(sku=sku, quantity=9)]))
    assert sold.reservation.channel == pb.CHANNEL_POS
    for loc in (OTHER, WAREHOUSE):
        err = await expect_error(pos.call(pos.inv.Sell, api.SellRequest(location_id=loc, items=[
            api.SkuQuantity(sku=sku, quantity=1)])), grpc.StatusCode.PERMISSION_DENIED)
        assert loc in (err.details() or "")
        await expect_error(pos.call(pos.inv.Reserve, _reserve(sku, loc)),
                           grpc.StatusCode.PERMISSION_DENIED)
    assert await _available(ch, sku, STORE) == (1, 0)
    assert await _available(ch, sku, OTHER) == (10, 0)
    assert await _available(ch, sku, WAREHOUSE) == (10, 0)


async def test_idempotency_keys_belong_to_their_principal(ch: grpc.aio.Channel) -> None:
    sku = await _world(ch)
    a, b = Client(ch, KEYS["shop"]), Client(ch, "key-shop-two")
    key = uid("cart")
    # B claims the key first: A's real call must not fail, nor get B's reservation
    got_b = await b.call(b.inv.Reserve, _reserve(sku, STORE, 2, idempotency_key=key))
    got_a = await a.call(a.inv.Reserve, _reserve(sku, STORE, 1, idempotency_key=key))
    assert got_a.reservation.id != got_b.reservation.id
    again = await a.call(a.inv.Reserve, _reserve(sku, STORE, 1, idempotency_key=key))
    assert again == got_a  # A's own repeat replays A's answer
    await expect_error(b.call(b.inv.Reserve, _reserve(sku, STORE, 1, idempotency_key=key)),
                       grpc.StatusCode.ALREADY_EXISTS)  # B's key, another request
    assert await _available(ch, sku, STORE) == (10, 3)


@pytest.mark.parametrize(("spec", "needle"), [
    ("k:pos", "needs its store"),
    ("k:cashier", "role must be one of"),
    ("k:shop,k:erp", "twice|shares a key"),
    (":shop", "empty key"),
])
def test_bad_api_keys_stop_the_start(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Settings(api_keys=spec).validate()


@pytest.mark.parametrize(("body", "needle"), [
    ('name = "a"\nrole = "shop"\nkeys_sha256 = ["' + "0" * 64 + '"]\nchannels = ["POS"]',
     "only pos and admin principals act for POS"),
    ('name = "a"\nrole = "pos"\nkeys_sha256 = ["' + "0" * 64 + '"]', "needs its store"),
    ('name = "a b"\nrole = "shop"\nkeys_sha256 = ["' + "0" * 64 + '"]', "name must be"),
    ('name = "a"\nrole = "shop"\nkeys_sha256 = ["plain-key"]', "64 hex digits"),
    ('name = "a"\nrole = "shop"', "needs keys_sha256 or mtls_identities"),
    ('name = "a"\nrole = "shop"\nkeys_sha256 = ["' + "0" * 64 + '"]\nquotas = {burst = -1}',
     "quotas.burst"),
    ('name = "a"\nrole = "shop"\nkeys_sha256 = ["' + "0" * 64 + '"]\nsecret = "x"',
     "unknown keys"),
])
def test_bad_principals_files_stop_the_start(tmp_path: Path, body: str, needle: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text("[[principal]]\n" + body + "\n")
    with pytest.raises(ConfigError, match=needle):
        Settings(principals_file=str(path)).validate()


def test_keys_are_kept_only_as_hashes(tmp_path: Path) -> None:
    from inventory_svc.transport.principals import load_principals

    registry = load_principals(Settings(api_keys="plain-secret:shop"))
    assert registry.by_key("plain-secret") is not None
    assert all(b"plain-secret" not in d for d in registry.by_digest)
    assert "plain-secret" not in repr(registry)
