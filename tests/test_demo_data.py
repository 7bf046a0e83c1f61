"""The demo network generator: sizes, geography, uniqueness, determinism, stock coverage; and
`demo-load`, which does not overwrite a live network's counts unless forced."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
from collections import Counter, defaultdict

import grpc
import pytest

from inventory.v1 import inventory_service_pb2 as api
from inventory.v1 import inventory_service_pb2_grpc as api_grpc
from inventory_svc.demo_data import DemoNetwork, DemoStockRow, build_demo
from inventory_svc.server import serve
from tests.conftest import Stores
from tests.faults.harness import own_site, site_settings

# Poland's bounding box (Łeba .. Bieszczady, Odra .. Bug).
LAT_RANGE = (49.0, 54.9)
LON_RANGE = (14.1, 24.2)


@pytest.fixture(scope="module")
def demo() -> DemoNetwork:
    return build_demo()


def test_counts_meet_the_minimums(demo: DemoNetwork) -> None:
    warehouses = [loc for loc in demo.locations if loc.type == "WAREHOUSE"]
    stores = [loc for loc in demo.locations if loc.type == "STORE"]
    assert len(warehouses) >= 5 and len(stores) >= 100
    assert len(warehouses) + len(stores) == len(demo.locations)
    assert {"WH-WAW", "WH-POZ", "WH-WRO", "WH-GDN", "WH-KTW"} <= {w.id for w in warehouses}
    assert len(demo.skus) == 10_000
    assert demo.skus[0] == "SKU-000001" and demo.skus[-1] == "SKU-010000"
    assert 200_000 <= len(demo.stock) <= 600_000


def test_coordinates_inside_poland(demo: DemoNetwork) -> None:
    for loc in demo.locations:
        assert LAT_RANGE[0] <= loc.lat <= LAT_RANGE[1], loc
        assert LON_RANGE[0] <= loc.lon <= LON_RANGE[1], loc


def test_ids_and_names_unique_and_well_formed(demo: DemoNetwork) -> None:
    ids = [loc.id for loc in demo.locations]
    assert len(set(ids)) == len(ids)
    assert len({loc.name for loc in demo.locations}) == len(ids)
    stores = [loc for loc in demo.locations if loc.type == "STORE"]
    assert [s.id for s in stores] == [f"ST-{n:04d}" for n in range(1, len(stores) + 1)]
    assert all(loc.id.startswith("WH-") for loc in demo.locations if loc.type == "WAREHOUSE")
    assert len(set(demo.skus)) == len(demo.skus)
    pairs = [(row.sku, row.location_id) for row in demo.stock]
    assert len(set(pairs)) == len(pairs)


def test_biggest_cities_get_several_stores(demo: DemoNetwork) -> None:
    names = {loc.name for loc in demo.locations if loc.type == "STORE"}
    assert {"Warszawa 1", "Warszawa 10", "Kraków 2", "Wrocław 2", "Łódź 2", "Gdańsk 2"} <= names
    # geonames districts (Mokotów, Wrzeszcz, ...) are folded into their city
    assert not any(name.startswith(("Mokotów", "Wrzeszcz", "Śródmieście")) for name in names)


def test_location_attributes_follow_the_type(demo: DemoNetwork) -> None:
    stores = [loc for loc in demo.locations if loc.type == "STORE"]
    for loc in demo.locations:
        if loc.type == "WAREHOUSE":
            assert loc.can_ship and not loc.can_pickup and loc.active
            assert 10 <= loc.priority <= 20 and 12 <= loc.fixed_cost <= 18
            assert 0.5 <= loc.cost_per_unit <= 1.0 and loc.default_safety_stock == 0
            assert loc.daily_capacity == 0 or loc.daily_capacity >= 3000
        else:
            assert loc.can_pickup
            assert 50 <= loc.priority <= 100 and 20 <= loc.fixed_cost <= 30
            assert 2 <= loc.cost_per_unit <= 4 and loc.default_safety_stock in (1, 2)
            assert 20 <= loc.daily_capacity <= 200
        assert 0.02 <= loc.cost_per_km <= 0.05
    assert 0.45 <= sum(s.can_ship for s in stores) / len(stores) <= 0.75
    assert 1 <= sum(not s.active for s in stores) <= 5
    assert any(loc.daily_capacity == 0 for loc in demo.locations)  # an unlimited warehouse


def test_every_sku_is_stocked_plausibly(demo: DemoNetwork) -> None:
    types = {loc.id: loc.type for loc in demo.locations}
    per_sku: dict[str, Counter[str]] = defaultdict(Counter)
    warehouse_units: list[int] = []
    store_units: list[int] = []
    for row in demo.stock:
        assert row.location_id in types and row.on_hand >= 0
        per_sku[row.sku][types[row.location_id]] += 1
        (warehouse_units if types[row.location_id] == "WAREHOUSE" else store_units).append(
            row.on_hand
        )
    assert set(per_sku) == set(demo.skus)
    n_stores = sum(t == "STORE" for t in types.values())
    for counts in per_sku.values():
        assert 2 <= counts["WAREHOUSE"] <= 5
        assert 0.15 * n_stores <= counts["STORE"] <= 0.45 * n_stores
    assert min(warehouse_units) >= 5 and max(warehouse_units) >= 1000
    assert max(store_units) <= 20
    assert 0.02 <= store_units.count(0) / len(store_units) <= 0.2
    # Zipf-ish: the top 0.1 % of SKUs hold far more warehouse stock per row than the median SKU.
    totals = sorted(
        (sum(r.on_hand for r in rows) / len(rows) for rows in _warehouse_rows(demo).values()),
        reverse=True,
    )
    assert totals[len(totals) // 1000] > 10 * totals[len(totals) // 2]


def _warehouse_rows(demo: DemoNetwork) -> dict[str, list[DemoStockRow]]:
    by_sku: dict[str, list[DemoStockRow]] = defaultdict(list)
    for row in demo.stock:
        if row.location_id.startswith("WH-"):
            by_sku[row.sku].append(row)
    return by_sku


def test_deterministic_for_a_seed(demo: DemoNetwork) -> None:
    again = build_demo(7)
    assert again == demo
    other = build_demo(8)
    assert other.locations != demo.locations or other.stock != demo.stock
    # the geography does not depend on the seed, only the attributes and stock do
    assert [(loc.id, loc.name) for loc in other.locations] == [
        (loc.id, loc.name) for loc in demo.locations
    ]


def test_small_networks_and_bad_sizes() -> None:
    small = build_demo(1, sku_count=3)
    assert small.skus == ("SKU-000001", "SKU-000002", "SKU-000003")
    assert {row.sku for row in small.stock} == set(small.skus)
    with pytest.raises(ValueError, match="sku_count"):
        build_demo(sku_count=0)


def test_build_is_immutable(demo: DemoNetwork) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        demo.locations[0].active = False  # type: ignore[misc]


# ---- demo-load against a running service ---------------------------------------------------
def _demo_load(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inventory_svc.cli", "demo-load", "--target", target, "--skus",
         "20", *args], capture_output=True, text=True, timeout=300)


async def test_demo_load_refuses_to_overwrite_stock_unless_forced(stores: Stores) -> None:
    async with own_site(stores) as site, serve(site_settings(stores, site)) as running, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        target = f"127.0.0.1:{running.port}"
        stub = api_grpc.InventoryServiceStub(ch)
        first = await asyncio.to_thread(_demo_load, target)
        assert first.returncode == 0, first.stderr
        sku, loc, _ = build_demo(7, sku_count=20).stock[0]  # a row the demo sets
        counted = await stub.SetStock(api.SetStockRequest(sku=sku, location_id=loc, on_hand=999))
        assert counted.stock.on_hand == 999  # a live count, say from a stock take

        again = await asyncio.to_thread(_demo_load, target)
        assert again.returncode == 1 and "Traceback" not in again.stderr, again.stderr
        (line,) = again.stderr.strip().splitlines()
        assert "already holds stock of 20 of the demo's 20 SKUs" in line and "--force" in line
        got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku],
                                                                    location_ids=[loc]))
        assert got.items[0].levels[0].on_hand == 999, "the refused load overwrote the count"

        forced = await asyncio.to_thread(_demo_load, target, "--force")
        assert forced.returncode == 0, forced.stderr
        got = await stub.GetAvailability(api.GetAvailabilityRequest(skus=[sku],
                                                                    location_ids=[loc]))
        assert got.items[0].levels[0].on_hand != 999
