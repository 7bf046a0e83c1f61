"""Brute-force reference solver (plain Python): the tests' oracle for OPTIMAL and FEWEST_SPLITS.

It enumerates every set of at most max_shipments eligible locations and every assignment of the
units to each set; a set is a plan when some cheapest assignment of it gives every member at
least one unit (otherwise the smaller set is the plan). Plans are then ordered as DESIGN §5 says
(see `routing.bnb`): cost within a 1e-9 relative tolerance, then fewer locations, then the
smaller sorted list of (priority, id). Slow by design; keep instances tiny.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import combinations

from routing.geo import haversine_km
from routing.model import (
    Allocation,
    Exclusion,
    ExclusionReason,
    LineShortfall,
    Method,
    Order,
    Plan,
    Policy,
    RoutingResult,
    SiteInfo,
    UnknownLocationError,
)

R = ExclusionReason


def tol(x: float) -> float:
    return 1e-9 * max(1.0, abs(x))


def _reason(i: int, site: SiteInfo, order: Order, pickup: int, dist: float, cap: int,
            stock_row: Sequence[int]) -> ExclusionReason | None:
    has_stock = any(s > 0 for s in stock_row)
    if i == pickup:
        checks = [
            (not site.active, R.INACTIVE),
            (not site.can_pickup, R.CANNOT_PICKUP),
            (site.id in order.excluded, R.EXCLUDED),
            # P's own shelf is not a shipment: no capacity needed
            (not has_stock, R.NO_STOCK),
        ]
    else:
        too_far = order.max_distance_km is not None and dist > order.max_distance_km
        checks = [
            (not site.active, R.INACTIVE),
            (site.id in order.excluded, R.EXCLUDED),
            (not site.can_ship, R.CANNOT_SHIP),
            (too_far, R.TOO_FAR),
            (cap == 0, R.NO_CAPACITY),
            (not has_stock, R.NO_STOCK),
        ]
    for failed, why in checks:
        if failed:
            return why
    return None


def _splits(qty: int, caps: Sequence[int]) -> Iterator[tuple[int, ...]]:
    """Every way to take `qty` units from members with the given stock caps."""
    if not caps:
        if qty == 0:
            yield ()
        return
    for first in range(min(qty, caps[0]) + 1):
        for rest in _splits(qty - first, caps[1:]):
            yield (first, *rest)


def _best_assignment(members: Sequence[int], order: Order, stock: Sequence[Sequence[int]],
                     cpu: Sequence[float]) -> tuple[float, float, list[tuple[int, ...]]] | None:
    """(cheapest unit cost, cheapest with every member used, that assignment) or None."""
    states: dict[int, tuple[float, list[tuple[int, ...]]]] = {0: (0.0, [])}
    for j, line in enumerate(order.lines):
        caps = [stock[i][j] for i in members]
        options: dict[int, tuple[float, tuple[int, ...]]] = {}
        if order.split_lines:
            candidates = list(_splits(line.qty, caps))
        else:
            candidates = [
                tuple(line.qty if k == a else 0 for k in range(len(members)))
                for a in range(len(members)) if caps[a] >= line.qty
            ]
        for parts in candidates:
            mask = sum(1 << k for k, u in enumerate(parts) if u > 0)
            cost = sum(u * cpu[i] for u, i in zip(parts, members, strict=True))
            if mask not in options or cost < options[mask][0]:
                options[mask] = (cost, parts)
        new: dict[int, tuple[float, list[tuple[int, ...]]]] = {}
        for m1, (c1, a1) in states.items():
            for m2, (c2, parts) in options.items():
                m, c = m1 | m2, c1 + c2
                if m not in new or c < new[m][0]:
                    new[m] = (c, [*a1, parts])
        states = new
    if not states:
        return None
    full = (1 << len(members)) - 1
    cheapest = min(c for c, _ in states.values())
    if full not in states:
        return cheapest, math.inf, []
    return cheapest, states[full][0], states[full][1]


def _select(plans: list[tuple[float, tuple[tuple[int, str], ...], Plan]],
            count: int) -> list[tuple[float, tuple[tuple[int, str], ...], Plan]]:
    """The first `count` picks in plan order."""
    left = list(plans)
    out: list[tuple[float, tuple[tuple[int, str], ...], Plan]] = []
    while left and len(out) < count:
        lo = min(p[0] for p in left)
        window = [p for p in left if p[0] <= lo + tol(lo)]
        best = min(window, key=lambda p: (len(p[1]), p[1]))
        out.append(best)
        left.remove(best)
    return out


def reference_solve(sites: Sequence[SiteInfo], order: Order, stock: Sequence[Sequence[int]],
                    capacity_left: Sequence[int] | None = None,
                    suggest: bool = True) -> RoutingResult:
    """Route like `routing.solve` by exhaustive enumeration (OPTIMAL or FEWEST_SPLITS)."""
    if order.policy not in (Policy.OPTIMAL, Policy.FEWEST_SPLITS):
        raise NotImplementedError("the reference covers OPTIMAL and FEWEST_SPLITS")
    ids = [s.id for s in sites]
    caps = list(capacity_left) if capacity_left is not None else [s.capacity_left for s in sites]
    pickup = -1
    if order.method is Method.PICKUP:
        if order.pickup_location_id not in ids:
            raise UnknownLocationError("pickup_location_id", "unknown location")
        pickup = ids.index(order.pickup_location_id)
        dest = (sites[pickup].lat, sites[pickup].lon)
    else:
        assert order.dest_lat is not None and order.dest_lon is not None
        dest = (order.dest_lat, order.dest_lon)
    dist = [0.0 if i == pickup else haversine_km(s.lat, s.lon, *dest) for i, s in enumerate(sites)]
    ship = [0.0 if i == pickup else s.fixed_cost + s.cost_per_km * dist[i]
            for i, s in enumerate(sites)]
    reasons = [_reason(i, s, order, pickup, dist[i], caps[i], stock[i])
               for i, s in enumerate(sites)]
    exclusions = tuple(Exclusion(ids[i], r) for i, r in enumerate(reasons) if r is not None)
    target_ok = pickup < 0 or (sites[pickup].active and sites[pickup].can_pickup)
    eligible = [i for i, r in enumerate(reasons) if r is None] if target_ok else []
    cpu = [s.cost_per_unit for s in sites]
    plans = []
    for k in range(1, order.max_shipments + 1):
        for members in combinations(eligible, k):
            best = _best_assignment(members, order, stock, cpu)
            if best is None:
                continue
            cheapest, used_all, parts = best
            if used_all > cheapest + tol(cheapest):
                continue
            ship_total = sum(ship[i] for i in members)
            penalty = order.split_penalty * (k - 1)
            allocs = tuple(
                Allocation(ids[i], tuple(p[a] for p in parts), ship[i],
                           sum(p[a] for p in parts) * cpu[i], dist[i])
                for a, i in enumerate(members)
            )
            cost = ship_total + used_all + penalty
            key = tuple(sorted((sites[i].priority, ids[i]) for i in members))
            plans.append((cost, key, Plan(allocs, cost, ship_total, used_all, penalty, k)))
    ranked = _select(plans, order.top_k + 1)
    if plans and order.policy is Policy.FEWEST_SPLITS:
        fewest = min(len(p[1]) for p in plans)
        chosen = _select([p for p in plans if len(p[1]) == fewest], 1)[0]
        rest = [p for p in _select(plans, order.top_k + 1) if p[1] != chosen[1]]
        ranked = [chosen, *rest[: order.top_k]]
    if ranked:
        return RoutingResult(ranked[0][2], tuple(p[2] for p in ranked[1:]), exclusions)
    shortfall = []
    for j, line in enumerate(order.lines):
        have = sorted((min(max(stock[i][j], 0), line.qty) for i in eligible), reverse=True)
        best_one = have[0] if have else 0
        got = min(line.qty, sum(have[: order.max_shipments])) if order.split_lines else best_one
        shortfall.append(LineShortfall(j, line.sku, line.qty, got))
    suggested: list[str] = []
    if pickup >= 0 and suggest:
        others = sorted(
            (haversine_km(s.lat, s.lon, *dest), s.id) for i, s in enumerate(sites)
            if i != pickup and s.active and s.can_pickup
        )
        for _, other in others:
            if len(suggested) == 5:
                break
            alt = Order(order.lines, Method.PICKUP, pickup_location_id=other,
                        max_shipments=order.max_shipments, split_lines=order.split_lines,
                        split_penalty=order.split_penalty, max_distance_km=order.max_distance_km,
                        excluded=order.excluded, top_k=0)
            if reference_solve(sites, alt, stock, caps, suggest=False).plan is not None:
                suggested.append(other)
    return RoutingResult(None, (), exclusions, tuple(shortfall), tuple(suggested))
