"""Scenarios: what one operation of each workload sends (DESIGN §1's clients on the demo network).

An operation may make several calls (a cart session reserves, then commits or releases); every call
is timed under its RPC name. The first call of an open-loop operation is timed from its intended
start, so a stall anywhere shows up as latency.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from benchmarks.load.clients import Clients, Recorder
from inventory.v1 import common_pb2 as pb
from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import routing_service_pb2 as rp


@dataclass
class Universe:
    """The part of the network the load touches, discovered from the service before the run."""

    skus: list[str]  # in popularity order: rank 1 (the Zipf head) first
    sku_locs: dict[str, list[str]]  # active locations holding a stock row of the SKU
    warehouses: list[str]
    stores: list[str]  # active stores
    store_skus: dict[str, list[str]]  # SKUs stocked at each active store
    places: list[tuple[float, float]]  # destination cities (lat, lon) ...
    place_weights: list[float]  # ... and their populations
    route_excluded: list[str] = field(default_factory=list)  # to restrict routing to N locations


@dataclass
class Knobs:
    """Workload settings shared by every worker."""

    keys: bool = True  # idempotency keys on every mutating call, as clients should send them
    zipf_s: float = 1.0
    reserve_ttl_s: int = 60  # focused Reserve: holds left to expire (abandoned carts)
    cart_ttl_s: int = 60
    cart_expire_ttl_s: int = 2  # the 10 % of carts left to expire
    route_ttl_s: int = 60
    route_lines: int = 5
    flash_ttl_s: int = 900  # long: every unit sold in a flash sale stays sold for the check
    timeout_s: float = 10.0
    redis_pipeline: int = 50


class Env:
    """Per-worker state the scenarios draw from: RNG, Zipf sampler, clients, key counter."""

    def __init__(self, wid: int, run_id: str, seed: int, universe: Universe, knobs: Knobs,
                 clients: Clients, target: str) -> None:
        self.wid, self.run_id = wid, run_id
        self.rng = random.Random(seed * 1009 + wid)
        self.u, self.knobs, self.clients, self.target = universe, knobs, clients, target
        weights = [1.0 / (k ** knobs.zipf_s) for k in range(1, len(universe.skus) + 1)]
        self._cum = list(itertools.accumulate(weights))
        wh = set(universe.warehouses)
        self.wh_of = {s: [x for x in locs if x in wh] for s, locs in universe.sku_locs.items()}
        self.st_of = {s: [x for x in locs if x not in wh] for s, locs in universe.sku_locs.items()}
        self.pos_stores = [s for s in universe.stores if universe.store_skus.get(s)]
        self._place_cum = list(itertools.accumulate(universe.place_weights))
        self._seq = itertools.count(1)

    def rank(self) -> int:
        """A 0-based popularity rank drawn from the Zipf distribution."""
        i = bisect.bisect_left(self._cum, self.rng.random() * self._cum[-1])
        return min(i, len(self._cum) - 1)

    def sku(self) -> str:
        """A SKU by Zipf popularity."""
        return self.u.skus[self.rank()]

    def distinct_skus(self, n: int) -> list[str]:
        out: list[str] = []
        for _ in range(n * 4):
            s = self.sku()
            if s not in out:
                out.append(s)
                if len(out) == n:
                    break
        return out

    def key(self, kind: str) -> str:
        return f"{self.run_id}-{kind}-{self.wid}-{next(self._seq)}" if self.knobs.keys else ""

    def ref(self) -> str:
        return f"{self.run_id}-o{self.wid}-{next(self._seq)}"

    def place(self) -> tuple[float, float]:
        """A destination: a city by population, jittered by up to ~5 km."""
        i = bisect.bisect_left(self._place_cum, self.rng.random() * self._place_cum[-1])
        lat, lon = self.u.places[min(i, len(self.u.places) - 1)]
        return (lat + self.rng.uniform(-0.045, 0.045),
                lon + self.rng.uniform(-0.07, 0.07) / max(0.2, math.cos(math.radians(lat))))

    def line_location(self, sku: str, warehouse_share: float = 0.7) -> str:
        wh, st = self.wh_of.get(sku) or [], self.st_of.get(sku) or []
        pool = wh if (wh and (not st or self.rng.random() < warehouse_share)) else st
        return self.rng.choice(pool or self.u.sku_locs[sku])


class Scenario:
    """One workload: `op` runs one operation and records each call it makes."""

    name: ClassVar[str] = ""
    rpcs: ClassVar[tuple[str, ...]] = ()  # the primary RPC first (plots use it)

    def __init__(self, env: Env, params: dict[str, Any]) -> None:
        self.env, self.params = env, params

    async def setup(self) -> None:
        """Open what the scenario needs before the clock starts."""

    async def close(self) -> None:
        """Close what `setup` opened (shared clients stay open for the next phase)."""

    async def op(self, rec: Recorder, t0: float | None) -> None:
        raise NotImplementedError


class Availability(Scenario):
    """A product page: one SKU's availability at every location."""

    name, rpcs = "availability", ("GetAvailability",)

    async def op(self, rec: Recorder, t0: float | None) -> None:
        e = self.env
        await rec.call("GetAvailability", e.clients.inventory(e.target).GetAvailability,
                       api.GetAvailabilityRequest(skus=[e.sku()], channel=pb.CHANNEL_WEB), t0)


