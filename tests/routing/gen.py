"""Random small instances for the oracle tests (deterministic from a seed)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from routing.geo import haversine_km
from routing.model import LocationType, Method, Order, OrderLine, Policy, SiteInfo


@dataclass(frozen=True)
class Instance:
    sites: list[SiteInfo]
    order: Order
    stock: list[list[int]]
    capacity: list[int] | None


POINTS = [(52.23, 21.01), (50.06, 19.94), (51.11, 17.03), (54.35, 18.65), (52.41, 16.93)]


def make_instance(rng: random.Random, policy: Policy = Policy.OPTIMAL) -> Instance:
    n = rng.randint(3, 9)
    n_lines = rng.randint(1, 4)
    pool = rng.sample(POINTS, rng.randint(1, len(POINTS)))
    flat = rng.random() < 0.15  # every cost equal: ties everywhere
    sites = []
    for i in range(n):
        lat, lon = rng.choice(pool)
        if rng.random() < 0.5:
            lat, lon = lat + rng.uniform(-0.5, 0.5), lon + rng.uniform(-0.5, 0.5)
        sites.append(SiteInfo(
            id=f"L{rng.randint(0, 99):02d}-{i}",
            type=rng.choice([LocationType.WAREHOUSE, LocationType.STORE]),
            lat=lat, lon=lon,
            can_ship=rng.random() < 0.9, can_pickup=rng.random() < 0.6,
            active=rng.random() < 0.93, priority=rng.randint(1, 3),
            fixed_cost=0.0 if flat else rng.choice([0.0, 5.0, 10.0, 10.0]),
            cost_per_km=0.0 if flat else rng.choice([0.0, 0.01, 0.05]),
            cost_per_unit=1.0 if flat else rng.choice([0.5, 1.0, 1.0, 1.5]),
            capacity_left=rng.choice([-1, -1, -1, 0, 1, 5]),
        ))
    mode = rng.random()
    big = mode < 0.3  # large lines, thin stock: plans need several locations
    thin = mode < 0.1  # one unit per location: up to max_shipments locations
    qty = [rng.randint(2, 4) if big else rng.randint(1, 3) for _ in range(n_lines)]
    sparsity = rng.choice([0.1, 0.3, 0.5])
    top = 1 if thin else 2 if big else 3
    stock = [[rng.randint(1, top) if rng.random() > sparsity else 0 for _ in range(n_lines)]
             for _ in range(n)]
    capacity = None
    if rng.random() < 0.3:
        capacity = [rng.choice([-1, -1, 0, 1, 2]) for _ in range(n)]
    pickup = rng.random() < 0.25
    dest = rng.choice(pool)
    max_distance = None
    if rng.random() < 0.3:
        anchor = sites[rng.randrange(n)] if pickup else None
        ref = (anchor.lat, anchor.lon) if anchor else dest
        dists = sorted({round(haversine_km(s.lat, s.lon, *ref), 6) for s in sites})
        k = rng.randrange(len(dists))
        upper = dists[k + 1] if k + 1 < len(dists) else dists[k] + 10.0
        max_distance = (dists[k] + upper) / 2
    excluded = frozenset(rng.sample([s.id for s in sites], rng.randint(0, 2))
                         if rng.random() < 0.3 else [])
    common = dict(
        max_shipments=4 if thin else rng.choice([1, 2, 3, 3, 4]),
        split_lines=thin or rng.random() < 0.7,
        split_penalty=0.0 if flat else rng.choice([0.0, 2.0, 5.0]),
        max_distance_km=max_distance,
        policy=policy, excluded=excluded, top_k=rng.randint(0, 3),
    )
    lines = tuple(OrderLine(f"S{j}", q) for j, q in enumerate(qty))
    if pickup:
        p = sites[rng.randrange(n)]
        order = Order(lines, Method.PICKUP, pickup_location_id=p.id, **common)  # type: ignore[arg-type]
    else:
        order = Order(lines, dest_lat=dest[0], dest_lon=dest[1], **common)  # type: ignore[arg-type]
    return Instance(sites, order, stock, capacity)


def make_retail(rng: random.Random, n: int, n_lines: int, kmax: int,
                top_k: int = 3) -> Instance:
    """A retailer-like network: a few cheap warehouses with broad stock, many sparse stores."""
    n_wh = max(2, n // 50)
    sites = []
    for i in range(n):
        lat, lon = rng.choice(POINTS)
        lat, lon = lat + rng.gauss(0, 0.3), lon + rng.gauss(0, 0.4)
        wh = i < n_wh
        sites.append(SiteInfo(
            id=f"{'WH' if wh else 'ST'}-{i:04d}",
            type=LocationType.WAREHOUSE if wh else LocationType.STORE,
            lat=lat, lon=lon, can_ship=wh or rng.random() < 0.7, can_pickup=not wh,
            active=rng.random() < 0.97, priority=rng.randint(1, 3) if wh else rng.randint(5, 9),
            fixed_cost=rng.uniform(12, 18) if wh else rng.uniform(8, 12),
            cost_per_km=rng.uniform(0.01, 0.02) if wh else rng.uniform(0.02, 0.04),
            cost_per_unit=rng.uniform(0.4, 0.6) if wh else rng.uniform(1.2, 2.0),
            capacity_left=rng.choice([-1, -1, 0, 3]),
        ))
    lines = tuple(OrderLine(f"S{j}", rng.choice([1, 1, 2, 3])) for j in range(n_lines))
    wh_share = rng.choice([0.6, 0.9])
    stock = []
    for i in range(n):
        p = wh_share if i < n_wh else rng.uniform(0.03, 0.4)
        stock.append([rng.randint(1, 50 if i < n_wh else 6) if rng.random() < p else 0
                      for _ in range(n_lines)])
    lat, lon = rng.choice(POINTS)
    order = Order(lines, dest_lat=lat, dest_lon=lon, max_shipments=kmax,
                  split_penalty=rng.choice([0.0, 5.0]), top_k=top_k)
    return Instance(sites, order, stock, None)
