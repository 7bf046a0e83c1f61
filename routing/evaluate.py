"""Numba helpers over candidate arrays: the cost of a location set, its assignment, coverage.

Candidate arrays (built per solve by `kernels.route`): `cship[c]` ship cost, `ccpu[c]`
cost_per_unit, `crank[c]` position in the (priority, id) order, `cs[c, j]` the units of line j
that candidate c can supply: min(stock, qty) with split_lines, else qty or 0 (whole line or none).
With that encoding one greedy serves both split modes.
"""

from __future__ import annotations

import numpy as np

from routing._types import B1, F1, I1, I2, B, F, I, kernel

INF = np.inf


@kernel(I1, I, F1, I1, I1)
def sort_members(mem: np.ndarray, m: int, ccpu: np.ndarray, crank: np.ndarray,
                 out: np.ndarray) -> None:
    """Write positions 0..m-1 of `mem` into `out`, ordered by (cost_per_unit, rank)."""
    for i in range(m):
        out[i] = i
    for i in range(1, m):
        p = out[i]
        k = i - 1
        while k >= 0:
            q = out[k]
            a, b = mem[q], mem[p]
            if ccpu[a] < ccpu[b] or (ccpu[a] == ccpu[b] and crank[a] < crank[b]):
                break
            out[k + 1] = q
            k -= 1
        out[k + 1] = p


@kernel(I1, I, F1, F1, I1, I2, I1, F, I1, F1, I2)
def set_cost(mem: np.ndarray, m: int, cship: np.ndarray, ccpu: np.ndarray, crank: np.ndarray,
             cs: np.ndarray, qty: np.ndarray, pen: float, order: np.ndarray,
             maxcpu: np.ndarray, take: np.ndarray) -> float:
    """Cost of the cheapest assignment over set `mem[:m]`, counting every member's ship cost.

    Greedy per line by (cost_per_unit, rank); fills `take[i, j]` (i = position in mem) and
    `maxcpu[j]`, the dearest unit price used on line j. Returns inf when the set cannot cover.
    """
    sort_members(mem, m, ccpu, crank, order)
    cost = pen * (m - 1)
    for i in range(m):
        cost += cship[mem[i]]
    for j in range(qty.shape[0]):
        need = qty[j]
        maxcpu[j] = 0.0
        for k in range(m):
            i = order[k]
            t = min(need, cs[mem[i], j])
            take[i, j] = t
            if t > 0:
                cost += t * ccpu[mem[i]]
                maxcpu[j] = ccpu[mem[i]]
                need -= t
        if need > 0:
            return INF
    return cost


@kernel(I1, I, B1, F1, I2, F1, I1, I1)
def _match(mem: np.ndarray, m: int, free: np.ndarray, ccpu: np.ndarray, cs: np.ndarray,
           maxcpu: np.ndarray, cap: np.ndarray, match: np.ndarray) -> bool:
    """Give every `free` member a line at its marginal price, at most cap[j] members per line.

    Augmenting paths (BFS) on members x lines; `match[i]` gets the line of member i or -1.
    """
    n_lines = maxcpu.shape[0]
    load = np.zeros(n_lines, np.int64)
    parent = np.empty(n_lines, np.int64)
    seen = np.zeros(n_lines, np.bool_)
    queue = np.empty(m, np.int64)
    queued = np.zeros(m, np.bool_)
    for i in range(m):
        match[i] = -1
    for s in range(m):
        if not free[s]:
            continue
        seen[:] = False
        queued[:] = False
        head, tail = 0, 1
        queue[0] = s
        queued[s] = True
        found = -1
        while head < tail and found < 0:
            u = queue[head]
            head += 1
            for j in range(n_lines):
                if seen[j] or cs[mem[u], j] <= 0 or ccpu[mem[u]] != maxcpu[j]:
                    continue
                seen[j] = True
                parent[j] = u
                if load[j] < cap[j]:
                    found = j
                    break
                for w in range(m):
                    if match[w] == j and not queued[w]:
                        queued[w] = True
                        queue[tail] = w
                        tail += 1
        if found < 0:
            return False
        j = found
        while True:
            u = parent[j]
            prev = match[u]
            match[u] = j
            if u == s:
                break
            j = prev
        load[found] += 1
    return True


