"""Small builders for hand-made routing cases."""

from __future__ import annotations

from typing import Any

import numpy as np

from routing import LocationType, Network, Order, OrderLine, RoutingResult, SiteInfo, solve

WARSAW = (52.2297, 21.0122)
LODZ = (51.7592, 19.4560)
KRAKOW = (50.0647, 19.9450)
GDANSK = (54.3520, 18.6466)
POZNAN = (52.4064, 16.9252)


def site(loc_id: str, at: tuple[float, float] = WARSAW, **kw: Any) -> SiteInfo:
    fields: dict[str, Any] = dict(
        type=LocationType.STORE, lat=at[0], lon=at[1], can_ship=True, can_pickup=True,
        active=True, priority=1, fixed_cost=10.0, cost_per_km=0.0, cost_per_unit=1.0,
        capacity_left=-1)
    fields.update(kw)
    return SiteInfo(loc_id, **fields)


def lines(*qty: int) -> tuple[OrderLine, ...]:
    return tuple(OrderLine(f"SKU-{j}", q) for j, q in enumerate(qty))


def ship_order(*qty: int, to: tuple[float, float] = WARSAW, **kw: Any) -> Order:
    return Order(lines(*qty), dest_lat=to[0], dest_lon=to[1], **kw)


def route(sites: list[SiteInfo], order: Order, stock: list[list[int]],
          capacity: list[int] | None = None) -> RoutingResult:
    return solve(Network(sites), order, np.array(stock, np.int64), capacity)


def units(result: RoutingResult) -> dict[str, tuple[int, ...]]:
    """location id -> units per line of the chosen plan."""
    assert result.plan is not None
    return {a.location_id: a.units for a in result.plan.allocations}
