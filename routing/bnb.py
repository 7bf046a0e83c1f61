"""Exact OPTIMAL search (numba): branch and bound over location sets.

A node holds a set T of candidates and a set F of forbidden ones. While T misses units it
branches on the candidates holding the rarest short line (every completion contains one of them);
once T covers the order, on adding any candidate that could still lower the cost or rank among
the top plans. Sibling branches forbid the candidates already tried, so each set is visited
once. Passes with at most 2, 3, ..., max_shipments locations (iterative deepening) fill the pool
(`routing.pool`) with small plans early; its thresholds prune a branch as soon as k1 pool plans
beat everything the branch can still produce, on cost, on size, or on the sorted rank list.

Lower bounds: (1) ship costs of T and the next member, penalties, and the cheapest unit cost;
(2) a per-line greedy where new locations' units carry their ship cost and penalty spread over
the most units they could supply; (3) a Lagrangian bound with unit prices pi; (4) for a
covering T, cost(T) plus, per added location, ship + penalty - the most it could save on units.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from routing._types import B1, F1, I1, I2, B, F, I, kernel
from routing.evaluate import make_valid, set_cost, sort_members
from routing.pool import pool_insert, tie_prune

# HOT_INLINE: `_forbid` and `_tie_key` run in _dfs's innermost loop with constant arguments
# (`_forbid(c, True, ...)`, `_tie_key(..., -1, ...)`). Inlined there, each call site is compiled
# with its constant folded in, as the literal specialisations of a lazy dispatcher were; as kernels
# with one generic signature, large OPTIMAL orders solved ~15 % slower. Inlining costs no compile
# time (they are small, and never compiled on their own).


@kernel(I, I1, I1, I, F1, F1, I2, I1, B1, B1, I1, I1, F1, F1)
def _line_bound(j: int, tmem: np.ndarray, tord: np.ndarray, d: int, ccpu: np.ndarray,
                eff: np.ndarray, cs: np.ndarray, qty: np.ndarray, in_t: np.ndarray,
                forb: np.ndarray, ptr: np.ndarray, eff_idx: np.ndarray, lbl: np.ndarray,
                marg: np.ndarray) -> None:
    """Lower bound on what line j adds to any completion of T (inf if it cannot be supplied).

    A unit from a member of T costs its cost_per_unit; a unit from a new location x at least
    eff[x] = cost_per_unit + (ship + penalty) / (units x can supply at most), since x's ship
    cost and penalty are spread over at most that many units. Greedy over both, cheapest first;
    `tord` lists T by cost_per_unit and `eff_idx[ptr[j]:ptr[j+1]]` the others by eff.
    """
    need = qty[j]
    total = 0.0
    price = 0.0
    ti = 0
    p = ptr[j]
    end = ptr[j + 1]
    while need > 0:
        while ti < d and cs[tmem[tord[ti]], j] == 0:
            ti += 1
        while p < end and (forb[eff_idx[p]] or in_t[eff_idx[p]]):
            p += 1
        if ti < d and (p == end or ccpu[tmem[tord[ti]]] <= eff[eff_idx[p]]):
            c = tmem[tord[ti]]
            price = ccpu[c]
            ti += 1
        elif p < end:
            c = eff_idx[p]
            price = eff[c]
            p += 1
        else:
            lbl[j] = np.inf
            marg[j] = np.inf
            return
        t = min(need, cs[c, j])
        total += t * price
        need -= t
    lbl[j] = total
    marg[j] = price


@njit(inline="always")  # see HOT_INLINE
def _forbid(c: int, bound: bool, tmem: np.ndarray, tord: np.ndarray, d: int,
            ccpu: np.ndarray, eff: np.ndarray, cs: np.ndarray, qty: np.ndarray,
            in_t: np.ndarray, forb: np.ndarray, fstack: np.ndarray, fsp: int,
            avail: np.ndarray, cnt: np.ndarray, ptr: np.ndarray, eff_idx: np.ndarray,
            lbl: np.ndarray, marg: np.ndarray) -> int:
    """Forbid c; with `bound`, refresh the line bounds c may have contributed to."""
    forb[c] = True
    fstack[fsp] = c
    for j in range(qty.shape[0]):
        if cs[c, j] > 0:
            avail[j] -= cs[c, j]
            cnt[j] -= 1
            if bound and eff[c] <= marg[j]:
                _line_bound(j, tmem, tord, d, ccpu, eff, cs, qty, in_t, forb, ptr, eff_idx,
                            lbl, marg)
    return fsp + 1


@kernel(I2, I1, I1)
def _lists_in_order(cs: np.ndarray, ptr: np.ndarray, seq: np.ndarray) -> np.ndarray:
    """Per-line lists (CSR with offsets `ptr`) of the candidates holding the line, in `seq`
    order."""
    out = np.empty(ptr[-1], np.int64)
    fill = ptr[:-1].copy()
    for c in seq:
        for j in range(cs.shape[1]):
            if cs[c, j] > 0:
                out[fill[j]] = c
                fill[j] += 1
    return out


@kernel(F1, F1, I2, F, F1, F, B1, B1, I, F1)
def _extra_costs(cship: np.ndarray, ccpu: np.ndarray, cs: np.ndarray, pen: float,
                 maxcpu: np.ndarray, cpumax: float, in_t: np.ndarray, forb: np.ndarray,
                 r: int, dx: np.ndarray) -> float:
    """For a covering T: dx[c] = ship + penalty - (most c could save on units), a lower bound
    on what adding c changes (inf if c would never be used); returns the sum of the r most
    negative. Savings are sub-additive, so T + X costs at least cost(T) + sum of dx over X.
    """
    best = np.zeros(max(r, 1), np.float64)  # the r most negative so far, ascending
    for c in range(cs.shape[0]):
        dx[c] = np.inf
        if in_t[c] or forb[c] or ccpu[c] > cpumax:
            continue
        saving = 0.0
        useful = False  # c can only supply a line whose dearest unit in T costs >= its own
        for j in range(cs.shape[1]):
            gap = maxcpu[j] - ccpu[c]
            if cs[c, j] > 0 and gap >= 0.0:
                useful = True
                saving += cs[c, j] * gap
        if not useful:
            continue
        dx[c] = cship[c] + pen - saving
        if r > 0 and dx[c] < best[r - 1]:
            k = r - 1
            while k > 0 and best[k - 1] > dx[c]:
                best[k] = best[k - 1]
                k -= 1
            best[k] = dx[c]
    return best[:r].sum() if r > 0 else 0.0


@njit(inline="always")  # see HOT_INLINE
def _tie_key(tmem: np.ndarray, d: int, crank: np.ndarray, c: int, extra: int,
             key: np.ndarray) -> int:
    """Sorted ranks of T + c (+ `extra` if >= 0) into `key`; returns their number."""
    m = 0
    for i in range(d + 2):
        if i < d:
            r = crank[tmem[i]]
        elif i == d:
            r = crank[c]
        elif extra >= 0:
            r = extra
        else:
            break
        k = m - 1
        while k >= 0 and key[k] > r:
            key[k + 1] = key[k]
            k -= 1
        key[k + 1] = r
        m += 1
    return m


@kernel(I, F1, I1, B1, B1)
def _negsum(r: int, rc: np.ndarray, rc_order: np.ndarray, forb: np.ndarray,
            in_t: np.ndarray) -> float:
    """Sum of the (at most r) most negative rc among candidates outside T and not forbidden."""
    total = 0.0
    for c in rc_order:
        if r == 0 or rc[c] >= 0.0:
            break
        if not (forb[c] or in_t[c]):
            total += rc[c]
            r -= 1
    return total


@kernel(F1, F1, I1, I2, I1, F, B, I, I, I1, I1, F1, F, F, F1, I1, I1, F1, I1, I2, I2, I1, F1)
def _dfs(cship: np.ndarray, ccpu: np.ndarray, crank: np.ndarray, cs: np.ndarray,
         qty: np.ndarray, pen: float, split: bool, kmax: int, k1: int, cov_ptr: np.ndarray,
         eff_idx: np.ndarray, eff: np.ndarray, u0: float, lag0: float, rc: np.ndarray,
         rc_order: np.ndarray, by_rank: np.ndarray, pcost: np.ndarray, psize: np.ndarray,
         pranks: np.ndarray, pmem: np.ndarray, pn: np.ndarray, thr: np.ndarray) -> None:
    """One depth-first pass over the sets of at most kmax candidates (see module docstring)."""
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
    in_t = np.zeros(nc, np.bool_)
    forb = np.zeros(nc, np.bool_)
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
    f_lb = np.empty((kmax + 1, n_lines), np.float64)  # per-line bounds of the node's T
    f_marg = np.empty((kmax + 1, n_lines), np.float64)
    f_tord = np.empty((kmax + 1, kmax), np.int64)
    f_neg = np.empty(kmax + 1, np.float64)
    f_pre = np.zeros(kmax + 1, np.bool_)  # f_dx / f_negx computed for this covering node
    f_negx = np.empty(kmax + 1, np.float64)
    f_dx = np.empty((kmax + 1, nc), np.float64)
    rc_t = 0.0
    gate = thr.shape[0] - 1  # thr[gate]: below it no tie on the rank list can prune
    key0 = np.empty(kmax + 1, np.int64)
    d = 0
    init = True
    while True:
        if init:
            init = False
            f_base[d] = fsp
            f_last[d] = -1
            f_pos[d] = 0
            f_end[d] = 0
            f_cover[d] = False
            f_pre[d] = False
            f_neg[d] = _negsum(kmax - d, rc, rc_order, forb, in_t)
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
                    sort_members(tmem, d, ccpu, crank, f_tord[d])
                    for j in range(n_lines):
                        _line_bound(j, tmem, f_tord[d], d, ccpu, eff, cs, qty, in_t, forb,
                                    cov_ptr, eff_idx, f_lb[d], f_marg[d])
        c = f_last[d]
        if c >= 0:
            f_last[d] = -1
            fsp = _forbid(c, f_cover[d], tmem, f_tord[d], d, ccpu, eff, cs, qty, in_t, forb,
                          fstack, fsp, avail, cnt, cov_ptr, eff_idx, f_lb[d], f_marg[d])
        ship_t = 0.0
        for i in range(d):
            ship_t += cship[tmem[i]]
        if f_cover[d]:
            if c >= 0:
                f_neg[d] = _negsum(kmax - d, rc, rc_order, forb, in_t)
            node_lb = ship_t + pen * (d - 1)
            for j in range(n_lines):
                node_lb += f_lb[d, j]
            if max(node_lb, lag0 + rc_t + f_neg[d]) >= thr[d + 1]:
                f_pos[d] = f_end[d]
        nxt = -1
        while f_pos[d] < f_end[d]:
            c = eff_idx[f_pos[d]] if f_cover[d] else f_pos[d]
            f_pos[d] += 1
            if in_t[c] or forb[c]:
                continue
            if f_cover[d]:
                lb = ship_t + cship[c] + pen * d + u0
                lag = lag0 + rc_t + rc[c] + f_neg[d]
                done = True
                for j in range(n_lines):
                    if got[j] + cs[c, j] < qty[j]:
                        done = False
                        break
                if not done and d + 1 == kmax:
                    continue
                prune = max(lb, lag) >= thr[d + 1] or (
                    not done and lb + pen + ship_min >= thr[d + 2])
                child_lb = max(lb if done else lb + pen + ship_min, lag)
                if not prune and child_lb >= thr[gate]:
                    # Same cost and size: can the sorted rank list still win? The smallest
                    # list of a completion adds the lowest-ranked candidate still available.
                    extra = -1
                    if not done:
                        for x in by_rank:
                            if x != c and not (forb[x] or in_t[x]):
                                extra = crank[x]
                                break
                    m0 = _tie_key(tmem, d, crank, c, extra, key0)
                    prune = (done or extra >= 0) and tie_prune(
                        pcost, psize, pranks, pn, k1, child_lb, m0, key0)
                if prune:
                    # node_lb (checked above) already bounds every completion; this bound
                    # is the child's own: T, c, and for an incomplete T + c one more member.
                    fsp = _forbid(c, True, tmem, f_tord[d], d, ccpu, eff, cs, qty, in_t, forb,
                                  fstack, fsp, avail, cnt, cov_ptr, eff_idx, f_lb[d], f_marg[d])
                    f_neg[d] = _negsum(kmax - d, rc, rc_order, forb, in_t)
                    node_lb = ship_t + pen * (d - 1)
                    for j in range(n_lines):
                        node_lb += f_lb[d, j]
                    if max(node_lb, lag0 + rc_t + f_neg[d]) >= thr[d + 1]:
                        f_pos[d] = f_end[d]
                    continue
            else:
                neg = (kmax - d - 1) * min(0.0, ship_min + pen - f_sumax[d])
                lb = f_cost[d] + cship[c] + pen + neg - f_sumax[d]
                if lb >= thr[d + 1]:  # grows with cship: so do all later candidates
                    f_pos[d] = f_end[d]
                    break
                if not f_pre[d]:
                    f_pre[d] = True
                    f_negx[d] = _extra_costs(cship, ccpu, cs, pen, f_maxcpu[d], f_cpumax[d],
                                             in_t, forb, kmax - d - 1, f_dx[d])
                lag = lag0 + rc_t + rc[c] + f_neg[d]
                child_lb = max(f_cost[d] + f_dx[d, c] + f_negx[d], lag, lb)
                # dx = inf: every set of this subtree holding c leaves c empty (not a plan).
                prune = child_lb >= thr[d + 1]
                if not prune and child_lb >= thr[gate]:
                    m0 = _tie_key(tmem, d, crank, c, -1, key0)
                    prune = tie_prune(pcost, psize, pranks, pn, k1, child_lb, m0, key0)
                if prune:
                    fsp = _forbid(c, False, tmem, f_tord[d], d, ccpu, eff, cs, qty, in_t, forb,
                                  fstack, fsp, avail, cnt, cov_ptr, eff_idx, f_lb[d], f_marg[d])
                    continue
            nxt = c
            break
        if nxt >= 0:
            f_last[d] = nxt
            tmem[d] = nxt
            in_t[nxt] = True
            rc_t += rc[nxt]
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
            forb[u] = False
            for j in range(n_lines):
                if cs[u, j] > 0:
                    avail[j] += cs[u, j]
                    cnt[j] += 1
        if d == 0:
            return
        d -= 1
        c = f_last[d]
        in_t[c] = False
        rc_t -= rc[c]
        for j in range(n_lines):
            got[j] -= cs[c, j]
            if cs[c, j] > 0:
                avail[j] += cs[c, j]
                cnt[j] += 1


@kernel(F1, F1, I1, I2, I1, F, B, I, I, I1, I1, F1, I1, I2, I2, I1, F1)
def search(cship: np.ndarray, ccpu: np.ndarray, crank: np.ndarray, cs: np.ndarray,
           qty: np.ndarray, pen: float, split: bool, kmax: int, k1: int, cov_ptr: np.ndarray,
           cov_idx: np.ndarray, pcost: np.ndarray, psize: np.ndarray, pranks: np.ndarray,
           pmem: np.ndarray, pn: np.ndarray, thr: np.ndarray) -> None:
    """Fill the pool with every plan of at most `kmax` candidates that may be among the first k1.

    Candidates must be sorted by ship cost, ascending (loops over them stop early on bounds).
    """
    nc, n_lines = cs.shape
    order = np.empty(kmax, np.int64)
    maxcpu = np.empty(n_lines, np.float64)
    take = np.empty((kmax, n_lines), np.int64)
    one = np.empty(1, np.int64)
    eff = np.empty(nc, np.float64)
    for c in range(nc):
        full = True
        units = 0
        for j in range(n_lines):
            units += cs[c, j]
            if cs[c, j] < qty[j]:
                full = False
        eff[c] = ccpu[c] + (cship[c] + pen) / max(units, 1)
        if full:
            one[0] = c
            cost = set_cost(one, 1, cship, ccpu, crank, cs, qty, pen, order, maxcpu, take)
            pool_insert(pcost, psize, pranks, pmem, pn, thr, cost, one, 1, crank, k1)
    if nc == 0 or kmax == 1:
        return
    # Branch on the cheapest sources per unit (eff) first: once their subtrees are done they
    # are forbidden, which raises the bound of the remaining siblings the most.
    eff_idx = _lists_in_order(cs, cov_ptr, np.argsort(eff, kind="mergesort"))
    u0 = 0.0
    by_cpu = np.argsort(ccpu, kind="mergesort")
    for j in range(n_lines):
        need = qty[j]
        for c in by_cpu:
            if need == 0:
                break
            t = min(need, cs[c, j])
            u0 += t * ccpu[c]
            need -= t
    # Lagrangian bound: with a price pi[j] per unit of line j (here the eff price of the
    # marginal unit when every candidate is available), any plan S costs at least
    # sum_j pi[j] * qty[j] - pen + sum over S of rc[x], where
    # rc[x] = ship[x] + pen + sum_j cs[x, j] * min(0, cpu[x] - pi[j]).
    lag0 = -pen
    pi = np.zeros(n_lines, np.float64)
    for j in range(n_lines):
        need = qty[j]
        for p in range(cov_ptr[j], cov_ptr[j + 1]):
            c = eff_idx[p]
            need -= min(need, cs[c, j])
            pi[j] = eff[c]
            if need == 0:
                break
        if need > 0:
            pi[j] = 0.0
        lag0 += pi[j] * qty[j]
    rc = np.empty(nc, np.float64)
    for c in range(nc):
        rc[c] = cship[c] + pen
        for j in range(n_lines):
            rc[c] += cs[c, j] * min(0.0, ccpu[c] - pi[j])
    rc_order = np.argsort(rc, kind="mergesort")
    by_rank = np.argsort(crank, kind="mergesort")
    # Iterative deepening: plans with fewer locations, found first, tighten later bounds. Pass
    # kcur adds only plans of exactly kcur locations (pass kcur - 1 searched the smaller sets
    # against a pool that has only grown since), so it is skipped when bounds (1) and (3) of
    # the module docstring, taken over the kcur cheapest candidates, already reach thr[kcur].
    # On dense networks this skips the widest pass, which finds nothing, more often than not.
    ship_k = cship[0]  # sums over the kcur cheapest: candidates are sorted by ship cost
    rc_k = rc[rc_order[0]]
    for kcur in range(2, kmax + 1):
        if kcur > nc:
            break
        ship_k += cship[kcur - 1]
        rc_k += rc[rc_order[kcur - 1]]
        if max(u0 + pen * (kcur - 1) + ship_k, lag0 + rc_k) >= thr[kcur]:
            continue
        _dfs(cship, ccpu, crank, cs, qty, pen, split, kcur, k1, cov_ptr, eff_idx, eff, u0,
             lag0, rc, rc_order, by_rank, pcost, psize, pranks, pmem, pn, thr)