@kernel(I1, I, F1, I2, I1, B, I1, F1, I2)
def make_valid(mem: np.ndarray, m: int, ccpu: np.ndarray, cs: np.ndarray, qty: np.ndarray,
               split: bool, order: np.ndarray, maxcpu: np.ndarray, take: np.ndarray) -> bool:
    """Is some cheapest assignment of `mem[:m]` one where every member supplies >= 1 unit?

    Call right after `set_cost` (same buffers). If the greedy leaves a member empty but an
    equally cheap assignment uses everyone (ties in cost_per_unit), rewrite `take` to it.
    """
    n_lines = qty.shape[0]
    all_used = True
    for i in range(m):
        used = False
        for j in range(n_lines):
            if take[i, j] > 0:
                used = True
                break
        if not used:
            all_used = False
            tie = False
            for j in range(n_lines):
                if cs[mem[i], j] > 0 and ccpu[mem[i]] == maxcpu[j]:
                    tie = True
                    break
            if not tie:
                return False
    if all_used:
        return True
    # Members with a unit priced below the marginal price of some line are used in every
    # cheapest assignment; the others each need a unit at a line's marginal price.
    free = np.ones(m, np.bool_)
    for i in range(m):
        for j in range(n_lines):
            if cs[mem[i], j] > 0 and ccpu[mem[i]] < maxcpu[j]:
                free[i] = False
                break
    cap = np.empty(n_lines, np.int64)
    for j in range(n_lines):
        r = 0
        for i in range(m):
            if ccpu[mem[i]] == maxcpu[j]:
                r += take[i, j]
        cap[j] = r if split else 1
    match = np.empty(m, np.int64)
    if not _match(mem, m, free, ccpu, cs, maxcpu, cap, match):
        return False
    for j in range(n_lines):
        n_matched = 0
        for i in range(m):
            if match[i] == j:
                n_matched += 1
        if n_matched == 0:
            continue
        rest = cap[j] if split else qty[j]
        for i in range(m):
            if ccpu[mem[i]] == maxcpu[j]:
                take[i, j] = 0
        for i in range(m):
            if match[i] == j:
                t = 1 if split else qty[j]
                take[i, j] = t
                rest -= t
        for k in range(m):
            i = order[k]
            if rest == 0:
                break
            if ccpu[mem[i]] == maxcpu[j]:
                t = min(rest, cs[mem[i], j] - take[i, j])
                take[i, j] += t
                rest -= t
    return True


@kernel(I2, I1, B1, I, I1, I1)
def can_cover(cs: np.ndarray, need0: np.ndarray, allowed: np.ndarray, budget: int,
              cov_ptr: np.ndarray, cov_idx: np.ndarray) -> bool:
    """Can at most `budget` allowed candidates together supply `need0`?

    Exact depth-first search: branch on the candidates holding the rarest unmet line (each set
    is visited once: siblings already tried are forbidden in later branches).
    """
    nc, n_lines = cs.shape
    rem = need0.copy()
    if np.all(rem <= 0):
        return True
    if budget <= 0:
        return False
    avail = np.zeros(n_lines, np.int64)
    cnt = np.zeros(n_lines, np.int64)
    blocked = np.empty(nc, np.bool_)
    for c in range(nc):
        blocked[c] = not allowed[c]
        if allowed[c]:
            for j in range(n_lines):
                if cs[c, j] > 0:
                    avail[j] += cs[c, j]
                    cnt[j] += 1
    fstack = np.empty(nc, np.int64)
    fsp = 0
    f_line = np.empty(budget + 1, np.int64)
    f_pos = np.empty(budget + 1, np.int64)
    f_last = np.empty(budget + 1, np.int64)
    f_base = np.empty(budget + 1, np.int64)
    d = 0
    init = True
    while True:
        if init:
            init = False
            f_base[d] = fsp
            f_last[d] = -1
            jstar, best, dead = -1, nc + 1, False
            for j in range(n_lines):
                if rem[j] > 0:
                    if avail[j] < rem[j]:
                        dead = True
                        break
                    if cnt[j] < best:
                        best, jstar = cnt[j], j
            if jstar < 0 and not dead:
                return True
            f_line[d] = jstar
            f_pos[d] = cov_ptr[jstar] if jstar >= 0 else 0
            if dead or d == budget:
                f_pos[d] = cov_ptr[jstar + 1] if jstar >= 0 else 0
        c = f_last[d]
        if c >= 0:
            blocked[c] = True
            fstack[fsp] = c
            fsp += 1
            for j in range(n_lines):
                if cs[c, j] > 0:
                    avail[j] -= cs[c, j]
                    cnt[j] -= 1
            f_last[d] = -1
            for j in range(n_lines):
                if rem[j] > 0 and avail[j] < rem[j]:
                    f_pos[d] = cov_ptr[f_line[d] + 1]
                    break
        nxt = -1
        jstar = f_line[d]
        while jstar >= 0 and f_pos[d] < cov_ptr[jstar + 1]:
            c = cov_idx[f_pos[d]]
            f_pos[d] += 1
            if blocked[c]:
                continue
            if d + 1 == budget:
                ok = True
                for j in range(n_lines):
                    if rem[j] > cs[c, j]:
                        ok = False
                        break
                if ok:
                    return True
                continue
            nxt = c
            break
        if nxt >= 0:
            f_last[d] = nxt
            blocked[nxt] = True
            for j in range(n_lines):
                rem[j] -= cs[nxt, j]
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
            return False
        d -= 1
        c = f_last[d]
        blocked[c] = False
        for j in range(n_lines):
            rem[j] += cs[c, j]
            if cs[c, j] > 0:
                avail[j] += cs[c, j]
                cnt[j] += 1
