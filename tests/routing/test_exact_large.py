"""OPTIMAL on retailer-sized instances against exhaustive enumeration of every location set.

The enumeration reuses the per-set evaluation (`set_cost`, `make_valid`, checked against the
reference solver in test_oracle), so this test checks the branch and bound itself: its pruning
never loses a plan that belongs in the answer.
"""

from __future__ import annotations

import math
import random
from math import comb

import numpy as np
import pytest
from numba import njit

from routing import Network, Order, solve
from routing.evaluate import make_valid, set_cost
from routing.kernels import candidates, eligibility
from tests.routing.checks import check_plan, close
from tests.routing.gen import make_retail


@njit
def every_plan(cship: np.ndarray, ccpu: np.ndarray, crank: np.ndarray, cs: np.ndarray,
               qty: np.ndarray, pen: float, split: bool, kmax: int, total: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(cost, size, sorted ranks) of every valid plan over at most kmax candidates."""
    nc, n_lines = cs.shape
    cost_out = np.empty(total, np.float64)
    size_out = np.empty(total, np.int64)
    ranks_out = np.full((total, kmax), -1, np.int64)
    order = np.empty(kmax, np.int64)
    maxcpu = np.empty(n_lines, np.float64)
    take = np.empty((kmax, n_lines), np.int64)
    n = 0
    for m in range(1, min(kmax, nc) + 1):
        idx = np.arange(m)
        while True:
            cost = set_cost(idx, m, cship, ccpu, crank, cs, qty, pen, order, maxcpu, take)
            if cost < np.inf and make_valid(idx, m, ccpu, cs, qty, split, order, maxcpu, take):
                cost_out[n] = cost
                size_out[n] = m
                ranks_out[n, :m] = np.sort(crank[idx])
                n += 1
            i = m - 1
            while i >= 0 and idx[i] == nc - m + i:
                i -= 1
            if i < 0:
                break
            idx[i] += 1
            for k in range(i + 1, m):
                idx[k] = idx[k - 1] + 1
    return cost_out, size_out, ranks_out, n


def brute_force(net: Network, order: Order, stock: np.ndarray,
                k1: int) -> list[tuple[float, list[int]]]:
    """The first k1 picks in plan order: (cost, sorted network ranks)."""
    assert order.dest_lat is not None and order.dest_lon is not None
    qty = np.array([line.qty for line in order.lines], np.int64)
    reason, _, ship = eligibility(
        net.lat, net.lon, net.active, net.can_ship, net.can_pickup, net.fixed, net.per_km,
        net.capacity, np.zeros(net.size, np.bool_), stock,
        math.radians(order.dest_lat), math.radians(order.dest_lon), -1, -1.0)
    kmax, split = order.max_shipments, order.split_lines
    cidx, cs = candidates(reason, ship, stock, qty, split, kmax)
    total = sum(comb(len(cidx), m) for m in range(1, kmax + 1))
    costs, sizes, ranks, n = every_plan(ship[cidx], net.cpu[cidx], net.rank[cidx], cs, qty,
                                        float(order.split_penalty), split, kmax, total)
    if n == 0:
        return []
    kth = np.sort(costs[:n])[min(k1, n) - 1]
    near = [(costs[i], sizes[i], ranks[i, : sizes[i]].tolist())
            for i in range(n) if costs[i] <= kth + 1e-6 * max(1.0, kth)]
    picks: list[tuple[float, list[int]]] = []
    while near and len(picks) < k1:
        lo = min(p[0] for p in near)
        window = [p for p in near if p[0] <= lo + 1e-9 * max(1.0, abs(lo))]
        best = min(window, key=lambda p: (p[1], p[2]))
        near.remove(best)
        picks.append((float(best[0]), best[2]))
    return picks


CASES = [(200, 20, 3, s) for s in range(3)] + [(60, 8, 3, s) for s in range(20)] + [
    (30, 6, 4, s) for s in range(10)] + [(22, 8, 6, s) for s in range(5)]


@pytest.mark.parametrize(("n", "n_lines", "kmax", "seed"), CASES)
def test_branch_and_bound_is_exact(n: int, n_lines: int, kmax: int, seed: int) -> None:
    inst = make_retail(random.Random(seed * 7919 + n), n, n_lines, kmax)
    net = Network(inst.sites)
    stock = np.array(inst.stock, np.int64)
    res = solve(net, inst.order, stock)
    expected = brute_force(net, inst.order, stock, inst.order.top_k + 1)
    got = [res.plan, *res.alternatives] if res.plan else []
    assert len(got) == len(expected)
    for plan, (cost, ranks) in zip(got, expected, strict=True):
        assert close(plan.cost, cost)
        assert sorted(int(net.rank[net.index[a.location_id]]) for a in plan.allocations) == ranks
        check_plan(inst.sites, inst.order, inst.stock, None, plan)
