"""Numba entry kernels: eligibility, candidates, the policies, pickup suggestions.

Everything here works on contiguous numpy arrays indexed by network position; the typed front
(`routing.solver`) is the only caller. Reason codes are `ExclusionReason` values, 0 = eligible.
"""

from __future__ import annotations

import numpy as np

from routing._types import B1, F1, I1, I2, R1, B, F, I, kernel
from routing.bnb import search
from routing.evaluate import can_cover, make_valid, set_cost
from routing.geo import haversine_rad_nb
from routing.pool import POOL_CAP, pool_select

INACTIVE, CANNOT_PICKUP, EXCLUDED, CANNOT_SHIP, TOO_FAR, NO_CAPACITY, NO_STOCK = 1, 2, 3, 4, 5, 6, 7
OPTIMAL, PRIORITY, CLOSEST, HIGHEST_STOCK, FEWEST_SPLITS = 0, 1, 2, 3, 4


@kernel(F1, F1, B1, B1, B1, F1, F1, I1, B1, I2, F, F, I, F)
def eligibility(lat: np.ndarray, lon: np.ndarray, active: np.ndarray, can_ship: np.ndarray,
                can_pickup: np.ndarray, fixed: np.ndarray, per_km: np.ndarray,
                capacity: np.ndarray, excluded: np.ndarray, stock: np.ndarray, dest_lat: float,
                dest_lon: float, pickup: int, max_dist: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per location: first failing reason (0 if eligible), distance and ship cost.

    For PICKUP (pickup >= 0) the destination is P; P's own shelf ships at 0 over 0 km and needs
    neither can_ship, nor a distance check, nor shipping capacity (handing a customer units from
    the shelf they stand at is not a shipment). max_dist < 0 means no limit.
    """
    n, n_lines = stock.shape
    reason = np.zeros(n, np.int8)
    dist = np.empty(n, np.float64)
    ship = np.empty(n, np.float64)
    if pickup >= 0:
        dest_lat, dest_lon = lat[pickup], lon[pickup]
    for i in range(n):
        has = False
        for j in range(n_lines):
            if stock[i, j] > 0:
                has = True
                break
        if i == pickup:
            dist[i] = 0.0
            ship[i] = 0.0
            if not active[i]:
                reason[i] = INACTIVE
            elif not can_pickup[i]:
                reason[i] = CANNOT_PICKUP
            elif excluded[i]:
                reason[i] = EXCLUDED
            elif not has:
                reason[i] = NO_STOCK
            continue
        d = haversine_rad_nb(lat[i], lon[i], dest_lat, dest_lon)
        dist[i] = d
        ship[i] = fixed[i] + per_km[i] * d
        if not active[i]:
            reason[i] = INACTIVE
        elif excluded[i]:
            reason[i] = EXCLUDED
        elif not can_ship[i]:
            reason[i] = CANNOT_SHIP
        elif max_dist >= 0.0 and d > max_dist:
            reason[i] = TOO_FAR
        elif capacity[i] == 0:
            reason[i] = NO_CAPACITY
        elif not has:
            reason[i] = NO_STOCK
    return reason, dist, ship


@kernel(R1, F1, I2, I1, B, I)
def candidates(reason: np.ndarray, ship: np.ndarray, stock: np.ndarray, qty: np.ndarray,
               split: bool, kmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Eligible locations that can supply something, sorted by (ship cost, index), and their
    supply matrix (see `routing.evaluate`). With kmax = 1 only those holding the whole order.
    """
    n, n_lines = stock.shape
    keep = np.zeros(n, np.bool_)
    for i in range(n):
        if reason[i] != 0:
            continue
        some, full = False, True
        for j in range(n_lines):
            if stock[i, j] >= qty[j] or (split and stock[i, j] > 0):
                some = True
            if stock[i, j] < qty[j]:
                full = False
        keep[i] = full if kmax == 1 else some
    idx = np.nonzero(keep)[0]
    idx = idx[np.argsort(ship[idx], kind="mergesort")]
    cs = np.zeros((idx.shape[0], n_lines), np.int64)
    for c in range(idx.shape[0]):
        for j in range(n_lines):
            s = stock[idx[c], j]
            if split:
                cs[c, j] = min(max(s, 0), qty[j])
            elif s >= qty[j]:
                cs[c, j] = qty[j]
    return idx, cs


@kernel(I2)
def cover_lists(cs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR lists, per line, of the candidates (ascending) that can supply some of it."""
    nc, n_lines = cs.shape
    ptr = np.zeros(n_lines + 1, np.int64)
    for c in range(nc):
        for j in range(n_lines):
            if cs[c, j] > 0:
                ptr[j + 1] += 1
    for j in range(n_lines):
        ptr[j + 1] += ptr[j]
    idx = np.empty(ptr[n_lines], np.int64)
    fill = ptr[:n_lines].copy()
    for c in range(nc):
        for j in range(n_lines):
            if cs[c, j] > 0:
                idx[fill[j]] = c
                fill[j] += 1
    return ptr, idx


@kernel(I1, I2, I1, I, I1, I1, I1, I2)
def walk(seq: np.ndarray, cs: np.ndarray, qty: np.ndarray, kmax: int, cov_ptr: np.ndarray,
         cov_idx: np.ndarray, mem: np.ndarray, take: np.ndarray) -> int:
    """Greedy fill in the order `seq` (candidate indices); returns the number of locations used.

    Each location supplies all it can of every line still short (whole lines only without
    split_lines) and is taken only if the rest can still be supplied within max_shipments by
    locations later in `seq`; so a plan is found whenever one exists. 0 means none exists.
    """
    nc, n_lines = cs.shape
    need = qty.copy()
    after = np.ones(nc, np.bool_)
    tk = np.empty(n_lines, np.int64)
    used = 0
    for c in seq:
        after[c] = False
        total = 0
        done = True
        for j in range(n_lines):
            tk[j] = min(need[j], cs[c, j])
            total += tk[j]
            if need[j] - tk[j] > 0:
                done = False
        if total == 0:
            continue
        if not done:
            if used + 1 >= kmax:
                continue
            if not can_cover(cs, need - tk, after, kmax - used - 1, cov_ptr, cov_idx):
                continue
        mem[used] = c
        for j in range(n_lines):
            take[used, j] = tk[j]
            need[j] -= tk[j]
        used += 1
        if done:
            return used
    return 0


@kernel(I, I1, I1, I1, F1, I2)
def _walk_order(policy: int, cidx: np.ndarray, rank: np.ndarray, id_rank: np.ndarray,
                dist: np.ndarray, stock: np.ndarray) -> np.ndarray:
    """Candidate indices in the walk order of a greedy policy (see `routing.solver`)."""
    nc = cidx.shape[0]
    if policy == PRIORITY:
        return np.argsort(rank[cidx], kind="mergesort")
    if policy == CLOSEST:
        seq = np.argsort(id_rank[cidx], kind="mergesort")
        return seq[np.argsort(dist[cidx][seq], kind="mergesort")]
    total = np.zeros(nc, np.int64)
    for c in range(nc):
        for j in range(stock.shape[1]):
            total[c] -= max(stock[cidx[c], j], 0)
    seq = np.argsort(rank[cidx], kind="mergesort")
    return seq[np.argsort(total[seq], kind="mergesort")]


@kernel(F1, F1, I1, I2, I1, F, B, I, I, I1, I1)
def _top_plans(cship: np.ndarray, ccpu: np.ndarray, crank: np.ndarray, cs: np.ndarray,
               qty: np.ndarray, pen: float, split: bool, kmax: int, k1: int,
               cov_ptr: np.ndarray, cov_idx: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact best k1 plans in plan order: (cost, size, members, takes) per plan."""
    n_lines = qty.shape[0]
    pcost = np.empty(POOL_CAP, np.float64)
    psize = np.empty(POOL_CAP, np.int64)
    pranks = np.empty((POOL_CAP, kmax), np.int64)
    pmem = np.empty((POOL_CAP, kmax), np.int64)
    pn = np.zeros(1, np.int64)
    thr = np.full(kmax + 3, np.inf)
    search(cship, ccpu, crank, cs, qty, pen, split, kmax, k1, cov_ptr, cov_idx,
           pcost, psize, pranks, pmem, pn, thr)
    sel = pool_select(pcost, psize, pranks, pn, k1)
    n = sel.shape[0]
    cost = np.empty(n, np.float64)
    size = np.empty(n, np.int64)
    mem = np.full((n, kmax), -1, np.int64)
    take = np.zeros((n, kmax, n_lines), np.int64)
    order = np.empty(kmax, np.int64)
    maxcpu = np.empty(n_lines, np.float64)
    for s in range(n):
        p = sel[s]
        m = psize[p]
        size[s] = m
        mem[s, :m] = pmem[p, :m]
        cost[s] = set_cost(mem[s], m, cship, ccpu, crank, cs, qty, pen, order, maxcpu, take[s])
        make_valid(mem[s], m, ccpu, cs, qty, split, order, maxcpu, take[s])
    return cost, size, mem, take


@kernel(F1, F1, B1, B1, B1, F1, F1, F1, I1, I1, I1, B1, I2, I1, F, F, I, F, F, I, B, I, I, nogil=True)
def route(lat: np.ndarray, lon: np.ndarray, active: np.ndarray, can_ship: np.ndarray,
          can_pickup: np.ndarray, fixed: np.ndarray, per_km: np.ndarray, cpu: np.ndarray,
          rank: np.ndarray, id_rank: np.ndarray, capacity: np.ndarray, excluded: np.ndarray,
          stock: np.ndarray, qty: np.ndarray, dest_lat: float, dest_lon: float, pickup: int,
          max_dist: float, pen: float, kmax: int, split: bool, policy: int, top_k: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Route one order: (reason, dist, ship, plan size, members, units) per location / plan.

    Plan 0 is the chosen plan, the next ones the alternatives; members are network indices.
    Sizes are 0 for no plan. Costs are recomputed by the caller from the allocations.
    """
    n_lines = qty.shape[0]
    reason, dist, ship = eligibility(lat, lon, active, can_ship, can_pickup, fixed, per_km,
                                     capacity, excluded, stock, dest_lat, dest_lon, pickup,
                                     max_dist)
    out_size = np.zeros(top_k + 1, np.int64)
    out_mem = np.full((top_k + 1, kmax), -1, np.int64)
    out_take = np.zeros((top_k + 1, kmax, n_lines), np.int64)
    if pickup >= 0 and not (active[pickup] and can_pickup[pickup]):
        return reason, dist, ship, out_size, out_mem, out_take
    cidx, cs = candidates(reason, ship, stock, qty, split, kmax)
    cship = ship[cidx]
    ccpu = cpu[cidx]
    crank = rank[cidx]
    cov_ptr, cov_idx = cover_lists(cs)
    first = 0
    chosen = np.full(kmax, -1, np.int64)
    if policy == FEWEST_SPLITS:
        everyone = np.ones(cidx.shape[0], np.bool_)
        for m in range(1, kmax + 1):
            if can_cover(cs, qty, everyone, m, cov_ptr, cov_idx):
                _, size, mem, take = _top_plans(cship, ccpu, crank, cs, qty, pen, split, m, 1,
                                                cov_ptr, cov_idx)
                out_size[0] = size[0]
                out_mem[0, :m] = mem[0]
                out_take[0, :m] = take[0]
                break
        first = 1
    elif policy != OPTIMAL:
        seq = _walk_order(policy, cidx, rank, id_rank, dist, stock)
        m = walk(seq, cs, qty, kmax, cov_ptr, cov_idx, out_mem[0], out_take[0])
        out_size[0] = m
        first = 1
    if first == 1:
        if out_size[0] == 0:
            return reason, dist, ship, out_size, out_mem, out_take
        chosen[:out_size[0]] = np.sort(out_mem[0, :out_size[0]])
        if top_k == 0:
            for i in range(out_size[0]):
                out_mem[0, i] = cidx[out_mem[0, i]]
            return reason, dist, ship, out_size, out_mem, out_take
    _, size, mem, take = _top_plans(cship, ccpu, crank, cs, qty, pen, split, kmax,
                                    top_k + 1, cov_ptr, cov_idx)
    s_out = first
    for s in range(size.shape[0]):
        if s_out > top_k:
            break
        m = size[s]
        if first == 1 and m == out_size[0]:
            same = True
            srt = np.sort(mem[s, :m])
            for i in range(m):
                if srt[i] != chosen[i]:
                    same = False
            if same:
                continue
        out_size[s_out] = m
        out_mem[s_out] = mem[s]
        out_take[s_out] = take[s]
        s_out += 1
    for s in range(top_k + 1):
        for i in range(out_size[s]):
            out_mem[s, i] = cidx[out_mem[s, i]]
    return reason, dist, ship, out_size, out_mem, out_take


@kernel(I, I, F1, F1, B1, I1, F)
def _serves(i: int, p: int, lat: np.ndarray, lon: np.ndarray, can_ship: np.ndarray,
            capacity: np.ndarray, max_dist: float) -> bool:
    """Can location i (already usable) supply a pickup at p: its own shelf (no shipment, so no
    capacity needed), or a transfer (a shipment: can_ship and capacity left)?"""
    if i == p:
        return True
    if not can_ship[i] or capacity[i] == 0:
        return False
    return max_dist < 0.0 or haversine_rad_nb(lat[i], lon[i], lat[p], lon[p]) <= max_dist


@kernel(F1, F1, B1, B1, B1, I1, I1, B1, I2, I1, I, F, I, B, I, nogil=True)
def suggest(lat: np.ndarray, lon: np.ndarray, active: np.ndarray, can_ship: np.ndarray,
            can_pickup: np.ndarray, id_rank: np.ndarray, capacity: np.ndarray,
            excluded: np.ndarray, stock: np.ndarray, qty: np.ndarray, pickup: int,
            max_dist: float, kmax: int, split: bool, limit: int) -> np.ndarray:
    """Up to `limit` other active pickup points, nearest to `pickup` first (then by id), where
    the same order has a plan (same eligibility rules as `eligibility`)."""
    n = lat.shape[0]
    out = np.empty(limit, np.int64)
    # Every location that could serve some pickup point: its own shelf (as that point: no
    # capacity needed) or a transfer (a shipment: capacity needed).
    loose = np.zeros(n, np.int8)
    for i in range(n):
        ships = can_ship[i] and capacity[i] != 0
        if not (active[i] and not excluded[i] and (ships or can_pickup[i])):
            loose[i] = 1
    cidx, cs = candidates(loose, np.zeros(n, np.float64), stock, qty, split, kmax)
    cov_ptr, cov_idx = cover_lists(cs)
    allowed = np.ones(cidx.shape[0], np.bool_)
    if not can_cover(cs, qty, allowed, kmax, cov_ptr, cov_idx):
        return out[:0]
    pts = np.empty(n, np.int64)
    k = 0
    for i in range(n):
        if i != pickup and active[i] and can_pickup[i]:
            pts[k] = i
            k += 1
    pts = pts[:k]
    d = np.empty(k, np.float64)
    for a in range(k):
        d[a] = haversine_rad_nb(lat[pts[a]], lon[pts[a]], lat[pickup], lon[pickup])
    seq = np.argsort(id_rank[pts], kind="mergesort")
    seq = seq[np.argsort(d[seq], kind="mergesort")]
    rare = np.argmin(cov_ptr[1:] - cov_ptr[:-1])
    found = 0
    for a in seq:
        if found == limit:
            break
        p = pts[a]
        some = False  # quick reject: nothing of the rarest line can reach p
        for q in range(cov_ptr[rare], cov_ptr[rare + 1]):
            if _serves(cidx[cov_idx[q]], p, lat, lon, can_ship, capacity, max_dist):
                some = True
                break
        if not some:
            continue
        for c in range(cidx.shape[0]):
            allowed[c] = _serves(cidx[c], p, lat, lon, can_ship, capacity, max_dist)
        if can_cover(cs, qty, allowed, kmax, cov_ptr, cov_idx):
            out[found] = p
            found += 1
    return out[:found]
