"""A pure in-memory model of DESIGN §3: the quantities, the rules and the lifecycle, nothing else.

Every operation returns the status code the service must answer ("OK", "NOT_FOUND",
"FAILED_PRECONDITION", "ABORTED") and changes the model only when it is "OK".
"""

from __future__ import annotations

from dataclasses import dataclass, field

Key = tuple[str, str]  # (sku, location)


@dataclass
class Row:
    on_hand: int = 0
    reserved: int = 0
    safety: int | None = None  # None: the location's default
    version: int = 0


@dataclass
class Res:
    lines: dict[Key, int]
    status: str = "ACTIVE"


@dataclass
class Model:
    default_safety: dict[str, int] = field(default_factory=dict)  # location -> default
    stock: dict[Key, Row] = field(default_factory=dict)
    reservations: dict[str, Res] = field(default_factory=dict)

    # ---- reads ---------------------------------------------------------------------------------
    def safety(self, key: Key) -> int:
        row = self.stock[key]
        return self.default_safety[key[1]] if row.safety is None else row.safety

    def available(self, key: Key, pos: bool) -> int:
        row = self.stock[key]
        return max(0, row.on_hand - row.reserved - (0 if pos else self.safety(key)))

    def free(self, key: Key) -> int:
        """Units that may leave the shelf other than by sale: not reserved ones."""
        row = self.stock[key]
        return row.on_hand - row.reserved

    def _row(self, key: Key) -> Row:
        """Rows a write creates when missing (its location exists): on_hand 0, version 0."""
        return self.stock.setdefault(key, Row())

    # ---- reservations --------------------------------------------------------------------------
    def reserve(self, res_id: str, lines: dict[Key, int], pos: bool) -> str:
        if any(k not in self.stock for k in lines):
            return "NOT_FOUND"
        if any(self.available(k, pos) < q for k, q in lines.items()):
            return "FAILED_PRECONDITION"
        for k, q in lines.items():
            self.stock[k].reserved += q
        self.reservations[res_id] = Res(dict(lines))
        return "OK"

    def both_wrong(self, lines: dict[Key, int], pos: bool) -> set[str]:
        """Both a missing row and a short line: the service may name either first."""
        missing = [k for k in lines if k not in self.stock]
        short = [k for k, q in lines.items() if k in self.stock and self.available(k, pos) < q]
        return {"NOT_FOUND", "FAILED_PRECONDITION"} if missing and short else set()

    def active(self, res_id: str) -> bool:
        return self.reservations[res_id].status == "ACTIVE"

    def extend(self, res_id: str) -> str:
        return "OK" if self.active(res_id) else "FAILED_PRECONDITION"

    def release(self, res_id: str, lines: dict[Key, int]) -> str:
        res = self.reservations[res_id]
        if res.status != "ACTIVE":
            return "FAILED_PRECONDITION"
        if any(k not in res.lines for k in lines):
            return "NOT_FOUND"
        if any(q > res.lines[k] for k, q in lines.items()):
            return "FAILED_PRECONDITION"
        give = lines or {k: q for k, q in res.lines.items() if q > 0}
        for k, q in give.items():
            self.stock[k].reserved -= q
            res.lines[k] -= q
        if not lines or not any(res.lines.values()):
            res.status = "RELEASED"
        return "OK"

    def commit(self, res_id: str) -> str:
        res = self.reservations[res_id]
        if res.status != "ACTIVE":
            return "FAILED_PRECONDITION"
        for k, q in res.lines.items():
            if q:
                row = self.stock[k]
                row.reserved -= q
                row.on_hand -= q
                row.version += 1
        res.status = "COMMITTED"
        return "OK"

    def expire(self, res_id: str) -> None:
        res = self.reservations[res_id]
        assert res.status == "ACTIVE"
        for k, q in res.lines.items():
            self.stock[k].reserved -= q
        res.status = "EXPIRED"

    # ---- stock ---------------------------------------------------------------------------------
    def sell(self, loc: str, items: dict[str, int]) -> str:
        keys = {(s, loc): q for s, q in items.items()}
        if any(k not in self.stock for k in keys):
            return "NOT_FOUND"
        if any(self.available(k, True) < q for k, q in keys.items()):
            return "FAILED_PRECONDITION"
        for k, q in keys.items():
            self.stock[k].on_hand -= q
            self.stock[k].version += 1
        return "OK"

    def return_items(self, loc: str, items: dict[str, int]) -> str:
        for s, q in items.items():
            row = self._row((s, loc))
            row.on_hand += q
            row.version += 1
        return "OK"

    def adjust(self, key: Key, delta: int) -> str:
        existed = key in self.stock
        row = self._row(key)
        if delta < 0 and self.free(key) < -delta:
            if not existed:
                del self.stock[key]  # the transaction that created it rolled back
            return "FAILED_PRECONDITION"
        row.on_hand += delta
        row.version += 1
        return "OK"

    def count(self, key: Key, on_hand: int, expected_version: int | None) -> str:
        existed = key in self.stock
        row = self._row(key)
        verdict = "OK"
        if expected_version is not None and row.version != expected_version:
            verdict = "ABORTED"
        elif on_hand < row.reserved:
            verdict = "FAILED_PRECONDITION"
        if verdict != "OK":
            if not existed:
                del self.stock[key]
            return verdict
        if on_hand != row.on_hand:
            row.on_hand = on_hand
            row.version += 1
        return "OK"

    def transfer(self, sku: str, src: str, dst: str, qty: int) -> str:
        if (sku, src) not in self.stock:
            return "NOT_FOUND"
        if self.free((sku, src)) < qty:
            return "FAILED_PRECONDITION"
        a, b = self.stock[(sku, src)], self._row((sku, dst))
        a.on_hand -= qty
        a.version += 1
        b.on_hand += qty
        b.version += 1
        return "OK"

    def set_safety(self, key: Key, safety: int | None) -> str:
        row = self._row(key)
        row.safety = safety
        row.version += 1
        return "OK"
