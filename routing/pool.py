"""The plan pool of the OPTIMAL search (numba) and the plan order it implements.

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

from routing._types import F1, I1, I2, F, I, kernel

POOL_CAP = 64  # plans kept at once; more only with > 64 plans mutually within tolerance


@kernel(F)
def tol(x: float) -> float:
    return 1e-9 * max(1.0, abs(x))


@kernel(I, I1, I, I1)
def _key_less(sa: int, ra: np.ndarray, sb: int, rb: np.ndarray) -> bool:
    if sa != sb:
        return sa < sb
    for i in range(sa):
        if ra[i] != rb[i]:
            return bool(ra[i] < rb[i])
    return False


@kernel(F, I, I1, F, I, I1)
def _beats(ca: float, sa: int, ra: np.ndarray, cb: float, sb: int, rb: np.ndarray) -> bool:
    return ca + tol(ca) < cb or (ca <= cb and _key_less(sa, ra, sb, rb))


@kernel(F1, I1, I1, I, F1)
def _thresholds(pcost: np.ndarray, psize: np.ndarray, pn: np.ndarray, k1: int,
                thr: np.ndarray) -> None:
    """thr[s]: a plan of cost >= thr[s] and size >= s is beaten by k1 pool plans.

    P beats such a plan when cost(P) + tol < lb (strict) or cost(P) <= lb with size(P) < s, so
    thr[s] is the k1-th smallest of cost(P) (size < s) or nextafter(cost(P) + tol) (others).
    The last entry is the k1-th smallest cost: below it no tie can be settled (`tie_prune`).
    """
    n = pn[0]
    keys = np.empty(n, np.float64)
    last = thr.shape[0] - 1
    if n >= k1:
        keys[:] = pcost[:n]
        keys.sort()
        thr[last] = keys[k1 - 1]
    else:
        thr[last] = np.inf
    for s in range(last):
        if n < k1:
            thr[s] = np.inf
            continue
        for p in range(n):
            c = pcost[p]
            keys[p] = c if psize[p] < s else np.nextafter(c + tol(c), np.inf)
        keys.sort()
        thr[s] = keys[k1 - 1]


@kernel(F1, I1, I2, I1, I, F, I, I1)
def tie_prune(pcost: np.ndarray, psize: np.ndarray, pranks: np.ndarray, pn: np.ndarray,
              k1: int, lb: float, m0: int, key0: np.ndarray) -> bool:
    """Do k1 pool plans beat every plan of cost >= lb with more than m0 locations, or with m0
    locations and sorted ranks >= key0? (Settles ties on the rank list, which `thr` cannot.)"""
    cnt = 0
    for p in range(pn[0]):
        c = pcost[p]
        if c + tol(c) < lb or (c <= lb and (psize[p] < m0 or (
                psize[p] == m0 and _key_less(m0, pranks[p], m0, key0)))):
            cnt += 1
            if cnt >= k1:
                return True
    return False


@kernel(F1, I1, I2, I2, I1, F1, F, I1, I, I1, I)
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


@kernel(F1, I1, I2, I1, I)
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


