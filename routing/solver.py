"""Typed front of the routing solver (DESIGN §5): `Network`, `solve`, `warm_up`.

Policies (all respect the same eligibility, max_shipments and split_lines rules and report the
cost of the plan they pick with the §5 formula):

- OPTIMAL: the exact minimum of the §5 cost; ties as in `routing.bnb` (fewer locations, then
  the smaller sorted list of (priority, id)).
- PRIORITY (Magento MSI default source selection), CLOSEST (Magento distance-based SSA,
  Shopify), HIGHEST_STOCK (Saleor "prioritize high stock"): walk the eligible locations in a
  fixed order and fill greedily: each location supplies all it can of every line still short
  (whole lines only when split_lines is off). A location is skipped when it supplies nothing, or
  when taking it would leave the rest impossible within max_shipments using locations later in
  the walk; so the walk finds a plan whenever one exists. Orders: PRIORITY by (priority, id);
  CLOSEST by (distance to the destination, id); HIGHEST_STOCK by total available units of the
  order's lines, descending, then (priority, id).
- FEWEST_SPLITS (Salesforce OMS / Shopify): the fewest locations, then the cheapest among those,
  then the OPTIMAL tie rule.

Alternatives are always the best OPTIMAL plans (plan order) whose location set differs from the
chosen plan's. Location ids compare as Python strings (code point order). The kernels release
the GIL, so `solve` may run in a worker thread.

The kernels (`routing.kernels`) are compiled, or loaded from numba's on-disk cache, when that
module is first imported: by `warm_up` or the first `solve`. Importing this module does neither,
so a service can start serving other calls while the kernels load (`routing.warm`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter
from types import ModuleType
from typing import Any

import numpy as np

from routing.model import (
    Allocation,
    Exclusion,
    ExclusionReason,
    LineShortfall,
    LocationType,
    Method,
    Order,
    OrderLine,
    Plan,
    Policy,
    RoutingResult,
    SiteInfo,
    UnknownLocationError,
)

MAX_SUGGESTIONS = 5
_kernels: ModuleType | None = None


def kernels() -> ModuleType:
    """`routing.kernels`, imported (so compiled or loaded from the cache) on first use."""
    global _kernels
    if _kernels is None:
        from routing import kernels as module

        _kernels = module
    return _kernels


class Network:
    """The locations as contiguous arrays; build once, reuse for every request.

    Only `capacity_left` changes often: pass an array to `solve` or call `set_capacity`.
    """

    def __init__(self, sites: Sequence[SiteInfo]) -> None:
        ids = [s.id for s in sites]
        self.ids: tuple[str, ...] = tuple(ids)
        self.index: dict[str, int] = {x: i for i, x in enumerate(ids)}
        if len(self.index) != len(ids):
            raise ValueError("duplicate location ids in the network")
        self.sites: tuple[SiteInfo, ...] = tuple(sites)
        self.lat = np.radians(np.array([s.lat for s in sites], np.float64))
        self.lon = np.radians(np.array([s.lon for s in sites], np.float64))
        self.active = np.array([s.active for s in sites], np.bool_)
        self.can_ship = np.array([s.can_ship for s in sites], np.bool_)
        self.can_pickup = np.array([s.can_pickup for s in sites], np.bool_)
        self.fixed = np.array([s.fixed_cost for s in sites], np.float64)
        self.per_km = np.array([s.cost_per_km for s in sites], np.float64)
        self.cpu = np.array([s.cost_per_unit for s in sites], np.float64)
        self.priority = np.array([s.priority for s in sites], np.int64)
        self.rank = _positions(sorted(range(len(ids)), key=lambda i: (sites[i].priority, ids[i])))
        self.id_rank = _positions(sorted(range(len(ids)), key=lambda i: ids[i]))
        self.capacity = np.array([s.capacity_left for s in sites], np.int64)
        self.rank_list: list[int] = self.rank.tolist()
        self.cpu_list: list[float] = self.cpu.tolist()
        # Every possible Exclusion, prebuilt: index (reason - 1) * n + i.
        self._exclusions: list[Exclusion] = [Exclusion(x, r) for r in ExclusionReason for x in ids]

    @property
    def size(self) -> int:
        return len(self.ids)

    def set_capacity(self, capacity_left: np.ndarray | Sequence[int]) -> None:
        """Replace the remaining daily shipments of every location (-1 = unlimited)."""
        self.capacity = _as_capacity(capacity_left, self.size)

    def exclusions(self, reason: np.ndarray) -> tuple[Exclusion, ...]:
        """Exclusions for a per-location reason code array (0 = eligible), in network order."""
        nz = np.flatnonzero(reason)
        keys: list[int] = ((reason[nz].astype(np.int64) - 1) * self.size + nz).tolist()
        if len(keys) < 2:
            return tuple(self._exclusions[k] for k in keys)
        found: tuple[Exclusion, ...] = itemgetter(*keys)(self._exclusions)
        return found


def _positions(order: list[int]) -> np.ndarray:
    out = np.empty(len(order), np.int64)
    out[np.array(order, np.int64)] = np.arange(len(order), dtype=np.int64)
    return out


def _as_capacity(capacity: np.ndarray | Sequence[int], n: int) -> np.ndarray:
    arr = np.array(capacity, np.int64)
    if arr.shape != (n,):
        raise ValueError(f"capacity_left must have shape ({n},), got {arr.shape}")
    if n and arr.min() < -1:
        raise ValueError("capacity_left values must be >= -1 (-1 = unlimited)")
    return arr


def _as_stock(stock: np.ndarray, n: int, n_lines: int) -> np.ndarray:
    arr = np.ascontiguousarray(stock, np.int64)
    if arr.shape != (n, n_lines):
        raise ValueError(f"stock must have shape ({n}, {n_lines}), got {arr.shape}")
    return arr if arr.flags.writeable else arr.copy()


def solve(network: Network, order: Order, stock: np.ndarray,
          capacity_left: np.ndarray | Sequence[int] | None = None) -> RoutingResult:
    """Route `order` over `network`.

    stock[i, j]: units of order line j available at location i for the order's channel (the
    caller applies reservations and safety stock). capacity_left: remaining daily shipments per
    location (-1 unlimited); defaults to the network's. Every location a plan ships from consumes
    one shipment of capacity; the pickup store P supplying units from its own shelf ships
    nothing, so it needs no capacity left (and the caller should not consume any for it); an
    excluded P stays the destination, only its shelf is not used. Raises UnknownLocationError
    for an unknown pickup location; excluded ids unknown to the network are ignored.
    """
    n, n_lines = network.size, len(order.lines)
    stock_arr = _as_stock(stock, n, n_lines)
    cap = network.capacity if capacity_left is None else _as_capacity(capacity_left, n)
    excluded = np.zeros(n, np.bool_)
    for loc in order.excluded:
        i = network.index.get(loc)
        if i is not None:
            excluded[i] = True
    qty = np.array([line.qty for line in order.lines], np.int64)
    pickup = -1
    dest_lat = dest_lon = 0.0
    if order.method is Method.PICKUP:
        pid = order.pickup_location_id
        if pid is None or pid not in network.index:
            raise UnknownLocationError("pickup_location_id", f"unknown location {pid!r}")
        pickup = network.index[pid]
    else:
        dest_lat, dest_lon = math.radians(order.dest_lat or 0.0), math.radians(order.dest_lon or 0.0)
    max_dist = -1.0 if order.max_distance_km is None else float(order.max_distance_km)
    k = kernels()
    reason, dist, ship, size, mem, take = k.route(
        network.lat, network.lon, network.active, network.can_ship, network.can_pickup,
        network.fixed, network.per_km, network.cpu, network.rank, network.id_rank, cap, excluded,
        stock_arr, qty, dest_lat, dest_lon, pickup, max_dist, float(order.split_penalty),
        order.max_shipments, order.split_lines, int(order.policy), order.top_k)
    pen = float(order.split_penalty)
    sizes, mems, takes = size.tolist(), mem.tolist(), take.tolist()
    plans = [
        _plan(network, sizes[p], mems[p], takes[p], ship, dist, pen)
        for p in range(len(sizes)) if sizes[p] > 0
    ]
    exclusions = network.exclusions(reason)
    if size[0] > 0:
        return RoutingResult(plans[0], tuple(plans[1:]), exclusions)
    shortfall = _shortfall(order, stock_arr, reason, qty, pickup, network)
    suggested: tuple[str, ...] = ()
    if pickup >= 0:
        found = k.suggest(
            network.lat, network.lon, network.active, network.can_ship, network.can_pickup,
            network.id_rank, cap, excluded, stock_arr, qty, pickup, max_dist,
            order.max_shipments, order.split_lines, MAX_SUGGESTIONS)
        suggested = tuple(network.ids[int(i)] for i in found)
    return RoutingResult(None, (), exclusions, shortfall, suggested)


def _plan(network: Network, m: int, mem: list[int], take: list[list[int]], ship: np.ndarray,
          dist: np.ndarray, pen: float) -> Plan:
    rank, cpu, ids = network.rank_list, network.cpu_list, network.ids
    allocs = []
    ship_total = unit_total = 0.0
    for i in sorted(range(m), key=lambda i: rank[mem[i]]):
        loc = mem[i]
        units = tuple(take[i])
        unit_cost = sum(units) * cpu[loc]
        ship_cost = float(ship[loc])
        ship_total += ship_cost
        unit_total += unit_cost
        allocs.append(Allocation(ids[loc], units, ship_cost, unit_cost, float(dist[loc])))
    penalty = pen * (m - 1)
    return Plan(tuple(allocs), ship_total + unit_total + penalty, ship_total, unit_total,
                penalty, m)


def _shortfall(order: Order, stock: np.ndarray, reason: np.ndarray, qty: np.ndarray,
               pickup: int, network: Network) -> tuple[LineShortfall, ...]:
    """Every line: requested vs the most obtainable of that line alone (within max_shipments)."""
    if pickup >= 0 and not (network.active[pickup] and network.can_pickup[pickup]):
        best = np.zeros(qty.shape[0], np.int64)
    else:
        s = np.clip(stock[reason == 0], 0, qty)
        if s.shape[0] == 0:
            best = np.zeros(qty.shape[0], np.int64)
        elif order.split_lines:
            best = np.minimum(-np.sort(-s, axis=0)[: order.max_shipments].sum(axis=0), qty)
        else:
            best = s.max(axis=0)
    return tuple(
        LineShortfall(j, line.sku, line.qty, int(best[j])) for j, line in enumerate(order.lines)
    )


def __getattr__(name: str) -> Any:
    # KERNELS: the only kernels called from Python (nogil); importing them compiles them
    if name == "KERNELS":
        return (kernels().route, kernels().suggest)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def warm_up() -> None:
    """Compile (or load from the numba cache) every kernel, then route a few orders through
    each policy and method: after this no call compiles anything."""
    kernels()
    def site(i: str, lat: float, can_pickup: bool) -> SiteInfo:
        return SiteInfo(i, LocationType.STORE, lat, 21.0, True, can_pickup, True, 1, 5.0, 0.1,
                        1.0, -1)

    net = Network([site("a", 52.0, True), site("b", 52.1, True), site("c", 52.2, False)])
    lines = (OrderLine("x", 2), OrderLine("y", 1))
    stock = np.array([[2, 0], [0, 1], [1, 1]], np.int64)
    for policy in Policy:
        for split in (True, False):
            solve(net, Order(lines, dest_lat=52.0, dest_lon=21.0, policy=policy,
                             split_lines=split, max_distance_km=500.0), stock)
            solve(net, Order(lines, Method.PICKUP, pickup_location_id="a", policy=policy,
                             split_lines=split), stock, [-1, 1, 0])
    solve(net, Order((OrderLine("x", 5),), Method.PICKUP, pickup_location_id="a"), stock[:, :1])
