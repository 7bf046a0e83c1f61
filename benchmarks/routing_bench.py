"""Routing solver benchmark: warm solve latency per size, and cold start.

Generates retailer-like networks (a few warehouses with broad stock, many stores with sparse
stock, Poland-sized coordinates), times `routing.solve` end to end (typed front included) on one
thread, and writes benchmarks/RESULTS-routing.md.

    PYTHONPATH=. .venv/bin/python benchmarks/routing_bench.py [--instances 200] [--quick]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from routing import (
    LocationType,
    Method,
    Network,
    Order,
    OrderLine,
    Policy,
    SiteInfo,
    solve,
    warm_up,
)

CITIES = [  # (lat, lon, weight): the largest Polish cities
    (52.23, 21.01, 18), (50.06, 19.94, 8), (51.76, 19.46, 7), (51.11, 17.03, 6),
    (52.41, 16.93, 5), (54.35, 18.65, 5), (53.43, 14.55, 4), (53.12, 18.01, 3),
    (51.25, 22.57, 3), (53.13, 23.16, 3), (50.26, 19.02, 3), (50.04, 22.00, 2),
    (50.87, 20.63, 2), (53.78, 20.49, 2), (50.67, 17.93, 1), (52.73, 15.24, 1),
]
SIZES = [(50, 5), (50, 10), (200, 10), (500, 20), (1000, 20)]
ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class World:
    network: Network
    warehouses: np.ndarray  # bool per location
    popularity: np.ndarray  # per SKU of the catalogue: share of stores holding it


def city_point(rng: random.Random, spread: float) -> tuple[float, float]:
    lat, lon, _ = rng.choices(CITIES, weights=[c[2] for c in CITIES])[0]
    return lat + rng.gauss(0, spread), lon + rng.gauss(0, spread * 1.5)


def make_world(rng: random.Random, n: int) -> World:
    n_wh = max(2, min(8, n // 100))
    sites = []
    for i in range(n):
        if i < n_wh:
            lat, lon = city_point(rng, 0.15)
            sites.append(SiteInfo(
                f"WH-{i:03d}", LocationType.WAREHOUSE, lat, lon, True, False, True,
                rng.randint(1, 3), rng.uniform(12, 18), rng.uniform(0.01, 0.02),
                rng.uniform(0.4, 0.6), -1))
        else:
            lat, lon = city_point(rng, 0.35)
            cap = rng.choice([-1, -1, 0] + [rng.randint(1, 40)] * 5)
            sites.append(SiteInfo(
                f"ST-{i:04d}", LocationType.STORE, lat, lon, rng.random() < 0.7,
                rng.random() < 0.95, rng.random() < 0.97, rng.randint(10, 50),
                rng.uniform(8, 12), rng.uniform(0.02, 0.04), rng.uniform(1.2, 2.0), cap))
    is_wh = np.zeros(n, np.bool_)
    is_wh[:n_wh] = True
    return World(Network(sites), is_wh, np.array([rng.uniform(0.03, 0.5) for _ in range(5000)]))


@dataclass(frozen=True)
class Cell:
    n: int
    n_lines: int
    kmax: int
    policy: Policy = Policy.OPTIMAL
    wh_share: float = 0.9  # share of SKUs each warehouse holds
    penalty: float = 5.0
    pickup: bool = False

    @property
    def label(self) -> str:
        extra = [] if self.wh_share == 0.9 else [f"warehouses hold {self.wh_share:.0%} of SKUs"]
        if self.penalty != 5.0:
            extra.append(f"split_penalty {self.penalty:g}")
        if self.pickup:
            extra.append("PICKUP")
        return ", ".join(extra) or "-"


def make_order(rng: random.Random, world: World, cell: Cell) -> tuple[Order, np.ndarray]:
    n_lines = cell.n_lines
    skus = rng.sample(range(world.popularity.shape[0]), n_lines)
    lines = tuple(OrderLine(f"SKU-{s}", rng.choice([1, 1, 1, 2, 3])) for s in skus)
    n = world.network.size
    stock = np.zeros((n, n_lines), np.int64)
    for j, s in enumerate(skus):
        stores = np.random.default_rng(rng.getrandbits(32)).random(n) < world.popularity[s]
        for i in range(n):
            if world.warehouses[i]:
                stock[i, j] = rng.randint(1, 200) if rng.random() < cell.wh_share else 0
            elif stores[i]:
                stock[i, j] = rng.randint(1, 8)
    common = dict(max_shipments=cell.kmax, split_penalty=cell.penalty, policy=cell.policy)
    if cell.pickup:
        stores = [i for i, s in enumerate(world.network.sites) if s.can_pickup and s.active]
        pid = world.network.ids[rng.choice(stores)]
        order = Order(lines, Method.PICKUP, pickup_location_id=pid, **common)  # type: ignore[arg-type]
    else:
        lat, lon = city_point(rng, 0.4)
        order = Order(lines, Method.SHIP, dest_lat=lat, dest_lon=lon, **common)  # type: ignore[arg-type]
    return order, stock


def time_cell(seed: int, cell: Cell, count: int) -> dict[str, float]:
    """Wall and CPU (thread) time of `solve` in µs over `count` orders: p50, p99, max."""
    rng = random.Random(seed)
    world = make_world(rng, cell.n)
    wall, cpu, used = [], [], []
    for _ in range(count):
        order, stock = make_order(rng, world, cell)
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        res = solve(world.network, order, stock)
        wall.append((time.perf_counter_ns() - t0) / 1000.0)
        cpu.append((time.thread_time_ns() - c0) / 1000.0)
        used.append(res.plan.locations_used if res.plan else 0)
    out = {"feasible": float(np.mean(np.array(used) > 0)),
           "mean_used": float(np.mean([u for u in used if u] or [0]))}
    for name, values in (("wall", wall), ("cpu", cpu)):
        arr = np.array(values)
        out[f"{name}_p50"] = float(np.percentile(arr, 50))
        out[f"{name}_p99"] = float(np.percentile(arr, 99))
        out[f"{name}_max"] = float(arr.max())
    return out


def cold_start() -> tuple[float, float]:
    """Fresh process: (import + warm_up seconds inside it, whole process wall seconds)."""
    code = ("import time; t=time.perf_counter(); import routing; routing.warm_up(); "
            "print(time.perf_counter()-t)")
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent))
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=600)
    return float(out.stdout.strip()), time.perf_counter() - t0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", type=int, default=200, help="orders per cell (<= 200)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="30 orders per cell")
    ap.add_argument("--out", type=Path, default=ROOT / "RESULTS-routing.md")
    args = ap.parse_args()
    count = 30 if args.quick else min(args.instances, 200)
    cold_in, cold_wall = cold_start()
    warm_up()
    cells = [Cell(n, n_lines, k) for n, n_lines in SIZES for k in (1, 2, 3)]
    cells += [Cell(500, 20, 3, policy) for policy in list(Policy)[1:]]
    cells += [Cell(1000, 20, 3, pickup=True), Cell(1000, 20, 3, wh_share=0.6, penalty=0.0),
              Cell(1000, 20, 5, wh_share=0.6, penalty=0.0),
              Cell(200, 20, 5, wh_share=0.6, penalty=0.0),
              Cell(200, 20, 10, wh_share=0.6, penalty=0.0)]
    rows = []
    started = time.perf_counter()
    for i, cell in enumerate(cells):
        r = time_cell(args.seed + i, cell, count)
        rows.append((cell, r))
        print(f"{cell.n:5d} x {cell.n_lines:2d} k={cell.kmax:2d} {cell.policy.name:13s} "
              f"{cell.label:40s} wall p50 {r['wall_p50']:8.0f} p99 {r['wall_p99']:8.0f}  "
              f"cpu p50 {r['cpu_p50']:8.0f} p99 {r['cpu_p99']:8.0f} max {r['cpu_max']:8.0f} µs",
              flush=True)
    elapsed = time.perf_counter() - started
    cmd = "PYTHONPATH=. .venv/bin/python benchmarks/routing_bench.py " + " ".join(sys.argv[1:])
    lines = [
        "# Routing solver benchmark",
        "",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} CPUs (nproc), {cpu_model()}; other work was running on"
        " it, so wall-clock tails include preemption: the CPU (thread) time columns show the"
        " solver's own cost",
        f"- python {platform.python_version()}, numpy {np.__version__}",
        f"- command: `{cmd.strip()}`",
        f"- {count} generated orders per row, one network per row; warm (after `warm_up()`),"
        " single thread; time = `routing.solve` end to end (typed front, kernels, result"
        " objects with exclusions); SHIP orders unless noted, split_lines on, split_penalty 5,"
        " top_k 3 (alternatives always computed)",
        "- network: 2-8 warehouses (90% of SKUs, cheap handling) + stores (3-50% of SKUs each,"
        " 70% ship-from-store, some at capacity 0), coordinates around Polish cities",
        f"- cold start (fresh process: import + `warm_up()` loading the numba cache): "
        f"{cold_in:.2f} s inside the process, {cold_wall:.2f} s wall including interpreter start",
        f"- run time of the timed rows: {elapsed:.1f} s",
        "",
        "| locations x lines | max_shipments | policy | scenario | wall p50 µs | wall p99 µs |"
        " CPU p50 µs | CPU p99 µs | CPU max µs | feasible | locations used |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell, r in rows:
        lines.append(
            f"| {cell.n} x {cell.n_lines} | {cell.kmax} | {cell.policy.name} | {cell.label} |"
            f" {r['wall_p50']:.0f} | {r['wall_p99']:.0f} | {r['cpu_p50']:.0f} |"
            f" {r['cpu_p99']:.0f} | {r['cpu_max']:.0f} | {r['feasible']:.0%} |"
            f" {r['mean_used']:.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