class Browse(Scenario):
    """Shoppers browsing: product and listing pages (availability), "in a store near me"."""

    name, rpcs = "browse", ("GetAvailability", "FindNearby")

    async def op(self, rec: Recorder, t0: float | None) -> None:
        e = self.env
        stub = e.clients.inventory(e.target)
        if e.rng.random() < 0.6:
            n = 1 if e.rng.random() < 0.7 else e.rng.randint(2, 10)
            await rec.call("GetAvailability", stub.GetAvailability, api.GetAvailabilityRequest(
                skus=e.distinct_skus(n), channel=pb.CHANNEL_WEB), t0)
        else:
            lat, lon = e.place()
            items = [api.SkuQuantity(sku=s, quantity=1) for s in e.distinct_skus(e.rng.randint(1, 2))]
            await rec.call("FindNearby", stub.FindNearby, api.FindNearbyRequest(
                items=items, lat=lat, lon=lon, radius_km=30.0, limit=10, channel=pb.CHANNEL_APP), t0)


class ReserveOnly(Scenario):
    """Durable Reserve of one line at a warehouse; the hold is left to expire."""

    name, rpcs = "reserve", ("Reserve",)

    async def op(self, rec: Recorder, t0: float | None) -> None:
        e = self.env
        sku = e.sku()
        line = pb.ReservationLine(sku=sku, location_id=e.line_location(sku, 1.0), quantity=1)
        await rec.call("Reserve", e.clients.inventory(e.target).Reserve, api.ReserveRequest(
            lines=[line], ttl_seconds=e.knobs.reserve_ttl_s, channel=pb.CHANNEL_WEB,
            idempotency_key=e.key("r")), t0)


class Cart(Scenario):
    """Reserve a 1-5 line cart, then commit (60 %), release (30 %) or leave it to expire (10 %)."""

    name, rpcs = "cart", ("Reserve", "CommitReservation", "ReleaseReservation")

    async def op(self, rec: Recorder, t0: float | None) -> None:
        e = self.env
        stub = e.clients.inventory(e.target)
        fate = e.rng.random()
        lines = []
        for sku in e.distinct_skus(e.rng.randint(1, 5)):
            lines.append(pb.ReservationLine(sku=sku, location_id=e.line_location(sku),
                                            quantity=e.rng.randint(1, 2)))
        ttl = e.knobs.cart_expire_ttl_s if fate >= 0.9 else e.knobs.cart_ttl_s
        resp = await rec.call("Reserve", stub.Reserve, api.ReserveRequest(
            lines=lines, ttl_seconds=ttl, channel=pb.CHANNEL_WEB, order_ref=e.ref(),
            idempotency_key=e.key("c")), t0)
        if resp is None or fate >= 0.9:
            return
        rid = resp.reservation.id
        if fate < 0.6:
            await rec.call("CommitReservation", stub.CommitReservation,
                           api.CommitReservationRequest(reservation_id=rid, idempotency_key=e.key("k")))
        else:
            await rec.call("ReleaseReservation", stub.ReleaseReservation,
                           api.ReleaseReservationRequest(reservation_id=rid,
                                                         idempotency_key=e.key("l")))


def route_request(e: Env, n_lines: int) -> rp.RouteAndReserveRequest:
    lat, lon = e.place()
    order = rp.RoutingOrder(
        lines=[rp.OrderLine(sku=s, quantity=e.rng.randint(1, 2)) for s in e.distinct_skus(n_lines)],
        method=rp.FULFILMENT_METHOD_SHIP, dest_lat=lat, dest_lon=lon,
        excluded_location_ids=e.u.route_excluded, channel=pb.CHANNEL_WEB, alternatives=1)
    return rp.RouteAndReserveRequest(order=order, ttl_seconds=e.knobs.route_ttl_s, order_ref=e.ref(),
                                     idempotency_key=e.key("rt"))


