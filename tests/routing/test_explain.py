"""Exclusion reasons, pickup rules and suggestions, shortfall, capacity."""

from __future__ import annotations

import numpy as np

from routing import Exclusion, LineShortfall, Method, Network, Order, solve
from routing import ExclusionReason as R
from tests.routing.helpers import (
    GDANSK,
    KRAKOW,
    LODZ,
    POZNAN,
    WARSAW,
    lines,
    route,
    ship_order,
    site,
    units,
)


def reasons(res: object) -> dict[str, R]:
    return {e.location_id: e.reason for e in res.exclusions}  # type: ignore[attr-defined]


def test_each_reason_and_the_order_of_checks() -> None:
    sites = [
        site("inactive", active=False, can_ship=False, capacity_left=0),
        site("excluded", can_ship=False),
        site("no-ship", KRAKOW, can_ship=False),
        site("too-far", GDANSK, capacity_left=0),
        site("no-capacity", capacity_left=0),
        site("no-stock"),
        site("ok"),
    ]
    stock = [[1], [1], [1], [1], [1], [0], [1]]
    res = route(sites, ship_order(1, max_distance_km=100.0, excluded=frozenset({"excluded"})),
                stock)
    assert units(res) == {"ok": (1,)}
    assert res.exclusions == (
        Exclusion("inactive", R.INACTIVE),
        Exclusion("excluded", R.EXCLUDED),
        Exclusion("no-ship", R.CANNOT_SHIP),
        Exclusion("too-far", R.TOO_FAR),
        Exclusion("no-capacity", R.NO_CAPACITY),
        Exclusion("no-stock", R.NO_STOCK),
    )


def test_eligible_but_unused_locations_are_not_listed() -> None:
    res = route([site("a"), site("b", fixed_cost=99.0)], ship_order(1), [[1], [1]])
    assert units(res) == {"a": (1,)} and res.exclusions == ()


def test_capacity_per_solve_overrides_the_network() -> None:
    net = Network([site("a"), site("b", fixed_cost=20.0)])
    stock = np.array([[1], [1]])
    assert units(solve(net, ship_order(1), stock)) == {"a": (1,)}
    res = solve(net, ship_order(1), stock, capacity_left=[0, -1])
    assert units(res) == {"b": (1,)} and reasons(res) == {"a": R.NO_CAPACITY}
    net.set_capacity([1, 0])
    assert units(solve(net, ship_order(1), stock)) == {"a": (1,)}
    assert reasons(solve(net, ship_order(1), stock)) == {"b": R.NO_CAPACITY}


def pickup(at: str, *qty: int, **kw: object) -> Order:
    return Order(lines(*qty), Method.PICKUP, pickup_location_id=at, **kw)  # type: ignore[arg-type]


def test_pickup_own_shelf_ships_free_and_needs_no_can_ship() -> None:
    sites = [site("p", can_ship=False, cost_per_unit=2.0), site("wh", POZNAN)]
    res = route(sites, pickup("p", 2), [[5], [5]])
    assert res.plan is not None and units(res) == {"p": (2,)}
    alloc = res.plan.allocations[0]
    assert (alloc.ship_cost, alloc.distance_km, alloc.unit_cost) == (0.0, 0.0, 4.0)


def test_pickup_transfers_pay_distance_to_the_store_and_need_can_ship() -> None:
    sites = [site("p", cost_per_km=0.0), site("lodz", LODZ, cost_per_km=0.1, can_ship=True),
             site("krakow", KRAKOW, can_ship=False)]
    res = route(sites, pickup("p", 2, split_penalty=1.0), [[1], [1], [5]])
    assert res.plan is not None and units(res) == {"p": (1,), "lodz": (1,)}
    transfer = next(a for a in res.plan.allocations if a.location_id == "lodz")
    assert round(transfer.distance_km) == 119
    assert abs(transfer.ship_cost - (10.0 + 0.1 * transfer.distance_km)) < 1e-9
    assert reasons(res) == {"krakow": R.CANNOT_SHIP}


