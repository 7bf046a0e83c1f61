"""A Wing & Gong linearizability checker (with Lowe's memo of visited configurations).

A history is a list of operations, each with the client's time of call and of return, what it
asked and what it was told. It is linearizable when every operation can be given one instant
between its call and its return such that, taken in that order, the operations are a legal run
of a sequential specification. Linearizability is local, so the history of each object (here one
SKU-location) is checked on its own.

The search: take any operation that is minimal (no other pending operation returned before it
was called), apply it to the specification's state if the specification allows its result, and
go on; backtrack when stuck. A configuration (set of operations done, state) already seen is not
searched twice, which keeps realistic histories tractable.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

State = Hashable
Apply = Callable[[State, "Op"], "State | None"]  # the next state, or None: not allowed


@dataclass(frozen=True, slots=True)
class Op:
    call: float
    ret: float
    kind: str
    arg: Any
    result: Any
    client: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    ops: int
    configurations: int
    stuck_at: Op | None = None  # an operation no linearization could place (when not ok)


def check(history: Sequence[Op], init: State, apply: Apply, *, budget: int = 5_000_000) -> Verdict:
    ops = sorted(history, key=lambda o: (o.call, o.ret))
    n = len(ops)
    if n == 0:
        return Verdict(True, 0, 0)
    calls = [o.call for o in ops]
    rets = [o.ret for o in ops]
    full = (1 << n) - 1
    seen: set[tuple[int, State]] = set()
    stack: list[tuple[int, State]] = [(0, init)]
    deepest = 0
    while stack:
        mask, state = stack.pop()
        if mask == full:
            return Verdict(True, n, len(seen))
        if (mask, state) in seen:
            continue
        seen.add((mask, state))
        if len(seen) > budget:
            raise RuntimeError(f"search budget of {budget} configurations exhausted")
        first = (~mask & (mask + 1)).bit_length() - 1
        deepest = max(deepest, first)
        pending: list[int] = []
        min_ret = float("inf")
        j = first
        while j < n and calls[j] < min_ret:
            if not (mask >> j) & 1:
                pending.append(j)
                if rets[j] < min_ret:
                    min_ret = rets[j]
            j += 1
        for j in reversed(pending):
            if calls[j] >= min_ret:
                continue
            nxt = apply(state, ops[j])
            if nxt is not None:
                stack.append((mask | (1 << j), nxt))
    return Verdict(False, n, len(seen), ops[deepest] if deepest < n else None)


# ---- the specification of one SKU-location (DESIGN §3, no safety stock, a remote channel) ----------
def stock_spec(state: State, op: Op) -> State | None:
    """state = (on_hand, reserved). Results: reserve/release/commit/adjust "OK" or "SHORT";
    read (on_hand, reserved)."""
    on_hand, reserved = state  # type: ignore[misc]
    if op.kind == "reserve":
        fits = on_hand - reserved >= op.arg
        if op.result == "OK":
            return (on_hand, reserved + op.arg) if fits else None
        return state if not fits else None
    if op.kind == "release":
        return (on_hand, reserved - op.arg) if reserved >= op.arg else None
    if op.kind == "commit":
        return (on_hand - op.arg, reserved - op.arg) if reserved >= op.arg else None
    if op.kind == "adjust":
        return (on_hand + op.arg, reserved)
    if op.kind == "read":
        return state if op.result == (on_hand, reserved) else None
    raise ValueError(op.kind)
