"""Exact OPTIMAL search (numba): branch and bound over location sets, keeping the top plans.

Plan order (DESIGN §5, shared with `routing.reference`): repeatedly take, among the plans left,
those whose cost is within tol of the cheapest left (tol(x) = 1e-9 * max(1, |x|)) and pick the
one with fewer locations, then the lexicographically smaller list of its members' ranks sorted
ascending, where a rank is the position of the location in the network sorted by
(priority, location id). The first pick is the plan, the next `top_k` the alternatives.

Plan P "beats" Q when cost(P) + tol(cost(P)) < cost(Q), or cost(P) <= cost(Q) with a smaller
(size, ranks) key. This is transitive, and a plan beaten by `k1` = top_k + 1 plans is never
picked, so the search drops such plans and prunes a branch when `k1` pool plans beat every plan
it can still produce (bounded by a lower bound on cost and a minimum size).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from routing.evaluate import make_valid, set_cost

POOL_CAP = 64  # plans kept at once; more only with > 64 plans mutually within tolerance


@njit(cache=True)
def tol(x: float) -> float:
    return 1e-9 * max(1.0, abs(x))


@njit(cache=True)
def _key_less(sa: int, ra: np.ndarray, sb: int, rb: np.ndarray) -> bool:
    if sa != sb:
        return sa < sb
    for i in range(sa):
        if ra[i] != rb[i]:
            return ra[i] < rb[i]
    return False


@njit(cache=True)
def _beats(ca: float, sa: int, ra: np.ndarray, cb: float, sb: int, rb: np.ndarray) -> bool:
    return ca + tol(ca) < cb or (ca <= cb and _key_less(sa, ra, sb, rb))


@njit(cache=True)
def _thresholds(pcost: np.ndarray, psize: np.ndarray, pn: np.ndarray, k1: int,
                thr: np.ndarray) -> None:
    """thr[s]: a plan of cost >= thr[s] and size >= s is beaten by k1 pool plans.

    P beats such a plan when cost(P) + tol < lb (strict) or cost(P) <= lb with size(P) < s, so
    thr[s] is the k1-th smallest of cost(P) (size < s) or nextafter(cost(P) + tol) (others).
    """
    n = pn[0]
    keys = np.empty(n, np.float64)
    for s in range(thr.shape[0]):
        if n < k1:
            thr[s] = np.inf
            continue
        for p in range(n):
            c = pcost[p]
            keys[p] = c if psize[p] < s else np.nextafter(c + tol(c), np.inf)
        keys.sort()
        thr[s] = keys[k1 - 1]


@njit(cache=True)
def pool_insert(pcost: np.ndarray, psize: np.ndarray, pranks: np.ndarray, pmem: np.ndarray,
                pn: np.ndarray, thr: np.ndarray, cost: float, mem: np.ndarray, m: int,
                crank: np.ndarray, k1: int) -> None:
    """Add plan `mem[:m]` unless it duplicates a pool plan or k1 pool plans beat it; then
    refresh the pruning thresholds `thr`."""
    ranks = np.empty(pranks.shape[1], np.int64)
    for i in range(m):
        r = crank[mem[i]]
        k = i - 1
        while k >= 0 and ranks[k] > r:
            ranks[k + 1] = ranks[k]
            k -= 1
        ranks[k + 1] = r
    n = pn[0]
    for p in range(n):
        if psize[p] == m and not _key_less(m, ranks, m, pranks[p]) \
                and not _key_less(m, pranks[p], m, ranks):
            return
    cnt = 0
    for p in range(n):
        if _beats(pcost[p], psize[p], pranks[p], cost, m, ranks):
            cnt += 1
            if cnt >= k1:
                return
    slot = n
    if n == pcost.shape[0]:
        slot = 0
        for p in range(1, n):
            w = pcost[slot]
            if pcost[p] > w or (pcost[p] == w and _key_less(
                    psize[slot], pranks[slot], psize[p], pranks[p])):
                slot = p
    else:
        pn[0] = n + 1
    pcost[slot] = cost
    psize[slot] = m
    pranks[slot, :m] = ranks[:m]
    pmem[slot, :m] = mem[:m]
    # Drop every plan now beaten by k1 others (all at once: each keeps k1 beaters in the pool).
    n = pn[0]
    beaten = np.zeros(n, np.int64)
    for q in range(n):
        for p in range(n):
            if p != q and _beats(pcost[p], psize[p], pranks[p], pcost[q], psize[q], pranks[q]):
                beaten[q] += 1
    w = 0
    for q in range(n):
        if beaten[q] < k1:
            if w != q:
                pcost[w] = pcost[q]
                psize[w] = psize[q]
                pranks[w] = pranks[q]
                pmem[w] = pmem[q]
            w += 1
    pn[0] = w
    _thresholds(pcost, psize, pn, k1, thr)


@njit(cache=True)
def pool_select(pcost: np.ndarray, psize: np.ndarray, pranks: np.ndarray, pn: np.ndarray,
                k1: int) -> np.ndarray:
    """Pool indices of the first k1 picks in plan order (see module docstring)."""
    n = pn[0]
    taken = np.zeros(n, np.bool_)
    out = np.empty(min(n, k1), np.int64)
    for s in range(out.shape[0]):
        lo = np.inf
        for p in range(n):
            if not taken[p] and pcost[p] < lo:
                lo = pcost[p]
        best = -1
        for p in range(n):
            if taken[p] or pcost[p] > lo + tol(lo):
                continue
            if best < 0 or _key_less(psize[p], pranks[p], psize[best], pranks[best]):
                best = p
        taken[best] = True
        out[s] = best
    return out


@njit(cache=True)
def _unit_bound(cs: np.ndarray, ccpu: np.ndarray, qty: np.ndarray) -> float:
    """Cheapest unit cost of the whole order with every candidate available (a lower bound)."""
    by_cpu = np.argsort(ccpu, kind="mergesort")
    total = 0.0
    for j in range(qty.shape[0]):
        need = qty[j]
        for c in by_cpu:
            if need == 0:
                break
            t = min(need, cs[c, j])
            total += t * ccpu[c]
            need -= t
    return total


@njit(cache=True)
def search(cship: np.ndarray, ccpu: np.ndarray, crank: np.ndarray, cs: np.ndarray,
           qty: np.ndarray, pen: float, split: bool, kmax: int, k1: int, cov_ptr: np.ndarray,
           cov_idx: np.ndarray, pcost: np.ndarray, psize: np.ndarray, pranks: np.ndarray,
           pmem: np.ndarray, pn: np.ndarray, thr: np.ndarray) -> None:
    """Fill the pool with every plan of at most `kmax` candidates that may be among the first k1.

    Candidates must be sorted by ship cost (ascending): bounds that grow with the ship cost of
    the next location let a loop stop early. Each node holds a set T of at most kmax members;
    while T misses units, it branches on the candidates holding the rarest short line (every
    completion must contain one); once T covers the order, on adding any candidate whose
    possible saving (units it could supply more cheaply) could pay its ship cost and penalty.
    """
    nc, n_lines = cs.shape
    order = np.empty(kmax, np.int64)
    maxcpu = np.empty(n_lines, np.float64)
    take = np.empty((kmax, n_lines), np.int64)
    one = np.empty(1, np.int64)
    for c in range(nc):
        full = True
        for j in range(n_lines):
            if cs[c, j] < qty[j]:
                full = False
                break
        if full:
            one[0] = c
            cost = set_cost(one, 1, cship, ccpu, crank, cs, qty, pen, order, maxcpu, take)
            pool_insert(pcost, psize, pranks, pmem, pn, thr, cost, one, 1, crank, k1)
    if nc == 0:
        return
    u0 = _unit_bound(cs, ccpu, qty)
    # Iterative deepening: plans with fewer locations, found first, tighten later bounds.
    for kcur in range(2, kmax + 1):
        _dfs(cship, ccpu, crank, cs, qty, pen, split, kcur, k1, cov_ptr, cov_idx, u0,
             pcost, psize, pranks, pmem, pn, thr)


@njit(cache=True)
def _dfs(cship: np.ndarray, ccpu: np.ndarray, crank: np.ndarray, cs: np.ndarray,
         qty: np.ndarray, pen: float, split: bool, kmax: int, k1: int, cov_ptr: np.ndarray,
         cov_idx: np.ndarray, u0: float, pcost: np.ndarray, psize: np.ndarray,
         pranks: np.ndarray, pmem: np.ndarray, pn: np.ndarray, thr: np.ndarray) -> None:
    """One depth-first pass over sets of at most kmax candidates (see `search`)."""
    nc, n_lines = cs.shape
    order = np.empty(kmax, np.int64)
    maxcpu = np.empty(n_lines, np.float64)
    take = np.empty((kmax, n_lines), np.int64)
    ship_min = cship[0]
    cpu_min = ccpu.min()
    got = np.zeros(n_lines, np.int64)
    avail = np.zeros(n_lines, np.int64)
    cnt = np.zeros(n_lines, np.int64)
    for c in range(nc):
        for j in range(n_lines):
            if cs[c, j] > 0:
                avail[j] += cs[c, j]
                cnt[j] += 1
    blocked = np.zeros(nc, np.bool_)
    fstack = np.empty(nc, np.int64)
    fsp = 0
    tmem = np.empty(kmax, np.int64)
    f_cover = np.empty(kmax + 1, np.bool_)
    f_line = np.empty(kmax + 1, np.int64)
    f_pos = np.empty(kmax + 1, np.int64)
    f_end = np.empty(kmax + 1, np.int64)
    f_last = np.empty(kmax + 1, np.int64)
    f_base = np.empty(kmax + 1, np.int64)
    f_cost = np.empty(kmax + 1, np.float64)
    f_sumax = np.empty(kmax + 1, np.float64)
    f_cpumax = np.empty(kmax + 1, np.float64)
    f_maxcpu = np.empty((kmax + 1, n_lines), np.float64)
    d = 0
    init = True
    while True:
        if init:
            init = False
            f_base[d] = fsp
            f_last[d] = -1
            f_pos[d] = 0
            f_end[d] = 0
            covered = True
            for j in range(n_lines):
                if got[j] < qty[j]:
                    covered = False
                    break
            if covered:
                cost = set_cost(tmem, d, cship, ccpu, crank, cs, qty, pen, order, maxcpu, take)
                if d >= 2 and make_valid(tmem, d, ccpu, cs, qty, split, order, maxcpu, take):
                    pool_insert(pcost, psize, pranks, pmem, pn, thr, cost, tmem, d, crank, k1)
                if d < kmax:
                    f_cover[d] = False
                    f_end[d] = nc
                    f_cost[d] = cost
                    sumax = 0.0
                    f_cpumax[d] = 0.0
                    for j in range(n_lines):
                        f_maxcpu[d, j] = maxcpu[j]
                        f_cpumax[d] = max(f_cpumax[d], maxcpu[j])
                        sumax += qty[j] * max(0.0, maxcpu[j] - cpu_min)
                    f_sumax[d] = sumax
            elif d < kmax:
                jstar, best = -1, nc + 1
                for j in range(n_lines):
                    if got[j] < qty[j]:
                        if avail[j] < qty[j] - got[j]:
                            jstar = -1
                            break
                        if cnt[j] < best:
                            best, jstar = cnt[j], j
                if jstar >= 0:
                    f_cover[d] = True
                    f_line[d] = jstar
                    f_pos[d] = cov_ptr[jstar]
                    f_end[d] = cov_ptr[jstar + 1]
        c = f_last[d]
        if c >= 0:
            f_last[d] = -1
            blocked[c] = True
            fstack[fsp] = c
            fsp += 1
            for j in range(n_lines):
                if cs[c, j] > 0:
                    avail[j] -= cs[c, j]
                    cnt[j] -= 1
            if f_cover[d]:
                for j in range(n_lines):
                    if got[j] < qty[j] and avail[j] < qty[j] - got[j]:
                        f_pos[d] = f_end[d]
                        break
        nxt = -1
        ship_t = 0.0
        for i in range(d):
            ship_t += cship[tmem[i]]
        while f_pos[d] < f_end[d]:
            if f_cover[d]:
                c = cov_idx[f_pos[d]]
            else:
                c = f_pos[d]
            f_pos[d] += 1
            if blocked[c]:
                continue
            if f_cover[d]:
                lb = ship_t + cship[c] + pen * d + u0
                if lb >= thr[d + 1]:
                    f_pos[d] = f_end[d]
                    break
                done = True
                for j in range(n_lines):
                    if got[j] + cs[c, j] < qty[j]:
                        done = False
                        break
                if not done and (d + 1 == kmax or lb + pen + ship_min >= thr[d + 2]):
                    continue
            else:
                neg = (kmax - d - 1) * min(0.0, ship_min + pen - f_sumax[d])
                lb = f_cost[d] + cship[c] + pen + neg
                if lb - f_sumax[d] >= thr[d + 1]:
                    f_pos[d] = f_end[d]
                    break
                # c can only ever supply a line whose dearest unit in T costs >= its own; if
                # none, every set of this subtree holding c leaves c empty (not a plan).
                saving = 0.0
                useful = ccpu[c] <= f_cpumax[d]
                if useful:
                    useful = False
                    for j in range(n_lines):
                        gap = f_maxcpu[d, j] - ccpu[c]
                        if cs[c, j] > 0 and gap >= 0.0:
                            useful = True
                            saving += cs[c, j] * gap
                if not useful or lb - saving >= thr[d + 1]:
                    blocked[c] = True
                    fstack[fsp] = c
                    fsp += 1
                    for j in range(n_lines):
                        if cs[c, j] > 0:
                            avail[j] -= cs[c, j]
                            cnt[j] -= 1
                    continue
            nxt = c
            break
        if nxt >= 0:
            f_last[d] = nxt
            tmem[d] = nxt
            blocked[nxt] = True
            for j in range(n_lines):
                got[j] += cs[nxt, j]
                if cs[nxt, j] > 0:
                    avail[j] -= cs[nxt, j]
                    cnt[j] -= 1
            d += 1
            init = True
            continue
        while fsp > f_base[d]:
            fsp -= 1
            u = fstack[fsp]
            blocked[u] = False
            for j in range(n_lines):
                if cs[u, j] > 0:
                    avail[j] += cs[u, j]
                    cnt[j] += 1
        if d == 0:
            return
        d -= 1
        c = f_last[d]
        blocked[c] = False
        for j in range(n_lines):
            got[j] -= cs[c, j]
            if cs[c, j] > 0:
                avail[j] += cs[c, j]
                cnt[j] += 1
