"""Input fuzzing of every RPC: ≥ 10k generated malformed or extreme messages (empty, oversized,
negative, NaN/inf coordinates, unicode, duplicate lines, unknown ids and enums): no crash, never
INTERNAL or UNKNOWN, and every refusal names its field (DESIGN §4)."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2

from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import routing_service_pb2 as rp
from inventory.v1 import routing_service_pb2_grpc as rp_grpc
from tests.conftest import Stores
from tests.faults.harness import check_all, make_world, own_site, running, site_settings
from tests.grpc_helpers import details

INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)


class Gen:
    def __init__(self, rng: random.Random, skus: list[str], locs: list[str]) -> None:
        self.r, self.skus, self.locs = rng, skus, locs
        self.res_ids: list[str] = ["r-unknown", ""]

    def text(self) -> str:
        r = self.r
        return r.choice([
            "", " ", "x" * r.choice([63, 64, 65, 129, 257, 5000]), "SKU with space", "a{b}c",
            "pipe|d", "\x00nul", "ñandú-ü", "🦄" * r.randint(1, 70), "\u202eRTL", "-lead",
            "..", "ok-id_1.2", uuid_like(r), "\ud7ff", "tab\tx", "NaN",
        ])

    def sku(self) -> str:
        return self.r.choice(self.skus) if self.r.random() < 0.5 else self.text()

    def loc(self) -> str:
        return self.r.choice(self.locs) if self.r.random() < 0.5 else self.text()

    def qty(self) -> int:
        r = self.r
        return r.choice([0, -1, 1, 2, 5, 10**9, 10**9 + 1, INT64[0], INT64[1], r.randint(-50, 50)])

    def i32(self) -> int:
        return self.r.choice([0, -1, 1, 60, 86_401, INT32[0], INT32[1], self.r.randint(-9, 900)])

    def real(self) -> float:
        r = self.r
        return r.choice([math.nan, math.inf, -math.inf, 0.0, -0.0, 90.0, 90.0001, -180.5, 1e308,
                         -1e-308, r.uniform(-200, 200)])

    def enum(self) -> int:
        return self.r.choice([0, 1, 2, 3, 5, 6, 7, 99, -1, INT32[1]])

    def key(self) -> str:
        return self.r.choice(["", "k-" + uuid_like(self.r), "x" * 129, "🦄" * 40])

    def lines(self) -> list[pb.ReservationLine]:
        r = self.r
        n = r.choice([0, 1, 2, 3, 201])
        out = [pb.ReservationLine(sku=self.sku(), location_id=self.loc(), quantity=self.qty())
               for _ in range(min(n, 5))]
        if n == 201:
            out = [pb.ReservationLine(sku=f"S{i}", location_id=self.locs[0], quantity=1)
                   for i in range(201)]
        if out and r.random() < 0.2:
            out.append(out[0])  # a duplicate line
        return out

    def items(self) -> list[api.SkuQuantity]:
        return [api.SkuQuantity(sku=x.sku, quantity=x.quantity) for x in self.lines()]

    def location(self) -> pb.Location:
        r = self.r
        return pb.Location(id=self.loc(), name=self.text()[:300], type=self.enum(), lat=self.real(),
                           lon=self.real(), can_ship=r.random() < 0.5, active=r.random() < 0.5,
                           priority=self.i32(), fixed_cost=self.real(), cost_per_km=self.real(),
                           cost_per_unit=self.real(), daily_capacity=self.i32(),
                           default_safety_stock=self.qty())

    def order(self) -> rp.RoutingOrder:
        r = self.r
        o = rp.RoutingOrder(
            lines=[rp.OrderLine(sku=self.sku(), quantity=self.qty())
                   for _ in range(r.choice([0, 1, 2, 4]))],
            method=self.enum(), dest_lat=self.real(), dest_lon=self.real(),
            pickup_location_id=self.loc() if r.random() < 0.5 else "",
            max_shipments=self.i32(), policy=self.enum(), channel=self.enum(),
            alternatives=self.i32(), excluded_location_ids=[self.loc()])
        if r.random() < 0.5:
            o.split_penalty = self.real()
        if r.random() < 0.5:
            o.max_distance_km = self.real()
        return o


def uuid_like(r: random.Random) -> str:
    return f"{r.getrandbits(64):016x}"


def requests(g: Gen) -> list[tuple[str, Callable[[Any, Any], Any], Any]]:
    """One generated request per RPC: (name, how to call it, request)."""
    r = g.r
    res = r.choice(g.res_ids)
    ch = g.enum()
    return [
        ("UpsertLocations", lambda s, q: s.UpsertLocations(q),
         api.UpsertLocationsRequest(locations=[g.location() for _ in range(r.choice([0, 1, 2]))],
                                    idempotency_key=g.key())),
        ("ListLocations", lambda s, q: s.ListLocations(q),
         api.ListLocationsRequest(ids=[g.loc()], type=g.enum())),
        ("SetStock", lambda s, q: s.SetStock(q),
         api.SetStockRequest(sku=g.sku(), location_id=g.loc(), on_hand=g.qty(),
                             expected_version=g.qty(), reason=g.text(), idempotency_key=g.key(),
                             channel=ch)),
        ("AdjustStock", lambda s, q: s.AdjustStock(q),
         api.AdjustStockRequest(sku=g.sku(), location_id=g.loc(), delta=g.qty(),
                                reason=g.enum(), note=g.text(), idempotency_key=g.key(),
                                channel=ch)),
        ("ImportStock", lambda s, q: s.ImportStock(iter(q)),
         [api.ImportStockRequest(rows=[api.ImportRow(sku=g.sku(), location_id=g.loc(),
                                                     on_hand=g.qty(), safety_stock=g.qty())
                                       for _ in range(r.choice([0, 1, 3]))],
                                 idempotency_key=g.key(), reason=g.text())
          for _ in range(r.choice([0, 1, 2]))]),
        ("TransferStock", lambda s, q: s.TransferStock(q),
         api.TransferStockRequest(sku=g.sku(), from_location_id=g.loc(), to_location_id=g.loc(),
                                  quantity=g.qty(), reason=g.text(), idempotency_key=g.key(),
                                  channel=ch)),
        ("SetSafetyStock", lambda s, q: s.SetSafetyStock(q),
         api.SetSafetyStockRequest(sku=g.sku(), location_id=g.loc(), safety_stock=g.qty(),
                                   idempotency_key=g.key(), channel=ch)),
        ("GetAvailability", lambda s, q: s.GetAvailability(q),
         api.GetAvailabilityRequest(skus=[g.sku() for _ in range(r.choice([0, 1, 3]))],
                                    location_ids=[g.loc()] if r.random() < 0.5 else [],
                                    channel=ch)),
        ("FindNearby", lambda s, q: s.FindNearby(q),
         api.FindNearbyRequest(items=g.items(), lat=g.real(), lon=g.real(), radius_km=g.real(),
                               channel=ch, limit=g.i32(), pickup_only=r.random() < 0.5)),
        ("Reserve", lambda s, q: s.Reserve(q),
         api.ReserveRequest(lines=g.lines(), ttl_seconds=g.i32(), channel=ch,
                            order_ref=g.text(), idempotency_key=g.key())),
        ("GetReservation", lambda s, q: s.GetReservation(q),
         api.GetReservationRequest(reservation_id=r.choice([res, g.text()]))),
        ("ExtendReservation", lambda s, q: s.ExtendReservation(q),
         api.ExtendReservationRequest(reservation_id=r.choice([res, g.text()]),
                                      ttl_seconds=g.i32(), idempotency_key=g.key())),
        ("ReleaseReservation", lambda s, q: s.ReleaseReservation(q),
         api.ReleaseReservationRequest(reservation_id=r.choice([res, g.text()]),
                                       lines=g.lines() if r.random() < 0.5 else [],
                                       idempotency_key=g.key())),
        ("CommitReservation", lambda s, q: s.CommitReservation(q),
         api.CommitReservationRequest(reservation_id=r.choice([res, g.text()]),
                                      idempotency_key=g.key())),
        ("Sell", lambda s, q: s.Sell(q),
         api.SellRequest(location_id=g.loc(), items=g.items(), order_ref=g.text(),
                         idempotency_key=g.key(), channel=ch)),
        ("ReturnItems", lambda s, q: s.ReturnItems(q),
         api.ReturnItemsRequest(location_id=g.loc(), items=g.items(), order_ref=g.text(),
                                reason=g.text(), idempotency_key=g.key(), channel=ch)),
        ("ListMovements", lambda s, q: s.ListMovements(q),
         api.ListMovementsRequest(sku=g.sku(), location_id=g.loc(),
                                  order_ref=g.text() if r.random() < 0.3 else "",
                                  reservation_id=r.choice(["", res]), page_size=g.i32(),
                                  page_token=r.choice(["", "m1", "mx", "m-1", g.text()]))),
        ("RouteOrder", lambda s, q: s.route.RouteOrder(q),
         rp.RouteOrderRequest(order=g.order())),
        ("RouteAndReserve", lambda s, q: s.route.RouteAndReserve(q),
         rp.RouteAndReserveRequest(order=g.order(), ttl_seconds=g.i32(), order_ref=g.text(),
                                   idempotency_key=g.key())),
    ]


def root_fields(request: Any) -> set[str]:
    msg = request[0] if isinstance(request, list) and request else request
    if isinstance(msg, list):
        return {"rows"}
    return {f.name for f in msg.DESCRIPTOR.fields}


async def test_fuzz_every_rpc(stores: Stores, soak: bool) -> None:
    total = 100_000 if soak else 10_000
    rng = random.Random(11)
    async with own_site(stores) as site, running(site_settings(stores, site)) as (svc, stub, ch):
        w = await make_world(stub, locations=2, skus=3, on_hand=50)
        stub.route = rp_grpc.RoutingServiceStub(ch)  # type: ignore[attr-defined]
        g = Gen(rng, w.skus, w.locations)
        codes: Counter[str] = Counter()
        problems: list[str] = []
        sent = 0

        async def one(name: str, call: Callable[[Any, Any], Any], request: Any) -> None:
            try:
                out = await call(stub, request)
                codes["OK"] += 1
                if name in ("Reserve", "RouteAndReserve"):
                    g.res_ids.append(out.reservation.id)
                return
            except grpc.aio.AioRpcError as err:
                code = err.code()
                codes[code.name] += 1
                where = f"{name}({str(request)[:200]!r}) -> {code.name}: {err.details()}"
                if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    problems.append(where)
                    return
                try:
                    found = details(err)
                except (ValueError, AssertionError) as exc:  # the answer did not arrive whole
                    problems.append(f"{exc}: {where}")
                    return
                if code is grpc.StatusCode.INVALID_ARGUMENT:
                    fields = [v.field for d in found if isinstance(d, error_details_pb2.BadRequest)
                              for v in d.field_violations]
                    roots = root_fields(request)
                    if not fields or any(f.split("[")[0].split(".")[0] not in roots
                                         for f in fields):
                        problems.append(f"refusal without its field ({fields}): {where}")
                elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    subjects = [v.subject for d in found if isinstance(d, error_details_pb2.QuotaFailure)
                                for v in d.violations]
                    if not all(subjects) or not subjects:
                        problems.append(f"limit without its field: {where}")
                elif not (err.details() or ""):
                    problems.append(f"refusal without a message: {where}")

        while sent < total:
            batch = [x for _ in range(4) for x in requests(g)]
            sent += len(batch)
            await asyncio.gather(*(one(*x) for x in batch))
        assert not problems, f"{len(problems)} bad answers, e.g. {problems[:5]}"
        await check_all(svc.ctx.pg.pool, svc.ctx.redis.client, w.skus)
        print(f"fuzz: {sent} messages over 19 RPCs: {dict(codes)}")