def test_pickup_from_own_shelf_needs_no_capacity_but_transfers_do() -> None:
    sites = [site("p"), site("lodz", LODZ)]
    # P's own units are not a shipment: P serves its shelf with no shipments left today
    res = route(sites, pickup("p", 1), [[1], [1]], capacity=[0, -1])
    assert units(res) == {"p": (1,)} and reasons(res) == {}
    # a transfer from a location with no shipments left is not possible
    res = route(sites, pickup("p", 2), [[1], [1]], capacity=[0, 0])
    assert res.plan is None and reasons(res) == {"lodz": R.NO_CAPACITY}
    # a store with no shipments left is still suggested when its own shelf holds the order
    res = route(sites, pickup("p", 1), [[0], [1]], capacity=[-1, 0])
    assert res.plan is None and res.suggested_pickup_ids == ("lodz",)


def test_pickup_store_must_be_active_and_accept_pickups() -> None:
    stock = [[5], [5]]
    for p, why in ((site("p", active=False), R.INACTIVE),
                   (site("p", can_pickup=False), R.CANNOT_PICKUP)):
        res = route([p, site("other", LODZ)], pickup("p", 1), stock)
        assert res.plan is None and res.alternatives == ()
        assert reasons(res)["p"] == why
        assert res.shortfall == (LineShortfall(0, "SKU-0", 1, 0),)
        assert res.suggested_pickup_ids == ("other",)


def test_pickup_suggestions_are_the_nearest_feasible_pickup_points() -> None:
    sites = [
        site("p"),  # Warsaw, no stock
        site("lodz", LODZ),
        site("krakow", KRAKOW),
        site("gdansk", GDANSK),
        site("poznan", POZNAN, can_pickup=False),
        site("warsaw-2", WARSAW, active=False),
        site("lodz-2", LODZ),
        site("lodz-3", LODZ),
        site("lodz-4", LODZ),
        site("krakow-2", KRAKOW, can_ship=False),
    ]
    stock = [[0], [1], [1], [1], [1], [1], [0], [0], [0], [1]]
    res = route(sites, pickup("p", 1, max_distance_km=100.0), stock)
    assert res.plan is None  # Lodz, the nearest stock, is 119 km from Warsaw
    # lodz-2..4 hold nothing but receive from lodz (0 km away); by (distance, id) krakow comes
    # before krakow-2 (same place) and gdansk; at most five suggestions.
    assert res.suggested_pickup_ids == ("lodz", "lodz-2", "lodz-3", "lodz-4", "krakow")
    res = route(sites, pickup("p", 1, max_distance_km=100.0), [[0]] + [[0]] * 8 + [[1]])
    assert res.suggested_pickup_ids == ("krakow-2",)  # its own shelf needs no can_ship
    many = route(sites, pickup("p", 1), stock)
    assert many.plan is not None  # without the distance cut lodz ships to Warsaw


def test_shortfall_per_line() -> None:
    sites = [site("a"), site("b"), site("c")]
    stock = [[2, 1, 0], [2, 0, 0], [2, 1, 0]]
    res = route(sites, ship_order(5, 1, 1, max_shipments=2), stock)
    assert res.plan is None
    assert res.shortfall == (
        LineShortfall(0, "SKU-0", 5, 4),
        LineShortfall(1, "SKU-1", 1, 1),
        LineShortfall(2, "SKU-2", 1, 0),
    )
    res = route(sites, ship_order(5, 1, 1, split_lines=False), stock)
    assert res.shortfall[0] == LineShortfall(0, "SKU-0", 5, 2)
    assert res.suggested_pickup_ids == ()


def test_infeasible_combination_reports_every_line_obtainable() -> None:
    # Each line alone is fine, but no single location holds both.
    res = route([site("a"), site("b")], ship_order(1, 1, max_shipments=1), [[1, 0], [0, 1]])
    assert res.plan is None
    assert [(s.requested, s.obtainable) for s in res.shortfall] == [(1, 1), (1, 1)]


def test_negative_stock_counts_as_none() -> None:
    res = route([site("a"), site("b")], ship_order(1), [[-3], [1]])
    assert units(res) == {"b": (1,)} and reasons(res) == {"a": R.NO_STOCK}
