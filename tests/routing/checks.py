"""Independent validation of a plan against DESIGN §5 (plain Python, no solver code)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from routing.geo import haversine_km
from routing.model import Method, Order, Plan, SiteInfo


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))


def check_plan(sites: Sequence[SiteInfo], order: Order, stock: Sequence[Sequence[int]],
               capacity: Sequence[int] | None, plan: Plan) -> None:
    """Assert that `plan` is feasible and that its reported costs follow the §5 formula."""
    index = {s.id: i for i, s in enumerate(sites)}
    caps = list(capacity) if capacity is not None else [s.capacity_left for s in sites]
    pickup = order.pickup_location_id if order.method is Method.PICKUP else None
    if pickup is not None:
        p = sites[index[pickup]]
        assert p.active and p.can_pickup
        dest = (p.lat, p.lon)
    else:
        assert order.dest_lat is not None and order.dest_lon is not None
        dest = (order.dest_lat, order.dest_lon)
    n_lines = len(order.lines)
    used = [a.location_id for a in plan.allocations]
    assert len(set(used)) == len(used), "a location appears twice"
    assert 1 <= len(used) <= order.max_shipments
    assert plan.locations_used == len(used)
    supplied = [0] * n_lines
    sources = [0] * n_lines
    ship_total = unit_total = 0.0
    for a in plan.allocations:
        i = index[a.location_id]
        s = sites[i]
        own_shelf = a.location_id == pickup
        assert s.active and a.location_id not in order.excluded
        assert own_shelf or caps[i] != 0, "no capacity left"  # P's own shelf ships nothing
        dist = 0.0 if own_shelf else haversine_km(s.lat, s.lon, *dest)
        if not own_shelf:
            assert s.can_ship
            assert order.max_distance_km is None or dist <= order.max_distance_km
        assert len(a.units) == n_lines and sum(a.units) >= 1, "a used location supplies nothing"
        for j, u in enumerate(a.units):
            assert 0 <= u <= stock[i][j]
            supplied[j] += u
            sources[j] += u > 0
        ship = 0.0 if own_shelf else s.fixed_cost + s.cost_per_km * dist
        unit = sum(a.units) * s.cost_per_unit
        assert close(a.ship_cost, ship) and close(a.unit_cost, unit)
        assert math.isclose(a.distance_km, dist, rel_tol=1e-9, abs_tol=1e-9)
        ship_total += ship
        unit_total += unit
    assert supplied == [line.qty for line in order.lines], "units not all assigned"
    if not order.split_lines:
        assert all(k == 1 for k in sources), "a line split although split_lines is off"
    penalty = order.split_penalty * (len(used) - 1)
    assert close(plan.ship_total, ship_total) and close(plan.unit_total, unit_total)
    assert close(plan.split_penalty_total, penalty)
    assert close(plan.cost, ship_total + unit_total + penalty)
