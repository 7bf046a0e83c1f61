"""Input validation, geometry, and the no-compile-on-request guarantee."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from routing import (
    LocationType,
    Method,
    Network,
    Order,
    OrderLine,
    Policy,
    RoutingInputError,
    UnknownLocationError,
    solve,
    warm_up,
)
from routing.geo import haversine_km, haversine_rad, haversine_rad_nb
from routing.solver import KERNELS
from tests.routing.helpers import KRAKOW, LODZ, WARSAW, lines, ship_order, site

GOOD: dict[str, Any] = dict(lines=lines(1), dest_lat=52.0, dest_lon=21.0)


@pytest.mark.parametrize(("change", "field"), [
    ({"lines": ()}, "lines"),
    ({"lines": (OrderLine("a", 0),)}, "lines[0].qty"),
    ({"lines": (OrderLine("a", -1),)}, "lines[0].qty"),
    ({"lines": (OrderLine("a", 10**9 + 1),)}, "lines[0].qty"),
    ({"lines": (OrderLine("a", True),)}, "lines[0].qty"),
    ({"lines": (OrderLine("a", 1.5),)}, "lines[0].qty"),  # type: ignore[arg-type]
    ({"lines": (OrderLine("", 1),)}, "lines[0].sku"),
    ({"lines": (OrderLine("a", 1), OrderLine("a", 2))}, "lines[1].sku"),
    ({"lines": tuple(OrderLine(f"s{i}", 1) for i in range(201))}, "lines"),
    ({"max_shipments": 0}, "max_shipments"),
    ({"max_shipments": 11}, "max_shipments"),
    ({"dest_lat": 91.0}, "dest_lat"),
    ({"dest_lat": math.nan}, "dest_lat"),
    ({"dest_lon": -180.5}, "dest_lon"),
    ({"dest_lon": math.inf}, "dest_lon"),
    ({"dest_lat": None}, "dest_lat"),
    ({"pickup_location_id": "p"}, "pickup_location_id"),
    ({"split_penalty": -1.0}, "split_penalty"),
    ({"split_penalty": math.nan}, "split_penalty"),
    ({"max_distance_km": -5.0}, "max_distance_km"),
    ({"top_k": 11}, "top_k"),
    ({"top_k": -1}, "top_k"),
    ({"excluded": frozenset({""})}, "excluded"),
    ({"policy": 3}, "policy"),
])
def test_order_validation(change: dict[str, Any], field: str) -> None:
    with pytest.raises(RoutingInputError) as err:
        Order(**(GOOD | change))
    assert err.value.field == field


def test_pickup_order_validation() -> None:
    with pytest.raises(RoutingInputError) as err:
        Order(lines(1), Method.PICKUP)
    assert err.value.field == "pickup_location_id"
    with pytest.raises(RoutingInputError) as err:
        Order(lines(1), Method.PICKUP, pickup_location_id="p", dest_lat=1.0, dest_lon=1.0)
    assert err.value.field == "dest_lat"
    Order(lines(1), Method.PICKUP, pickup_location_id="p")


@pytest.mark.parametrize(("change", "field"), [
    ({"lat": 100.0}, "lat"), ({"lon": math.nan}, "lon"), ({"fixed_cost": -1.0}, "fixed_cost"),
    ({"cost_per_km": math.inf}, "cost_per_km"), ({"cost_per_unit": -0.1}, "cost_per_unit"),
    ({"capacity_left": -2}, "capacity_left"), ({"priority": 1.5}, "priority"),
])
def test_site_validation(change: dict[str, Any], field: str) -> None:
    with pytest.raises(RoutingInputError) as err:
        site("x", **change)
    assert err.value.field == field


def test_solve_input_errors() -> None:
    net = Network([site("a"), site("b")])
    with pytest.raises(UnknownLocationError) as err:
        solve(net, Order(lines(1), Method.PICKUP, pickup_location_id="nope"), np.ones((2, 1)))
    assert isinstance(err.value, RoutingInputError) and err.value.field == "pickup_location_id"
    with pytest.raises(ValueError, match="stock must have shape"):
        solve(net, ship_order(1, 1), np.ones((2, 1)))
    with pytest.raises(ValueError, match="capacity_left"):
        solve(net, ship_order(1), np.ones((2, 1)), capacity_left=[-2, 0])
    with pytest.raises(ValueError, match="duplicate"):
        Network([site("a"), site("a")])
    # Unknown excluded ids are ignored.
    assert solve(net, ship_order(1, excluded=frozenset({"zz"})), np.ones((2, 1))).plan


def test_haversine_plain_and_numba_agree() -> None:
    assert abs(haversine_km(*WARSAW, *KRAKOW) - 252.0) < 1.0
    assert haversine_km(*LODZ, *LODZ) == 0.0
    assert abs(haversine_km(0.0, 0.0, 0.0, 180.0) - math.pi * 6371.0088) < 1e-6
    for a, b in ((WARSAW, KRAKOW), (LODZ, WARSAW), ((-33.9, 151.2), (51.5, -0.1))):
        args = [math.radians(x) for x in (*a, *b)]
        assert abs(haversine_rad_nb(*args) - haversine_rad(*args)) <= 1e-9


def test_warm_up_leaves_nothing_to_compile() -> None:
    warm_up()
    before = [len(k.signatures) for k in KERNELS]
    assert all(n >= 1 for n in before)
    sites = [site("a", WARSAW), site("b", LODZ, type=LocationType.WAREHOUSE),
             site("c", KRAKOW, can_ship=False)]
    net = Network(sites)
    stock = np.array([[1, 0], [2, 5], [0, 1]], dtype=np.int32)  # converted, not recompiled
    read_only = np.array([[1, 0], [2, 5], [0, 1]], dtype=np.int64)
    read_only.flags.writeable = False
    fortran = np.asfortranarray(read_only)
    for policy in Policy:
        for order in (
            ship_order(1, 2, policy=policy, split_penalty=0, max_distance_km=500),
            ship_order(1, 2, policy=policy, split_lines=False, top_k=0, max_shipments=1),
            Order(lines(1, 9), Method.PICKUP, pickup_location_id="c", policy=policy),
            Order(lines(1, 1), Method.PICKUP, pickup_location_id="a", policy=policy),
            replace(ship_order(1, 1), max_shipments=10, top_k=10),
        ):
            for s in (stock, read_only, fortran):
                solve(net, order, s)
                solve(net, order, s, capacity_left=[0, 1, -1])
    assert [len(k.signatures) for k in KERNELS] == before


def test_kernel_cache_watches_every_kernel_module() -> None:
    from routing import _numba_cache

    assert _numba_cache.INSTALLED
    for kernel in KERNELS:
        dispatcher: Any = kernel
        locator = dispatcher._cache._impl.locator
        assert getattr(locator, "routing_locator", False)
        assert locator.get_source_stamp() == _numba_cache.source_stamp()