class Route(Scenario):
    """RouteAndReserve of a 5-line order (--route-lines) shipped to a Polish city; left to expire."""

    name, rpcs = "route", ("RouteAndReserve",)

    async def op(self, rec: Recorder, t0: float | None) -> None:
        e = self.env
        await rec.call("RouteAndReserve", e.clients.routing(e.target).RouteAndReserve,
                       route_request(e, e.knobs.route_lines), t0)


class Pos(Scenario):
    """Tills in stores: sell 1-3 items from the shelf (80 %), take a return of one item this
    worker sold (20 %; a return must name its sale)."""

    name, rpcs = "pos", ("Sell", "ReturnItems")
    SOLD_KEPT = 1_000

    def __init__(self, env: Env, params: dict[str, Any]) -> None:
        super().__init__(env, params)
        self._sold: list[tuple[str, str, str]] = []  # (store, sku, sale's reservation id)

    async def op(self, rec: Recorder, t0: float | None) -> None:
        e = self.env
        stub = e.clients.inventory(e.target)
        if e.rng.random() < 0.8 or not self._sold:
            store = e.rng.choice(e.pos_stores)
            shelf = e.u.store_skus[store]
            items = [api.SkuQuantity(sku=s, quantity=1)
                     for s in e.rng.sample(shelf, min(len(shelf), e.rng.randint(1, 3)))]
            out = await rec.call("Sell", stub.Sell, api.SellRequest(
                location_id=store, items=items, order_ref=e.ref(), idempotency_key=e.key("s"),
                channel=pb.CHANNEL_POS), t0)
            if out is not None:
                self._sold = (self._sold + [(store, x.sku, out.reservation.id)
                                            for x in items])[-self.SOLD_KEPT:]
        else:
            store, sku, res_id = self._sold.pop(e.rng.randrange(len(self._sold)))
            await rec.call("ReturnItems", stub.ReturnItems, api.ReturnItemsRequest(
                location_id=store, items=[api.SkuQuantity(sku=sku, quantity=1)],
                reservation_id=res_id, reason="customer return", idempotency_key=e.key("ret"),
                channel=pb.CHANNEL_POS), t0)


class Mixed(Scenario):
    """A retailer's day: 80 % reads (availability, near me), 15 % carts, 3 % routed orders, 2 % POS."""

    name = "mixed"
    rpcs = ("GetAvailability", "FindNearby", "Reserve", "CommitReservation", "ReleaseReservation",
            "RouteAndReserve", "Sell", "ReturnItems")

    def __init__(self, env: Env, params: dict[str, Any]) -> None:
        super().__init__(env, params)
        self._browse, self._cart, self._pos = Browse(env, params), Cart(env, params), Pos(env, params)

    async def op(self, rec: Recorder, t0: float | None) -> None:
        e, u = self.env, self.env.rng.random()
        if u < 0.80:
            await self._browse.op(rec, t0)
        elif u < 0.95:
            await self._cart.op(rec, t0)
        elif u < 0.98:
            await rec.call("RouteAndReserve", e.clients.routing(e.target).RouteAndReserve,
                           route_request(e, e.rng.randint(1, 5)), t0)
        else:
            await self._pos.op(rec, t0)


class FlashSale(Scenario):
    """Thousands of shoppers reserving one unit of a few hot SKUs with little stock."""

    name, rpcs = "flash-sale", ("Reserve",)

    def pick(self) -> tuple[tuple[str, str], int]:
        """The (sku, location) this attempt reserves at, and its hold's TTL: long, so every unit
        sold stays sold for the check."""
        return self.env.rng.choice(self.params["flash"]), self.env.knobs.flash_ttl_s

    async def op(self, rec: Recorder, t0: float | None) -> None:
        e = self.env
        (sku, loc), ttl_s = self.pick()
        await rec.call("Reserve", e.clients.inventory(e.target).Reserve, api.ReserveRequest(
            lines=[pb.ReservationLine(sku=sku, location_id=loc, quantity=1)],
            ttl_seconds=ttl_s, channel=pb.CHANNEL_APP, idempotency_key=e.key("f")), t0)


class FlashHot(FlashSale):
    """The flash sale's other shape: every unit on one hot SKU (all attempts on one row)."""

    name = "flash-hot"


class HotRow(FlashSale):
    """A flash sale while its stock lasts: every call reserves one unit of one SKU at one
    warehouse, which holds more than a run can sell, so every call is a winner and every write
    contends for that one row."""

    name = "hot-row"

    def pick(self) -> tuple[tuple[str, str], int]:
        return self.params["hot"], self.env.knobs.reserve_ttl_s  # the holds are left to expire


SCENARIOS: dict[str, type[Scenario]] = {
    c.name: c for c in (Availability, Browse, ReserveOnly, Cart, Route, Pos, Mixed, FlashSale,
                        FlashHot, HotRow)}
